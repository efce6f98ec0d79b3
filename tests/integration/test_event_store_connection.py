"""The event store leaves no driver error behind: an outage is Unavailable, a race a conflict.

Losing the database shows as `Unavailable` naming the command database (the
callers retry it), the store recovers once the database is back, and the loser
of two writers racing on one stream gets `ConcurrencyConflict`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from structlog.testing import capture_logs

from financing.adapters.postgres import capacity as capacity_module
from financing.adapters.postgres import connection as connection_module
from financing.adapters.postgres.connection import (
    CLOSE_TIMEOUT,
    COMMAND_DATABASE,
    CUT_BY_TIMEOUT,
    IDLE_IN_TRANSACTION,
    acquired,
    close_connection,
    close_pool,
    connect,
    create_pool,
    ping,
    refuse_pooled_sessions,
    sessions_allowed,
    writable,
)
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.outbox import PostgresOutbox, PostgresRelayerLock
from financing.adapters.postgres.schema import MIGRATION_LOCK, migrate
from financing.application import codec
from financing.application.errors import ConcurrencyConflict, Refused, Unavailable
from financing.config import Database
from financing.domain.aggregates import Investor
from financing.domain.events import BidOnInvoicePlacedEvent
from financing.entrypoints.cli import console
from tests.support import infra
from tests.support.infra import holds, wait_until
from tests.support.relay import Relay
from tests.support.service import free_port


@pytest.fixture(scope="module")
async def database() -> AsyncIterator[Database]:
    async with infra.migrated_database("fin_conn", "commands") as db:
        yield db


@pytest.fixture
async def pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database, COMMAND_DATABASE)
    yield pool
    await pool.close()


async def create_investor(store: PostgresEventStore, investor_id: UUID) -> None:
    async with store.unit_of_work() as uow:
        investor = await uow.load(Investor, investor_id)
        investor.create(Decimal("100"))
        await uow.save(investor)


async def test_an_unreachable_database_is_unavailable_when_connecting_or_opening_a_pool() -> None:
    nowhere = Database({**infra.database("postgres").connect_kwargs, "port": free_port()})

    with pytest.raises(Unavailable) as connecting:
        await connect(nowhere, COMMAND_DATABASE)
    with pytest.raises(Unavailable) as pooling:
        await create_pool(nowhere, COMMAND_DATABASE)

    assert connecting.value.dependency == pooling.value.dependency == COMMAND_DATABASE


async def test_a_killed_connection_fails_as_unavailable_and_the_store_recovers(
    database: Database,
) -> None:
    pool = await create_pool(Database(database.connect_kwargs, pool_max_size=1), COMMAND_DATABASE)
    admin = await connect(database)
    try:
        store = PostgresEventStore(pool)
        investor_id = uuid4()

        with pytest.raises(Unavailable) as raised:
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                await admin.execute(
                    "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                investor.create(Decimal("10"))
                await uow.save(investor)
        assert raised.value.dependency == COMMAND_DATABASE

        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, investor_id)
            assert not investor.exists  # nothing of the failed unit of work was committed
            investor.create(Decimal("10"))
            await uow.save(investor)
        assert [e.version for e in await store.stream(investor_id)] == [1, 2]
    finally:
        await admin.close()
        await pool.close()


async def test_a_database_refusing_connections_is_unavailable_until_it_accepts_them(
    database: Database, pool: asyncpg.Pool
) -> None:
    store = PostgresEventStore(pool)
    investor_id = uuid4()
    await create_investor(store, investor_id)  # the pool holds a session from now on

    async with infra.refusing_connections(database):
        # First the pooled session the server ended, then a refused reconnection.
        for _ in range(3):
            with pytest.raises(Unavailable) as raised:
                async with store.unit_of_work() as uow:
                    await uow.load(Investor, investor_id)
            assert raised.value.dependency == COMMAND_DATABASE
            assert not isinstance(raised.value, asyncpg.PostgresError | asyncpg.InterfaceError)
        with pytest.raises(Unavailable):
            await store.stream(investor_id)
        with pytest.raises(Unavailable):
            await create_investor(store, uuid4())

    async with store.unit_of_work() as uow:
        investor = await uow.load(Investor, investor_id)
        investor.place_bid(uuid4(), Decimal("10"))
        await uow.save(investor)
    assert [e.version for e in await store.stream(investor_id)] == [1, 2, 3]


async def test_a_role_refused_after_start_up_is_an_outage_that_ends_when_it_may_log_in(
    database: Database,
) -> None:
    """Regression: a refusal met once the pool was open (here a role no longer allowed to
    log in; a rotated password is the same error) was `Refused`, a permanent fault."""
    role = infra.unique_name("fin_role")
    admin = await connect(database)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    as_role = Database({**database.connect_kwargs, "user": role})
    try:
        pool = await create_pool(as_role, COMMAND_DATABASE)
        try:
            await ping(pool, COMMAND_DATABASE)
            await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
            )
            # First the session the server ended, then the refused reconnection.
            details = []
            for _ in range(2):
                with pytest.raises(Unavailable) as raised:
                    await ping(pool, COMMAND_DATABASE)
                details.append(raised.value.detail)
            assert "not permitted to log in" in details[-1], details
            # A process starting now is refused at once.
            with pytest.raises(Refused):
                await create_pool(as_role, COMMAND_DATABASE)
            await admin.execute(f'ALTER ROLE "{role}" LOGIN')
            await ping(pool, COMMAND_DATABASE)
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


@contextlib.asynccontextmanager
async def limited_role(database: Database, limit: int, pool_size: int) -> AsyncIterator[Database]:
    """`database` as a role of its own allowed `limit` sessions, pools of `pool_size`."""
    role = infra.unique_name("fin_limited")
    admin = await connect(database)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT {limit}')
    try:
        yield Database({**database.connect_kwargs, "user": role}, pool_max_size=pool_size)
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


async def test_a_pool_the_role_lets_open_fewer_sessions_than_its_size_works_with_those(
    database: Database,
) -> None:
    """Regression (a probe): with the service's role limited to fewer sessions than its
    pool's size (`CONNECTION LIMIT`, shared by several instances), each unit of work that
    found every session busy tried to open one more, was refused, and failed as an
    outage of the whole database; under load the outage began and ended every few
    seconds. The pool is now held to the sessions it has, and the work waits for them."""
    async with limited_role(database, 2, 6) as as_role:
        pool = await create_pool(as_role, COMMAND_DATABASE)
        try:

            async def unit_of_work() -> int:
                async with acquired(pool, COMMAND_DATABASE) as conn:
                    answer: int = await conn.fetchval("SELECT 1 FROM pg_sleep(0.05)")
                    return answer

            with capture_logs() as logs:
                answers = await asyncio.gather(*(unit_of_work() for _ in range(12)))
            assert answers == [1] * 12
            assert sessions_allowed(pool) == 2 and pool.get_size() == 2
            held = [line for line in logs if line["event"].startswith("database sessions held")]
            # Said once, with the sessions open when the pool was refused one more.
            [said] = held
            assert said["pool_max_conns"] == 6 and said["sessions_open"] in (1, 2), said
        finally:
            await close_pool(pool)


async def test_a_unit_of_work_refused_a_session_waits_before_it_tries_again(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions held outside the units of work (a migration's) leave a unit of work nothing
    but a new session to try, refused at once: it waits (`Capacity.after_refusal`, for a
    session given back or a moment) between its attempts, rather than trying again and
    again at once."""
    refusals = 0
    real = capacity_module.Capacity.hold_to

    def counted(self: capacity_module.Capacity, sessions: int, why: str) -> None:
        nonlocal refusals
        refusals += 1
        real(self, sessions, why)

    waiting, resumed = asyncio.Event(), asyncio.Event()

    async def after_refusal(self: capacity_module.Capacity) -> None:
        waiting.set()
        await resumed.wait()

    monkeypatch.setattr(capacity_module.Capacity, "hold_to", counted)
    monkeypatch.setattr(capacity_module.Capacity, "after_refusal", after_refusal)
    async with limited_role(database, 2, 4) as as_role:
        pool = await create_pool(as_role, COMMAND_DATABASE)
        try:
            held = [await pool.acquire(), await pool.acquire()]  # both of the role's
            unit = asyncio.ensure_future(acquired(pool, COMMAND_DATABASE).__aenter__())
            await asyncio.wait_for(waiting.wait(), 5)
            assert refusals == 1  # refused once, then waiting, not trying again
            await pool.release(held.pop())
            resumed.set()
            conn = await asyncio.wait_for(unit, 5)  # the session given back
            await pool.release(conn)
            await pool.release(held.pop())
        finally:
            await close_pool(pool)


