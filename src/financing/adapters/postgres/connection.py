"""Connections to PostgreSQL, and the translation of its errors at this adapter's boundary.

Nothing above the adapter sees asyncpg's exceptions: a database that cannot
be reached becomes `Unavailable`, two writers racing becomes
`ConcurrencyConflict`, credentials or a database the server does not know
become `Refused` when opening a pool, at start-up; once the database has
accepted the service they are an outage like any other. Anything else is left
as it is: a bug.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from financing.adapters.postgres.capacity import Capacity
from financing.application.errors import (
    AwaitingOperator,
    ConcurrencyConflict,
    PoisonMessage,
    Refused,
    Unavailable,
    said_of,
)
from financing.application.ports import OtherSession
from financing.config import Database

# A connection that statements can run on: a dedicated one or one borrowed from a pool.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy

COMMAND_DATABASE = "command database"
# The application_name of the service's sessions; the command line names its own.
SERVICE_APPLICATION = "financing"
QUERY_DATABASE = "query database"

# SQLSTATE classes that say the server cannot serve now, not that the statement is wrong:
# 08 connection exception, 53 insufficient resources (too many connections, disk full),
# 57 operator intervention (shutdown, backend terminated, server starting, query
# cancelled), 58 system error (I/O).
_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})
# States that say the server will not serve the service now, though it answers, until an
# operator is done: 25006 read-only transaction, as on a standby that has not been promoted
# yet; 55P03 lock not available, a lock held (by maintenance: an index built) longer than
# the session's `lock_timeout`; 42501 insufficient privilege, the service's privileges on
# its tables revoked; 42P01 undefined table, its tables out of the session's sight (a
# `search_path` changed to schemas that do not hold them); 42703 undefined column, a table
# of another's of the same name in sight before its own (a `search_path` putting a
# schema that holds an `events` of its own first); 42P10 invalid column reference, an
# upsert whose unique index a DBA dropped (`schema.require_indexes` names it). Taken for
# bugs, each dead-lettered every message meanwhile, or stopped the service.
_UNAVAILABLE_STATES = frozenset({"25006", "55P03", "42501", "42P01", "42703", "42P10"})

# Errors by which PostgreSQL tells one of two racing writers to retry.
RACE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.UniqueViolationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)

# Refusals that waiting does not cure: fail start-up at once.
_REFUSALS: tuple[type[Exception], ...] = (
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.InvalidAuthorizationSpecificationError,  # unknown role, wrong password
    # The connection string's own options (an sslmode the driver does not know).
    asyncpg.exceptions.ClientConfigurationError,
    # A setting its `options` gives that the server does not have, or refuses the value
    # of, or the role may not set.
    asyncpg.exceptions.UndefinedObjectError,
    asyncpg.exceptions.InvalidParameterValueError,
    asyncpg.exceptions.InsufficientPrivilegeError,
)

# What a pooler that hands a client's connection out per transaction or per statement
# does to the driver's prepared statements: each is prepared on one server session and
# run on another.
_POOLED_STATEMENTS = (
    asyncpg.exceptions.InvalidSQLStatementNameError,
    asyncpg.exceptions.DuplicatePreparedStatementError,
)
POOLED_SESSIONS = (
    "its sessions are not the service's own: a pooler hands its connections out per"
    " transaction or per statement (PgBouncer's transaction or statement mode), where the"
    " service's prepared statements, its relayer's lock and its LISTEN do not hold (two"
    " relayers may run, every event going out twice). Put the service behind a pooler in"
    ' session mode, or straight before PostgreSQL (docs/scaling.md, "Poolers")'
)


class PooledSessions(Exception):
    """A session's server backend changed under one connection: what a pooler in
    transaction or statement mode does, where a session's advisory lock is not held."""

    def __init__(self, dependency: str, before: int, after: int) -> None:
        super().__init__(
            f"{dependency}: one connection's statements ran on server backend {before},"
            f" then {after}: {POOLED_SESSIONS}"
        )


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database cannot be reached now (rather than a bug)."""
    if isinstance(error, asyncpg.exceptions.ClientConfigurationError):
        return False  # an InterfaceError, but the configuration's: waiting does not cure it
    if isinstance(
        error,
        OSError  # refused, reset, unreachable; includes ConnectionError
        | TimeoutError  # connect or command timeout
        | asyncpg.InterfaceError  # "connection is closed" and other client-side states
        # The first use of a pooled session the server ended while it sat idle
        # can fail with "cannot switch to state N" before the pool notices.
        | asyncpg.exceptions.InternalClientError,
    ):
        return True
    if isinstance(error, asyncpg.PostgresError):
        state = str(getattr(error, "sqlstate", "") or "")
        return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_STATES
    return False


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError) and not str(error):
        return "no answer in time (FINANCING_DB_TIMEOUT)"
    said = said_of(error)
    if isinstance(error, asyncpg.exceptions.InternalClientError) and str(error).endswith(
        "another operation (2) is in progress"  # 2: consuming what follows a server's error
    ):
        # What the driver says of a session the server ended (pg_terminate_backend, a
        # restart, its database dropped), found on its next use: the server's own message
        # is not kept. Not only an idle one: one mid-statement says the same.
        return f"the server ended the session; the driver kept none of its words ({said})"
    if isinstance(error, asyncpg.QueryCanceledError) and _CUT_BY_TIMEOUT in str(error):
        # Whichever statement it cut: one as a session opened, at start-up, was said bare.
        said += f": {CUT_BY_TIMEOUT}"
    return said


# Text the database's encoding cannot hold (a LATIN1 database, a `€` or an emoji in a
# message id, a correlation id or a foreign event's body): what carries it is poison.
_UNHELD_TEXT = (
    asyncpg.exceptions.UntranslatableCharacterError,
    asyncpg.exceptions.CharacterNotInRepertoireError,
)


def _translate(error: BaseException, dependency: str) -> None:
    """Raise what a driver error raised while using a connection means to the
    application (ConcurrencyConflict, Unavailable, PoisonMessage); return for a bug,
    left as it is."""
    if isinstance(error, _UNHELD_TEXT):
        raise PoisonMessage(
            f"{dependency} cannot hold a character of it, in its encoding: {describe(error)}"
        ) from error
    if isinstance(error, RACE_ERRORS):
        raise ConcurrencyConflict(f"{dependency}: {describe(error)}") from error
    if isinstance(error, _POOLED_STATEMENTS):
        raise AwaitingOperator(dependency, POOLED_SESSIONS) from error
    if isinstance(error, Exception) and is_unavailable(error):
        said = describe(error)
        if getattr(error, "sqlstate", None) in _OUT_OF_SIGHT:
            said += f": {OUT_OF_SIGHT}"
        raise Unavailable(dependency, said) from error


# Undefined table, undefined column: the service's statements name its own tables, which
# a session finds by its search_path.
_OUT_OF_SIGHT = frozenset({"42P01", "42703"})
OUT_OF_SIGHT = (
    "the service's tables out of its sessions' search_path (ALTER DATABASE or ALTER ROLE"
    " ... SET search_path), in a schema its role may not use (GRANT USAGE ON SCHEMA), or"
    " another schema's tables of the same names before them?"
)


# The server's words for a statement its `statement_timeout` cut (57014, which a
# cancellation by an operator, `pg_cancel_backend`, shares with other words).
_CUT_BY_TIMEOUT = "due to statement timeout"
CUT_BY_TIMEOUT = (
    "the server's statement_timeout ended it (set on the database or the role: ALTER"
    " DATABASE or ALTER ROLE ... SET statement_timeout; or in the connection string's"
    " options)"
)


def _translate_opening(error: BaseException, dependency: str) -> None:
    """Raise what a failure to open the first connection means: a refusal or an outage;
    return for a bug."""
    if isinstance(error, _REFUSALS):
        raise Refused(dependency, describe(error)) from error
    if isinstance(error, asyncpg.exceptions.ProtocolViolationError) and (
        "unsupported startup parameter" in str(error)
    ):
        # A pooler's (PgBouncer's) refusal of a setting the connection string's `options`
        # give: waiting does not cure it.
        raise Refused(
            dependency,
            f"{describe(error)}: a pooler stands before the database and refuses the"
            " setting; let it through (PgBouncer 1.20 and later: track_extra_parameters;"
            " ignore_startup_parameters drops it instead), set it on the database or the"
            " role (ALTER ROLE ... SET), or drop it from the connection string's options",
        ) from error
    _translate_reopening(error, dependency)


def _translate_reopening(error: BaseException, dependency: str) -> None:
    """Raise what a failure to open a connection means once the database has accepted
    the service: an outage, refusals included (a password rotated, a role not allowed to
    log in for a while, a database renamed), which ends once the operator is done, as
    the broker's does; return for a bug."""
    if isinstance(error, Exception) and (
        is_unavailable(error) or isinstance(error, asyncpg.PostgresError)
    ):
        # Any server error while connecting (a database not accepting
        # connections, or being dropped or renamed) ends once the operator is done.
        raise Unavailable(dependency, describe(error)) from error


