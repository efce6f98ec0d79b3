"""Retention of deduplication records: the setting, and the worker on fake databases."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from financing.application.errors import Fault, Unavailable
from financing.application.retry import Backoff, Limit, Outages, RetryPolicy
from financing.config import ConfigError, Settings
from financing.workers.retention import Retention
from tests.support import infra

WEEK = timedelta(days=7)
# Outages retried without limit, a bug not at all, with pauses of a millisecond.
QUICK = RetryPolicy(unavailable=Limit(Backoff(0.001, 0.001), None)).without(Fault.BUG)


class Records:
    """Deduplication records of one fake database: `old` of them beyond the window."""

    def __init__(self, old: int, *, failures: list[Exception] | None = None) -> None:
        self.old = old
        self.failures = list(failures or [])
        self.calls: list[tuple[timedelta, int]] = []

    async def prune(self, older_than: timedelta, limit: int) -> int:
        self.calls.append((older_than, limit))
        if self.failures:
            raise self.failures.pop(0)
        pruned = min(self.old, limit)
        self.old -= pruned
        return pruned


def retention(*databases: tuple[str, Records], batch_size: int = 3) -> Retention:
    return Retention(
        dict(databases), Outages(), keep=WEEK, interval=0.01, batch_size=batch_size, policy=QUICK
    )


# The setting


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("5400s", timedelta(minutes=90)),
        ("3600", timedelta(hours=1)),
        (" 2D ", timedelta(days=2)),
    ],
)
def test_the_retention_window_is_read_as_days_hours_minutes_or_seconds(
    raw: str, kept: timedelta
) -> None:
    assert Settings.from_env({"FINANCING_DEDUP_RETENTION": raw}).dedup_retention == kept


def test_deduplication_records_are_kept_a_week_by_default() -> None:
    assert Settings.from_env({}).dedup_retention == WEEK
    assert Settings.from_env({"FINANCING_DEDUP_RETENTION": ""}).dedup_retention == WEEK


@pytest.mark.parametrize("raw", ["1", "45s", "59m", "3599"])
def test_a_retention_window_shorter_than_an_hour_is_a_configuration_error(raw: str) -> None:
    """Regression: a retention of one second was accepted; a service killed under load
    and restarted pruned the records of what it had just handled, and the redeliveries
    and the relayer's repeats that followed were applied again (funds released twice)."""
    with pytest.raises(ConfigError, match="FINANCING_DEDUP_RETENTION must be at least 1h"):
        Settings.from_env({"FINANCING_DEDUP_RETENTION": raw})


# The last is a full-width 7.
@pytest.mark.parametrize(
    "raw", ["0", "0d", "-1d", "7w", "d", "1.5h", "seven days", "\uff17d", "1000000000d", "9" * 30]
)
def test_a_retention_window_that_is_not_a_positive_duration_is_a_configuration_error(
    raw: str,
) -> None:
    with pytest.raises(ConfigError, match="FINANCING_DEDUP_RETENTION"):
        Settings.from_env({"FINANCING_DEDUP_RETENTION": raw})


# The worker


async def test_records_are_pruned_in_batches_until_a_batch_is_not_full() -> None:
    commands = Records(old=7)

    pruned = await retention(("command database", commands)).prune()

    assert pruned == {"command database": 7}
    assert commands.calls == [(WEEK, 3)] * 3  # 3 + 3 + 1
    assert commands.old == 0


async def test_every_open_database_is_pruned() -> None:
    commands, queries = Records(old=2), Records(old=4)

    pruned = await retention(("command database", commands), ("query database", queries)).prune()

    assert pruned == {"command database": 2, "query database": 4}
    assert commands.old == queries.old == 0


async def test_nothing_old_enough_prunes_nothing_and_logs_nothing() -> None:
    with capture_logs() as logs:
        pruned = await retention(("command database", Records(old=0))).prune()

    assert pruned == {"command database": 0}
    assert logs == []


async def test_what_was_pruned_is_logged_once_per_database() -> None:
    with capture_logs() as logs:
        await retention(("query database", Records(old=5))).prune()

    assert [(log["event"], log["database"], log["count"]) for log in logs] == [
        ("pruned deduplication records", "query database", 5)
    ]


async def test_an_outage_is_retried_quietly_until_the_database_is_back() -> None:
    down = Unavailable("command database", "connection refused")
    commands = Records(old=2, failures=[down, down, down])

    with capture_logs() as logs:
        pruned = await retention(("command database", commands)).prune()

    assert pruned == {"command database": 2}
    assert len(commands.calls) == 4
    levels = [(log["log_level"], log["event"]) for log in logs]
    assert levels[0] == ("warning", "command database unavailable")
    assert levels[1][0] == "warning" and levels[1][1] == "command database recovered"
    assert not [level for level, _ in levels if level == "error"]


async def test_a_bug_stops_the_worker_at_once() -> None:
    commands = Records(old=2, failures=[TypeError("boom")])

    with pytest.raises(TypeError, match="boom"):
        await retention(("command database", commands)).prune()
    assert len(commands.calls) == 1


async def test_the_worker_prunes_again_after_each_interval() -> None:
    commands = Records(old=0)
    running = asyncio.create_task(retention(("command database", commands)).run())
    try:

        async def pruned_three_times() -> bool:
            return len(commands.calls) >= 3

        await infra.wait_until(pruned_three_times, timeout=5, what="three pruning rounds")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert running.cancelled()
