"""The event store on PostgreSQL: one stream per aggregate, appended in units of work.

Commit order. Each event row carries the id of the transaction that inserted
it (`transaction_id`, assigned by PostgreSQL at the transaction's first
write). Readers order events by `(transaction_id, position)`. That order puts
causes before effects only if a transaction's id is greater than the ids of
all transactions whose effects it read, which holds when every read happens
before the first write: a transaction that committed before we read it had
its id already, and ids are handed out in increasing order. So a unit of work
refuses a read after a write (`ReadAfterWrite`), and performs no write of its
own before the first `save`/`record`.

Conflicts. UNIQUE(aggregate_id, version) on events and the primary key of
processed_messages make two transactions that append the same version, or
record the same message, unable to both commit: the loser gets
`ConcurrencyConflict`, its whole unit of work is rolled back, and its retry
reloads (or finds the message processed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import (
    COMMAND_DATABASE,
    RACE_ERRORS,
    Connection,
    acquired,
)
from financing.application import codec
from financing.application.errors import ConcurrencyConflict, ReadAfterWrite
from financing.application.ports import PROCESSED, A, Cause, Processed, StoredEvent
from financing.domain.aggregates import Aggregate
from financing.domain.events import DomainEvent

# Notified inside every transaction that appends events; PostgreSQL delivers
# it at commit, so a listener never hears of events it cannot read yet.
NOTIFY_CHANNEL = "financing_events"

EVENT_COLUMNS = (
    "position, transaction_id, aggregate_type, aggregate_id, version, name, body,"
    " correlation_id, causation_id, recorded_at"
)


def stored_event(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(
        position=row["position"],
        aggregate_type=row["aggregate_type"],
        aggregate_id=UUID(int=row["aggregate_id"].int),
        version=row["version"],
        name=row["name"],
        body=row["body"].encode(),
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        recorded_at=row["recorded_at"],
    )


# Events numbered from $3 on, in the order of the arrays.
_APPEND = (
    "WITH appended AS ("
    " INSERT INTO events (aggregate_type, aggregate_id, version, name, body,"
    " correlation_id, causation_id)"
    " SELECT $1, $2, $3 + ordinality - 1, name, body::json, $6, $7"
    " FROM unnest($4::text[], $5::text[]) WITH ORDINALITY AS new (name, body, ordinality)"
    " RETURNING 1)"
    " SELECT pg_notify($8, '') FROM (SELECT 1 FROM appended LIMIT 1) AS any_appended"
)

# A snapshot row has no name; event rows follow it in version order.
_LOAD = (
    "WITH snapshot AS (SELECT version, state FROM snapshots"
    " WHERE aggregate_id = $1 AND aggregate_type = $2)"
    " SELECT version, NULL AS name, state::text AS body, 0 AS part FROM snapshot"
    " UNION ALL"
    " SELECT version, name, body::text, 1 FROM events"
    " WHERE aggregate_id = $1 AND version > coalesce((SELECT version FROM snapshot), 0)"
    " ORDER BY part, version"
)


def _event(name: str, body: str, aggregate_id: UUID) -> DomainEvent:
    event = codec.decode(name, body.encode(), str(aggregate_id))
    assert isinstance(event, DomainEvent)  # the event store holds domain events only
    return event


@contextmanager
def _conflicts(what: str) -> Iterator[None]:
    try:
        yield
    except RACE_ERRORS as exc:
        raise ConcurrencyConflict(f"{what}: {exc}") from exc


class PostgresUnitOfWork:
    """One transaction: reads (`seen`, `load`) first, then writes (`save`, `record`)."""

    def __init__(self, conn: Connection, snapshot_interval: int, cause: Cause | None) -> None:
        self._conn = conn
        self._snapshot_interval = snapshot_interval
        self._cause = cause
        self._wrote = False
        # Aggregates saved so far, by identity, with how many of their changes are stored.
        self._saved: dict[int, tuple[Aggregate, int]] = {}

    def _reading(self, what: str) -> None:
        if self._wrote:
            raise ReadAfterWrite(f"{what} after a write in the same unit of work")

    async def seen(self, consumer: str, message_id: str) -> bool:
        self._reading("seen")
        found: bool = await self._conn.fetchval(
            "SELECT EXISTS (SELECT FROM processed_messages"
            " WHERE consumer = $1 AND message_id = $2)",
            consumer,
            message_id,
        )
        return found

    async def load(self, cls: type[A], aggregate_id: UUID) -> A:
        self._reading("load")
        # One round trip: the snapshot (if any) first, then only the events it does not
        # already include.
        rows = await self._conn.fetch(_LOAD, aggregate_id, cls.aggregate_type)
        aggregate = cls(aggregate_id)
        for row in rows:
            if row["name"] is None:
                aggregate = cls.restore(aggregate_id, row["version"], json.loads(row["body"]))
            else:
                aggregate.apply(_event(row["name"], row["body"], aggregate_id))
        return aggregate

    async def save(self, aggregate: Aggregate) -> None:
        _, stored = self._saved.get(id(aggregate), (aggregate, 0))
        new = aggregate.changes[stored:]
        if not new:
            return
        self._wrote = True
        before = aggregate.stored_version + stored
        cause = self._cause
        with _conflicts(f"{aggregate.aggregate_type} {aggregate.id} moved past version {before}"):
            # One round trip: the new events, and the NOTIFY delivered at commit (several
            # in one transaction reach listeners as one).
            await self._conn.execute(
                _APPEND,
                aggregate.aggregate_type,
                aggregate.id,
                before + 1,
                [codec.name_of(event) for event in new],
                [codec.encode(event).decode() for event in new],
                cause.correlation_id if cause else None,
                cause.causation_id if cause else None,
                NOTIFY_CHANNEL,
            )
        self._saved[id(aggregate)] = (aggregate, stored + len(new))
        after = before + len(new)
        if after // self._snapshot_interval > before // self._snapshot_interval:
            await self._snapshot(aggregate)

    async def _snapshot(self, aggregate: Aggregate) -> None:
        with _conflicts(f"snapshot of {aggregate.aggregate_type} {aggregate.id}"):
            await self._conn.execute(
                "INSERT INTO snapshots (aggregate_id, aggregate_type, version, state)"
                " VALUES ($1, $2, $3, $4::jsonb)"
                " ON CONFLICT (aggregate_id) DO UPDATE"
                " SET aggregate_type = EXCLUDED.aggregate_type, version = EXCLUDED.version,"
                " state = EXCLUDED.state, taken_at = now()"
                " WHERE snapshots.version < EXCLUDED.version",
                aggregate.id,
                aggregate.aggregate_type,
                aggregate.version,
                json.dumps(aggregate.snapshot()),
            )

    async def record(self, consumer: str, message_id: str, what: Processed = PROCESSED) -> None:
        self._wrote = True
        with _conflicts(f"message {message_id} already processed by {consumer}"):
            await self._conn.execute(
                "INSERT INTO processed_messages"
                " (consumer, message_id, name, correlation_id, outcome, detail, events)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                consumer,
                message_id,
                what.name or None,
                self._cause.correlation_id if self._cause else None,
                what.outcome,
                what.detail or None,
                what.events,
            )

    def committed(self) -> None:
        """The saved aggregates' changes are now stored: they are changes no more."""
        for aggregate, _ in self._saved.values():
            aggregate.changes.clear()