class _Translating:
    """A block whose error leaves it as `translate` says (a class, not a generator:
    it is entered on every statement's way)."""

    __slots__ = ("_dependency", "_translate")

    def __init__(self, translate: Callable[[BaseException, str], None], dependency: str) -> None:
        self._translate = translate
        self._dependency = dependency

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: Any
    ) -> None:
        if error is not None:
            self._translate(error, self._dependency)


def translated(dependency: str) -> AbstractContextManager[None]:
    """Driver errors raised inside the block, as the application's error types."""
    return _Translating(_translate, dependency)


def opening(dependency: str) -> AbstractContextManager[None]:
    """What a failure to open the first connection means: a refusal, an outage, or a bug."""
    return _Translating(_translate_opening, dependency)


def reopening(dependency: str) -> AbstractContextManager[None]:
    """What a failure to open a connection means once the database accepted the service
    (a pool made, `create_pool`): an outage, or a bug."""
    return _Translating(_translate_reopening, dependency)


# How long a cancelled block's session may take to be given back (the server to
# acknowledge its statement's cancellation) before it is dropped (seconds).
CANCELLED_RELEASE = 1.0


class acquired:
    """A pooled connection, errors translated, from opening it to the last statement.

    A class rather than a generator-based context manager: every unit of work, read
    and ring goes through it, and a generator's frame and its wrappers cost more than
    the work it does.
    """

    __slots__ = ("_capacity", "_conn", "_dependency", "_pool")

    def __init__(self, pool: asyncpg.Pool, dependency: str) -> None:
        self._pool = pool
        self._dependency = dependency
        self._capacity = _CAPACITIES.get(pool)  # None: a pool not made by `create_pool`

    async def __aenter__(self) -> Connection:
        capacity = self._capacity
        if capacity is None:
            with reopening(self._dependency):
                self._conn: PoolConnectionProxy = await self._pool.acquire()
            return self._conn
        while True:
            await capacity.take(self._pool.get_size)
            try:
                with reopening(self._dependency):
                    self._conn = await self._pool.acquire()
                return self._conn
            except BaseException as error:
                capacity.give_back(self._pool.get_size)
                opened = self._pool.get_size()
                if (refusal := _limit_refusal(error)) is None or not opened:
                    raise
                capacity.hold_to(opened, refusal)
                await capacity.after_refusal()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: Any
    ) -> None:
        if isinstance(error, asyncio.CancelledError):
            # Cancelled (its caller's deadline, a probe's timeout), maybe with a statement
            # in flight: the pool waits for the server to acknowledge the statement's
            # cancellation, at most CANCELLED_RELEASE, then drops the session (a silent
            # server kept a health probe waiting FINANCING_DB_TIMEOUT: it saw the
            # database's outage 13 s late, or only once it was over). The cancellation
            # goes on whatever the release meets.
            try:
                with contextlib.suppress(Exception):
                    await self._pool.release(self._conn, timeout=CANCELLED_RELEASE)
            finally:
                self._given_back()
            return
        try:
            if error is not None:
                if isinstance(error, TimeoutError):
                    if await _answers_after_a_timeout(self._conn):
                        raise Unavailable(self._dependency, WAITED) from error
                elif getattr(error, "sqlstate", None) in _SESSION_STATES:
                    drop_stale(self._conn)
                _translate(error, self._dependency)
        finally:
            try:
                with translated(self._dependency):
                    await self._pool.release(self._conn)
            finally:
                self._given_back()
            RELEASED[self._dependency] += 1

    def _given_back(self) -> None:
        if self._capacity is not None:
            self._capacity.give_back(self._pool.get_size)


