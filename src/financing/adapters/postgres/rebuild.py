"""Rebuilding the read models from the event store (`financing projections rebuild`).

The whole event store is replayed, in the order the relayer publishes it (up
to the relaying horizon: `PostgresEventStore.read_all`), into a fresh schema,
with each event recorded as processed under the message id the relayer
publishes it with; then the fresh schema replaces the live one in one
transaction. Until
that commit, queries read the old read models; after it, the new ones: never
a half-built state. The replaced ones are dropped afterwards, once their last
readers are done (`_drop_retired`).

The live projector may keep running meanwhile. The swap first locks the live
`processed_messages` against writes (reads go on), so the projector pauses;
if it projected anything the replay did not cover, the replay goes on from the
last event it read (events already applied are skipped by message id) before
the swap. The events of another relayer (a reference relayer's), which are in
no event store of this service, are replayed after the store's, in the order the
projector kept them (`foreign_events`): the rows they made stay.

A rebuild holds a lock named after its schema for as long as it builds it, so that
the next one tells the schema of a rebuild that was killed (its lock free) from one
being built, and drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Set as AbstractSet
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
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.projected_store import record_store, refuse_another, store_of
from financing.adapters.postgres.read_models import (
    DEFAULT_SCHEMA,
    PostgresReadModels,
    create_tables,
    quoted_schema,
)
from financing.adapters.postgres.schema import migrate, require_tables
from financing.application.ports import EventStore, StoredEvent
from financing.application.read_models import ReadModelStore, apply_foreign, kept_foreign
from financing.domain.events import DomainEvent
from financing.logging import get_logger

log = get_logger(__name__)

# Events read and applied together. Each batch costs a transaction and a statement
# per table whatever its size; at 2,000 a replay ran 7-10% faster than at 500, with
# no gain beyond (5,000), and a batch's memory is a few megabytes.
BATCH_SIZE = 2000
# Events decoded between two turns given to the batch being applied (`replay`).
TURN = 64
# Seconds the drop of the read models a rebuild replaced waits for their last readers.
RETIRED_DROP_WAIT = 2.0
# Attempts at dropping the read models a swap retired, when each ends in a deadlock.
DROP_ATTEMPTS = 3


@dataclass(frozen=True)
class RebuildReport:
    events: int  # events replayed from the event store
    investors: int
    invoices: int  # listed invoices
    issuers: int
    foreign: int = 0  # events of another relayer replayed after them


async def rebuild(
    event_store_pool: asyncpg.Pool,
    query_pool: asyncpg.Pool,
    *,
    batch_size: int = BATCH_SIZE,
    adopt: bool = False,
) -> RebuildReport:
    """Replace the read models with a fresh projection of the whole event store.

    Read models of another event store (`projected_store`) are replaced only when told to
    `adopt` them (this store took the place of that one): rebuilt by mistake, another
    deployment's read models were dropped and made this one's."""
    async with acquired(query_pool, QUERY_DATABASE) as conn:
        gone = await conn.fetchval("SELECT to_regnamespace($1) IS NULL", DEFAULT_SCHEMA)
    # Made from nothing, the live read models are dropped in the migration's transaction.
    await migrate(query_pool, "queries", if_new=LIVE_DROPPED)
    if gone:
        await _drop_made_empty(query_pool)
    # The read models' own tables may be gone (their schema dropped): the rebuild makes
    # them. Those outside it it does not (`require_tables`).
    await require_tables(query_pool, "queries", rebuilding=True)
    fresh = f"{DEFAULT_SCHEMA}_rebuild_{uuid.uuid4().hex[:12]}"
    store = PostgresEventStore(event_store_pool)
    store_id = await store_of(event_store_pool)
    if not adopt:
        async with acquired(query_pool, QUERY_DATABASE) as conn:
            await refuse_another(conn, store_id)
    # The live read models keep the events of another relayer; the fresh ones replay them.
    target = PostgresReadModels(query_pool, fresh, journal=False)
    async with acquired(query_pool, QUERY_DATABASE) as holder:
        await holder.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", fresh)
        try:
            await _discard_abandoned(holder)
            events, foreign = await _rebuilt(store, store_id, target, query_pool, batch_size, fresh)
        finally:
            with contextlib.suppress(Exception):  # gone with its session otherwise
                await holder.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", fresh)
    investors, invoices, issuers = await PostgresReadModels(query_pool).counts()
    report = RebuildReport(events, investors, invoices, issuers, foreign)
    log.info("read models rebuilt", **vars(report))
    return report


async def _rebuilt(
    store: PostgresEventStore,
    store_id: UUID,
    target: PostgresReadModels,
    query_pool: asyncpg.Pool,
    batch_size: int,
    fresh: str,
) -> tuple[int, int]:
    """Build `fresh`, then swap it for the live schema, the read models recorded as
    `store`'s (`projected_store.record_store`); the events replayed, of the store and of
    another relayer."""
    suffix = fresh.rpartition("_")[2]
    retired = f"{DEFAULT_SCHEMA}_retired_{suffix}"
    live_sql, fresh_sql, retired_sql = (quoted_schema(s) for s in (DEFAULT_SCHEMA, fresh, retired))
    log.info("rebuilding read models", schema=fresh)
    try:
        async with acquired(query_pool, QUERY_DATABASE) as conn:
            await create_tables(conn, fresh)
        live = PostgresReadModels(query_pool)
        events, last = await replay(store, target, batch_size)
        foreign = 0
        async for kept in kept_foreign(live, batch_size):
            foreign += len(await apply_foreign(target, kept))
        async with acquired(query_pool, QUERY_DATABASE) as conn, conn.transaction():
            # Gone (the live schema dropped, or its tables): nothing to lock or to catch
            # up with, as no projector can write there; the fresh schema takes its place.
            live_kept = await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", f"{live_sql}.processed_messages"
            )
            if live_kept:
                await conn.execute(f"LOCK TABLE {live_sql}.processed_messages IN EXCLUSIVE MODE")
                behind = await conn.fetchval(
                    f"SELECT EXISTS (SELECT FROM {live_sql}.processed_messages AS live"
                    f" WHERE NOT EXISTS (SELECT FROM {fresh_sql}.processed_messages AS"
                    " fresh WHERE fresh.message_id = live.message_id))"
                )
            else:
                log.info("the live read models are gone: the rebuilt ones take their place")
                behind = False
            if behind:
                # The projector waits meanwhile: only what followed the replay is read.
                log.info(
                    "the live read models hold events the replay did not read (the live"
                    " projection moved on during the rebuild, or a restore of the event store"
                    " left out events they had projected): reading on from the last one read"
                )
                more, _ = await replay(store, target, batch_size, after=last)
                events += more
                # What the journal holds and the replay has not: a position is taken
                # when a row is written, not when it commits, so one committed late may
                # lie before the last one read.
                missed = await live.foreign_events_missing_from(fresh)
                foreign += len(await apply_foreign(target, missed))
            if await conn.fetchval(
                "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)", DEFAULT_SCHEMA
            ):
                await conn.execute(f"ALTER SCHEMA {live_sql} RENAME TO {retired_sql}")
            await conn.execute(f"ALTER SCHEMA {fresh_sql} RENAME TO {live_sql}")
            await record_store(conn, store_id)
    except BaseException:
        await _discard(query_pool, fresh_sql)
        raise
    async with acquired(query_pool, QUERY_DATABASE) as conn:
        await _drop_retired(conn, retired)
    return events, foreign


# The live read models dropped: in the transaction that migrates a query database from
# nothing under a store with a history (`holds_history`), so that no instance reads
# them empty (made, then dropped, they were served empty in between: 0 investors).
LIVE_DROPPED = f"DROP SCHEMA IF EXISTS {quoted_schema(DEFAULT_SCHEMA)} CASCADE"


async def holds_history(event_store_pool: asyncpg.Pool) -> bool:
    """Whether the event store holds any event."""
    async with acquired(event_store_pool, COMMAND_DATABASE) as conn:
        return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM events)"))


async def made_empty(event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool) -> bool:
    """Whether the live read models hold no row (or are gone) while the event store holds
    events: a query database lost and made again empty, or whose read models were
    dropped, under a store with a history. Rows are never pruned, unlike the records of
    what was projected: a store's first event makes one."""
    return await read_models_empty(query_pool) and await holds_history(event_store_pool)


