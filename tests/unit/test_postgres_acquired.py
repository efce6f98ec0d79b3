"""A pooled connection goes back to its pool whatever ends the block, and the driver's
errors leave `acquired` and the event store's unit of work translated: a race as
ConcurrencyConflict, an outage as Unavailable, anything else (a bug, a cancellation)
as it is."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from financing.adapters.postgres.connection import (
    CANCELLED_RELEASE,
    COMMAND_DATABASE,
    CUT_BY_TIMEOUT,
    QUERY_DATABASE,
    acquired,
    opening,
    reopening,
    translated,
)
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.application.errors import (
    AlreadyProcessed,
    ConcurrencyConflict,
    Refused,
    Unavailable,
)


class FakeConnection:
    def __init__(self, write_error: BaseException | None = None) -> None:
        self.write_error = write_error
        self.statements: list[str] = []
        self.terminated = False

    def terminate(self) -> None:
        self.terminated = True

    async def fetchval(self, query: str, *args: Any) -> object:
        self.statements.append(query)
        if self.write_error is not None:
            raise self.write_error
        return 0


class FakePool:
    """Hands out one connection; counts what was taken and given back."""

    def __init__(
        self,
        conn: FakeConnection | None = None,
        *,
        acquire_error: BaseException | None = None,
        release_error: BaseException | None = None,
    ) -> None:
        self.conn = conn or FakeConnection()
        self.acquire_error = acquire_error
        self.release_error = release_error
        self.out = 0
        self.released = 0
        self.timeouts: list[float | None] = []

    async def acquire(self) -> FakeConnection:
        if self.acquire_error is not None:
            raise self.acquire_error
        self.out += 1
        return self.conn

    async def release(self, conn: FakeConnection, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 - asyncpg's own signature
        assert conn is self.conn
        self.out -= 1
        self.released += 1
        self.timeouts.append(timeout)
        if self.release_error is not None:
            raise self.release_error

    def is_closing(self) -> bool:
        return False


def race() -> asyncpg.UniqueViolationError:
    return asyncpg.UniqueViolationError("duplicate key value violates unique constraint")


async def test_the_connection_is_given_back_after_a_block_that_ends_well() -> None:
    pool = FakePool()
    async with acquired(pool, COMMAND_DATABASE) as conn:  # type: ignore[arg-type]
        assert conn is pool.conn
        assert pool.out == 1
    assert (pool.out, pool.released) == (0, 1)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (race(), ConcurrencyConflict),
        (ConnectionResetError("reset by peer"), Unavailable),
        (asyncpg.AdminShutdownError("terminating connection"), Unavailable),
        # The server answers but will not serve the service until an operator is done
        # (regressions: each was a bug, its messages dead-lettered, the relayer stopped):
        # a lock held beyond `lock_timeout`, privileges revoked, tables out of sight.
        (asyncpg.LockNotAvailableError("canceling statement due to lock timeout"), Unavailable),
        (asyncpg.InsufficientPrivilegeError("permission denied for table events"), Unavailable),
        (asyncpg.UndefinedTableError('relation "events" does not exist'), Unavailable),
        # Another's table of the same name found first (a DBA's schema put first in the
        # `search_path`): a bug before, four commands dead-lettered, the relayer stopped.
        (asyncpg.UndefinedColumnError('column "position" does not exist'), Unavailable),
    ],
)
async def test_a_driver_error_in_the_block_is_translated_and_the_connection_given_back(
    error: Exception, expected: type[Exception]
) -> None:
    pool = FakePool()
    with pytest.raises(expected) as raised:
        async with acquired(pool, COMMAND_DATABASE):  # type: ignore[arg-type]
            raise error
    assert raised.value.__cause__ is error
    assert (pool.out, pool.released) == (0, 1)
    if isinstance(raised.value, Unavailable):
        assert raised.value.dependency == COMMAND_DATABASE
    # A session refused for a setting it may hold from its start (lock_timeout,
    # search_path) is dropped, not given back to be refused again; others are kept.
    setting = isinstance(
        error,
        asyncpg.LockNotAvailableError | asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError,
    )
    assert pool.conn.terminated is setting


async def test_a_session_the_server_ended_is_said_to_be_so() -> None:
    """Regression: after pg_terminate_backend the outage's line said only "InternalClientError:
    cannot switch to state 12; another operation (2) is in progress", the driver's words
    for the first use of a session the server ended (idle, or mid-statement: it was said
    to have sat idle where its database was dropped under a statement)."""
    error = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    with pytest.raises(Unavailable) as raised:
        async with acquired(FakePool(), COMMAND_DATABASE):  # type: ignore[arg-type]
            raise error
    assert raised.value.detail == (
        "the server ended the session; the driver kept none of its words (InternalClientError:"
        " cannot switch to state 12; another operation (2) is in progress)"
    )


@pytest.mark.parametrize("error", [ValueError("a bug"), asyncio.CancelledError()])
async def test_a_bug_or_a_cancellation_leaves_as_it_is_and_the_connection_is_given_back(
    error: BaseException,
) -> None:
    pool = FakePool()
    with pytest.raises(type(error)) as raised:
        async with acquired(pool, COMMAND_DATABASE):  # type: ignore[arg-type]
            raise error
    assert raised.value is error
    assert (pool.out, pool.released) == (0, 1)


async def test_a_cancelled_block_waits_a_second_at_most_for_its_session_to_go_back() -> None:
    """Regression: a block cancelled with its statement in flight (the health probe's
    timeout) gave its session back with no bound on the wait for the server to
    acknowledge the statement's cancellation, FINANCING_DB_TIMEOUT for a silent server;
    and a release that fails then does not stand in for the cancellation."""
    pool = FakePool(release_error=TimeoutError())
    with pytest.raises(asyncio.CancelledError):
        async with acquired(pool, COMMAND_DATABASE):  # type: ignore[arg-type]
            raise asyncio.CancelledError
    assert pool.timeouts == [CANCELLED_RELEASE] and CANCELLED_RELEASE <= 1.0


async def test_a_release_the_database_cannot_take_is_unavailable() -> None:
    lost = ConnectionResetError("reset by peer")
    pool = FakePool(release_error=lost)
    with pytest.raises(Unavailable) as raised:
        async with acquired(pool, COMMAND_DATABASE):  # type: ignore[arg-type]
            pass
    assert raised.value.__cause__ is lost


@pytest.mark.parametrize(
    ("error", "at_start_up"),
    [
        (ConnectionRefusedError("refused"), Unavailable),
        (asyncpg.CannotConnectNowError("the database system is starting up"), Unavailable),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), Refused),
        (asyncpg.InvalidAuthorizationSpecificationError('role "x" is not permitted'), Refused),
    ],
)
async def test_a_connection_that_cannot_be_opened_is_an_outage_once_the_service_runs(
    error: Exception, at_start_up: type[Exception]
) -> None:
    """Regression: a refusal met by a pool that had been opened (a password rotated, a
    role not allowed to log in for a while) was `Refused`, a permanent fault: every
    delivery was dead-lettered and the Queries API answered INTERNAL, until a restart."""
    pool = FakePool(acquire_error=error)
    with pytest.raises(Unavailable) as raised:
        async with acquired(pool, COMMAND_DATABASE):  # type: ignore[arg-type]
            pytest.fail("the block ran without a connection")
    assert raised.value.__cause__ is error
    assert pool.released == 0
    with pytest.raises(Unavailable), reopening(COMMAND_DATABASE):
        raise error
    # Opening the first connection, at start-up, a refusal fails at once.
    with pytest.raises(at_start_up), opening(COMMAND_DATABASE):
        raise error


async def test_a_write_that_loses_a_race_is_a_conflict_and_the_connection_given_back() -> None:
    lost = race()
    pool = FakePool(FakeConnection(write_error=lost))
    store = PostgresEventStore(pool)  # type: ignore[arg-type]
    with pytest.raises(ConcurrencyConflict) as raised:
        async with store.unit_of_work() as uow:
            await uow.record("consumer", "message-1")
    assert not isinstance(raised.value, AlreadyProcessed)
    assert raised.value.__cause__ is lost
    assert len(pool.conn.statements) == 1
    assert (pool.out, pool.released) == (0, 1)


async def test_a_unit_of_work_that_fails_writes_nothing_and_gives_its_connection_back() -> None:
    pool = FakePool()
    store = PostgresEventStore(pool)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the handler failed"):
        async with store.unit_of_work() as uow:
            await uow.record("consumer", "message-1")
            raise ValueError("the handler failed")
    assert pool.conn.statements == []
    assert (pool.out, pool.released) == (0, 1)


@pytest.mark.parametrize("translating", [opening, reopening, translated])
def test_a_statement_the_servers_statement_timeout_ended_is_said_so_however_it_was_met(
    translating: Any,
) -> None:
    """Regression (a probe): a statement a database's `statement_timeout` (20 ms) ended as
    a session opened, at start-up, was said bare ("canceling statement due to statement
    timeout") where every other such line said the setting ended it."""
    cut = asyncpg.QueryCanceledError("canceling statement due to statement timeout")
    with pytest.raises(Unavailable) as raised, translating(QUERY_DATABASE):
        raise cut
    assert str(raised.value).endswith(CUT_BY_TIMEOUT), raised.value
    # A cancellation by an operator (pg_cancel_backend) says its own words alone.
    cancelled = asyncpg.QueryCanceledError("canceling statement due to user request")
    with pytest.raises(Unavailable) as raised, translating(QUERY_DATABASE):
        raise cancelled
    assert CUT_BY_TIMEOUT not in str(raised.value)