def _limit_refusal(error: BaseException) -> str | None:
    """What the server said where `error` (translated) is its refusal of one more session
    for a connection limit (53300); None where it is not."""
    cause = error.__cause__
    return describe(cause) if isinstance(cause, asyncpg.TooManyConnectionsError) else None


# Sessions given back to their pool after a unit of work ended, by dependency: whether
# the pool's sessions serve statements, for a health probe that finds them all taken.
RELEASED: collections.Counter[str] = collections.Counter()

# What a statement's timeout means when the server answers at once afterwards.
WAITED = (
    "the server answers, but a statement waited longer than FINANCING_DB_TIMEOUT"
    " (on a lock another session holds, which `financing status` names, or a statement"
    " that slow)"
)


async def _answers_after_a_timeout(conn: Connection) -> bool:
    """Whether the server acknowledges the cancellation of the statement that timed out on
    `conn` and answers within CANCELLED_RELEASE: the statement waited on something (a lock
    another session holds), which "no answer in time" sent operators looking at the
    network. A server that does not answer has its session dropped, rather than waited
    on again for the cancellation's acknowledgement."""
    try:
        async with asyncio.timeout(CANCELLED_RELEASE):
            await conn.fetchval("SELECT 1")
    except (Exception, asyncio.CancelledError) as error:  # the timeout, the connection lost
        drop_stale(conn)
        if isinstance(error, asyncio.CancelledError):
            raise
        return False
    return True


