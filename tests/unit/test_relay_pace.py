"""Appending kept to the relayer's pace: while too many events wait to be relayed, each
consumer that appends handles one delivery at a time, and as many as it is given once
few do."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from structlog.testing import capture_logs

from financing.application import pace as pace_module
from financing.application.errors import Unavailable
from financing.application.pace import RelayPace
from financing.application.pipeline import Decoded, Outcome
from financing.application.ports import OtherSession
from tests.support.infra import holds, wait_until


class Lag:
    """The events waiting to be relayed and how long the oldest has waited, as a test
    sets them; None: the database is down."""

    def __init__(self) -> None:
        self.waiting: int | None = 0
        self.oldest = 0.0

    async def __call__(self) -> tuple[int, float]:
        if self.waiting is None:
            raise Unavailable("command database", "connection refused")
        return self.waiting, self.oldest


class Handling:
    """A handler whose calls each wait for the test to let them end; it notes how many
    run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.end = asyncio.Event()

    async def __call__(self, decoded: Decoded) -> Outcome:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.end.wait()
        finally:
            self.running -= 1
        return Outcome.processed()


async def _two_at_once(pace: RelayPace, handling: Handling) -> int:
    """Two deliveries handled at once by `pace`'s handler: how many ran together."""
    handling.most = 0
    handling.end.clear()
    paced = pace.paced(handling)
    calls = [asyncio.create_task(paced(cast(Decoded, object()))) for _ in range(2)]
    # Not true at the first look (neither has run yet): by the next, both have run as
    # far as they were let.
    await wait_until(lambda: holds(handling.running >= 1), what="a delivery handled")
    handling.end.set()
    await asyncio.gather(*calls)
    return handling.most


async def test_while_too_many_events_wait_each_consumer_handles_one_delivery_at_a_time() -> None:
    lag = Lag()
    pace = RelayPace(lag, most_waiting=100, resume_at=40)
    handling = Handling()
    with capture_logs() as logs:
        lag.waiting = 100  # at the bound: not paced
        await pace.look()
        assert await _two_at_once(pace, handling) == 2
        lag.waiting = 101
        await pace.look()
        assert await _two_at_once(pace, handling) == 1
        lag.waiting = 41  # fewer, not yet few enough
        await pace.look()
        lag.waiting = None  # a lag that cannot be read changes nothing
        await pace.look()
        assert pace.holding
        lag.waiting = 40
        await pace.look()
        assert await _two_at_once(pace, handling) == 2
    assert [(line["log_level"], line["event"]) for line in logs] == [
        (
            "warning",
            "appending is paced, one delivery at a time for each queue: more events wait to"
            " be relayed than the handlers may run ahead of the relayer",
        ),
        ("info", "appending is no longer paced: the relayer caught up"),
    ]
    assert logs[0]["waiting_events"] == 101


async def test_the_lag_is_looked_at_by_itself() -> None:
    lag = Lag()
    pace = RelayPace(lag, most_waiting=10, resume_at=5)
    looking = asyncio.create_task(pace.run(every=0.01))
    try:
        lag.waiting = 11
        await wait_until(lambda: holds(pace.holding), what="appending paced")
        lag.waiting = 5
        await wait_until(lambda: holds(not pace.holding), what="appending no longer paced")
    finally:
        looking.cancel()


async def test_events_waiting_with_no_relayer_running_are_said_once_and_its_return_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: with every instance started without the relayer, events waited for
    ever and nothing in the service's log said why sagas stood still."""
    monkeypatch.setattr(pace_module, "RELAYER_ABSENT_FOR", 0.0)
    lag = Lag()
    running = True
    asked = 0

    async def relayer() -> OtherSession | None:
        nonlocal asked
        asked += 1
        holder = OtherSession(1, "financing", "financing", "local", "idle", None)
        return holder if running else None

    pace = RelayPace(lag, relayer=relayer, most_waiting=1000, resume_at=500)
    with capture_logs() as logs:
        lag.waiting, lag.oldest = 3, pace_module.RELAYER_MISSED_AFTER - 1
        running = False
        await pace.look()
        assert asked == 0  # not waited long enough to ask: a relayer's failover
        lag.oldest = pace_module.RELAYER_MISSED_AFTER
        running = True
        await pace.look()  # waited long, but a relayer runs: slow, not missing
        running = False
        await pace.look()
        await pace.look()
        running = True
        await pace.look()
    assert [(line["log_level"], line["event"]) for line in logs] == [
        (
            "warning",
            "events wait to be relayed and no instance runs the relayer (no session holds"
            " the relayer lock): sagas and read models wait until one runs",
        ),
        ("info", "a relayer runs again"),
    ]
    assert logs[0]["waiting_events"] == 3


async def test_a_relayer_missing_for_a_moment_only_is_not_said_missing() -> None:
    """Regression: a relayer that lost its lock stands for election again, and for half
    a second no session held it: one look then said that no instance ran the relayer,
    an alert on that line firing at every hand-over while events waited."""
    lag = Lag()
    running = False

    async def relayer() -> OtherSession | None:
        holder = OtherSession(1, "financing", "financing", "local", "idle", None)
        return holder if running else None

    pace = RelayPace(lag, relayer=relayer, most_waiting=1000, resume_at=500)
    with capture_logs() as logs:
        lag.waiting, lag.oldest = 3, pace_module.RELAYER_MISSED_AFTER
        await pace.look()  # between two elections
        await pace.look()
        running = True
        await pace.look()  # elected again
        running = False
        await pace.look()  # a new gap starts its own count
    assert logs == []