class PostgresEventStore:
    """The event store; PostgreSQL's errors leave it as Unavailable or ConcurrencyConflict."""

    def __init__(self, pool: asyncpg.Pool, *, snapshot_interval: int = 100) -> None:
        if snapshot_interval < 1:
            raise ValueError(f"snapshot_interval must be >= 1, got {snapshot_interval}")
        self._pool = pool
        self._snapshot_interval = snapshot_interval

    @asynccontextmanager
    async def unit_of_work(self, cause: Cause | None = None) -> AsyncIterator[PostgresUnitOfWork]:
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            uow = PostgresUnitOfWork(conn, self._snapshot_interval, cause)
            # One snapshot for every read: a copy of a message that found it new
            # must not then load what another copy committed meanwhile (it would
            # break a rule, releasing funds twice, instead of conflicting).
            async with conn.transaction(isolation="repeatable_read"):
                yield uow
            uow.committed()

    async def stream(self, aggregate_id: UUID) -> list[StoredEvent]:
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            rows = await conn.fetch(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 ORDER BY version",
                aggregate_id,
            )
        return [stored_event(row) for row in rows]

    async def read_all(self, batch_size: int = 500) -> AsyncIterator[StoredEvent]:
        """Every event committed when the first batch is read, in commit order.

        One read-only REPEATABLE READ transaction gives every batch the same
        snapshot, so an event committed meanwhile with a smaller order key
        cannot slip in behind the pagination key.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        after: tuple[Any, int] = (0, 0)
        async with (
            acquired(self._pool, COMMAND_DATABASE) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            while True:
                rows = await conn.fetch(
                    f"SELECT {EVENT_COLUMNS} FROM events"
                    " WHERE (transaction_id, position) > ($1::xid8, $2)"
                    " ORDER BY transaction_id, position LIMIT $3",
                    *after,
                    batch_size,
                )
                for row in rows:
                    yield stored_event(row)
                if len(rows) < batch_size:
                    return
                after = (rows[-1]["transaction_id"], rows[-1]["position"])
