"""The outbox: committed events not yet relayed, read in commit order without gaps.

`position` comes from a sequence at insert time, so position 10 may commit
after 11; a reader that moved past 11 would never see 10. Instead events are
read in `(transaction_id, position)` order and only from transactions below a
horizon under which every transaction that could write here has finished
(`event_store.relaying_horizon`), so no event can later appear before one already read.
The checkpoint, the order key of the last event marked relayed, is stored per
relayer name in `relay_checkpoints`; the relayer reads on from the last event
it relayed (`pending(limit, after)`, under the same horizon) between two marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from financing.adapters.postgres.connection import (
    CLOSE_TIMEOUT,
    COMMAND_DATABASE,
    SERVICE_APPLICATION,
    SESSION_COLUMNS,
    Connection,
    PooledSessions,
    acquired,
    advisory_lock_holder,
    close_connection,
    connect,
    is_unavailable,
    other_session,
    translated,
)
from financing.adapters.postgres.event_store import (
    EVENT_COLUMNS,
    IDS_AHEAD,
    IDS_AHEAD_DETAIL,
    NOTIFY_CHANNEL,
    relaying_horizon,
    stored_event,
    transactions_elsewhere,
)
from financing.application.errors import Unavailable
from financing.application.ports import Holder, OtherSession, PreparedTransaction, StoredEvent
from financing.config import Database
from financing.logging import get_logger

__all__ = [
    "NOTIFY_CHANNEL",
    "CommitListener",
    "PostgresOutbox",
    "PostgresRelayerLock",
    "RelayBacklog",
    "RelayerRunning",
    "Rewound",
    "rewind",
]

log = get_logger(__name__)

# Advisory lock key electing the one relayer of a database ("fin-rela").
RELAYER_LOCK = 0x66696E2D72656C61
# How long a round trip on the lock connection may take before it counts as lost.
HEALTH_CHECK_TIMEOUT = 5.0

_CHECKPOINT = (
    "(coalesce((SELECT transaction_id FROM relay_checkpoints WHERE name = $1), '0'::xid8),"
    " coalesce((SELECT position FROM relay_checkpoints WHERE name = $1), 0))"
)

_PENDING = (
    f"SELECT {EVENT_COLUMNS} FROM events"
    f" WHERE (transaction_id, position) > {_CHECKPOINT}"
    f" AND transaction_id < {relaying_horizon('$3')}"
    " ORDER BY transaction_id, position LIMIT $2"
)
# The same after a given event ($1, $2) instead of the checkpoint.
_PENDING_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM events"
    " WHERE (transaction_id, position) > ($1::xid8, $2)"
    f" AND transaction_id < {relaying_horizon('$4')}"
    " ORDER BY transaction_id, position LIMIT $3"
)

# The events at positions $1, with what tells each from another recorded there since.
_HELD = (
    "SELECT position, transaction_id, recorded_at FROM events WHERE position = ANY($1::bigint[])"
)


# Moving the checkpoint, in one statement: past the newest of the events at positions $2
# that are not behind it yet (`new`), only if those are exactly the events that follow
# it (`skipped` names any that would be jumped over) and every position exists. The
# checkpoint row is locked first, so two relayers in a take-over cannot interleave; it
# never moves backwards. The events that follow it are sought from it in the index, its
# values given as scalar subqueries, known before the scan starts: compared with a
# joined row's, they were a filter on an index read from its start, every relayed event
# read at each move (2.3 s at 1.35 million events).
#
# Its commit is not waited for (`synchronous_commit` off for this transaction only):
# the events it marks are confirmed by the broker already, so a checkpoint lost with
# the last moments of a crashed database server only relays them again, under the
# same message ids, which consumers recognise as copies. Not waiting saves the relayer
# a disk flush per batch.
_MARK_RELAYED = (
    "WITH locked AS (SELECT transaction_id, position FROM relay_checkpoints"
    " WHERE name = $1 FOR UPDATE),"
    " checkpoint AS (SELECT coalesce((SELECT transaction_id FROM locked), '0'::xid8) AS xid,"
    " coalesce((SELECT position FROM locked), 0) AS pos),"
    " marked AS (SELECT transaction_id, position FROM events"
    " WHERE position = ANY($2::bigint[])),"
    " new AS (SELECT m.transaction_id, m.position FROM marked AS m, checkpoint AS c"
    " WHERE (m.transaction_id, m.position) > (c.xid, c.pos)),"
    " following AS (SELECT transaction_id, position FROM events"
    " WHERE (transaction_id, position)"
    " > ((SELECT xid FROM checkpoint), (SELECT pos FROM checkpoint))"
    " ORDER BY transaction_id, position LIMIT (SELECT count(*) FROM new)),"
    " skipped AS (SELECT position FROM following"
    " WHERE (transaction_id, position) NOT IN (SELECT transaction_id, position FROM new)),"
    " last AS (SELECT transaction_id, position FROM new"
    " ORDER BY transaction_id DESC, position DESC LIMIT 1),"
    " moved AS (INSERT INTO relay_checkpoints (name, transaction_id, position)"
    " SELECT $1, transaction_id, position FROM last"
    " WHERE (SELECT count(*) FROM marked) = cardinality($2::bigint[])"
    " AND NOT EXISTS (SELECT FROM skipped)"
    " ON CONFLICT (name) DO UPDATE"
    " SET transaction_id = EXCLUDED.transaction_id, position = EXCLUDED.position,"
    " updated_at = now()"
    " WHERE (relay_checkpoints.transaction_id, relay_checkpoints.position)"
    " < (EXCLUDED.transaction_id, EXCLUDED.position)"
    " RETURNING 1)"
    " SELECT set_config('synchronous_commit', 'off', true),"
    " (SELECT array_agg(position) FROM marked) AS known,"
    " (SELECT array_agg(position ORDER BY transaction_id, position) FROM new) AS new,"
    " (SELECT array_agg(position ORDER BY position) FROM skipped) AS skipped,"
    " (SELECT count(*) FROM moved) AS moved"
)


@dataclass(frozen=True)
class RelayBacklog:
    """How far a relayer is behind: its checkpoint, and the events after it (`lag`)."""

    checkpoint: int | None  # the position of the last event relayed; None before the first
    moved_at: datetime | None  # when the checkpoint last moved
    waiting: int  # events not relayed yet
    oldest_age: float  # seconds since the oldest of them was recorded; 0 when none
    held_back_by: Holder | None = None  # `PostgresOutbox.held_back_by`
    relayer: OtherSession | None = None  # the relayer lock's holder, when events wait
    # Whether that holder relays another schema's event store (`relays_elsewhere`).
    relayer_elsewhere: bool = False
    # Whether the stored transaction ids are ahead of the server's (IDS_AHEAD).
    ids_ahead: bool = False


# The session whose transaction is the relaying horizon (`relaying_horizon`), when an event
# after the checkpoint waits behind it: relayed only once that transaction ends. Any
# session of the database that writes holds it so (a foreign application's, a psql left
# in a transaction), which a relayer cannot tell from one about to append events. Named
# only when an event has waited $3 seconds behind it: a relayer merely behind (a backlog
# it relays as fast as it can) always has the newest events behind whichever unit of work
# is the horizon at that moment, milliseconds old, and named that innocent session.
_HELD_BEHIND = f"WITH horizon AS (SELECT {relaying_horizon('$4')} AS xid)"
_WAITED_BEHIND = (
    " WHERE EXISTS (SELECT 1 FROM events e"
    " WHERE (e.transaction_id, e.position) > ($1::xid8, $2) AND e.transaction_id >= h.xid"
    " AND e.recorded_at <= now() - make_interval(secs => $3))"
)
_HELD_BACK_BY = (
    f"{_HELD_BEHIND} SELECT {SESSION_COLUMNS} FROM horizon h JOIN pg_stat_activity a"
    f" ON a.backend_xid = h.xid::xid AND a.datname = current_database(){_WAITED_BEHIND}"
)
# The same for a prepared transaction of this database, which has no session.
_HELD_BACK_BY_PREPARED = (
    f"{_HELD_BEHIND} SELECT p.gid, p.owner,"
    " extract(epoch FROM now() - p.prepared)::float8 AS prepared_for"
    " FROM horizon h JOIN pg_prepared_xacts p"
    f" ON p.transaction = h.xid::xid AND p.database = current_database(){_WAITED_BEHIND}"
)


# Every event after the checkpoint, committed or about to be, with the age of the oldest.
# The checkpoint is given as values, read first: compared with a subquery's values,
# unknown when the statement is planned, the planner took a third of the table to match
# and scanned all of it, every LAG_INTERVAL on every relayer, however small the lag.
_LAG = (
    "SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8 FROM events"
    " WHERE (transaction_id, position) > ($1::xid8, $2)"
)
_CHECKPOINT_VALUES = (
    "SELECT coalesce((SELECT transaction_id FROM relay_checkpoints WHERE name = $1), '0'::xid8),"
    " coalesce((SELECT position FROM relay_checkpoints WHERE name = $1), 0)"
)


class PostgresOutbox:
    def __init__(self, pool: asyncpg.Pool, name: str = "relayer") -> None:
        self._pool = pool
        self._name = name
        self._ids_checked = False

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        """Up to `limit` committed events after the checkpoint, or after `after` when
        given, in commit order. The first call checks that the stored transaction ids
        are this server's (ValueError if not)."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            if not self._ids_checked:
                if await conn.fetchval(IDS_AHEAD):
                    raise ValueError(IDS_AHEAD_DETAIL)
                self._ids_checked = True
            elsewhere = await transactions_elsewhere(conn)  # before the snapshot
            if after is None:
                rows = await conn.fetch(_PENDING, self._name, limit, elsewhere)
            else:
                rows = await conn.fetch(
                    _PENDING_AFTER, after.transaction_id, after.position, limit, elsewhere
                )
        return [stored_event(row) for row in rows]

    async def lag(self) -> tuple[int, float]:
        """How many events are not relayed yet, and how old the oldest of them is (seconds)."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            checkpoint = await conn.fetchrow(_CHECKPOINT_VALUES, self._name)
            assert checkpoint is not None  # a SELECT without FROM returns one row
            row = await conn.fetchrow(_LAG, *checkpoint)
        assert row is not None  # an aggregate always gives one row
        count, age = row
        return int(count), max(0.0, float(age or 0.0))

    async def held_back_by(self, waited: float) -> Holder | None:
        """The transaction an event after the checkpoint has waited `waited` seconds
        for, if one has: the oldest still running in this database that may write events."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            checkpoint = await conn.fetchrow(_CHECKPOINT_VALUES, self._name)
            assert checkpoint is not None  # a SELECT without FROM returns one row
            elsewhere = await transactions_elsewhere(conn)  # before the snapshot
            row = await conn.fetchrow(_HELD_BACK_BY, *checkpoint, waited, elsewhere)
            if row is not None:
                return other_session(row)
            row = await conn.fetchrow(_HELD_BACK_BY_PREPARED, *checkpoint, waited, elsewhere)
        if row is None:
            return None
        return PreparedTransaction(row["gid"], row["owner"], max(0.0, row["prepared_for"]))

    async def backlog(self, held_back_after: float) -> RelayBacklog:
        """The checkpoint and what is waiting behind it (`financing status`): the
        transaction an event has waited `held_back_after` seconds behind, if one has."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            checkpoint = await conn.fetchrow(
                "SELECT position, updated_at FROM relay_checkpoints WHERE name = $1", self._name
            )
            ids_ahead = bool(await conn.fetchval(IDS_AHEAD))
        waiting, oldest_age = await self.lag()
        relayer, elsewhere = await self._relayer() if waiting else (None, False)
        return RelayBacklog(
            ids_ahead=ids_ahead,
            checkpoint=None if checkpoint is None else checkpoint["position"],
            moved_at=None if checkpoint is None else checkpoint["updated_at"],
            waiting=waiting,
            oldest_age=oldest_age,
            held_back_by=await self.held_back_by(held_back_after) if waiting else None,
            relayer=relayer,
            relayer_elsewhere=elsewhere,
        )

    async def _relayer(self) -> tuple[OtherSession | None, bool]:
        """The relayer lock's holder, and whether it relays another schema's events."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            holder = await advisory_lock_holder(conn, RELAYER_LOCK)
            return holder, holder is not None and await relays_elsewhere(conn, holder)

    async def relayer(self) -> OtherSession | None:
        """The session holding the relayer lock: the relayer, if one runs."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            return await advisory_lock_holder(conn, RELAYER_LOCK)

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        """Move the checkpoint past `events`, which must be the next ones `pending` gives.

        Events already behind the checkpoint are ignored. Raises ValueError
        rather than move past an event that is not among them.
        """
        positions = sorted({event.position for event in events})
        if not positions:
            return
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            row = await conn.fetchrow(_MARK_RELAYED, self._name, positions)
        assert row is not None  # the final SELECT always gives one row
        known = set(row["known"] or ())
        if len(known) != len(positions):
            raise ValueError(f"no such events: {sorted(set(positions) - known)}")
        if row["skipped"]:
            raise ValueError(
                f"relayer {self._name!r}: marking {row['new']} relayed would skip"
                f" events at positions {row['skipped']}"
            )

    async def missing(self, events: Sequence[StoredEvent]) -> list[StoredEvent]:
        """Those of `events` the store no longer holds as they were read."""
        async with acquired(self._pool, COMMAND_DATABASE) as conn:
            rows = await conn.fetch(_HELD, [event.position for event in events])
        held = {tuple(row) for row in rows}
        return [
            event
            for event in events
            if (event.position, event.transaction_id, event.recorded_at) not in held
        ]


# Moves the checkpoint back to just before the first event, in relay order, recorded at
# or after $2; never forward. How many relayed events it gives back to the relayer, and
# when the first of them was recorded. The scan of `events` in relay order stops at
# that first event.
_REWIND = (
    "WITH first AS (SELECT transaction_id, position FROM events"
    " WHERE recorded_at >= $2 ORDER BY transaction_id, position LIMIT 1),"
    " before AS (SELECT e.transaction_id, e.position FROM events AS e, first AS f"
    " WHERE (e.transaction_id, e.position) < (f.transaction_id, f.position)"
    " ORDER BY e.transaction_id DESC, e.position DESC LIMIT 1),"
    " target AS (SELECT coalesce((SELECT transaction_id FROM before), '0'::xid8) AS xid,"
    " coalesce((SELECT position FROM before), 0) AS pos FROM first),"
    " again AS (SELECT e.recorded_at FROM events AS e, target AS t"
    " WHERE (e.transaction_id, e.position) > (t.xid, t.pos)"
    f" AND (e.transaction_id, e.position) <= {_CHECKPOINT}),"
    " moved AS (UPDATE relay_checkpoints AS r SET transaction_id = t.xid,"
    " position = t.pos, updated_at = now() FROM target AS t"
    " WHERE r.name = $1 AND (r.transaction_id, r.position) > (t.xid, t.pos) RETURNING 1)"
    " SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM again) AS again,"
    " (SELECT min(recorded_at) FROM again) AS first,"
    " (SELECT count(*) FROM first) AS found,"
    " (SELECT count(*) FROM events AS e, target AS t"
    " WHERE (e.transaction_id, e.position) > (t.xid, t.pos)) AS beyond_target,"
    f" (SELECT count(*) FROM events AS e WHERE (e.transaction_id, e.position) > {_CHECKPOINT})"
    " AS beyond_checkpoint"
)


class RelayerRunning(Exception):
    """A relayer holds the relayer lock: it reads on from the events it relayed, not from
    the checkpoint, and would move a checkpoint moved back forward again."""


@dataclass(frozen=True)
class Rewound:
    """What `rewind` gave back to the relayer."""

    again: int  # events the rewind took back from behind the checkpoint
    first: datetime | None  # the earliest time one of them was recorded
    # Events behind the checkpoint the rewind left: all the next relayer publishes,
    # those of an earlier rewind and those never relayed included.
    waiting: int
    found: bool  # whether any event was recorded since the time asked for


async def rewind(pool: asyncpg.Pool, since: datetime, name: str = "relayer") -> Rewound:
    """Move relayer `name`'s checkpoint back, so that the events recorded at or after
    `since` are relayed again: events a broker lost after it had confirmed them (its
    queues deleted, its definitions restored without their messages). Never forward,
    which would skip events. The relayer lock is held for the transaction that moves it,
    so that no relayer relays meanwhile from where it was; RelayerRunning while one
    holds it."""
    async with acquired(pool, COMMAND_DATABASE) as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAYER_LOCK):
            raise RelayerRunning(_running(await advisory_lock_holder(conn, RELAYER_LOCK)))
        row = await conn.fetchrow(_REWIND, name, since)
    assert row is not None  # the final SELECT always gives one row
    moved = bool(row["moved"])
    return Rewound(
        again=row["again"] if moved else 0,
        first=row["first"],
        waiting=row["beyond_target"] if moved else row["beyond_checkpoint"],
        found=bool(row["found"]),
    )


def _running(holder: OtherSession | None) -> str:
    if holder is not None and holder.application != SERVICE_APPLICATION:
        return (
            f"a session that is no relayer of the service holds the relayer lock"
            f" ({holder.describe()}): end it (pg_terminate_backend({holder.pid})), then"
            " rewind"
        )
    who = holder.describe() if holder is not None else "a session that has just ended"
    return (
        f"a relayer is running ({who} holds the relayer lock): stop every instance that"
        " runs the relayer component, then rewind, then start them again"
    )


# Seconds the relayer lock's session may stay idle before the server ends it, and the
# lock with it: several of its holder's round trips (`check_interval`), so that only a
# holder that has stopped running loses it.
LOCK_LEASE = 5.0
# Seconds a relayer stands by, the lock held by another session, before it says which;
# it looks again as often, and says so whenever another session holds it.
STANDBY_SAID = 10.0


# The advisory lock an elected relayer takes besides the relayer lock, on the same
# session, for the schema of the event store it relays. The relayer lock is the
# database's: two deployments of the service in two schemas of one database share it,
# and only one of them relays. A relayer standing by tells the other deployment's
# relayer from its own by this lock (a relayer before 0.5.5 takes none: taken for its
# own, as it was).
_SCHEMA_LOCK = "hashtextextended('financing relayer of schema ' || current_schema(), 0)"
_RELAYS_ELSEWHERE = (
    "SELECT EXISTS (SELECT FROM pg_locks AS l WHERE l.locktype = 'advisory' AND l.granted"
    " AND l.pid = $1 AND l.objsubid = 1 AND l.database = ("
    "SELECT oid FROM pg_database WHERE datname = current_database())"
    f" AND ((l.classid::bigint << 32) | l.objid::bigint) NOT IN ($2, {_SCHEMA_LOCK}))"
)


async def relays_elsewhere(conn: Connection, holder: OtherSession) -> bool:
    """Whether `holder`, holding the relayer lock, relays the event store of another
    schema of this database than `conn`'s: another deployment's relayer (a session of
    the service's; another's, whatever locks it holds, is no relayer at all)."""
    if holder.application != SERVICE_APPLICATION:
        return False
    return bool(await conn.fetchval(_RELAYS_ELSEWHERE, holder.pid, RELAYER_LOCK))


# What is said of another deployment's relayer holding the relayer lock.
ANOTHER_DEPLOYMENT = (
    "the relayer of another deployment of the service, on another schema of this database,"
    " holds the relayer lock, which is the database's: no event of this event store is"
    " relayed while it runs; give each deployment a database of its own"
)


def left_holding(holder: OtherSession) -> str | None:
    """What the session holding the relayer lock is, and what ends it, where it is named
    as the service's and has been idle longer than a relayer's lease: no relayer's is (it
    sends a round trip every second, and the server ends its session idle for
    LOCK_LEASE). None for any other holder."""
    if (
        holder.application != SERVICE_APPLICATION
        or holder.idle_for is None
        or holder.idle_for <= LOCK_LEASE
    ):
        return None
    return (
        f"it has sent nothing for {holder.idle_for:.0f} s, where a relayer's sends a round"
        " trip every second: a session left holding it, no relayer (a pooler's, kept from"
        " an instance behind one in transaction mode); SELECT pg_terminate_backend"
        f"({holder.pid}) ends it, or the pooler's reconnecting"
    )


def _tell_holder(holder: OtherSession, *, elsewhere: bool) -> None:
    """Who holds the relayer lock this instance stands by for: another instance's
    relayer; another deployment's, or a session that is no relayer of the service (an
    operator's, a foreign application's), either of which keeps every event from being
    relayed, and an error or a warning says so."""
    if elsewhere:
        log.error(f"relayer standing by: {ANOTHER_DEPLOYMENT}", holder=holder.describe())
    elif left := left_holding(holder):
        log.warning(
            f"relayer standing by: no event is relayed until the session holding its lock"
            f" lets go, and {left}",
            holder=holder.describe(),
        )
    elif holder.application == SERVICE_APPLICATION:
        log.info("relayer standing by: another instance relays", holder=holder.describe())
    else:
        log.warning(
            "relayer standing by: a session that is no relayer of the service holds its"
            " lock, and no event is relayed until it lets go",
            holder=holder.describe(),
        )


class PostgresRelayerLock:
    """Only one relayer per database: a session advisory lock on a dedicated connection.

    The lock lives as long as the connection: if the connection is lost, so
    is the lock, and another instance may take over. `lost()` reports it.

    The holder sends a round trip every `check_interval`, and the server ends the
    session once it has been idle for `lease` (PostgreSQL 14 and later): a holder
    whose process is frozen, or whose host is cut off with its socket left open,
    would otherwise keep the lock, and every saga waiting, for as long as it lasts.
    """

    def __init__(
        self,
        db: Database,
        *,
        poll_interval: float = 0.1,
        check_interval: float = 1.0,
        lease: float = LOCK_LEASE,
    ) -> None:
        self._db = db
        self._poll_interval = poll_interval
        self._check_interval = check_interval
        self._lease = lease
        self._conn: asyncpg.Connection | None = None
        self._backend = 0  # the server backend the lock was taken on (pg_backend_pid())
        self._gone = asyncio.Event()
        # One statement at a time on the lock connection (health check, unlock).
        self._busy = asyncio.Lock()

    async def acquire(self, answered: Callable[[str], None] = lambda _: None) -> None:
        """Wait while another instance holds the lock; Unavailable when the database is not
        reachable (the connection is then dropped, and the caller retries). Each poll the
        database answers is `answered`: a standby's wait, begun as the outage ended, kept
        its outage open for FINANCING_DB_TIMEOUT more (an attempt under way, not yet
        failed: `Outages.trying`), its `/health` at 503 over a database that answered.

        A session kept from an earlier poll that fails is replaced at once: the server
        ends a standby's session whose process was frozen past the lease (or an
        operator ended it), and only a new session's failure says the database is out.
        Taken for an outage, it kept a standby's `/health` at 503 for 12 s after a
        freeze, over a database that answered all along."""
        look_at = time.monotonic() + STANDBY_SAID  # when to look who holds the lock
        told: tuple[int, bool, bool] | None = None  # said last: pid, elsewhere, left
        try:
            while True:
                kept = self._conn is not None and not self._conn.is_closed()
                conn = await self._connection()
                try:
                    with translated(COMMAND_DATABASE):
                        row = await conn.fetchrow(
                            "SELECT pg_try_advisory_lock($1), pg_backend_pid()", RELAYER_LOCK
                        )
                        assert row is not None  # a SELECT without FROM returns one row
                        taken, self._backend = row
                        if taken:
                            await conn.execute(f"SELECT pg_try_advisory_lock({_SCHEMA_LOCK})")
                        elif time.monotonic() >= look_at:
                            look_at = time.monotonic() + STANDBY_SAID
                            holder = await advisory_lock_holder(conn, RELAYER_LOCK)
                            if holder is not None:
                                elsewhere = await relays_elsewhere(conn, holder)
                                seen = holder.pid, elsewhere, bool(left_holding(holder))
                                if seen != told:
                                    _tell_holder(holder, elsewhere=elsewhere)
                                    told = seen
                except Unavailable:
                    if not kept:
                        raise
                    self._discard()
                    continue
                if taken:
                    return
                answered(COMMAND_DATABASE)
                await asyncio.sleep(self._poll_interval)
        except BaseException:
            self._discard()  # failed or cancelled: leave no connection behind
            raise

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        # Its statements unnamed: behind a pooler that hands the connection to another
        # server session (which `lost` then finds), a named one was not found there, and
        # the relayer stopped on the driver's error, not on what it meant.
        conn = await connect(self._db, COMMAND_DATABASE, named_statements=False)
        try:
            if conn.get_server_version() >= (14, 0):
                with translated(COMMAND_DATABASE):
                    await conn.execute(f"SET idle_session_timeout = {round(self._lease * 1000)}")
        except BaseException:
            conn.terminate()  # not yet ours to discard: failed or cancelled, it goes here
            raise
        gone = asyncio.Event()
        conn.add_termination_listener(lambda _: gone.set())
        self._conn, self._gone = conn, gone
        return conn

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def lost(self) -> None:
        """Return once the lock is no longer held: connection lost, broken or released.

        A closed socket is noticed at once; a silent one (half-open TCP) by a
        periodic round trip that fails or times out. PooledSessions where that round
        trip runs on another server backend than the one the lock was taken on: a
        pooler (PgBouncer in transaction mode) handed the connection to another
        session, and the lock, left on the first, holds off no other relayer.
        """
        conn, gone = self._conn, self._gone
        if conn is None:
            return
        while not gone.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), self._check_interval)
                return
            try:
                async with self._busy:
                    if conn.is_closed():
                        return
                    backend = await conn.fetchval(
                        "SELECT pg_backend_pid()", timeout=HEALTH_CHECK_TIMEOUT
                    )
            except Exception as error:
                if is_unavailable(error):
                    return
                raise
            if backend != self._backend:
                raise PooledSessions(COMMAND_DATABASE, self._backend, backend)

    async def release(self) -> None:
        """Give the lock up and close its connection; safe to call when not held."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._gone.set()  # whoever waits in lost() learns of it now
        try:
            if not conn.is_closed():
                async with self._busy:
                    # The relayer lock and its schema's at once: a relayer elected as the
                    # first goes found the second still held, and held none for its tenure.
                    await conn.fetchval("SELECT pg_advisory_unlock_all()", timeout=CLOSE_TIMEOUT)
                await close_connection(conn)
        except Exception as error:
            if not is_unavailable(error):
                raise
        finally:
            if not conn.is_closed():
                # Closing failed: end the session anyway; the server then drops the lock.
                conn.terminate()


