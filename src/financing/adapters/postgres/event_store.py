"""The event store on PostgreSQL: one stream per aggregate, appended in units of work.

A unit of work costs one round trip per read and one for all its writes. Its
reads (`recorded`, `load`) run as they come, each a statement of its own; its
writes (`save`, `record`) are kept until the block ends and then go to the
server as one statement, which appends every event, takes the snapshots due
and records the processed message: one statement is one transaction, so they
all commit or none does, and no transaction is held open while the handler
decides. Once events are committed, the commit bell tells the relayer.

The bell is a NOTIFY in a transaction of its own, after the commit, not in the
writing transaction: PostgreSQL serialises the commits of notifying
transactions (a lock taken before the commit record and held until it is
flushed), so units of work that notified as they committed would commit one at
a time, one disk flush each, instead of sharing flushes. A unit of work that
commits alone has no flush to share: its writing statement notifies, and it
rings no bell.

Commit order. Each event row carries the id of the transaction that inserted
it (`transaction_id`, assigned by PostgreSQL at the transaction's first
write). Readers order events by `(transaction_id, position)`. That order puts
causes before effects only if a transaction's id is greater than the ids of
all transactions whose effects it read, which holds when every read happens
before the first write: a transaction that committed before we read it had
its id already, and ids are handed out in increasing order. The writing
statement comes after every read of its unit of work, which refuses a read
after a write (`ReadAfterWrite`) so that no handler expects otherwise.

Conflicts. UNIQUE(aggregate_id, version) on events and the primary key of
processed_messages make two units of work that append the same version, or
record the same message, unable to both commit: the loser gets
`ConcurrencyConflict`, none of its writes take effect, and its retry reloads
(or finds the message processed). Reads are not one snapshot: a copy of a
message that found it new may load what another copy committed meanwhile; its
record of the message then conflicts, and `pipeline.exactly_once` looks again
before it lets a broken rule dead-letter the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import (
    COMMAND_DATABASE,
    RACE_ERRORS,
    Connection,
    acquired,
    describe,
    is_unavailable,
)
from financing.application import codec
from financing.application.errors import (
    AlreadyProcessed,
    AwaitingOperator,
    ConcurrencyConflict,
    EventNotInStore,
    ReadAfterWrite,
    Unavailable,
)
from financing.application.ports import (
    PROCESSED,
    REFUSED,
    A,
    B,
    Cause,
    Processed,
    RelayedEvent,
    StoredEvent,
    event_message_id,
)
from financing.domain.aggregates import Aggregate
from financing.domain.events import DomainEvent
from financing.logging import get_logger

log = get_logger(__name__)

# Notified after events are committed (`CommitBell`), so a listener never hears
# of events it cannot read yet.
NOTIFY_CHANNEL = "financing_events"

# The bell's transaction writes nothing worth a disk flush: its commit is not
# waited for (`synchronous_commit` off for this transaction only), which keeps the
# lock that serialises notifying commits held for microseconds.
_RING = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')"
# Said (at debug level) of a ring the database cannot take now.
_NOT_RUNG = "commit bell not rung; the relayer polls"
# How long closing the event store waits for a ring on its way.
BELL_GRACE = 1.0

EVENT_COLUMNS = (
    "position, transaction_id, aggregate_type, aggregate_id, version, name, body,"
    " correlation_id, causation_id, recorded_at"
)


def stored_event(row: asyncpg.Record) -> StoredEvent:
    # The driver's UUID is a `uuid.UUID` (equal to, and hashing as, the plain one for
    # the same value) whose text is made in C: kept as it is, it costs a replay or the
    # relayer nothing per event to convert or to write into the event's message id.
    return StoredEvent(
        position=row["position"],
        aggregate_type=row["aggregate_type"],
        aggregate_id=row["aggregate_id"],
        version=row["version"],
        name=row["name"],
        body=row["body"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        recorded_at=row["recorded_at"],
        transaction_id=row["transaction_id"],
    )


# Every write of a unit of work, in one statement: the events (in the order of the
# arrays), the snapshots and the processed records, each part only when the unit of
# work has some (a statement per combination, each prepared once per connection).
# Data-modifying WITH clauses all run to completion whether or not the final SELECT
# reads them. `$?` are the part's arguments, in order (`_write` numbers them).
_APPEND = (
    "appended AS ("
    " INSERT INTO events (aggregate_type, aggregate_id, version, name, body,"
    " correlation_id, causation_id)"
    " SELECT type, id, version, name, body::json, $?, $?"
    " FROM unnest($?::text[], $?::uuid[], $?::int[], $?::text[], $?::text[])"
    " WITH ORDINALITY AS new (type, id, version, name, body, ordinality)"
    "{held} ORDER BY ordinality"
    " RETURNING 1)"
)
_SNAPSHOT = (
    "snapshot AS ("
    " INSERT INTO snapshots (aggregate_id, aggregate_type, version, state)"
    " SELECT id, type, version, state::jsonb"
    " FROM unnest($?::uuid[], $?::text[], $?::int[], $?::text[])"
    " AS new (id, type, version, state){held}"
    " ON CONFLICT (aggregate_id) DO UPDATE"
    " SET aggregate_type = EXCLUDED.aggregate_type, version = EXCLUDED.version,"
    " state = EXCLUDED.state, taken_at = now()"
    " WHERE snapshots.version < EXCLUDED.version"
    " RETURNING 1)"
)
_RECORD = (
    "recorded AS ("
    " INSERT INTO processed_messages"
    " (consumer, message_id, name, correlation_id, outcome, detail, events, digest)"
    " SELECT consumer, message_id, name, $?, outcome, detail, events, digest"
    " FROM unnest($?::text[], $?::text[], $?::text[], $?::text[], $?::text[], $?::int[],"
    " $?::text[])"
    " AS new (consumer, message_id, name, outcome, detail, events, digest){held}"
    " RETURNING 1)"
)
# The unique keys the plain INSERTs of events and records rely on, each named as the
# conflict target of an insert of no row, which the statement's plan checks: once the key
# is gone (a DBA's drop, an index left invalid), every writing statement fails (42P10, an
# outage of the database) where the INSERT itself went on without it, until the database's
# inspection looked: under load, 10 s in which a stream forked (two events of one
# version) and copies of 24 messages were applied twice.
_EVENTS_KEYED = (
    "events_keyed AS (INSERT INTO events (aggregate_id, version)"
    " SELECT NULL::uuid, NULL::int WHERE false ON CONFLICT (aggregate_id, version) DO NOTHING)"
)
_RECORDS_KEYED = (
    "records_keyed AS (INSERT INTO processed_messages (consumer, message_id)"
    " SELECT NULL::text, NULL::text WHERE false ON CONFLICT (consumer, message_id) DO NOTHING)"
)
# A unit of work acting on an event of the store (`acting_on`) writes only if the store
# holds it: every part is guarded by the same look-up (one snapshot, one index probe),
# and the statement answers -1 where it wrote nothing for want of it.
_CLAIM = (
    "claim AS (SELECT EXISTS (SELECT FROM events"
    " WHERE aggregate_id = $? AND version = $? AND name = $? AND body::text = $?) AS held)"
)
_HELD = " WHERE (SELECT held FROM claim)"
NOT_HELD = -1


@functools.cache
def _write(
    events: bool, snapshots: bool, records: bool, notify: bool = False, claimed: bool = False
) -> str:
    """The writing statement for the parts a unit of work has; it gives the number of
    events appended. With `notify` (and events), its transaction also notifies
    NOTIFY_CHANNEL, the last argument, at its commit. With `claimed`, the first four
    arguments name an event the store must hold (`_CLAIM`), or nothing is written and
    the statement gives NOT_HELD."""
    held = _HELD if claimed else ""
    present = [
        part.format(held=held)
        for part, has in ((_APPEND, events), (_SNAPSHOT, snapshots), (_RECORD, records))
        if has
    ]
    keyed = [key for key, has in ((_EVENTS_KEYED, events), (_RECORDS_KEYED, records)) if has]
    present += keyed
    numbers = itertools.count(1)
    parts = [_CLAIM, *present] if claimed else present
    clauses = re.sub(r"\$\?", lambda _: f"${next(numbers)}", ", ".join(parts))
    count = "count(*)" if events else "0"
    if claimed:
        count = f"CASE WHEN (SELECT held FROM claim) THEN {count} ELSE {NOT_HELD} END"
    sources = " FROM appended" if events else ""
    if events and notify:
        sources += f", pg_notify(${next(numbers)}, '')"
    return f"WITH {clauses} SELECT {count}{sources}"


# A snapshot written by itself (`PostgresUnitOfWork._loaded`), never over a newer one.
_SNAPSHOT_ALONE = (
    "INSERT INTO snapshots (aggregate_id, aggregate_type, version, state)"
    " VALUES ($1, $2, $3, $4::jsonb)"
    " ON CONFLICT (aggregate_id) DO UPDATE"
    " SET aggregate_type = EXCLUDED.aggregate_type, version = EXCLUDED.version,"
    " state = EXCLUDED.state, taken_at = now()"
    " WHERE snapshots.version < EXCLUDED.version"
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


# `_LOAD` for two aggregates at once, each one's rows in the same order. Each stream is
# read through its own index range (`version >` its snapshot's, a value of the outer row),
# so a load reads only the events after the snapshot however long the stream grows.
_LOAD_BOTH = (
    "WITH wanted AS (SELECT w.aggregate_id, s.version AS since, s.state"
    " FROM (VALUES ($1::uuid, $2::text), ($3, $4)) AS w (aggregate_id, aggregate_type)"
    " LEFT JOIN snapshots AS s USING (aggregate_id, aggregate_type))"
    " SELECT aggregate_id, since AS version, NULL AS name, state::text AS body, 0 AS part"
    " FROM wanted WHERE since IS NOT NULL"
    " UNION ALL"
    " SELECT w.aggregate_id, e.version, e.name, e.body::text, 1 FROM wanted AS w"
    " CROSS JOIN LATERAL (SELECT version, name, body FROM events"
    " WHERE events.aggregate_id = w.aggregate_id AND version > coalesce(w.since, 0)) AS e"
    " ORDER BY aggregate_id, part, version"
)


# Events folded into an aggregate between two turns the event loop gives the rest of the
# process: a stream replayed without a recent snapshot (a restore without the snapshots,
# a large FINANCING_SNAPSHOT_INTERVAL) took 0.44 s of the one thread for 53,000 events,
# and several handlers of one aggregate folded it back to back: health checks waited
# seconds, the relayer lost its lock, the pool's sessions were all said busy.
FOLD_SLICE = 500


async def _folded(cls: type[A], aggregate_id: UUID, rows: list[asyncpg.Record]) -> A:
    """The aggregate rebuilt from its load's rows: a snapshot, then the events after it,
    the event loop given a turn every FOLD_SLICE events."""
    aggregate = cls(aggregate_id)
    for index, row in enumerate(rows):
        if index and not index % FOLD_SLICE:
            await asyncio.sleep(0)
        if row["name"] is None:
            aggregate = cls.restore(aggregate_id, row["version"], json.loads(row["body"]))
        else:
            aggregate.apply(_event(row["name"], row["body"], aggregate_id))
    return aggregate


def _replayed(rows: list[asyncpg.Record]) -> int:
    """How many events a load's rows replay after their snapshot."""
    return len(rows) - (1 if rows and rows[0]["name"] is None else 0)


