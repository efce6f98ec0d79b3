"""Whole servers restarted under load: the RabbitMQ broker, then the PostgreSQL server;
and the broker's memory alarm, which blocks every publishing connection of the server;
and PostgreSQL restarted to allow prepared transactions (two-phase commit), then again
as it was.

Unlike the other fault tests, which touch only a vhost or databases of their
own, these stop (or alarm) the machine's shared servers: while they run they
own them. The suite runs its tests one at a time, and each of these waits until
its server answers again and leaves it running, without an alarm, also when the
test fails. Across a restart concurrent sagas run throughout; every saga must
complete, `financing check` must pass and the read models must equal a replay,
without the service being restarted. Across the alarm the Commands API must
answer UNAVAILABLE, log the outage once, and take commands again once it clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import pytest
from grpclib.const import Status

from financing.adapters.postgres.connection import COMMAND_DATABASE, create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.outbox import PostgresOutbox
from financing.adapters.postgres.schema import migrate
from financing.application.ports import PreparedTransaction
from financing.config import Database
from financing.domain.aggregates import Investor
from financing.entrypoints.cli import status
from tests.faults.conftest import Deploy, add_figure, record_workload, set_figure
from tests.faults.workload import (
    Deployment,
    Workload,
    assert_outages_logged_once,
    enqueue_one,
    settle,
    suite_seed,
    verify_effects,
)
from tests.support import infra

# How long a server stays down; long enough for every component to notice.
DOWN_SECONDS = (2.0, 4.0)
BACK_WITHIN = 120.0


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=BACK_WITHIN)


def postgres_cluster() -> tuple[str, str]:
    """The (version, name) of the local PostgreSQL cluster."""
    version = sorted(path.name for path in Path("/etc/postgresql").iterdir())[0]
    return version, "main"


async def postgres_answers() -> bool:
    try:
        conn = await asyncpg.connect(
            host=infra.PG_HOST, port=infra.PG_PORT, user=infra.PG_USER, database="postgres"
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


async def broker_answers() -> bool:
    done = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "await_startup", "--timeout", "1"],
        capture_output=True,
    )
    return done.returncode == 0


async def restart_broker(down_for: float) -> None:
    await asyncio.to_thread(run, "rabbitmqctl", "-q", "stop_app")
    try:
        await asyncio.sleep(down_for)  # the outage itself
    finally:
        await asyncio.to_thread(run, "rabbitmqctl", "-q", "start_app")
        await infra.wait_until(broker_answers, timeout=BACK_WITHIN, what="RabbitMQ to be back")


async def restart_postgres(down_for: float) -> None:
    version, cluster = postgres_cluster()
    control = ("pg_ctlcluster", "--skip-systemctl-redirect", version, cluster)
    await asyncio.to_thread(run, *control, "stop", "--mode", "fast")
    try:
        await asyncio.sleep(down_for)  # the outage itself
    finally:
        await asyncio.to_thread(run, *control, "start")
        await infra.wait_until(postgres_answers, timeout=BACK_WITHIN, what="PostgreSQL to be back")


def memory_watermark() -> str:
    """The broker's memory high watermark, as `set_vm_memory_high_watermark` takes it."""
    found = subprocess.run(
        ["rabbitmqctl", "-q", "eval", "vm_memory_monitor:get_vm_memory_high_watermark()."],
        check=True,
        capture_output=True,
        text=True,
        timeout=BACK_WITHIN,
    )
    return found.stdout.strip()


@pytest.fixture
async def servers_left_running() -> AsyncIterator[None]:
    """Whatever happens, the servers are running again after the test, without an alarm."""
    watermark = await asyncio.to_thread(memory_watermark)
    yield
    if await asyncio.to_thread(memory_watermark) != watermark:
        await asyncio.to_thread(run, "rabbitmqctl", "-q", "set_vm_memory_high_watermark", watermark)
    if not await broker_answers():
        await asyncio.to_thread(run, "rabbitmqctl", "-q", "start_app")
        await infra.wait_until(broker_answers, timeout=BACK_WITHIN, what="RabbitMQ to be back")
    if not await postgres_answers():
        version, cluster = postgres_cluster()
        await asyncio.to_thread(
            run, "pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"
        )
        await infra.wait_until(postgres_answers, timeout=BACK_WITHIN, what="PostgreSQL to be back")


