"""The process says when it did not run: a stopped (SIGSTOP, a paused VM), starved or
blocked process finds deadlines that ran out meanwhile, and reports outages of
dependencies that answered all along."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing.entrypoints.observability import watch_event_loop
from tests.support.infra import wait_until


def lag_count() -> float:
    return REGISTRY.get_sample_value("financing_event_loop_lag_seconds_count") or 0.0


def block_the_loop(seconds: float) -> None:
    """Hold the event loop for `seconds`: to the loop, as a process stopped that long."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


async def _now(value: bool) -> bool:
    return value


async def test_a_process_that_did_not_run_says_so_once_and_exports_its_lag() -> None:
    """Regression: an instance resumed after 12 s of SIGSTOP logged "command database
    unavailable: no answer in time" (and a broker outage of 15 s) while every other
    instance used both; nothing said that the process itself had not run."""
    observed = lag_count()
    with capture_logs() as logs:
        watching = asyncio.create_task(watch_event_loop(period=0.01, reported=0.2))
        try:
            await wait_until(lambda: _now(lag_count() > observed), what="a first lag")
            block_the_loop(0.3)
            await wait_until(lambda: _now(bool(logs)), what="the line")
            await wait_until(lambda: _now(lag_count() > observed + 3), what="later lags")
        finally:
            watching.cancel()
    # The stall made here, and any a loaded machine adds (each one line).
    assert logs and all(line["log_level"] == "warning" for line in logs)
    assert all(line["event"].startswith("the process did not run for a while") for line in logs)
    assert any(0.2 <= line["stalled_seconds"] < 5 for line in logs)
