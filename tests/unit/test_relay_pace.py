"""Appending kept to the relayer's pace: handlers wait while too many events wait to be
relayed, and go on once few do."""

from __future__ import annotations

import asyncio
from typing import cast

from structlog.testing import capture_logs

from financing.application.errors import Unavailable
from financing.application.pace import RelayPace
from financing.application.pipeline import Decoded, Outcome
from tests.support.infra import holds, wait_until


class Lag:
    """The events waiting to be relayed, as a test sets them; None: the database is down."""

    def __init__(self) -> None:
        self.waiting: int | None = 0

    async def __call__(self) -> int:
        if self.waiting is None:
            raise Unavailable("command database", "connection refused")
        return self.waiting


def _decoded() -> Decoded:
    return cast(Decoded, object())  # the handler here reads nothing of it


async def test_handlers_wait_while_too_many_events_wait_to_be_relayed() -> None:
    lag = Lag()
    pace = RelayPace(lag, most_waiting=100, resume_at=40)
    handled: list[str] = []

    async def handler(decoded: Decoded) -> Outcome:
        handled.append("handled")
        return Outcome.processed()

    paced = pace.paced(handler)
    with capture_logs() as logs:
        lag.waiting = 100  # at the bound: appending goes on
        await pace.look()
        await paced(_decoded())
        lag.waiting = 101
        await pace.look()
        waiting = asyncio.create_task(paced(_decoded()))
        lag.waiting = 41  # fewer, not yet few enough
        await pace.look()
        lag.waiting = None  # a lag that cannot be read changes nothing
        await pace.look()
        assert pace.holding and not waiting.done()
        lag.waiting = 40
        await pace.look()
        await asyncio.wait_for(waiting, 5)
    assert handled == ["handled", "handled"]
    assert [(line["log_level"], line["event"]) for line in logs] == [
        (
            "warning",
            "appending waits for the relayer: more events wait to be relayed than it may run"
            " ahead of them",
        ),
        ("info", "appending goes on: the relayer caught up"),
    ]
    assert logs[0]["waiting_events"] == 101


async def test_the_lag_is_looked_at_by_itself() -> None:
    lag = Lag()
    pace = RelayPace(lag, most_waiting=10, resume_at=5)
    looking = asyncio.create_task(pace.run(every=0.01))
    try:
        lag.waiting = 11
        await wait_until(lambda: holds(pace.holding), what="appending held")
        lag.waiting = 5
        await wait_until(lambda: holds(not pace.holding), what="appending let go")
    finally:
        looking.cancel()
