"""Whole servers restarted under load: the RabbitMQ broker, then the PostgreSQL server.

Unlike the other fault tests, which touch only a vhost or databases of their
own, these stop the machine's shared servers: while they run they own them.
The suite runs its tests one at a time, and each of these waits until its
server answers again and leaves it running, also when the test fails.
Concurrent sagas run throughout; every saga must complete, `financing check`
must pass and the read models must equal a replay, without the service being
restarted.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from tests.faults.conftest import Deploy, add_figure, record_workload, set_figure
from tests.faults.workload import (
    Deployment,
    Workload,
    assert_outages_logged_once,
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


@pytest.fixture
async def servers_left_running() -> AsyncIterator[None]:
    """Whatever happens, the servers are running again after the test."""
    yield
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