def _event(name: str, body: str, aggregate_id: UUID) -> DomainEvent:
    event = codec.decode(name, body.encode(), aggregate_id)
    assert isinstance(event, DomainEvent)  # the event store holds domain events only
    return event


# Which rule a unique violation of the writing statement broke.
_PROCESSED = "processed_messages_pkey"

# The names releases before version 2 of the event store's schema record a processed
# message under: the queue that feeds its handler (commands.sql, version 2, renamed the
# records there when it ran). Such a release running beside this one in a rolling
# upgrade, or started again on this database, still records under them, and a message
# it handled must be seen here too, or a redelivery is handled twice.
LEGACY_CONSUMERS = {
    "create_issuer": "CreateIssuer",
    "create_investor": "CreateInvestor",
    "sell_invoice": "SellInvoice",
    "bid_on_invoice": "BidOnInvoice",
    "approve_financing": "ApproveFinancing",
    "reverse_financing": "ReverseFinancing",
    "bid_placed_offers_bid_to_invoice": "events_BidOnInvoicePlacedEvent",
    "rejected_bid_releases_funds": "events_BidOnInvoiceRejectedEvent",
    "financing_releases_excess_bid": "events_InvoiceFinancedEvent",
    "approval_commits_funds": "events_InvoiceApprovedEvent",
    "reversal_releases_funds": "events_InvoiceReversedEvent",
}
_RECORDED_AS = {consumer: (consumer, legacy) for consumer, legacy in LEGACY_CONSUMERS.items()}
_CONFLICTS = {
    "events_stream_version": "an aggregate moved past the version it was loaded at",
    _PROCESSED: "the message was already processed",
}