# What `other_session` reads of a session, from pg_stat_activity as `a`. Measured to the
# moment it is read (`clock_timestamp()`), not to the start of the reader's transaction
# (`now()`): a migration that waited 2 s for the lock before it named the holder said its
# transaction open for 2 s less than it was.
SESSION_COLUMNS = (
    "a.pid, a.usename, a.application_name, host(a.client_addr) AS client, a.state,"
    " extract(epoch FROM clock_timestamp() - a.xact_start)::float8 AS open_for,"
    " CASE WHEN a.state = 'idle'"
    " THEN extract(epoch FROM clock_timestamp() - a.state_change)::float8 END AS idle_for"
)


def other_session(row: asyncpg.Record) -> OtherSession:
    """The session a row of SESSION_COLUMNS shows."""
    state = row["state"]
    return OtherSession(
        pid=row["pid"],
        user=row["usename"] or "",
        application=row["application_name"] or "",
        client=None if state is None else row["client"] or "local",
        state=state,
        open_for=None if row["open_for"] is None else max(0.0, float(row["open_for"])),
        idle_for=None if row["idle_for"] is None else max(0.0, float(row["idle_for"])),
    )


async def advisory_lock_holder(conn: Connection, key: int) -> OtherSession | None:
    """The session holding the advisory lock `key` of this database, if any."""
    row = await conn.fetchrow(
        f"SELECT {SESSION_COLUMNS} FROM pg_locks AS l JOIN pg_stat_activity AS a"
        " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.database = ("
        "SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND ((l.classid::bigint << 32) | l.objid::bigint) = $1 AND l.objsubid = 1"
        " LIMIT 1",
        key,
    )
    return None if row is None else other_session(row)


# A lock that stops a table's writes or its reads (SHARE and stronger: LOCK TABLE, CREATE
# INDEX, REINDEX, CLUSTER, VACUUM FULL, ALTER TABLE).
_STOPPING_MODES = "('ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')"
_TABLES = "(SELECT to_regclass(t) FROM unnest($1::text[]) AS t)"


async def tables_locked(
    conn: Connection, tables: Sequence[str], held: float = 0.0
) -> list[tuple[str, OtherSession]]:
    """(table, holder) for each of `tables` (as the session names them) another session
    holds a lock on that stops its writes or its reads (SHARE and stronger), in a
    transaction open `held` seconds or more, the oldest transaction first: what the service's
    statements on it wait for, now or at their next. Judged by the waiters instead, it
    came and went as each waiter gave up (at FINANCING_DB_TIMEOUT, or a client's
    deadline), a locked table said healthy half the time."""
    rows = await conn.fetch(
        f"SELECT l.relation::regclass::text AS locked, {SESSION_COLUMNS} FROM pg_locks AS l"
        " JOIN pg_stat_activity AS a ON a.pid = l.pid WHERE l.locktype = 'relation'"
        f" AND l.granted AND l.pid <> pg_backend_pid() AND l.relation IN {_TABLES}"
        f" AND l.mode IN {_STOPPING_MODES}"
        " AND a.xact_start <= clock_timestamp() - make_interval(secs => $2)"
        " ORDER BY a.xact_start, locked",
        list(tables),
        held,
    )
    return [(row["locked"], other_session(row)) for row in rows]


# What a health probe says when every session of the pool stayed busy for PROBE_POOL_WAIT
# seconds: said "no answer to a health probe", it sent operators looking at the network
# while the sessions waited on a table another session had locked.
POOL_BUSY = (
    "every one of its {sessions} pooled sessions is busy: their statements wait on a lock"
    " another session holds (`financing status` names it), or are that slow"
)
PROBE_POOL_WAIT = 1.5  # of the health probe's 2 s


