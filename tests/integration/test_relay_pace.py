"""A service whose handlers append faster than the relayer publishes holds appending
until the relayer has caught up: the commands wait in their queue, not the events in the
event store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import asyncpg
import pytest
from structlog.testing import capture_logs

from financing.application import pace
from financing.config import Database, Settings
from financing.entrypoints.bootstrap import bootstrap
from financing.entrypoints.supervisor import supervise
from tests.support import infra
from tests.support.deployment import service_env
from tests.support.rabbitmq import list_queues
from tests.support.service import free_port, run_cli

ISSUERS = 300


@pytest.fixture
async def databases() -> AsyncIterator[tuple[Database, Database]]:
    async with (
        infra.fresh_database("fin_pace_c") as commands,
        infra.fresh_database("fin_pace_q") as queries,
    ):
        yield commands, queries


async def _events(db: Database) -> int:
    conn = await asyncpg.connect(**db.connect_kwargs)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def test_appending_waits_while_the_relayer_is_behind_and_goes_on_once_it_caught_up(
    databases: tuple[Database, Database], amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with a backlog of queued commands, the handlers appended about twice as
    fast as the relayer published, and the relay lag grew for as long as the backlog
    lasted (to 123,000 events): a bid made meanwhile waited minutes for its saga."""
    monkeypatch.setattr(pace, "MOST_WAITING", 40)
    monkeypatch.setattr(pace, "RESUME_AT", 10)
    monkeypatch.setattr(pace, "LOOK_EVERY", 0.1)
    commands, queries = databases
    settings = Settings(
        command_address=("127.0.0.1", free_port()),
        query_address=("127.0.0.1", free_port()),
        command_db=commands,
        query_db=queries,
        amqp_url=amqp_url,
        metrics_address=None,
    )
    vhost = amqp_url.rsplit("/", 1)[1]
    with capture_logs() as logs:
        async with AsyncExitStack() as stack:
            # Commands handled, nothing relayed: the relayer is stopped, or far behind.
            appending = await bootstrap(
                settings, ("integration", "commands"), stack, deadline=time.monotonic() + 30
            )
            stop = asyncio.Event()
            running = asyncio.create_task(supervise(appending, stop))
            env = service_env(
                commands, queries, amqp_url, *(("127.0.0.1", free_port()) for _ in range(3))
            )
            populated = await run_cli(
                env, "populate", "--issuers", str(ISSUERS), "--investors", "0"
            )
            assert populated.exit_code == 0, populated.describe()

            def said(event: str) -> bool:
                return any(line["event"].startswith(event) for line in logs)

            await infra.wait_until(
                lambda: infra.holds(said("appending waits for the relayer")),
                timeout=30,
                what="appending held",
            )
            held_at = await _events(commands)
            queued = (await list_queues(vhost))["CreateIssuer"]["messages_ready"]
            assert held_at < ISSUERS and queued > 0, (held_at, queued)

            relaying = await bootstrap(
                settings, ("relayer",), stack, deadline=time.monotonic() + 30
            )
            relayer_stop = asyncio.Event()
            relayer = asyncio.create_task(supervise(relaying, relayer_stop))

            async def all_appended() -> bool:
                return await _events(commands) == ISSUERS

            await infra.wait_until(all_appended, timeout=60, what="every issuer created")
            assert said("appending goes on: the relayer caught up")
            stop.set()
            relayer_stop.set()
            assert await running == 0
            assert await relayer == 0