def _conflict(error: Exception, loaded_at: tuple[tuple[object, int], ...]) -> ConcurrencyConflict:
    """What a race lost by the writing statement means: which rule it broke."""
    constraint = getattr(error, "constraint_name", None) or ""
    what = _CONFLICTS.get(constraint, "another writer came first")
    detail = getattr(error, "detail", None) or str(error)
    if constraint == _PROCESSED:
        return AlreadyProcessed(f"{what}: {detail}")
    return ConcurrencyConflict(f"{what}: {detail}", loaded_at=loaded_at)


@dataclass
class _Saved:
    """An aggregate saved in a unit of work: how many of its changes to store, and the
    snapshot (version, state) due once they are stored, if any."""

    aggregate: Aggregate
    changes: int
    snapshot: tuple[int, str] | None


class PostgresUnitOfWork:
    """Reads (`recorded`, `load`) run at once; writes (`save`, `record`) wait for `commit`."""

    def __init__(self, conn: Connection, snapshot_interval: int, cause: Cause | None) -> None:
        self._conn = conn
        self._snapshot_interval = snapshot_interval
        self._cause = cause
        # Aggregates saved so far, by identity, in the order they were first saved.
        self._saved: dict[int, _Saved] = {}
        self._records: list[tuple[str, str, Processed]] = []
        self._acting_on: RelayedEvent | None = None

    def _reading(self, what: str) -> None:
        if self._saved or self._records:
            raise ReadAfterWrite(f"{what} after a write in the same unit of work")

    async def recorded(self, consumer: str, message_id: str) -> Processed | None:
        self._reading("recorded")
        row = await self._conn.fetchrow(
            "SELECT name, outcome, detail, events, digest FROM processed_messages"
            " WHERE consumer = ANY($1::text[]) AND message_id = $2 LIMIT 1",
            _RECORDED_AS.get(consumer, (consumer,)),
            message_id,
        )
        if row is None:
            return None
        # Records of older releases lack some of these (schema versions 1 to 3).
        return Processed(
            row["name"] or "",
            row["outcome"] or PROCESSED.outcome,
            row["detail"] or "",
            row["events"] or 0,
            row["digest"] or "",
        )

    async def load(self, cls: type[A], aggregate_id: UUID) -> A:
        self._reading("load")
        # One round trip: the snapshot (if any) first, then only the events it does not
        # already include.
        rows = await self._conn.fetch(_LOAD, aggregate_id, cls.aggregate_type)
        return await self._loaded(await _folded(cls, aggregate_id, rows), rows)

    async def _loaded(self, aggregate: A, rows: list[asyncpg.Record]) -> A:
        """`aggregate`, its snapshot taken at once where its load replayed a snapshot
        interval of events or more (its snapshot missing or old: restored without the
        snapshots, the interval changed), as Axon's event-count trigger does: a stream
        left without a recent snapshot was replayed whole by every command until it
        crossed its next multiple, and by every command refused for ever. A snapshot is
        of committed events, so it is written apart from the unit's own writes; one
        that cannot be written now is left for the next load."""
        if _replayed(rows) >= self._snapshot_interval:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await self._conn.execute(
                    _SNAPSHOT_ALONE,
                    aggregate.id,
                    aggregate.aggregate_type,
                    aggregate.version,
                    json.dumps(aggregate.snapshot()),
                )
        return aggregate

    async def load_both(
        self, first: type[A], first_id: UUID, second: type[B], second_id: UUID
    ) -> tuple[A, B]:
        if first_id == second_id:  # one stream: each type reads all of it, as `load` does
            return await self.load(first, first_id), await self.load(second, second_id)
        self._reading("load")
        rows = await self._conn.fetch(
            _LOAD_BOTH, first_id, first.aggregate_type, second_id, second.aggregate_type
        )
        of_first = [row for row in rows if row["aggregate_id"] == first_id]
        of_second = [row for row in rows if row["aggregate_id"] == second_id]
        return (
            await self._loaded(await _folded(first, first_id, of_first), of_first),
            await self._loaded(await _folded(second, second_id, of_second), of_second),
        )

    async def save(self, aggregate: Aggregate) -> None:
        count = len(aggregate.changes)
        saved = self._saved.get(id(aggregate))
        if count == (saved.changes if saved else 0):
            return
        before = aggregate.stored_version
        after = before + count
        snapshot = saved.snapshot if saved else None
        if after // self._snapshot_interval > before // self._snapshot_interval:
            snapshot = (aggregate.version, json.dumps(aggregate.snapshot()))
        self._saved[id(aggregate)] = _Saved(aggregate, count, snapshot)

    async def record(self, consumer: str, message_id: str, what: Processed = PROCESSED) -> None:
        self._records.append((consumer, message_id, what))

    async def acting_on(self, event: RelayedEvent) -> None:
        self._acting_on = event

    async def commit(self, notify: bool = False) -> int:
        """Every write kept so far, in one statement (nothing when there is none); the
        number of events appended. With `notify`, a commit that appends events notifies
        NOTIFY_CHANNEL itself (`CommitBell.committing`)."""
        if not self._saved and not self._records:
            return 0
        events = [
            (saved.aggregate, saved.aggregate.stored_version + offset, event)
            for saved in self._saved.values()
            for offset, event in enumerate(saved.aggregate.changes[: saved.changes], start=1)
        ]
        snapshots = [
            (saved.aggregate, *saved.snapshot)
            for saved in self._saved.values()
            if saved.snapshot is not None
        ]
        cause = self._cause
        records = self._records
        correlation_id = cause.correlation_id if cause else None
        claim = self._acting_on
        arguments: list[object] = []
        if claim is not None:
            arguments += [claim.aggregate_id, claim.version, claim.name, claim.body]
        if events:
            arguments += [
                correlation_id,
                cause.causation_id if cause else None,
                [aggregate.aggregate_type for aggregate, _, _ in events],
                [aggregate.id for aggregate, _, _ in events],
                [version for _, version, _ in events],
                [codec.name_of(event) for _, _, event in events],
                [codec.encode_text(event) for _, _, event in events],
            ]
        if snapshots:
            arguments += [
                [aggregate.id for aggregate, _, _ in snapshots],
                [aggregate.aggregate_type for aggregate, _, _ in snapshots],
                [version for _, version, _ in snapshots],
                [state for _, _, state in snapshots],
            ]
        if records:
            arguments += [
                correlation_id,
                [consumer for consumer, _, _ in records],
                [message_id for _, message_id, _ in records],
                [what.name or None for _, _, what in records],
                [what.outcome for _, _, what in records],
                [what.detail or None for _, _, what in records],
                [what.events for _, _, what in records],
                [what.digest or None for _, _, what in records],
            ]
        notify = notify and bool(events)
        if notify:
            arguments.append(NOTIFY_CHANNEL)
        statement = _write(bool(events), bool(snapshots), bool(records), notify, bool(claim))
        try:
            appended: int = await self._conn.fetchval(statement, *arguments)
        except RACE_ERRORS as error:
            loaded_at = tuple(
                (saved.aggregate.id, saved.aggregate.stored_version)
                for saved in self._saved.values()
            )
            raise _conflict(error, loaded_at) from error
        if appended == NOT_HELD and claim is not None:
            raise EventNotInStore(claim.not_held())
        # The saved changes are now stored: they are changes no more.
        for saved in self._saved.values():
            del saved.aggregate.changes[: saved.changes]
        return appended


