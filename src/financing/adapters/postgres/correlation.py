"""What the event store knows of a correlation: its events, and what became of its messages.

Both are read in one snapshot, so a handler committing meanwhile shows
entirely (its record and its events) or not at all.
"""

from __future__ import annotations

import asyncpg

from financing.adapters.postgres.connection import COMMAND_DATABASE, acquired
from financing.adapters.postgres.event_store import EVENT_COLUMNS, stored_event
from financing.application.errors import PoisonMessage
from financing.application.pipeline import OutcomeKind
from financing.application.ports import REFUSED, StoredEvent
from financing.application.trace import Fate, Handling

_EVENTS = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE correlation_id = $1"
    " ORDER BY transaction_id, position"
)
_PROCESSED = (
    "SELECT consumer, message_id, name, outcome, detail, events, processed_at"
    " FROM processed_messages WHERE correlation_id = $1 ORDER BY processed_at"
)
# The outcome column of processed_messages, as the pipeline records it.
_FATES = {
    OutcomeKind.PROCESSED.value: Fate.APPLIED,
    OutcomeKind.UNCHANGED.value: Fate.UNCHANGED,
    REFUSED: Fate.REFUSED,
}


async def correlated(
    pool: asyncpg.Pool, correlation_id: str
) -> tuple[list[StoredEvent], list[Handling]]:
    """The events of the correlation in commit order, and the processed messages' records;
    none for a correlation id the database's encoding cannot hold, which nothing it holds
    carries (a message carrying it was poison: its dead letter may)."""
    try:
        async with (
            acquired(pool, COMMAND_DATABASE) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            events = await conn.fetch(_EVENTS, correlation_id)
            processed = await conn.fetch(_PROCESSED, correlation_id)
    except PoisonMessage:
        return [], []
    return [stored_event(row) for row in events], [_handling(row) for row in processed]


def _handling(row: asyncpg.Record) -> Handling:
    return Handling(
        message_id=row["message_id"],
        message_name=row["name"] or "",
        fate=_FATES.get(row["outcome"], Fate.APPLIED),
        by=row["consumer"],
        at=row["processed_at"],
        detail=row["detail"] or "",
        events=row["events"] or 0,
    )
