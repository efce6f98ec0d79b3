"""Which event store the read models project: a query database holds the read models of
one event store.

The event store names itself (commands schema 5: at random when made empty, after its
first event when it held events already; carried with its data by a dump or a standby).
The query database records the store whose read models it holds (queries schema 5): the
first process that opens both databases records it, and a rebuild the store it replayed
(told to `adopt` read models of another store, refused otherwise). A process of another
deployment, pointed at that query database by mistake, is refused at start-up: two
deployments that shared one query database mixed their read models silently, and a
rebuild by one dropped the other's rows.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import (
    COMMAND_DATABASE,
    QUERY_DATABASE,
    Connection,
    acquired,
)
from financing.application.errors import AwaitingOperator, Refused

# Seconds a projector takes the store it found recorded for granted (`RecordedStore`).
RECHECK = 10.0

REMEDY = (
    "give each deployment a query database of its own; if this event store took that"
    " one's place (a store lost and started anew), `financing projections rebuild"
    " --adopt` makes the read models this store's"
)


@dataclass(frozen=True)
class Projected:
    """The event store a query database's read models are of, and since when."""

    store: UUID
    since: datetime


class ProjectsAnotherStore(Refused):
    """The query database holds the read models of another event store."""

    def __init__(self, projected: Projected, store: UUID) -> None:
        super().__init__(
            QUERY_DATABASE,
            f"it holds the read models of event store {projected.store} (since"
            f" {projected.since.isoformat(timespec='seconds')}), not of this deployment's"
            f" event store {store}: {REMEDY}",
        )
        self.projected = projected
        self.store = store


class Unnamed(Refused):
    """The event store has no name: `event_store_identity` emptied, or restored without
    its row."""

    def __init__(self) -> None:
        super().__init__(
            COMMAND_DATABASE,
            "its event store has no name (the table event_store_identity is empty:"
            " restored without its row?): restore the table with the rest of the store",
        )


async def store_of(pool: asyncpg.Pool) -> UUID:
    """The event store's id (commands schema 5); Unnamed when it has none."""
    async with acquired(pool, COMMAND_DATABASE) as conn:
        found: UUID | None = await conn.fetchval("SELECT id FROM event_store_identity")
    if found is None:
        raise Unnamed()
    return found


async def projected(conn: Connection) -> Projected | None:
    """The event store the query database's read models are of; None until recorded."""
    row = await conn.fetchrow("SELECT id, since FROM projected_event_store")
    return None if row is None else Projected(row["id"], row["since"])


async def refuse_another(conn: Connection, store: UUID) -> None:
    """ProjectsAnotherStore if the read models are recorded as another store's than
    `store`."""
    found = await projected(conn)
    if found is not None and found.store != store:
        raise ProjectsAnotherStore(found, store)


async def claim(query_pool: asyncpg.Pool, store: UUID) -> None:
    """Record `store` as the one the read models are of, unless one is recorded already;
    ProjectsAnotherStore when that is another. A database that takes no writes (a replica
    for the Queries API) is only read."""
    async with acquired(query_pool, QUERY_DATABASE) as conn:
        with contextlib.suppress(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute(
                "INSERT INTO projected_event_store (id) VALUES ($1)"
                " ON CONFLICT (singleton) DO NOTHING",
                store,
            )
        await refuse_another(conn, store)


async def record_store(conn: Connection, store: UUID) -> None:
    """Record `store` as the one the read models are of, in the caller's transaction (a
    rebuild's swap)."""
    await conn.execute(
        "INSERT INTO projected_event_store (id) VALUES ($1)"
        " ON CONFLICT (singleton) DO UPDATE SET id = excluded.id, since = now()",
        store,
    )


class HoldsAnotherStore(AwaitingOperator):
    """The projector receives the events of an event store whose read models the query
    database does not hold: another deployment's projector pointed at it (a process that
    opens the query database alone, which start-up cannot tell). An outage: the events
    wait in their queue, nothing is projected, until an operator mends it."""

    def __init__(self, refused: ProjectsAnotherStore) -> None:
        super().__init__(
            QUERY_DATABASE,
            f"{refused.detail}; the projector's events, relayed from event store"
            f" {refused.store}, wait in their queue",
        )


class RecordedStore:
    """The query database's record of the event store whose read models it holds, as
    the projector asks it of each event relayed with its store's name: known once read,
    recorded (claimed) where none is yet, as a process opening both databases does at
    start-up; so a split deployment records its store too."""

    def __init__(self, query_pool: asyncpg.Pool) -> None:
        self._pool = query_pool
        # The store found recorded, and when (time.monotonic()): asked again RECHECK
        # seconds later, so that a rebuild that adopted the read models for another
        # store stops this projector's writes into them.
        self._known: tuple[UUID, float] | None = None

    async def require(self, store: str) -> None:
        try:
            named = UUID(store)
        except ValueError:
            return  # not a name this service's relayer writes: the event is judged as any
        now = time.monotonic()
        if self._known is not None and self._known[0] == named and now - self._known[1] < RECHECK:
            return
        try:
            await claim(self._pool, named)
        except ProjectsAnotherStore as refused:
            raise HoldsAnotherStore(refused) from None
        self._known = (named, now)