# How often the listening session must answer a round trip: one whose server was
# replaced behind the same address, or lost behind a partition, is never told so
# while it only listens, and would leave the relayer to its poll for good.
LISTEN_CHECK_INTERVAL = 5.0


class CommitListener:
    """Wakes the relayer when events commit: LISTEN on a dedicated connection.

    Only a shortcut past the relayer's poll: while the connection cannot be
    had, `wait` simply times out, and the next `wait` tries to listen again.
    Every `check_interval` seconds the session is asked to answer (within the
    database's answer timeout) beside the wait; one that does not is dropped,
    and the next `wait` listens on a new one.
    """

    def __init__(self, db: Database, *, check_interval: float = LISTEN_CHECK_INTERVAL) -> None:
        self._db = db
        self._conn: asyncpg.Connection | None = None
        self._woken = asyncio.Event()
        self._check_interval = check_interval
        self._next_check = 0.0
        self._checking: asyncio.Task[None] | None = None

    def clear(self) -> None:
        self._woken.clear()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a poll interval
        await self._listen()
        self._check_when_due()
        try:
            async with asyncio.timeout(timeout):
                await self._woken.wait()
        except TimeoutError:
            return False
        return True

    async def _listen(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        self._conn = None
        try:
            conn = await connect(self._db, COMMAND_DATABASE)
        except Unavailable as error:
            log.debug("cannot listen for commits; polling", error=error.detail)
            return
        try:
            with translated(COMMAND_DATABASE):
                await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except Unavailable as error:
            conn.terminate()
            log.debug("cannot listen for commits; polling", error=error.detail)
            return
        except BaseException:  # cancelled (the lock lost, the service stopping): not kept
            conn.terminate()
            raise
        self._conn = conn
        self._next_check = time.monotonic() + self._check_interval
        self._woken.set()  # events committed while nobody listened are relayed at once

    def _check_when_due(self) -> None:
        conn = self._conn
        if conn is None or self._checking is not None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self._check_interval
        self._checking = asyncio.create_task(self._check(conn))

    async def _check(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.fetchval("SELECT 1")
        except Exception as error:
            # Not answered in time, or lost: listen on a new session from the next wait.
            log.debug("the listening session did not answer; listening again", error=repr(error))
            conn.terminate()
        finally:
            self._checking = None

    def _notified(self, *_: object) -> None:
        self._woken.set()

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checking
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await close_connection(conn)