class CommitBell:
    """Tells listeners (the relayer) that events were committed, after the commit.

    The unit of work that committed rings on its own connection, as soon as its
    writing statement has returned and before it gives the connection back: no
    task to start and no connection to borrow stand between a commit and its
    ring. Rings coalesce: a ring asked for while one is being sent is not sent
    on its own; once the one being sent is done, a task sends one more on a
    pooled connection (and again for those asked for meanwhile), so every
    commit is followed by a notification sent after it, and a burst of commits
    costs two. A ring that cannot be sent is dropped (the database is
    unreachable, or the pool closing): the relayer polls.

    A unit of work that commits alone, while no other of the event store is
    committing, rings no bell: its writing statement notifies, and the relayer
    hears of its events as they commit, a round trip sooner. Nothing of this
    process waits behind its commit for the lock that notifying commits take;
    of other processes (instances), at most their own one such commit each.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._busy = False  # a ring is being sent, by a unit of work or by the task
        self._again = False  # a ring was asked for meanwhile
        self._follow_up: asyncio.Task[None] | None = None
        self._committing = 0  # units of work whose writing statement is on its way

    def committing(self) -> bool:
        """A unit of work sends its writing statement: whether it commits alone (and
        then notifies in it, instead of ringing after it). `committed` when it returns."""
        self._committing += 1
        return self._committing == 1

    def committed(self) -> None:
        self._committing -= 1

    async def ring(self, conn: Connection) -> None:
        """Ring after a commit made on `conn`, which the caller still holds."""
        if self._busy:
            self._again = True
            return
        self._busy = True
        self._again = False
        try:
            await _rung(conn)
        finally:
            if self._again and not self._pool.is_closing():
                self._follow_up = asyncio.get_running_loop().create_task(self._ring_again())
            else:
                self._busy = False

    async def _ring_again(self) -> None:
        try:
            while self._again and not self._pool.is_closing():
                self._again = False
                async with acquired(self._pool, COMMAND_DATABASE) as conn:
                    await _rung(conn)
        except Unavailable as error:
            log.debug(_NOT_RUNG, error=str(error))
        finally:
            self._busy = False
            self._follow_up = None

    async def quiet(self, grace: float = BELL_GRACE) -> None:
        """Wait until the ring the task is sending, if any, is done; give it up after
        `grace` seconds (a database that does not answer must not hold a shutdown)."""
        sending = self._follow_up
        if sending is None:
            return
        done, _ = await asyncio.wait({sending}, timeout=grace)
        if not done:
            sending.cancel()
            await asyncio.wait({sending})


async def _rung(conn: Connection) -> None:
    """One ring on `conn`; one the database cannot take now is dropped."""
    try:
        await conn.execute(_RING, NOTIFY_CHANNEL)
    except Exception as error:
        if not is_unavailable(error):
            raise
        log.debug(_NOT_RUNG, error=describe(error))


class _UnitOfWorkScope:
    """`async with store.unit_of_work(cause) as uow:` a unit of work on a pooled
    connection; when the block ends without an error, its writes are committed and,
    if it appended events, the relayer is told: by the writing statement itself when
    it commits alone, otherwise by the commit bell, rung on the same connection
    before the connection goes back to the pool.

    A class rather than a generator-based context manager: every message a handler
    processes goes through it, and a generator's frame and wrappers cost more than
    the rest of its work."""

    __slots__ = ("_acquired", "_bell", "_cause", "_conn", "_snapshot_interval", "_uow")

    def __init__(
        self, pool: asyncpg.Pool, snapshot_interval: int, bell: CommitBell, cause: Cause | None
    ) -> None:
        self._acquired = acquired(pool, COMMAND_DATABASE)
        self._snapshot_interval = snapshot_interval
        self._bell = bell
        self._cause = cause

    async def __aenter__(self) -> PostgresUnitOfWork:
        self._conn = await self._acquired.__aenter__()
        self._uow = PostgresUnitOfWork(self._conn, self._snapshot_interval, self._cause)
        return self._uow

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: Any
    ) -> None:
        if error is None:
            try:
                alone = self._bell.committing()
                try:
                    appended = await self._uow.commit(notify=alone)
                finally:
                    self._bell.committed()
                if appended and not alone:
                    await self._bell.ring(self._conn)
            except BaseException as failure:
                # Translated, and the connection released, as a failure of the block is.
                await self._acquired.__aexit__(type(failure), failure, failure.__traceback__)
                raise
        await self._acquired.__aexit__(kind, error, tb)


# The transactions of another database of the server, as pg_stat_activity shows them: they
# cannot write events here, and the relaying horizon leaves them out. Read in a statement
# of its own before the one that takes the horizon's snapshot: read in that statement,
# after its snapshot, a transaction of another database that ended in between was no
# longer shown, counted as one that may write here, and held back every committed event
# whose transaction began after it (with short transactions running in another
# database, `read_all` came short in 455 of 942 reads right after a commit, the outbox
# in 240 of 2,801). Read first, a transaction is shown by the database it belongs to for
# its whole life, and one that begins after this look still counts (its id is above
# every event committed before): the horizon can only be too low, never too high. A
# prepared transaction (two-phase commit) has no session: pg_prepared_xacts names its
# database (one prepared in another database held every later event back for as long
# as it stayed prepared).
ELSEWHERE = (
    "SELECT coalesce(array_agg(xid), '{}') FROM ("
    "SELECT backend_xid FROM pg_stat_activity"
    " WHERE backend_xid IS NOT NULL AND datname <> current_database()"
    " UNION ALL SELECT transaction FROM pg_prepared_xacts"
    " WHERE database <> current_database()) AS elsewhere (xid)"
)


def relaying_horizon(elsewhere: str) -> str:
    """The relaying horizon, given the parameter holding what ELSEWHERE read (`$1`): the
    oldest transaction of the statement's snapshot still in progress that may be writing
    to this database, or the snapshot's xmax when none is. Transaction ids are the
    server's, so pg_snapshot_xmin would count every database on it (the query
    database's projector, another application)."""
    return (
        "coalesce("
        "(SELECT min(running) FROM pg_snapshot_xip(pg_current_snapshot()) AS running"
        f" WHERE running::xid <> ALL({elsewhere}::xid[])),"
        " pg_snapshot_xmax(pg_current_snapshot()))"
    )


