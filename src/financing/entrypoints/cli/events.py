"""`financing events AGGREGATE_ID`: an aggregate's stream, and its row in the read models.

The stream is read from the event store (version, time, name, body, and the
correlation each event belongs to, for `financing trace`); the row from the
query database, so the two can be compared at a glance. When the query
database cannot be reached the stream is still shown.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from typing import Any
from uuid import UUID

from financing.adapters.postgres.connection import COMMAND_DATABASE, QUERY_DATABASE
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_model_rows import read_model_row
from financing.application.errors import Refused, Unavailable
from financing.application.moments import moment
from financing.application.ports import StoredEvent
from financing.config import Settings
from financing.domain.money import canonical
from financing.entrypoints.cli.console import database, table, write_lines


async def run_events(settings: Settings, aggregate_id: UUID) -> int:
    """Print the stream and the row; exit code 1 when neither exists, or when the read
    models could not be reached (the stream is printed all the same)."""
    async with database(settings.command_db, COMMAND_DATABASE, "events", schema="commands") as pool:
        stream = await PostgresEventStore(pool).stream(aggregate_id)
    aggregate_type = stream[0].aggregate_type if stream else None
    row, reached = await _row(settings, aggregate_id, aggregate_type)
    if not stream and row is None:
        models = "no row in the read models" if reached else "the read models were not read"
        print(
            f"financing events: nothing is known of aggregate {aggregate_id}:"
            f" no event in the event store, {models}",
            file=sys.stderr,
        )
        return 1
    write_lines([*_stream_lines(aggregate_id, stream), "", *_row_lines(row)])
    return 0 if reached else 1


async def _row(
    settings: Settings, aggregate_id: UUID, aggregate_type: str | None
) -> tuple[tuple[str, dict[str, Any]] | None, bool]:
    """The aggregate's read-model row, and whether the read models could be reached."""
    try:
        async with database(settings.query_db, QUERY_DATABASE, "events", schema="queries") as pool:
            return await read_model_row(pool, aggregate_id, aggregate_type), True
    except (Unavailable, Refused) as error:
        print(f"financing events: read model not shown: {error}", file=sys.stderr)
        return None, False


def _stream_lines(aggregate_id: UUID, stream: list[StoredEvent]) -> list[str]:
    if not stream:
        return [f"aggregate {aggregate_id}: no event in the event store"]
    heading = f"{stream[0].aggregate_type} {aggregate_id}: {len(stream)} event(s)"
    rows = [
        (
            f"v{event.version}",
            moment(event.recorded_at),
            event.name,
            event.correlation_id or "-",
            event.body,
        )
        for event in stream
    ]
    return [heading, *table(("VERSION", "RECORDED AT", "NAME", "CORRELATION", "BODY"), rows)]


def _row_lines(row: tuple[str, dict[str, Any]] | None) -> list[str]:
    if row is None:
        return ["read model: no row (not projected yet, or the query database is unreachable)"]
    name, columns = row
    if not columns:
        return [f"read model ({name}): listed"]
    width = max(len(column) for column in columns)
    return [
        f"read model ({name}):",
        *(f"  {c:<{width}}  {_value(v)}" for c, v in columns.items()),
    ]


def _value(value: Any) -> str:
    """A column's value; an amount in plain notation, as the events' bodies show it (the
    driver reads 10000 as Decimal('1E+4'))."""
    return canonical(value) if isinstance(value, Decimal) else str(value)