async def test_a_dedicated_session_refused_by_a_limit_makes_room_in_the_pools(
    database: Database,
) -> None:
    """Regression (a probe): with the role's limit lowered at run time and its sessions
    ended, the pools took every session as they grew back, and the relayer's lock and
    listener were refused until the pools' idle sessions expired (300 s): nothing was
    relayed, and a standby's outage never ended."""
    async with limited_role(database, 3, 4) as as_role:
        pool = await create_pool(as_role, COMMAND_DATABASE)
        try:

            async def unit_of_work() -> None:
                async with acquired(pool, COMMAND_DATABASE) as conn:
                    await conn.execute("SELECT pg_sleep(0.05)")

            await asyncio.gather(*(unit_of_work() for _ in range(6)))  # grown to the limit
            assert pool.get_size() == 3
            with pytest.raises(Unavailable, match="too many connections"):
                await connect(as_role, COMMAND_DATABASE)  # the relayer's lock, refused
            dedicated = await connect(as_role, COMMAND_DATABASE)  # room made
            try:
                assert pool.get_size() == 2 and sessions_allowed(pool) == 2
                await asyncio.gather(*(unit_of_work() for _ in range(6)))  # still served
                assert pool.get_size() == 2
            finally:
                await close_connection(dedicated)
        finally:
            await close_pool(pool)