async def read_models_empty(query_pool: asyncpg.Pool) -> bool:
    """Whether the live read models hold no row, or are gone whole (some of their tables
    gone is the operator's to mend: a restore)."""
    live = quoted_schema(DEFAULT_SCHEMA)
    tables = [f"{live}.{table}" for table in ("investors", "invoices", "issuers")]
    async with acquired(query_pool, QUERY_DATABASE) as conn:
        row = await conn.fetchrow(
            "SELECT to_regnamespace($1) IS NOT NULL AS schema, count(to_regclass(t)) AS found"
            " FROM unnest($2::text[]) AS t",
            DEFAULT_SCHEMA,
            tables,
        )
        assert row is not None  # an aggregate returns one row
        if row["schema"] and row["found"] < len(tables):
            return False
        return not (
            row["schema"]
            and await conn.fetchval(
                "SELECT " + " OR ".join(f"EXISTS (SELECT FROM {table})" for table in tables)
            )
        )


async def drop_made_empty(query_pool: asyncpg.Pool) -> None:
    """Drop read models `made_empty`, so that no instance serves them (its Queries
    unanswered, its projector waiting) until a rebuild takes their place."""
    log.warning(
        "the read models hold nothing while the event store holds events (a query database"
        " made anew, or its read models dropped): rebuilding them from the event store;"
        " the Queries API answers UNAVAILABLE until they are"
    )
    await _drop_made_empty(query_pool)