async def sagas_through(
    target: Deployment, name: str, restart: Callable[[float], Awaitable[None]]
) -> float:
    """Run concurrent sagas, restart a server in their midst; how long it was down."""
    seed = suite_seed()
    schedule = random.Random(f"{name}/{seed}")
    workload = Workload(target, seed=seed, concurrency=12)
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))
    try:
        await asyncio.sleep(schedule.uniform(0.5, 1.5))  # sagas under way
        assert not running.done(), running.result()
        started = time.monotonic()
        await restart(schedule.uniform(*DOWN_SECONDS))
        down = time.monotonic() - started
        enough.set()
        await running
    finally:
        running.cancel()
    await target.event_pool.expire_connections()  # the suite's own sessions died too
    await target.query_pool.expire_connections()
    assert target.service.running and target.starts() == 1, (
        f"the service did not survive on its own:\n{target.log_tail()}"
    )
    await settle(target, within=90)
    await verify_effects(target, workload)
    record_workload(workload)
    return down


async def test_sagas_complete_across_a_broker_restart(
    deploy: Deploy, servers_left_running: None
) -> None:
    target = await deploy("broker_restart")
    down = await sagas_through(target, "broker restart", restart_broker)
    await assert_outages_logged_once(target, "broker", ["broker unavailable", "broker reconnected"])
    add_figure("whole broker restarts survived", 1)
    set_figure("broker restart: seconds from stop_app to start_app done", round(down, 1))


async def test_sagas_complete_across_a_postgres_restart(
    deploy: Deploy, servers_left_running: None
) -> None:
    target = await deploy("postgres_restart")
    down = await sagas_through(target, "postgres restart", restart_postgres)
    for database in ("command database", "query database"):
        await assert_outages_logged_once(
            target, database, [f"{database} unavailable", f"{database} recovered"]
        )
    add_figure("whole PostgreSQL restarts survived", 1)
    set_figure("PostgreSQL restart: seconds from stop to start done", round(down, 1))


async def test_a_broker_memory_alarm_is_one_outage_that_ends_when_the_alarm_clears(
    deploy: Deploy, servers_left_running: None
) -> None:
    """Regression: the end of a broker outage was checked by the connection being open,
    which it stays while the alarm blocks publishing: "broker reconnected" was logged
    about every second, each time followed by "broker unavailable" again."""
    target = await deploy("memory_alarm")
    assert await enqueue_one(target, timeout=30) is Status.OK
    watermark = await asyncio.to_thread(memory_watermark)
    await asyncio.to_thread(run, "rabbitmqctl", "-q", "set_vm_memory_high_watermark", "0.0001")
    try:
        # The publish is never confirmed; the listener gives up after its budget of 5 s.
        # The outage is logged by the health probe, whose declaration waits too.
        assert await enqueue_one(target, timeout=30) is Status.UNAVAILABLE

        async def outage_logged() -> bool:
            return bool(target.outage_lines("broker"))

        await infra.wait_until(outage_logged, timeout=10, what="the broker's outage logged")
        # Another 5 s budget, in which the outage's end is checked about five times.
        assert await enqueue_one(target, timeout=30) is Status.UNAVAILABLE
        lines = [event for _, event in target.outage_lines("broker")]
        assert lines == ["broker unavailable"], lines
    finally:
        await asyncio.to_thread(run, "rabbitmqctl", "-q", "set_vm_memory_high_watermark", watermark)

    async def accepted() -> bool:
        return await enqueue_one(target, timeout=30) is Status.OK

    await infra.wait_until(accepted, timeout=30, what="a command accepted again")
    await assert_outages_logged_once(target, "broker", ["broker unavailable", "broker recovered"])
    assert target.service.running and target.starts() == 1, target.log_tail()
    add_figure("broker memory alarms survived", 1)


