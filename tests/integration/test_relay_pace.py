"""A service whose handlers append faster than the relayer publishes paces appending,
one delivery at a time for each queue, until the relayer has caught up: the commands
wait in their queue, not the events in the event store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import asyncpg
import pytest
from structlog.testing import capture_logs

from financing.application import pace
from financing.application.pipeline import Decoded, Handler, Outcome
from financing.config import Database, Settings
from financing.entrypoints.bootstrap import Overrides, bootstrap
from financing.entrypoints.supervisor import supervise
from tests.support import infra, rabbitmq
from tests.support.deployment import service_env
from tests.support.rabbitmq import connection_names
from tests.support.service import free_port, run_cli

ISSUERS = 300


@pytest.fixture
async def amqp_url() -> AsyncIterator[str]:
    """A vhost of its own: the events relayed here, with no projector running to take
    them, were left in the projector's queue for the next test's projector, which took
    them for another event store's."""
    async with rabbitmq.private_vhost("fin_pace") as vhost:
        yield vhost.url


@pytest.fixture
async def databases() -> AsyncIterator[tuple[Database, Database]]:
    async with (
        infra.fresh_database("fin_pace_c") as commands,
        infra.fresh_database("fin_pace_q") as queries,
    ):
        yield commands, queries


def _settings(databases: tuple[Database, Database], amqp_url: str) -> Settings:
    """The settings of a service on `databases` and the broker at `amqp_url`."""
    commands, queries = databases
    return Settings(
        command_address=("127.0.0.1", free_port()),
        query_address=("127.0.0.1", free_port()),
        command_db=commands,
        query_db=queries,
        amqp_url=amqp_url,
        metrics_address=None,
    )


async def _events(db: Database) -> int:
    conn = await asyncpg.connect(**db.connect_kwargs)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


class Concurrency:
    """A handler part noting how many commands that append (CreateIssuer) it handles at
    once: the most among those begun before appending was paced, and among those begun
    while it was. (The integration handler, which appends nothing, is not paced.)"""

    def __init__(self, paced: Callable[[], bool]) -> None:
        self._paced = paced
        self._now: dict[tuple[str, bool], int] = {}
        self.most = {False: 0, True: 0}

    def __call__(self, handler: Handler) -> Handler:
        async def noted(decoded: Decoded) -> Outcome:
            if decoded.envelope.name != "CreateIssuer":
                return await handler(decoded)
            begun = (decoded.envelope.name, self._paced())
            self._now[begun] = self._now.get(begun, 0) + 1
            self.most[begun[1]] = max(self.most[begun[1]], self._now[begun])
            try:
                return await handler(decoded)
            finally:
                self._now[begun] -= 1

        return noted


async def test_appending_is_paced_while_the_relayer_is_behind_and_no_longer_once_caught_up(
    databases: tuple[Database, Database], amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with a backlog of queued commands, the handlers appended about twice as
    fast as the relayer published, and the relay lag grew for as long as the backlog
    lasted (to 123,000 events): a bid made meanwhile waited minutes for its saga."""
    monkeypatch.setattr(pace, "MOST_WAITING", 40)
    monkeypatch.setattr(pace, "RESUME_AT", 10)
    monkeypatch.setattr(pace, "LOOK_EVERY", 0.1)
    monkeypatch.setattr(pace, "RELAYER_MISSED_AFTER", 0.5)
    commands, queries = databases
    settings = _settings(databases, amqp_url)
    with capture_logs() as logs:

        def said(event: str) -> bool:
            return any(line["event"].startswith(event) for line in logs)

        concurrency = Concurrency(
            lambda: said("appending is paced") and not said("appending is no longer paced")
        )
        async with AsyncExitStack() as stack:
            # Commands handled, nothing relayed: the relayer is stopped, or far behind.
            appending = await bootstrap(
                settings,
                ("integration", "commands"),
                stack,
                deadline=time.monotonic() + 30,
                overrides=Overrides(handler_parts=(concurrency,)),
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
            await infra.wait_until(
                lambda: infra.holds(said("appending is paced")),
                timeout=30,
                what="appending paced",
            )
            await infra.wait_until(
                lambda: infra.holds(said("events wait to be relayed and no instance runs")),
                timeout=30,
                what="no relayer said to run",
            )
            relaying = await bootstrap(
                settings, ("relayer",), stack, deadline=time.monotonic() + 30
            )
            relayer_stop = asyncio.Event()
            relayer = asyncio.create_task(supervise(relaying, relayer_stop))

            async def all_appended() -> bool:
                return await _events(commands) == ISSUERS

            await infra.wait_until(all_appended, timeout=60, what="every issuer created")
            await infra.wait_until(
                lambda: infra.holds(said("appending is no longer paced")),
                timeout=30,
                what="appending no longer paced",
            )
            assert said("a relayer runs again")
            stop.set()
            relayer_stop.set()
            assert await running == 0
            assert await relayer == 0
    # Up to the prefetch at once before (32 deliveries), one at a time while paced.
    assert concurrency.most[False] > 1 and concurrency.most[True] == 1, concurrency.most


async def test_the_relayer_publishes_on_a_connection_of_its_own(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    """Regression: the relayer published on the connection the Commands API publishes
    on; a flood of commands held its events' confirms unread past their timeout, and the
    broker was logged as down while it confirmed in milliseconds. Each connection is
    named, as the broker's management shows it."""
    commands, queries = databases
    settings = _settings(databases, amqp_url)
    vhost = amqp_url.rsplit("/", 1)[1]
    async with AsyncExitStack() as stack:
        running = await bootstrap(
            settings,
            ("commands-api", "integration", "commands", "relayer"),
            stack,
            deadline=time.monotonic() + 30,
        )
        stop = asyncio.Event()
        supervising = asyncio.create_task(supervise(running, stop))
        try:
            # The relayer's connection is opened by its first publish: an event appended.
            env = service_env(
                commands, queries, amqp_url, *(("127.0.0.1", free_port()) for _ in range(3))
            )
            sent = await run_cli(env, "populate", "--issuers", "1", "--investors", "0")
            assert sent.exit_code == 0, sent.describe()

            async def both() -> bool:
                named = await connection_names(vhost)
                return {"financing", "financing relayer"} <= set(named)

            await infra.wait_until(both, what="the relayer's connection beside the API's")
            assert (await connection_names(vhost)).count("financing relayer") == 1
        finally:
            stop.set()
            assert await supervising == 0
