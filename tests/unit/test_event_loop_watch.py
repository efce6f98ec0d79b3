"""The process says when it did not run: a stopped (SIGSTOP, a paused VM), starved or
blocked process finds deadlines that ran out meanwhile, and reports outages of
dependencies that answered all along."""

from __future__ import annotations

import asyncio
import time

import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing import logging as service_logging
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


async def test_a_line_written_as_the_process_resumes_before_the_watch_says_so_is_marked() -> None:
    """Regression (a probe): resumed after 25 s of SIGSTOP, a process first ran what its
    sockets brought and logged "a read of invoices was given up by its caller after
    25.2 s: the query database answers it slowly", and only then that it had not run."""
    log = structlog.get_logger("financing.test")
    marked = [structlog.processors.add_log_level, service_logging._said_stalled]
    observed = lag_count()
    with capture_logs(processors=marked) as logs:
        watching = asyncio.create_task(watch_event_loop(period=0.01, reported=1.0))
        try:
            await wait_until(lambda: _now(lag_count() > observed), what="a first turn")
            log.warning("said while the process runs")
            block_the_loop(1.1)
            log.warning("said as the process resumes")  # before the watch's next turn
            await wait_until(
                lambda: _now(any("did not run" in line["event"] for line in logs)),
                what="the watch's line",
            )
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    log.warning("said once no watch runs")  # a command that runs none, or after the stop
    stalled = {line["event"]: line.get("process_stalled_seconds") for line in logs}
    assert stalled["said while the process runs"] is None
    assert 1.1 <= stalled["said as the process resumes"] < 10
    watch_line = next(event for event in stalled if "did not run" in event)
    assert stalled[watch_line] is None  # it says the stall itself
    assert service_logging._WATCH is None