async def _drop_made_empty(query_pool: asyncpg.Pool) -> None:
    """Drop the live read models the migration just made, empty, in a database that had
    none (made again empty, or its schema dropped): the rebuilt ones take their place at
    the swap. Left there, they were taken for the read models back: the running service
    said the query database recovered, and its Queries answered empty lists for as long
    as the replay took (18 s for 150,000 events); gone, the database stays down and the
    Queries unanswered until the swap. What the live projector wrote there meanwhile is
    of the store, which the replay reads, or kept in `foreign_events`, which it replays."""
    async with acquired(query_pool, QUERY_DATABASE) as conn:
        await conn.execute(LIVE_DROPPED)
    log.info("the live read models were gone: the rebuilt ones take their place at the swap")


async def _drop_retired(conn: Connection, retired: str) -> None:
    """Drop the read models a swap retired, in a transaction of its own after the swap's.

    A session still reading them (a transaction begun before the swap: a report, a
    `pg_dump`) holds the drop back; it waits RETIRED_DROP_WAIT at most, then leaves
    them for the next rebuild, saying so. Dropped in the swap's transaction, the drop
    waited for such a reader with every new statement on the read models queued behind
    it: the Queries API and the projector stood still until the reader ended (25 s of
    a probe's, `/health` 503, Queries calls cut by their deadlines). After the swap
    nobody else asks for the retired tables (the names are the fresh ones'), so the
    wait holds up the rebuild alone.

    A deadlock (a projector's write begun on a retired table before the swap, as the
    drop took the tables one by one: 1 rebuild in 10 under load) is tried again once the
    other transaction, chosen to go on, is over: left there, the replaced read models
    stayed until the next rebuild."""
    for attempt in range(DROP_ATTEMPTS):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {round(RETIRED_DROP_WAIT * 1000)}")
                await conn.execute(f"DROP SCHEMA IF EXISTS {quoted_schema(retired)} CASCADE")
            return
        except asyncpg.DeadlockDetectedError as error:
            if attempt + 1 < DROP_ATTEMPTS:
                continue
            _said_not_dropped(retired, error)
        except asyncpg.LockNotAvailableError:
            log.warning(
                "the read models the rebuild replaced are still read by another session;"
                " the next rebuild drops them",
                schema=retired,
            )
        except asyncpg.PostgresError as error:  # another rebuild's, dropped meanwhile
            _said_not_dropped(retired, error)
        return