async def test_an_argument_the_driver_cannot_encode_is_a_bug_not_an_outage(
    pool: asyncpg.Pool,
) -> None:
    """asyncpg raises it as a DataError (SQLSTATE class 22), left as it is: retrying it
    as an outage would retry a bug forever, quietly."""
    with pytest.raises(asyncpg.DataError) as raised:
        async with acquired(pool, COMMAND_DATABASE) as conn:
            await conn.fetchval("SELECT $1::int", "not a number")
    assert "invalid input for query argument $1" in str(raised.value)
    await ping(pool, COMMAND_DATABASE)  # the connection was fine all along


async def waiting_on_a_lock(pool: asyncpg.Pool) -> bool:
    found: bool = await pool.fetchval(
        "SELECT EXISTS (SELECT FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock')"
    )
    return found


async def test_of_two_writers_racing_on_one_stream_the_loser_gets_a_concurrency_conflict(
    pool: asyncpg.Pool,
) -> None:
    store = PostgresEventStore(pool)
    investor_id = uuid4()
    await create_investor(store, investor_id)
    first_saved, first_may_commit = asyncio.Event(), asyncio.Event()

    async def first() -> None:
        # Another writer, holding its transaction open after appending version 3 (a
        # unit of work's own writing statement is too short to hold it open).
        placed = BidOnInvoicePlacedEvent(investor_id, uuid4(), Decimal("10"))
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO events (aggregate_type, aggregate_id, version, name, body)"
                " VALUES ('Investor', $1, 3, $2, $3::json)",
                investor_id,
                codec.name_of(placed),
                codec.encode(placed).decode(),
            )
            first_saved.set()
            await first_may_commit.wait()

    async def second() -> None:
        await first_saved.wait()
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, investor_id)  # still at version 2
            investor.place_bid(uuid4(), Decimal("20"))
            await uow.save(investor)  # version 3 too: waits for the first to end

    winner, loser = asyncio.create_task(first()), asyncio.create_task(second())
    try:
        await wait_until(lambda: waiting_on_a_lock(pool), what="the second writer blocked")
    finally:
        first_may_commit.set()
    await winner
    with pytest.raises(ConcurrencyConflict) as raised:
        await loser

    assert isinstance(raised.value.__cause__, asyncpg.UniqueViolationError)
    stream = await store.stream(investor_id)
    assert [e.version for e in stream] == [1, 2, 3]
    placed = stream[2].event
    assert isinstance(placed, BidOnInvoicePlacedEvent)
    assert placed.bid_amount == Decimal("10")


