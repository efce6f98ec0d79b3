"""The database server's clock as the service's host sees it, and a skew between them said."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from structlog.testing import capture_logs

from financing.adapters.postgres.clock import DatabaseClock
from tests.support import infra


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_clock", "queries") as pool:
        yield pool


async def test_clocks_in_step_measure_an_offset_near_zero(pool: asyncpg.Pool) -> None:
    clock = DatabaseClock(pool, "query database")
    await clock.measure()
    assert abs(clock.offset) < 0.5  # this machine's clocks are the same clock
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 0.5


async def test_a_host_clock_ahead_is_measured_said_once_and_its_end_said(
    pool: asyncpg.Pool,
) -> None:
    ahead = [30.0]
    clock = DatabaseClock(pool, "query database", host_clock=lambda: time.time() + ahead[0])
    with capture_logs() as logs:
        await clock.measure()
        await clock.measure()
        assert clock.offset == pytest.approx(-30.0, abs=0.5)
        assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 0.5
        ahead[0] = 0.0
        await clock.measure()
    said = [(line["log_level"], line["event"]) for line in logs]
    assert said == [
        (
            "warning",
            "this host's clock and the database server's differ: keep them in step (NTP);"
            " projection delays are measured by the server's",
        ),
        ("info", "this host's clock and the database server's agree again"),
    ]
    assert logs[0]["offset_seconds"] == pytest.approx(-30.0, abs=0.5)


async def test_a_step_of_the_host_clock_does_not_move_the_time_told_by_the_server_clock(
    pool: asyncpg.Pool,
) -> None:
    """Regression: told as the host's wall clock plus the offset last measured, a step of
    the host's clock went into every projection delay until the next reading (a minute at
    most): a step of 90 s, a thousand delays of 90 s recorded where they took
    milliseconds."""
    ahead = [0.0]
    clock = DatabaseClock(pool, "query database", host_clock=lambda: time.time() + ahead[0])
    await clock.measure()
    ahead[0] = 90.0  # stepped after the reading
    assert abs((clock.now() - datetime.now(UTC)).total_seconds()) < 0.5
