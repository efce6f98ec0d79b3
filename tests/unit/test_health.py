"""Readiness follows the probes of each side's dependencies, and drains at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.testing import ChannelFor
from structlog.testing import capture_logs

from financing.application.errors import Unavailable
from financing.application.retry import Outages
from financing.entrypoints.grpc.health import (
    BUSY_EXCUSES,
    BUSY_TURN,
    SHUTTING_DOWN,
    HealthWatch,
    Probe,
    Readiness,
    health_service,
)
from tests.support.busy import busy
from tests.support.infra import holds, wait_until


class Dependency:
    def __init__(self) -> None:
        self.up = True

    async def check(self) -> None:
        if not self.up:
            raise Unavailable("broker", "connection refused")


async def test_a_side_serves_while_its_probes_succeed_and_stops_when_one_fails() -> None:
    broker = Dependency()
    watch = HealthWatch(Outages())
    commands = Readiness("Commands")
    watch.watch(commands, [Probe("broker", broker.check)])
    assert not commands.serving  # not before the first probe
    await watch.probe_once()
    assert commands.serving
    broker.up = False
    await watch.probe_once()
    assert not commands.serving
    broker.up = True
    await watch.probe_once()
    assert commands.serving


async def test_probes_log_the_outage_once_and_its_end_even_without_traffic() -> None:
    broker = Dependency()
    watch = HealthWatch(Outages())
    watch.watch(Readiness("Commands"), [Probe("broker", broker.check)])
    with capture_logs() as logs:
        broker.up = False
        for _ in range(3):
            await watch.probe_once()
        broker.up = True
        await watch.probe_once()
    events = [log["event"] for log in logs if log.get("dependency") == "broker"]
    # The probe failed on a connection it never saw lost: no reconnection to speak of.
    assert events == ["broker unavailable", "broker recovered"]


async def test_a_probe_that_hangs_counts_as_a_failure() -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    watch = HealthWatch(Outages(), timeout=0.05)
    queries = Readiness("Queries")
    watch.watch(queries, [Probe("query database", hangs)])
    await watch.probe_once()
    assert not queries.serving


async def test_a_dependency_slower_than_the_probe_but_within_its_operations_time_is_up() -> None:
    """Regression (a probe): a broker 200 ms away each way answered every command in
    0.4 s, and its health probe's round trips took more than the probe's 2 s: it was
    said down for as long as it was slow, `/health` at 503 and `Commands` NOT_SERVING,
    and its outage could not end, each check given 1 s."""

    async def answers_late() -> None:  # later than the probe's own timeout
        answered = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, answered.set)
        await answered.wait()

    outages = Outages()
    outages.check_with("broker", answers_late, answers_within=5.0)
    watch = HealthWatch(outages, timeout=0.05)
    commands = Readiness("Commands")
    watch.watch(commands, [Probe("broker", answers_late)])
    with capture_logs() as logs:
        await watch.probe_once()
        assert commands.serving
        # An outage begun otherwise is ended by a check given as long.
        outages.failed(Unavailable("broker", "connection lost"))
        await outages.check_once(within=0.05, quiet=0.0)
    said = [line["event"] for line in logs if line.get("dependency") == "broker"]
    assert said == ["broker unavailable", "broker recovered"]


async def test_a_silent_dependency_does_not_hold_another_sides_readiness() -> None:
    async def silent() -> None:
        await asyncio.Event().wait()

    outages = Outages()
    outages.check_with("query database", silent, answers_within=60.0)
    watch = HealthWatch(outages, timeout=0.05)
    queries, commands = Readiness("Queries"), Readiness("Commands")
    watch.watch(queries, [Probe("query database", silent)])
    watch.watch(commands, [Probe("broker", Dependency().check)])
    probing = asyncio.create_task(watch.probe_once())
    try:
        await wait_until(lambda: holds(commands.serving), what="the Commands side served")
        assert not probing.done()  # the query database still given its time
    finally:
        probing.cancel()
        await asyncio.gather(probing, return_exceptions=True)


async def test_draining_stops_serving_for_good_whatever_the_probes_say() -> None:
    watch = HealthWatch(Outages())
    commands = Readiness("Commands")
    watch.watch(commands, [Probe("broker", Dependency().check)])
    await watch.probe_once()
    await watch.drain()
    assert not commands.serving
    await watch.probe_once()
    assert not commands.serving


async def test_watchers_are_told_of_every_change() -> None:
    readiness = Readiness("Commands")
    watcher = await readiness.__subscribe__()
    readiness.set(True)
    assert watcher.is_set()
    watcher.clear()
    readiness.set(True)  # no change: no news
    assert not watcher.is_set()
    readiness.set(False)
    assert watcher.is_set()
    await readiness.__unsubscribe__(watcher)


@pytest.mark.parametrize(
    "turn",
    [BUSY_TURN * 1.5, BUSY_TURN / 10],
    ids=["long turns (starved)", "short turns, always busy (a storm of calls)"],
)
async def test_a_probe_out_of_time_in_a_busy_process_says_nothing_of_its_dependency(
    turn: float,
) -> None:
    """Regression: a storm of calls on two cores kept the event loop so busy that the
    probes ran out of time: a broker and a database that answered everyone else were
    logged as down, `/health` answered 503 and Commands was NOT_SERVING, up to 104 s
    (then, judged by one turn of the loop alone, still 43 s: each turn was short)."""
    answering = asyncio.Event()

    async def slow_to_read() -> None:
        await answering.wait()  # the answer is there; the process never reads it in time

    outages = Outages()
    watch = HealthWatch(outages, timeout=0.05)
    commands = Readiness("Commands")
    watch.watch(commands, [Probe("broker", slow_to_read)])
    answering.set()
    await watch.probe_once()
    assert commands.serving
    answering.clear()
    async with busy(turn):
        with capture_logs() as logs:
            await watch.probe_once()
    assert commands.serving  # nothing learnt: the broker is as its users say
    assert not outages.down()
    assert [log["event"] for log in logs if log["log_level"] != "debug"] == []

    outages.failed(Unavailable("broker", "a publish not confirmed"))  # its users say
    async with busy(turn):
        await watch.probe_once()
    assert not commands.serving  # a real outage is not hidden by a busy process
    outages.succeeded("broker")

    await watch.probe_once()  # the process idle again: the probe's silence is the broker's
    assert not commands.serving
    assert outages.down()


async def test_a_busy_process_excuses_a_silent_dependency_only_a_few_probes_in_a_row() -> None:
    """A broker that stops answering while the process stays busy, and that no operation
    reports (a Commands API's publishes only time out), is not hidden for long."""

    async def silent() -> None:
        await asyncio.Event().wait()

    outages = Outages()
    watch = HealthWatch(outages, timeout=0.05)
    commands = Readiness("Commands")
    commands.set(True)
    watch.watch(commands, [Probe("broker", silent)])
    async with busy(BUSY_TURN / 10):
        for _ in range(BUSY_EXCUSES):
            await watch.probe_once()
            assert commands.serving and not outages.down()
        await watch.probe_once()
    assert not commands.serving
    assert outages.down() == {"broker"}


@pytest.mark.parametrize("name", ["", "grpc.health.v1.Health.Unknown"], ids=["served", "unknown"])
async def test_a_watch_call_is_told_not_serving_and_ends_when_the_service_drains(
    name: str,
) -> None:
    """Regression: grpclib's Watch went on until the connection's close cut it, its
    client never given a status."""
    watch = HealthWatch(Outages())
    commands = Readiness("Commands")
    watch.watch(commands, [Probe("broker", Dependency().check)])
    await watch.probe_once()
    async with (
        ChannelFor([health_service(_Commands(), commands)]) as channel,
        HealthStub(channel).Watch.open() as call,
    ):
        await call.send_message(HealthCheckRequest(service=name), end=True)
        first = await call.recv_message()
        assert first is not None
        assert first.status == (
            HealthCheckResponse.SERVING if name == "" else HealthCheckResponse.SERVICE_UNKNOWN
        )
        draining = asyncio.create_task(watch.drain())
        async with asyncio.timeout(5):  # grpclib's Watch never ended
            told = [reply.status async for reply in _replies(call)]
            with pytest.raises(GRPCError) as ended:
                await call.recv_trailing_metadata()
        assert ended.value.status == Status.UNAVAILABLE
        assert ended.value.message == SHUTTING_DOWN
        await draining
    assert told == ([HealthCheckResponse.NOT_SERVING] if name == "" else [])
    assert not commands.watched


class _Commands:
    """A servable named as the Commands service (what the port's health is named for)."""

    def __mapping__(self) -> dict[str, Any]:
        return {"/financing.v1.Commands/SellInvoice": None}


async def _replies(call: Any) -> AsyncIterator[Any]:
    while (reply := await call.recv_message()) is not None:
        yield reply