def has_room(pool: asyncpg.Pool) -> bool:
    """Whether a session of `pool` is free now, or one more may be opened, and no unit of
    work waits for one: one taken now waits behind none. A pool still growing, every
    session it may hold taken or being opened for units of work in line, had the health
    probe wait behind them: with the database 200 ms away each way, past its time."""
    capacity = _CAPACITIES.get(pool)
    if capacity is not None and (capacity.queued or capacity.taken >= capacity.limit):
        return False
    return bool(pool.get_idle_size()) or pool.get_size() < sessions_allowed(pool)


class _probing(acquired):
    """`acquired` for a health probe: a pool whose every session stays taken for
    PROBE_POOL_WAIT is said to be busy (Unavailable, POOL_BUSY), unless units of work
    ended meanwhile: its sessions then serve statements, and the probe, behind the
    service's own work in the pool's line, has no session (None) and needs none. Said
    busy, a service with more deliveries in flight than sessions logged the command
    database's outage under its own load (five times in a run, 5.5-6.8 s each). A wait
    for a session being opened is the server's to answer, within the probe's own time."""

    __slots__ = ()

    async def __aenter__(self) -> Connection | None:  # type: ignore[override]
        pool = self._pool
        if has_room(pool):
            return await super().__aenter__()
        released = RELEASED[self._dependency]
        try:
            async with asyncio.timeout(PROBE_POOL_WAIT):
                return await super().__aenter__()
        except TimeoutError:
            if RELEASED[self._dependency] != released:
                self._conn = None  # type: ignore[assignment]
                return None
            sessions = sessions_allowed(pool)
            raise Unavailable(self._dependency, POOL_BUSY.format(sessions=sessions)) from None

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: Any
    ) -> None:
        if self._conn is not None:
            await super().__aexit__(kind, error, tb)


async def ping(pool: asyncpg.Pool, dependency: str) -> bool:
    """Return if the database answers a statement now; Unavailable if not. Whether it was
    asked on a session of the probe's own (False: the pool's sessions were answering the
    service's statements, which says as much)."""
    async with _probing(pool, dependency) as conn:
        if conn is None:  # the pool's sessions answer the service's statements
            return False
        await conn.fetchval("SELECT 1")
    return True


# What a database that answers and takes no writes is said to be.
READ_ONLY = (
    "it takes no writes: its transactions are read-only (a standby not promoted yet, or"
    " default_transaction_read_only set on the database or the role); the service waits"
    " for writes to be taken and goes on by itself"
)


async def writable(pool: asyncpg.Pool, dependency: str) -> bool:
    """Return if the database answers and takes writes now; Unavailable if not. A server
    that answers but takes no writes (a standby not yet promoted, one read-only by
    default: 25006 to every write) is still out for the service, which writes. Whether
    it was asked on a session of the probe's own, as `ping` says."""
    async with _probing(pool, dependency) as conn:
        if conn is None:  # the pool's sessions serve the service's units of work
            return False
        read_only = await conn.fetchval("SELECT current_setting('transaction_read_only')")
        if read_only != "off":
            drop_stale(conn)
    if read_only != "off":
        raise AwaitingOperator(dependency, READ_ONLY)
    return True


# States by which the server refuses a session for a setting it may hold from its start
# (`ALTER DATABASE` or `ALTER ROLE ... SET`): 25006 read-only by default, 57014 a
# `statement_timeout`, 55P03 a `lock_timeout`, 42P01 a `search_path` without its tables,
# 42703 one that finds another's tables of the same names first.
_SESSION_STATES = frozenset({"25006", "57014", "55P03", "42P01", "42703"})


def drop_stale(conn: Connection) -> None:
    """Drop a session the server refuses, or that finds the database otherwise, for a
    state that may be its own (_SESSION_STATES; tables out of its `search_path`): a
    session keeps the settings it started with, so a pooled one kept the service down
    after the operator had set them back. The next attempt opens a session with the
    settings of then."""
    with contextlib.suppress(asyncpg.InterfaceError):  # already given back, closed
        conn.terminate()


# Seconds a session may sit in a transaction without sending anything before the server
# ends it, its locks with it (`_session`): no transaction of the service waits that long
# on its own client between two statements.
IDLE_IN_TRANSACTION = 10.0