async def test_a_pooled_connection_is_released_without_a_round_trip_unless_a_transaction_is_open(
    database: Database,
) -> None:
    pool = await create_pool(database, COMMAND_DATABASE, min_size=1)
    sent: list[str] = []
    try:
        conn = await pool.acquire()
        conn.add_query_logger(lambda query: sent.append(query.query))
        await conn.fetchval("SELECT 1")
        await pool.release(conn)
        assert sent == ["SELECT 1"]  # the driver's reset query is not sent

        conn = await pool.acquire()
        await conn.execute("BEGIN")  # as a statement cancelled mid-transaction leaves it
        await pool.release(conn)
        assert sent[-1] == "ROLLBACK"
        async with pool.acquire() as again:
            assert not again.is_in_transaction()
    finally:
        await pool.close()


async def test_a_database_that_answers_but_takes_no_writes_is_not_back_for_the_service() -> None:
    # As a standby not yet promoted answers: every write refused with 25006.
    async with infra.fresh_database("fin_readonly") as db:
        name = db.connect_kwargs["database"]
        await infra.set_read_only(name, True)
        pool = await create_pool(db, COMMAND_DATABASE)
        try:
            await ping(pool, COMMAND_DATABASE)  # it answers
            with pytest.raises(Unavailable, match="takes no writes"):
                await writable(pool, COMMAND_DATABASE)
        finally:
            await pool.close()
        await infra.set_read_only(name, False)
        pool = await create_pool(db, COMMAND_DATABASE)
        try:
            await writable(pool, COMMAND_DATABASE)
        finally:
            await pool.close()


@pytest.mark.parametrize(
    ("setting", "statement"),
    [
        ("default_transaction_read_only = on", "CREATE TEMPORARY TABLE t (x int)"),
        ("statement_timeout = '1ms'", "SELECT pg_sleep(0.05)"),
    ],
)
async def test_a_session_setting_set_back_by_the_operator_ends_the_outage(
    setting: str, statement: str
) -> None:
    """Regression: a session keeps the settings it started with; the pool's sessions that
    started under an `ALTER DATABASE ... SET` kept refusing the service after the operator
    had set it back (145 s, until they were terminated by hand)."""
    async with infra.fresh_database("fin_settings") as db:
        name = db.connect_kwargs["database"]
        pool = await create_pool(db, COMMAND_DATABASE, min_size=2)
        try:
            await infra.alter_database(name, f"SET {setting}")
            await infra.terminate_sessions(db)  # the pool's sessions start again under it

            said: list[str] = []

            async def refused() -> bool:
                try:
                    async with acquired(pool, COMMAND_DATABASE) as conn:
                        await conn.execute(statement)
                except Unavailable as error:
                    said.append(str(error))
                    return True
                return False

            await wait_until(refused, what="the statement refused under the setting")
            if setting.startswith("statement_timeout"):
                # Said as the setting's doing, not as a server that does not answer.
                assert CUT_BY_TIMEOUT in said[-1], said[-1]
            await infra.alter_database(name, "RESET ALL")

            async def served() -> bool:
                try:
                    async with acquired(pool, COMMAND_DATABASE) as conn:
                        await conn.execute(statement)
                    await writable(pool, COMMAND_DATABASE)
                except Unavailable:
                    return False
                return True

            await wait_until(served, what="the statement served once the setting is gone")
        finally:
            await pool.close()


# How long the server may take to answer in the silent-server tests (FINANCING_DB_TIMEOUT).
ANSWER_TIMEOUT = 1.0
# What a loaded machine may add to a bound before it is seen to hold.
MARGIN = 3.0


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    relay = Relay(infra.PG_HOST, infra.PG_PORT)
    await relay.start()
    yield relay
    await relay.close()


def through(relay: Relay, database: Database, **changes: Any) -> Database:
    kwargs = {**database.connect_kwargs, "host": "127.0.0.1", "port": relay.port}
    return replace(database, connect_kwargs=kwargs, answer_timeout=ANSWER_TIMEOUT, **changes)


