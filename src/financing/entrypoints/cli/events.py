"""`financing events AGGREGATE_ID [--from-version N] [--last N]`: an aggregate's stream, or
a window of it, and its row in the read models.

The stream is read from the event store (version, time, name, body, and the
correlation each event belongs to, for `financing trace`); the row from the
query database, so the two can be compared at a glance. When the query
database cannot be reached the stream is still shown. A long stream's end is read
without reading it whole (`--last`), as an event store's readers read a stream from a
revision, backwards.
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


async def run_events(
    settings: Settings, aggregate_id: UUID, *, from_version: int = 1, last: int | None = None
) -> int:
    """Print the stream (its events from `from_version` on, the `last` of them) and the
    row; exit code 1 when neither exists, or when the read models could not be reached
    (the stream is printed all the same)."""
    async with database(settings.command_db, COMMAND_DATABASE, "events", schema="commands") as pool:
        store = PostgresEventStore(pool)
        stream = await store.stream(aggregate_id, from_version=from_version, last=last)
        # A window past the stream's end still names the aggregate, by its last event.
        known = stream or (await store.stream(aggregate_id, last=1) if from_version > 1 else [])
    aggregate_type = known[0].aggregate_type if known else None
    row, reached = await _row(settings, aggregate_id, aggregate_type)
    if not known and row is None:
        models = "no row in the read models" if reached else "the read models were not read"
        print(
            f"financing events: nothing is known of aggregate {aggregate_id}:"
            f" no event in the event store, {models}",
            file=sys.stderr,
        )
        return 1
    windowed = from_version > 1 or last is not None
    lines = (
        _window_lines(aggregate_id, stream, known)
        if windowed
        else _stream_lines(aggregate_id, stream)
    )
    write_lines([*lines, "", *_row_lines(row, reached)])
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


def _window_lines(
    aggregate_id: UUID, stream: list[StoredEvent], known: list[StoredEvent]
) -> list[str]:
    """A window of the stream: its versions, and how many events the stream holds (its
    versions run from 1 without a gap: the last one's)."""
    if not known:
        return [f"aggregate {aggregate_id}: no event in the event store"]
    kind, latest = known[-1].aggregate_type, known[-1].version
    if not stream:
        return [f"{kind} {aggregate_id}: no event in the window, of its {latest} event(s)"]
    first, end = stream[0].version, stream[-1].version
    heading = f"{kind} {aggregate_id}: v{first} to v{end}, {len(stream)} of its {latest} event(s)"
    return [heading, *_event_lines(stream)]


def _stream_lines(aggregate_id: UUID, stream: list[StoredEvent]) -> list[str]:
    if not stream:
        return [f"aggregate {aggregate_id}: no event in the event store"]
    heading = f"{stream[0].aggregate_type} {aggregate_id}: {len(stream)} event(s)"
    return [heading, *_event_lines(stream)]


def _event_lines(stream: list[StoredEvent]) -> list[str]:
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
    return table(("VERSION", "RECORDED AT", "NAME", "CORRELATION", "BODY"), rows)


def _row_lines(row: tuple[str, dict[str, Any]] | None, reached: bool) -> list[str]:
    if not reached:
        return ["read model: not read (the query database did not answer it: why is on stderr)"]
    if row is None:
        return [
            "read model: no row (its events not projected yet, or the row lost since:"
            " `financing check` compares the read models with a replay)"
        ]
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