async def create_pool(
    db: Database,
    dependency: str = "database",
    *,
    min_size: int = 1,
    application_name: str = SERVICE_APPLICATION,
) -> asyncpg.Pool:
    """A pool of at most `db.pool_max_size` connections, `min_size` opened up front."""
    with opening(dependency):
        pool = await asyncpg.create_pool(
            **_session(db, application_name),
            min_size=min(min_size, db.pool_max_size),
            max_size=db.pool_max_size,
            reset=_keep_session,
            init=partial(_settle_session, db),
        )
    assert pool is not None  # only None when created without awaiting
    _CAPACITIES[pool] = Capacity(db.pool_max_size, dependency)
    return pool


# The capacity of each pool `create_pool` made, until `close_pool`.
_CAPACITIES: dict[asyncpg.Pool, Capacity] = {}


def sessions_allowed(pool: asyncpg.Pool) -> int:
    """How many sessions units of work may take from `pool` at once: its size, or fewer
    while a connection limit of the server holds it below that (`Capacity`)."""
    capacity = _CAPACITIES.get(pool)
    return pool.get_max_size() if capacity is None else capacity.limit


@dataclass(frozen=True)
class SessionLimits:
    """How many sessions the server lets a pool's role open: on the whole server (its
    `CONNECTION LIMIT`, and `max_connections` less the superusers' reserve) and on the
    database (its own `CONNECTION LIMIT`); None where there is no such limit. A
    superuser is held to none of them."""

    role: str
    database: str
    role_limit: int | None
    database_limit: int | None
    server_limit: int | None


_SESSION_LIMITS = (
    "SELECT current_user AS role, current_database() AS database, r.rolsuper AS super,"
    " nullif(r.rolconnlimit, -1) AS role_limit, nullif(d.datconnlimit, -1) AS database_limit,"
    " current_setting('max_connections')::int"
    " - current_setting('superuser_reserved_connections')::int AS server_limit"
    " FROM pg_roles AS r, pg_database AS d"
    " WHERE r.rolname = current_user AND d.datname = current_database()"
)


async def session_limits(pool: asyncpg.Pool, dependency: str) -> SessionLimits:
    async with acquired(pool, dependency) as conn:
        row = await conn.fetchrow(_SESSION_LIMITS)
    assert row is not None  # the session's own role and database
    if row["super"]:
        return SessionLimits(row["role"], row["database"], None, None, None)
    return SessionLimits(
        row["role"], row["database"], row["role_limit"], row["database_limit"], row["server_limit"]
    )


async def role_sessions(pool: asyncpg.Pool, dependency: str) -> int:
    """How many sessions the pool's role holds on the server now, this process's among
    them (`pg_stat_activity` shows every role's sessions to each)."""
    async with acquired(pool, dependency) as conn:
        held: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = current_user"
        )
    return held


def too_few_sessions(
    needs: Sequence[tuple[str, SessionLimits, int]], *, least: bool = False
) -> list[str]:
    """What limits fewer sessions than one process opens, given for each of its databases
    (by its server's address) the limits of its pool's role and the sessions it opens
    there at most: a pool that cannot grow meets an outage each time it tries, and one
    of two pools of a role may be left with none at all. With `least`, the sessions given
    are the fewest the process can work with, and a limit below them leaves it none."""
    if least:
        opens = "needs at least {n} as {role} (a session each pool, two more while one starts"
        opens += ", and a relayer's 2): {fix} higher"
        opens_there = "needs at least {n} there: {fix} higher"
    else:
        opens = "alone opens up to {n} as {role} (each pool's pool_max_conns, and a relayer's"
        opens += " 2): {fix} higher, or lower pool_max_conns"
        opens_there = "alone opens up to {n} there: {fix} higher, or lower pool_max_conns"
    said = []
    by_role: dict[tuple[str, str], int] = collections.Counter()
    for server, limits, sessions in needs:
        by_role[(server, limits.role)] += sessions
    for server, limits, sessions in needs:
        on_server = by_role[(server, limits.role)]
        for limit, what, fix in (
            (
                limits.role_limit,
                f"role {limits.role} may open {limits.role_limit} session(s) on the server",
                f"ALTER ROLE {limits.role} CONNECTION LIMIT",
            ),
            (
                limits.server_limit,
                f"server takes {limits.server_limit} session(s) of roles that are not"
                " superusers (max_connections)",
                "raise max_connections",
            ),
        ):
            if limit is not None and limit < on_server:
                how = opens.format(n=on_server, role=limits.role, fix=fix)
                said.append(f"the {what}, and this process {how}")
        if limits.database_limit is not None and limits.database_limit < sessions:
            fix = f"ALTER DATABASE {limits.database} CONNECTION LIMIT"
            how = opens_there.format(n=sessions, fix=fix)
            said.append(
                f"the database {limits.database} takes {limits.database_limit} session(s),"
                f" and this process {how}"
            )
    return list(dict.fromkeys(said))  # a limit two databases share, said once