async def test_a_server_that_stops_answering_is_unavailable_in_time_and_its_session_dropped(
    database: Database, relay: Relay
) -> None:
    """Regression: a statement sent to a server that stopped answering without closing its
    socket (frozen, or behind a partition that drops packets) waited without end."""
    pool = await create_pool(through(relay, database, pool_max_size=1), COMMAND_DATABASE)
    store = PostgresEventStore(pool)
    try:
        investor_id = uuid4()
        await create_investor(store, investor_id)
        relay.silence()
        started = time.monotonic()
        with pytest.raises(Unavailable) as silent:
            await store.stream(investor_id)
        answered_in = time.monotonic() - started
        relay.restore()
        # The one session was dropped, not left waiting for its statement's cancellation:
        # the next statement gets a new one at once.
        started = time.monotonic()
        assert [e.version for e in await store.stream(investor_id)] == [1, 2]
        reopened_in = time.monotonic() - started
    finally:
        relay.restore()
        await close_pool(pool)
    assert silent.value.dependency == COMMAND_DATABASE
    assert silent.value.detail == "no answer in time (FINANCING_DB_TIMEOUT)"
    assert ANSWER_TIMEOUT <= answered_in < ANSWER_TIMEOUT + MARGIN, answered_in
    assert reopened_in < MARGIN, reopened_in


async def test_a_server_that_does_not_answer_a_new_connection_is_unavailable_in_time(
    database: Database, relay: Relay
) -> None:
    relay.silence()
    started = time.monotonic()
    with pytest.raises(Unavailable) as silent:
        await connect(through(relay, database), COMMAND_DATABASE)
    assert silent.value.dependency == COMMAND_DATABASE
    assert time.monotonic() - started < ANSWER_TIMEOUT + MARGIN


async def test_pools_and_sessions_close_in_time_though_their_server_no_longer_answers(
    database: Database, relay: Relay
) -> None:
    """Regression: closing a pool waited on a server that no longer answered, so a
    SIGTERM never ended the service."""
    silent = through(relay, database, pool_max_size=2)
    pool = await create_pool(silent, COMMAND_DATABASE, min_size=2)
    session = await connect(silent, COMMAND_DATABASE)
    relay.silence()
    started = time.monotonic()
    await close_pool(pool)
    await close_connection(session)
    assert time.monotonic() - started < 2 * CLOSE_TIMEOUT + MARGIN
    assert pool.is_closing()
    assert session.is_closed()


async def test_a_migration_waits_longer_than_a_statement_may_for_another_instances_lock(
    database: Database,
) -> None:
    """A migration's lock wait and statements are bounded by start-up's budget, not by the
    answer timeout: another instance may be migrating a large table."""
    pool = await create_pool(replace(database, answer_timeout=ANSWER_TIMEOUT), COMMAND_DATABASE)
    holder = await connect(database)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        started = time.monotonic()
        migrating = asyncio.create_task(migrate(pool, "commands", statement_timeout=60))

        async def waited_past_a_statements_bound() -> bool:
            assert not migrating.done(), migrating
            return time.monotonic() - started > 2 * ANSWER_TIMEOUT

        await wait_until(waited_past_a_statements_bound, what="the migration to wait")
        await transaction.rollback()
        await asyncio.wait_for(migrating, MARGIN)
    finally:
        await holder.close()
        await close_pool(pool)


async def test_a_command_that_scans_whole_tables_may_run_statements_longer_but_not_connect_longer(
    database: Database, relay: Relay
) -> None:
    """`financing check` and `projections rebuild` read or rewrite whole tables: their
    statements get at least SCAN_TIMEOUT, not the service's answer timeout; connecting is
    still bounded by it."""
    short = replace(database, answer_timeout=ANSWER_TIMEOUT)
    long_statement = f"SELECT 1 FROM pg_sleep({2 * ANSWER_TIMEOUT})"
    async with console.database(short, COMMAND_DATABASE, "check") as pool:
        with pytest.raises(TimeoutError):
            await pool.fetchval(long_statement)
    async with console.database(short, COMMAND_DATABASE, "check", scans=True) as pool:
        assert await pool.fetchval(long_statement) == 1
    relay.silence()
    started = time.monotonic()
    with pytest.raises(Unavailable):
        async with console.database(
            through(relay, database), COMMAND_DATABASE, "check", scans=True
        ):
            pass
    assert time.monotonic() - started < ANSWER_TIMEOUT + MARGIN