def _said_not_dropped(retired: str, error: asyncpg.PostgresError) -> None:
    log.warning(
        "could not drop the read models a rebuild replaced", schema=retired, error=str(error)
    )


async def _discard_abandoned(conn: Connection) -> None:
    """Drop the schemas of rebuilds that did not finish and whose process is gone (killed,
    out of memory), and the read models earlier rebuilds replaced and could not drop
    (still read then): each a full copy of the read models, which nothing else removes."""
    retired = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
        f"{DEFAULT_SCHEMA}_retired_",
    )
    for row in retired:
        await _drop_retired(conn, row["nspname"])
    rows = await conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)",
        f"{DEFAULT_SCHEMA}_rebuild_",
    )
    for row in rows:
        name = row["nspname"]
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", name):
            continue  # being built
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quoted_schema(name)} CASCADE")
            log.info("dropped the schema of a rebuild that did not finish", schema=name)
        except asyncpg.PostgresError as error:  # not this rebuild's to fail for
            log.warning(
                "could not drop the schema of a rebuild that did not finish",
                schema=name,
                error=str(error),
            )
        finally:
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", name)


async def replay(
    store: EventStore,
    target: ReadModelStore,
    batch_size: int,
    *,
    after: StoredEvent | None = None,
) -> tuple[int, StoredEvent | None]:
    """Apply every event of `store` (after `after`, when given) to `target` in batches,
    in commit order; how many, and the last (`after` when there were none).

    Reading and decoding a batch is this process's work, applying one mostly the
    database's: a batch is applied while the next one is read and decoded, so that
    the two run side by side. One batch is applied at a time, each after the one
    before. Decoding a batch takes tens of milliseconds without a pause, so it gives
    way every TURN events: the batch being applied takes its next round trip then,
    rather than once the whole batch is decoded.
    """
    count = 0
    last = after
    batch: list[tuple[str, DomainEvent]] = []
    recorded: dict[str, datetime] = {}  # when each was recorded, kept with its record
    applying: asyncio.Task[AbstractSet[str]] | None = None
    try:
        async for stored in store.read_all(batch_size, after):
            last = stored
            batch.append((stored.message_id, stored.event))
            if stored.recorded_at is not None:
                recorded[stored.message_id] = stored.recorded_at
            if len(batch) % TURN == 0 and applying is not None:
                await asyncio.sleep(0)
            if len(batch) >= batch_size:
                if applying is not None:
                    await applying
                applying = asyncio.create_task(target.apply(batch, recorded=recorded))
                count += len(batch)
                batch, recorded = [], {}
        if applying is not None:
            await applying
        if batch:
            await target.apply(batch, recorded=recorded)
            count += len(batch)
    finally:
        if applying is not None:
            if not applying.done():
                # Reading failed, or the replay was cancelled, while a batch was applied.
                applying.cancel()
                await asyncio.wait({applying})
            if not applying.cancelled():
                # Taken as seen: a failure of it was raised by `await applying` above,
                # or came beside the one being raised (the same outage, as a rule).
                applying.exception()
    return count, last


async def _discard(query_pool: asyncpg.Pool, schema_sql: str) -> None:
    try:
        async with acquired(query_pool, QUERY_DATABASE) as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema_sql} CASCADE")
    except Exception as exc:
        log.warning("could not drop the unfinished rebuild schema", error=repr(exc))