async def transactions_elsewhere(conn: Connection) -> list[int]:
    """What ELSEWHERE reads, for a statement that follows on `conn`."""
    return list(await conn.fetchval(ELSEWHERE))


# Whether the stored transaction ids are ahead of the server's: every committed
# transaction of this server is below its next one (the snapshot's xmax), so an event or
# a checkpoint at or above it was written on another server, its database restored here
# (pg_dump, logical replication). Relay order, the checkpoint, the lag and the relaying
# horizon compare those ids with this server's: every new event would sort before the
# checkpoint, none would ever be relayed, and none is below the horizon (`read_all`).
IDS_AHEAD = (
    "SELECT greatest((SELECT max(transaction_id) FROM events),"
    " (SELECT max(transaction_id) FROM relay_checkpoints))"
    " >= pg_snapshot_xmax(pg_current_snapshot())"
)
IDS_AHEAD_DETAIL = (
    "the event store's transaction ids are ahead of this server's: the database was"
    " restored from another server, and no event of it can be relayed, read in commit"
    " order nor checked. Before the service starts on it, raise the server's transaction"
    " id epoch above the old server's (pg_resetwal -e; docs/deployment.md, \"Moving the"
    ' command database")'
)


class TransactionIdsAhead(AwaitingOperator):
    """The event store's transaction ids are ahead of its server's (IDS_AHEAD): read in
    commit order, it held no event (`check` said 0 events checked, OK; a rebuild would
    build empty read models)."""

    def __init__(self) -> None:
        super().__init__(COMMAND_DATABASE, IDS_AHEAD_DETAIL)