async def test_a_session_idle_in_its_transaction_is_ended_and_its_locks_let_go(
    database: Database,
) -> None:
    """Regression: a projector whose process was frozen in the middle of a transaction
    held its row locks for the whole freeze, and the projector that took over waited
    on them. The server now ends a session idle in a transaction for longer than
    IDLE_IN_TRANSACTION."""
    frozen, successor = await connect(database), await connect(database)
    try:
        await frozen.execute("BEGIN")
        await frozen.execute("SELECT pg_advisory_xact_lock(4242)")  # held until its end
        # ... and nothing more is sent on it, as from a frozen process.
        await successor.execute(
            "SELECT pg_advisory_xact_lock(4242)", timeout=IDLE_IN_TRANSACTION + 10
        )
        await wait_until(lambda: infra.holds(frozen.is_closed()), what="the idle session ended")
    finally:
        await close_connection(frozen)
        await close_connection(successor)


async def test_a_statement_its_caller_gives_up_on_a_silent_server_ends_at_once(
    database: Database, relay: Relay
) -> None:
    """Regression: a block cancelled by its caller (the health probe's 2 s timeout, a
    Queries call past its deadline) while its statement waited on a silent server gave
    its session back to the pool, which waited for the server to acknowledge the
    statement's cancellation, up to FINANCING_DB_TIMEOUT: the probe reported a silent
    query database 13 s late, and a 7 s silence only once it was over."""
    slow = replace(through(relay, database, pool_max_size=1), answer_timeout=60.0)
    pool = await create_pool(slow, COMMAND_DATABASE)
    try:
        await ping(pool, COMMAND_DATABASE)
        relay.silence()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await ping(pool, COMMAND_DATABASE)
        gave_up_in = time.monotonic() - started
        relay.restore()
        await ping(pool, COMMAND_DATABASE)  # on a new session
    finally:
        relay.restore()
        await close_pool(pool)
    assert gave_up_in < 0.5 + MARGIN, gave_up_in


async def test_a_statement_waiting_on_another_sessions_lock_is_not_said_to_be_unanswered(
    database: Database,
) -> None:
    """Regression: a statement that waited on a lock another session held for longer than
    FINANCING_DB_TIMEOUT was reported as "no answer in time", as if the server or the
    network had gone silent; the session the server still answered on was dropped."""
    pool = await create_pool(
        replace(database, answer_timeout=ANSWER_TIMEOUT, pool_max_size=1), COMMAND_DATABASE
    )
    store = PostgresEventStore(pool)
    holder = await asyncpg.connect(**database.connect_kwargs)
    try:
        investor_id = uuid4()
        await create_investor(store, investor_id)
        async with pool.acquire() as conn:
            kept_pid = await conn.fetchval("SELECT pg_backend_pid()")
        await holder.execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(Unavailable) as waited:
            await store.stream(investor_id)
        await holder.execute("ROLLBACK")
        async with pool.acquire() as conn:
            # The session kept: the pool's only one, not a new one.
            assert await conn.fetchval("SELECT pg_backend_pid()") == kept_pid
    finally:
        await holder.close()
        await close_pool(pool)
    assert waited.value.dependency == COMMAND_DATABASE
    assert "waited longer than FINANCING_DB_TIMEOUT" in waited.value.detail
    assert "lock another session holds" in waited.value.detail


@pytest.mark.parametrize("probe", [ping, writable], ids=["ping", "writable"])
async def test_a_health_probe_finding_every_pooled_session_busy_says_so(
    database: Database, monkeypatch: pytest.MonkeyPatch, probe: Any
) -> None:
    """Regression: with every session of the pool waiting on a table another session
    had locked, the probe waited for a session until its own time ran out, and the
    database was said to give "no answer to a health probe", as if it or the network
    had gone silent."""
    monkeypatch.setattr(connection_module, "PROBE_POOL_WAIT", 0.2)
    pool = await create_pool(replace(database, pool_max_size=2), COMMAND_DATABASE, min_size=2)
    try:
        async with pool.acquire(), pool.acquire():  # every session busy
            with pytest.raises(Unavailable) as busy:
                async with asyncio.timeout(5):
                    await probe(pool, COMMAND_DATABASE)
        await probe(pool, COMMAND_DATABASE)  # a session free again: answered
    finally:
        await close_pool(pool)
    assert busy.value.dependency == COMMAND_DATABASE
    assert busy.value.detail == (
        "every one of its 2 pooled sessions is busy: their statements wait on a lock"
        " another session holds (`financing status` names it), or are that slow"
    )