def pooled_sessions(needs: Sequence[tuple[str, SessionLimits, int, int]]) -> list[int]:
    """How many sessions each pool may open within the limits of its server, its role and
    its database, given for each (by its server's address) its role's limits, its size and
    the sessions the process opens there beside it (a relayer's lock and listener): the
    sessions beside come first, and the pools of one role share what is left in
    proportion to their sizes, at least one each. A pool that grew beyond it took the
    sessions the relayer needs, and the relayer never ran."""
    sizes = [size for _, _, size, _ in needs]
    by_role: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for index, (server, limits, _, _) in enumerate(needs):
        by_role[(server, limits.role)].append(index)
    for members in by_role.values():
        limits = needs[members[0]][1]
        allowed = [limit for limit in (limits.role_limit, limits.server_limit) if limit is not None]
        if not allowed:
            continue
        room = min(allowed) - sum(needs[index][3] for index in members)
        wanted = sum(sizes[index] for index in members)
        if wanted > room:
            for index in members:
                sizes[index] = max(1, min(sizes[index], room * sizes[index] // wanted))
    for index, (_, limits, _, beside) in enumerate(needs):
        if limits.database_limit is not None:
            sizes[index] = max(1, min(sizes[index], limits.database_limit - beside))
    return sizes


def hold_pool(pool: asyncpg.Pool, sessions: int) -> None:
    """Let units of work take at most `sessions` of `pool`'s sessions at once, for good
    (`pooled_sessions`)."""
    capacity = _CAPACITIES.get(pool)
    if capacity is not None:
        capacity.resize(sessions)


# How long closing a pool or a session waits for the server to see it out; then the
# sessions are dropped: a server that stops answering must not hold a shutdown.
CLOSE_TIMEOUT = 2.0


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close `pool`'s sessions in order, or drop them after CLOSE_TIMEOUT."""
    _CAPACITIES.pop(pool, None)
    await _closed_in_time(pool)


async def close_connection(conn: asyncpg.Connection) -> None:
    """Close a dedicated session in order, or drop it after CLOSE_TIMEOUT."""
    await _closed_in_time(conn)


async def _closed_in_time(closable: asyncpg.Pool | asyncpg.Connection) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await closable.close()
    except Exception as error:
        closable.terminate()
        if not is_unavailable(error):
            raise


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a pooled connection needs on release besides the rollback of a transaction
    left open (which the pool always does): nothing. Pooled sessions never SET, LISTEN,
    take session advisory locks or keep cursors (dedicated connections do those), so
    the driver's default reset query would cost a round trip on every release for
    nothing."""


async def connect(
    db: Database,
    dependency: str = "database",
    *,
    application_name: str = SERVICE_APPLICATION,
    named_statements: bool = True,
) -> asyncpg.Connection:
    """One dedicated connection, outside any pool (locks, LISTEN), opened while the
    service runs: the pool of the same database was made first. Without
    `named_statements`, each statement is prepared unnamed, in the round trip that runs
    it: one that a pooler hands to another server session still runs there."""
    options = _session(db, application_name)
    if not named_statements:
        options["statement_cache_size"] = 0
    try:
        with reopening(dependency):
            conn: asyncpg.Connection = await asyncpg.connect(**options)
            try:
                await _settle_session(db, conn)
            except BaseException:
                conn.terminate()
                raise
            return conn
    except Unavailable as error:
        if (refusal := _limit_refusal(error)) is not None:
            await _make_room(refusal)
        raise


async def _make_room(why: str) -> None:
    """A dedicated session (the relayer's lock, the commit listener) refused by a
    connection limit: each pool of the process gives back one of its idle sessions, and is
    held to those it keeps, so that the next attempt finds room. Lowered at run time,
    the limit let the pools take every session as they grew back, and the relayer
    waited for their idle sessions to expire (300 s), relaying nothing; a standby's
    outage never ended."""
    for pool, capacity in list(_CAPACITIES.items()):
        if pool.get_size() <= 1:
            continue
        # One session fewer from now on: where none is idle now, one will be, for the
        # next refusal to take.
        capacity.hold_to(pool.get_size() - 1, why)
        if pool.get_idle_size():
            # Taken and ended in this step (no timeout: asyncpg's would wait in a task of
            # its own, and a session given back meanwhile raised the hold again).
            with contextlib.suppress(Exception):  # closing
                idle = await pool.acquire()
                idle.terminate()
                await pool.release(idle)


async def _settle_session(db: Database, conn: asyncpg.Connection) -> None:
    """The settings of a session the service opens, made in one round trip once it is
    open, not sent as it opens: a pooler in front of the database (PgBouncer) refuses
    settings it does not know in the opening, and one told to let them through drops
    them (JIT back on, and no end to a session idle in a transaction).

    A client that stops sending in the middle of a transaction (its process frozen, or
    its host cut off, its socket left open) would hold the transaction's locks for as
    long as the server keeps the socket: the projector that took over from a frozen one
    waited on its row locks for the whole freeze. The server ends such a session once
    it has been idle in a transaction for IDLE_IN_TRANSACTION (or the answer timeout,
    when longer).

    A session is not ended for sitting idle (`idle_session_timeout`, which a database or
    a role may set) unless the connection string's `options` say so: the pool ends the
    sessions it has not lent for 5 minutes itself, and one the server ended while it sat
    in the pool failed the next statement lent it (at 1 s, the query database was said
    to be out every few seconds, its `/health` at 503 half the time, over a database
    that answered). The relayer's lock session sets its own (its lease).

    JIT compilation is off unless the connection string's `options` turn it on: the
    service's statements are short, and compiled they are slower (a database set to
    compile every statement, `jit_above_cost = 0`, ran the service ~50 times slower,
    its first statement of each session taking a third of a second)."""
    given = db.connect_kwargs.get("server_settings", {})
    idle = round(max(IDLE_IN_TRANSACTION, db.answer_timeout) * 1000)
    settings = [f"SET idle_in_transaction_session_timeout = {idle}"]
    if "jit" not in given:
        settings.append("SET jit = off")
    if "idle_session_timeout" not in given and conn.get_server_version() >= (14, 0):
        settings.append("SET idle_session_timeout = 0")
    await conn.execute(";".join(settings))


# The sessions `refuse_pooled_sessions` opens beside its database's pool.
CHECK_SESSIONS = 2


async def refuse_pooled_sessions(db: Database, dependency: str) -> None:
    """Refused where a pooler hands the database's connections out per transaction or per
    statement (PgBouncer's transaction or statement mode), before the service writes
    through it: two connections each run a transaction, ended the other way round, then
    a statement; a session of its own runs each connection's statements on one server
    backend, where a pooler puts at least one of them on the backend the other had."""
    first = await connect(db, dependency, named_statements=False)
    try:
        second = await connect(db, dependency, named_statements=False)
        try:
            with translated(dependency):
                backends = []
                for conn in (first, second):
                    await _begin(conn, dependency)
                    backends.append(await conn.fetchval("SELECT pg_backend_pid()"))
                for conn in (second, first):
                    await conn.execute("COMMIT")
                after = [await conn.fetchval("SELECT pg_backend_pid()") for conn in (first, second)]
        finally:
            await close_connection(second)
    finally:
        await close_connection(first)
    for before, now in zip(backends, after, strict=True):
        if before != now:
            raise Refused(dependency, str(PooledSessions(dependency, before, now)))


async def _begin(conn: asyncpg.Connection, dependency: str) -> None:
    try:
        await conn.execute("BEGIN")
    except asyncpg.PostgresError as error:
        if "pooling mode" not in str(error):  # PgBouncer's words in statement mode
            raise
        raise Refused(dependency, f"{describe(error)}: {POOLED_SESSIONS}") from error


def _session(db: Database, application_name: str) -> dict[str, Any]:
    """Connection arguments naming the session, so that an operator looking at
    pg_stat_activity (or a lock it waits on) can tell who holds it, and bounding how
    long the server may take to answer.

    A server that stops answering without closing its sockets (frozen, or behind a
    partition that drops packets) would otherwise hold every statement sent to it,
    and the connection with it, for as long as the kernel keeps the socket: no
    outage would be seen, and nothing would heal once the server was back. With
    `command_timeout`, a statement not answered in time fails with TimeoutError (an
    outage, retried like any other); the driver then asks the server to cancel it,
    and closes the connection when that goes unanswered as long.

    The session's other settings are made once it is open (`_settle_session`)."""
    settings = {
        **db.connect_kwargs.get("server_settings", {}),
        "application_name": application_name,
    }
    return {
        "timeout": db.answer_timeout,  # connecting; a connection string's connect_timeout wins
        **db.connect_kwargs,
        "server_settings": settings,
        "command_timeout": db.answer_timeout,
    }