class PostgresEventStore:
    """The event store; PostgreSQL's errors leave it as Unavailable or ConcurrencyConflict."""

    def __init__(self, pool: asyncpg.Pool, *, snapshot_interval: int = 100) -> None:
        if snapshot_interval < 1:
            raise ValueError(f"snapshot_interval must be >= 1, got {snapshot_interval}")
        self._pool = pool
        self._snapshot_interval = snapshot_interval
        self._bell = CommitBell(pool)

    def unit_of_work(self, cause: Cause | None = None) -> _UnitOfWorkScope:
        return _UnitOfWorkScope(self._pool, self._snapshot_interval, self._bell, cause)

    async def close(self) -> None:
        """Let the last ring of the commit bell go out (before the pool closes)."""
        await self._bell.quiet()

    async def stream(
        self, aggregate_id: UUID, *, from_version: int = 1, last: int | None = None
    ) -> list[StoredEvent]:
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            rows = await conn.fetch(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 AND version >= $2"
                " ORDER BY version DESC LIMIT $3",
                aggregate_id,
                from_version,
                last,  # NULL: no limit
            )
        return [stored_event(row) for row in reversed(rows)]

    async def processed_any(self, consumers: Sequence[str]) -> bool:
        """Whether any of `consumers` (by their names) has a record: it processed messages
        before (within the records' retention)."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            return bool(
                await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM processed_messages WHERE consumer = ANY($1))",
                    list(consumers),
                )
            )

    async def last_processed_recorded_at(self, consumer: str, before: datetime) -> datetime | None:
        """When the store recorded the event `consumer` (a policy) processed last before
        `before`, by any instance: what its queue held, lost with it, was relayed after
        that event. The event is looked for among those of its message's correlation
        recorded before it was processed; where none is its (a record without a
        correlation, or an event pruned), the earliest of them, or None."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            last = await conn.fetchrow(
                "SELECT message_id, correlation_id, processed_at FROM processed_messages"
                " WHERE consumer = ANY($1::text[]) AND processed_at <= $2"
                " ORDER BY processed_at DESC LIMIT 1",
                _RECORDED_AS.get(consumer, (consumer,)),
                before,
            )
            if last is None or last["correlation_id"] is None:
                return None
            rows = await conn.fetch(
                "SELECT aggregate_id, version, recorded_at FROM events"
                " WHERE correlation_id = $1 AND recorded_at <= $2"
                " ORDER BY position DESC LIMIT 1000",
                last["correlation_id"],
                last["processed_at"],
            )
        for row in rows:
            if event_message_id(row["aggregate_id"], row["version"]) == last["message_id"]:
                recorded: datetime = row["recorded_at"]
                return recorded
        return min((row["recorded_at"] for row in rows), default=None)

    async def forget_refusal(self, consumer: str, message_id: str) -> None:
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            await conn.execute(
                "DELETE FROM processed_messages"
                " WHERE consumer = ANY($1::text[]) AND message_id = $2 AND outcome = $3",
                _RECORDED_AS.get(consumer, (consumer,)),
                message_id,
                REFUSED,
            )

    async def read_all(
        self, batch_size: int = 500, after: StoredEvent | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Every event the relayer could relay when the first batch is read (those of
        transactions below the relaying horizon), in commit order: what is read is a
        prefix of the order in which the relayer publishes, so a projection rebuilt
        from it lists rows as the live projector does. A transaction still running
        with a smaller id than a committed one holds that one back, as it holds back
        the relayer.

        One read-only REPEATABLE READ transaction gives every batch the same
        snapshot and horizon, so an event committed meanwhile with a smaller order
        key cannot slip in behind the pagination key. With `after`, the events that
        follow it.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        key: tuple[Any, int] = (0, 0) if after is None else (after.transaction_id, after.position)
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            elsewhere = await transactions_elsewhere(conn)  # before the snapshot
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                if after is None and await conn.fetchval(IDS_AHEAD):
                    raise TransactionIdsAhead()
                horizon = await conn.fetchval(f"SELECT {relaying_horizon('$1')}", elsewhere)
                while True:
                    rows = await conn.fetch(
                        f"SELECT {EVENT_COLUMNS} FROM events"
                        " WHERE (transaction_id, position) > ($1::xid8, $2)"
                        " AND transaction_id < $4::xid8"
                        " ORDER BY transaction_id, position LIMIT $3",
                        *key,
                        batch_size,
                        horizon,
                    )
                    for row in rows:
                        yield stored_event(row)
                    if len(rows) < batch_size:
                        return
                    key = (rows[-1]["transaction_id"], rows[-1]["position"])
