"""The supervisor's shutdown: what a component does while it stops is not lost."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from financing import release
from financing.entrypoints.bootstrap import Listener, Service
from financing.entrypoints.observability import MetricsEndpoint
from financing.entrypoints.supervisor import supervise
from tests.support.infra import wait_until


async def stopped_once(
    started: asyncio.Event, service: Service
) -> tuple[int, list[MutableMapping[str, Any]]]:
    """Supervise `service`, stop it once `started` is set: its exit code and its lines."""
    stop = asyncio.Event()
    with capture_logs() as logs:
        supervising = asyncio.create_task(supervise(service, stop))
        await started.wait()
        stop.set()
        async with asyncio.timeout(10):
            code = await supervising
    return code, logs


async def test_a_component_failing_while_it_stops_is_logged_and_the_stop_stays_clean() -> None:
    started = asyncio.Event()

    async def failing_on_the_way_out() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("could not let go")

    async def quiet() -> None:
        await asyncio.Event().wait()

    service = Service(frozenset(), workers={"leaky": failing_on_the_way_out, "quiet": quiet})
    code, logs = await stopped_once(started, service)

    assert code == 0
    failed = [line for line in logs if line["event"] == "component failed while stopping"]
    assert [line["component"] for line in failed] == ["leaky"]
    assert "could not let go" in failed[0]["error"]


async def test_a_stop_before_the_service_is_ready_leaves_nothing_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: asyncio logged the cancelled wait for the consumers as an exception
    never retrieved, with a traceback, at the error level."""
    started = asyncio.Event()

    async def waiting() -> None:
        started.set()
        await asyncio.Event().wait()

    never = asyncio.Event()  # a consumer that never consumes
    service = Service(frozenset(), workers={"waiting": waiting}, consuming={"q": never})
    code, logs = await stopped_once(started, service)
    gc.collect()  # asyncio reports a future never retrieved when it is collected

    assert code == 0
    assert "service ready" not in [line["event"] for line in logs]
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text


@contextlib.asynccontextmanager
async def ready_line(*listeners: Listener) -> AsyncIterator[MutableMapping[str, Any]]:
    """The "service ready" line of a service with one consumer and `listeners`, while it
    runs; stopped (exit code 0) at the end of the block."""
    consuming = asyncio.Event()

    async def consumer() -> None:
        consuming.set()
        await asyncio.Event().wait()

    service = Service(
        frozenset(),
        workers={"consumer": consumer},
        listeners=list(listeners),
        consuming={"q": consuming},
    )
    stop = asyncio.Event()
    with capture_logs() as logs:
        supervising = asyncio.create_task(supervise(service, stop))

        async def ready() -> list[MutableMapping[str, Any]]:
            return [line for line in logs if line["event"] == "service ready"]

        [line] = await wait_until(ready, what="the ready line")
        try:
            yield line
        finally:
            stop.set()
            async with asyncio.timeout(10):
                assert await supervising == 0


async def test_the_ready_line_names_the_release() -> None:
    """An operator rolling a release out tells its instances apart by their logs."""
    async with ready_line() as line:
        pass
    assert line["release"] == release()


async def test_the_ready_line_names_the_port_a_listener_was_given() -> None:
    """Regression: a listen address with port 0 (the system picks a free one) was logged
    as `:0`, leaving the operator no way to find the service."""
    endpoint = MetricsEndpoint(lambda: [])
    async with ready_line(Listener("metrics", endpoint, ("127.0.0.1", 0))) as line:
        assert endpoint._server is not None
        port = endpoint._server.sockets[0].getsockname()[1]
    assert port != 0
    assert line["listening"] == {"metrics": f"127.0.0.1:{port}"}


async def test_the_ready_line_says_a_listener_on_every_address_takes_both_families() -> None:
    """Regression (a probe): a listener given `:PORT`, which takes IPv4 and IPv6 clients
    alike, was said to listen on `0.0.0.0:PORT`, which reads as IPv4 alone."""
    endpoint = MetricsEndpoint(lambda: [])
    async with ready_line(Listener("metrics", endpoint, ("0.0.0.0", 0))) as line:
        assert endpoint._server is not None
        port = endpoint._server.sockets[0].getsockname()[1]
    assert line["listening"] == {"metrics": f":{port}"}