@pytest.mark.parametrize("probe", [ping, writable], ids=["ping", "writable"])
async def test_a_health_probe_behind_the_services_own_units_of_work_finds_the_database_up(
    database: Database, monkeypatch: pytest.MonkeyPatch, probe: Any
) -> None:
    """Regression: with more deliveries in flight than pooled sessions, the probe waited
    in the pool's line behind the service's own units of work, which went on ending, and
    the command database was said to be down, every session busy (5.5-6.8 s each time)."""
    monkeypatch.setattr(connection_module, "PROBE_POOL_WAIT", 0.2)
    pool = await create_pool(replace(database, pool_max_size=2), COMMAND_DATABASE, min_size=2)
    stop = asyncio.Event()
    ended = 0

    async def unit_of_work() -> None:
        nonlocal ended
        while not stop.is_set():
            async with acquired(pool, COMMAND_DATABASE) as conn:
                await conn.fetchval("SELECT pg_sleep(0.05)")
            ended += 1

    working = [asyncio.create_task(unit_of_work()) for _ in range(40)]
    try:
        await wait_until(lambda: holds(ended >= 2), what="units of work ending")
        async with asyncio.timeout(5):
            await probe(pool, COMMAND_DATABASE)  # not Unavailable
    finally:
        stop.set()
        await asyncio.gather(*working)
        await close_pool(pool)


async def test_the_services_sessions_compile_no_statement_unless_the_connection_string_says(
    database: Database,
) -> None:
    """Regression: a database set to JIT-compile every statement (`jit_above_cost = 0`)
    ran the service ~50 times slower, and nothing said why."""
    name = database.connect_kwargs["database"]
    await infra.alter_database(name, "SET jit_above_cost = 0")
    try:
        asked = replace(
            database,
            connect_kwargs={**database.connect_kwargs, "server_settings": {"jit": "on"}},
        )
        settings: list[str] = []
        for db in (database, asked):
            session = await connect(db)
            try:
                settings.append(await session.fetchval("SHOW jit"))
            finally:
                await close_connection(session)
    finally:
        await infra.alter_database(name, "RESET jit_above_cost")
    assert settings == ["off", "on"]


# The parameters PgBouncer lets a client send as its session opens, without being told
# to ignore or track others (its `ignore_startup_parameters`, `track_extra_parameters`).
POOLER_PARAMETERS = {
    "user",
    "database",
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "standard_conforming_strings",
}


