"""The supervisor's shutdown: what a component does while it stops is not lost."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from financing.entrypoints.bootstrap import Service
from financing.entrypoints.supervisor import supervise


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
    stop = asyncio.Event()
    with capture_logs() as logs:
        supervising = asyncio.create_task(supervise(service, stop))
        await started.wait()
        stop.set()
        async with asyncio.timeout(10):
            code = await supervising

    assert code == 0
    failed = [line for line in logs if line["event"] == "component failed while stopping"]
    assert [line["component"] for line in failed] == ["leaky"]
    assert "could not let go" in failed[0]["error"]