async def on_server(statement: str) -> object:
    """The answer to `statement`, sent as the superuser to the database `postgres`."""
    conn = await asyncpg.connect(
        host=infra.PG_HOST, port=infra.PG_PORT, user=infra.PG_USER, database="postgres"
    )
    try:
        return await conn.fetchval(statement)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def prepared_transactions_allowed() -> AsyncIterator[None]:
    """The server restarted to allow prepared transactions, then as it was (its default,
    max_prepared_transactions = 0, allows none)."""
    if await on_server("SELECT current_setting('max_prepared_transactions')") != "0":
        yield
        return
    await on_server("ALTER SYSTEM SET max_prepared_transactions = 4")
    try:
        await restart_postgres(0.0)
        yield
    finally:
        await on_server("ALTER SYSTEM RESET max_prepared_transactions")
        await restart_postgres(0.0)


async def test_a_prepared_transaction_holds_back_only_its_own_databases_events_and_is_named(
    servers_left_running: None,
) -> None:
    """Regression: the relaying horizon left out the transactions of other databases as
    pg_stat_activity shows them, and a prepared transaction (two-phase commit) has no
    session there: one prepared in another database of the server held back every event
    committed after it, for as long as it stayed prepared; and one of the command
    database, which holds them back rightly, was named by nothing."""
    async with (
        prepared_transactions_allowed(),
        infra.fresh_database("fin_prepared_cmd") as database,
        infra.fresh_database("fin_prepared_other") as other,
    ):
        pool = await create_pool(database, COMMAND_DATABASE)
        try:
            await migrate(pool, "commands")
            store, outbox = PostgresEventStore(pool), PostgresOutbox(pool)
            async with prepared(other, "fin_elsewhere"):
                first = await investor_created(store)
                relayable = await outbox.pending(100)
                read = [event async for event in store.read_all()]
            async with prepared(database, "fin_here"):
                await investor_created(store)
                held = await outbox.held_back_by(0)
                backlog = await outbox.backlog(held_back_after=0)
                behind = await outbox.pending(100)
        finally:
            await pool.close()
    assert [(e.aggregate_id, e.version) for e in relayable] == [(first, 1), (first, 2)]
    assert [(e.aggregate_id, e.version) for e in read] == [(first, 1), (first, 2)]
    assert [(e.aggregate_id, e.version) for e in behind] == [(first, 1), (first, 2)]
    assert isinstance(held, PreparedTransaction), held
    assert (held.gid, held.owner) == ("fin_here", infra.PG_USER)
    said = status._why_waiting(backlog)  # what `financing status` says the lag waits for
    named = f", behind the prepared transaction 'fin_here' (owner {infra.PG_USER!r},"
    assert said.startswith(named), said
    assert said.endswith("COMMIT PREPARED or ROLLBACK PREPARED 'fin_here' ends it)"), said


@contextlib.asynccontextmanager
async def prepared(database: Database, gid: str) -> AsyncIterator[None]:
    """A transaction of `database` with an id, prepared as `gid`, rolled back at the end."""
    conn = await asyncpg.connect(**database.connect_kwargs)
    try:
        await conn.execute(f"BEGIN; SELECT pg_current_xact_id(); PREPARE TRANSACTION '{gid}'")
        try:
            yield
        finally:
            await conn.execute(f"ROLLBACK PREPARED '{gid}'")
    finally:
        await conn.close()


async def investor_created(store: PostgresEventStore) -> UUID:
    investor = Investor(uuid4())
    investor.create(Decimal("10"))
    async with store.unit_of_work() as uow:
        await uow.save(investor)
    return investor.id