class PoolerDoor:
    """What PgBouncer does with a session's opening: one asking for a parameter it does
    not know is refused (`unsupported startup parameter`), the others are carried on to
    the server."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.asked: list[set[str]] = []
        self._carrying: set[asyncio.Task[None]] = set()

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            packet = await self._packet(reader)
            if packet[:4] == (80877103).to_bytes(4, "big"):  # SSLRequest: no TLS here
                writer.write(b"N")
                packet = await self._packet(reader)
            fields = packet[4:].split(b"\0")
            asked = {key.decode().lower() for key in fields[0:-2:2]}
            self.asked.append(asked)
            refused = sorted(asked - POOLER_PARAMETERS)
            if refused:
                said = f"unsupported startup parameter: {refused[0]}".encode()
                body = b"SERROR\0C08P01\0M" + said + b"\0\0"
                writer.write(b"E" + (len(body) + 4).to_bytes(4, "big") + body)
                await writer.drain()
                return
            server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            server_writer.write((len(packet) + 4).to_bytes(4, "big") + packet)
            await asyncio.gather(_pump(reader, server_writer), _pump(server_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _packet(reader: asyncio.StreamReader) -> bytes:
        length = int.from_bytes(await reader.readexactly(4), "big")
        return await reader.readexactly(length - 4)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._open, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    sink.close()


async def test_sessions_open_through_a_pooler_and_keep_the_services_settings(
    database: Database,
) -> None:
    """Regression: the service sent `jit` and `idle_in_transaction_session_timeout` as
    its sessions opened, which PgBouncer refuses (`unsupported startup parameter`): the
    service retried it as an outage for its whole start-up budget. A PgBouncer told to
    ignore them let the sessions open without them (JIT on, no end to a session idle in
    a transaction), and nothing said so."""
    host = database.connect_kwargs.get("host", "127.0.0.1")
    door = PoolerDoor((host, int(database.connect_kwargs.get("port", 5432))))
    async with door.open() as port:
        through = replace(
            database, connect_kwargs={**database.connect_kwargs, "host": "127.0.0.1", "port": port}
        )
        pool = await create_pool(through, COMMAND_DATABASE)
        try:
            await refuse_pooled_sessions(through, COMMAND_DATABASE)  # its sessions kept
            session = await connect(through, COMMAND_DATABASE)
            try:
                async with acquired(pool, COMMAND_DATABASE) as pooled:
                    settings = [
                        (
                            await conn.fetchval("SHOW jit"),
                            await conn.fetchval("SHOW idle_in_transaction_session_timeout"),
                        )
                        for conn in (pooled, session)
                    ]
            finally:
                await close_connection(session)
        finally:
            await close_pool(pool)
    assert door.asked and all(asked <= POOLER_PARAMETERS for asked in door.asked)
    assert settings == [("off", "10s"), ("off", "10s")]


async def test_a_setting_a_pooler_refuses_as_a_session_opens_stops_start_up_saying_so(
    database: Database,
) -> None:
    """Regression: a pooler's refusal of a setting the connection string's `options` give
    (`unsupported startup parameter`) was retried as an outage for the whole start-up
    budget."""
    host = database.connect_kwargs.get("host", "127.0.0.1")
    door = PoolerDoor((host, int(database.connect_kwargs.get("port", 5432))))
    async with door.open() as port:
        through = replace(
            database,
            connect_kwargs={
                **database.connect_kwargs,
                "host": "127.0.0.1",
                "port": port,
                "server_settings": {"work_mem": "64MB"},
            },
        )
        async with asyncio.timeout(10):
            with pytest.raises(Refused, match="work_mem: a pooler stands before the database"):
                await create_pool(through, COMMAND_DATABASE)


async def test_another_schemas_table_of_the_same_name_first_in_sight_is_an_outage(
    database: Database, pool: asyncpg.Pool
) -> None:
    """Regression: a DBA's schema holding an `events` table of its own, put first in the
    service's `search_path`, made every append and the relayer's read fail on a column
    that table lacks: taken for a bug, commands were dead-lettered and the relayer
    stopped the service."""
    await pool.execute("CREATE SCHEMA IF NOT EXISTS dba")
    await pool.execute("CREATE TABLE IF NOT EXISTS dba.events (id serial, note text)")
    elsewhere = replace(
        database,
        connect_kwargs={
            **database.connect_kwargs,
            "server_settings": {"search_path": "dba, public"},
        },
    )
    shadowed = await create_pool(elsewhere, COMMAND_DATABASE)
    try:
        with pytest.raises(Unavailable, match="does not exist"):
            await create_investor(PostgresEventStore(shadowed), uuid4())
        with pytest.raises(Unavailable, match="does not exist"):
            await PostgresOutbox(shadowed).pending(10)
    finally:
        await close_pool(shadowed)
        await pool.execute("DROP SCHEMA dba CASCADE")


async def test_the_services_sessions_are_not_ended_for_sitting_idle(database: Database) -> None:
    """Regression: a database set to end sessions idle for 1 s (`idle_session_timeout`)
    ended the pool's sessions between statements; the next statement lent one failed,
    and the query database was said to be out every few seconds, its `/health` at 503
    half the time, over a database that answered. The relayer's lock session keeps its
    own lease."""
    name = database.connect_kwargs["database"]
    await infra.alter_database(name, "SET idle_session_timeout = '1s'")
    try:
        pool = await create_pool(database, COMMAND_DATABASE)
        session = await connect(database, COMMAND_DATABASE)
        lock = PostgresRelayerLock(database)
        try:
            await lock.acquire()
            async with acquired(pool, COMMAND_DATABASE) as pooled:
                shown = [
                    await conn.fetchval("SHOW idle_session_timeout")
                    for conn in (pooled, session, lock._conn)
                ]
        finally:
            await lock.release()
            await close_connection(session)
            await close_pool(pool)
    finally:
        await infra.alter_database(name, "RESET idle_session_timeout")
    assert shown == ["0", "0", "5s"]
