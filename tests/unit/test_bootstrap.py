"""Start-up waits only for dependencies that are unavailable; a bug is a bug, not an outage."""

from __future__ import annotations

import asyncio
import time

import pytest

from financing.application.errors import AwaitingOperator, Refused, Unavailable
from financing.application.retry import Outages
from financing.entrypoints.bootstrap import Service, StartupError, _unhealthy, started


async def test_a_dependency_unavailable_past_the_deadline_fails_start_up_saying_so() -> None:
    attempts = 0

    async def connect() -> None:
        nonlocal attempts
        attempts += 1
        raise Unavailable("broker", "connection refused")

    with pytest.raises(StartupError) as raised:
        await started("migrating the broker", connect, Outages(), time.monotonic() + 0.5)
    # Regression: "migrating the query database is unreachable: ...".
    assert str(raised.value) == (
        "migrating the broker: gave up when FINANCING_STARTUP_TIMEOUT ran out:"
        " broker unavailable: connection refused"
    )
    assert attempts > 1


async def test_an_outage_only_an_operator_ends_says_start_up_stopped_where_it_gave_up() -> None:
    """Regression (a probe): start-up given up while a unique index was lacking said,
    as its last words, that the service goes on by itself once it is made, and exited."""

    async def indexed() -> None:
        raise AwaitingOperator(
            "command database",
            "it lacks the unique index(es) its writes rely on, dropped or left invalid: ...;"
            " the service goes on by itself once they are made",
        )

    with pytest.raises(StartupError) as raised:
        await started("the unique indexes", indexed, Outages(), time.monotonic() + 0.3)
    assert str(raised.value).endswith(
        "the service goes on by itself once they are made (this instance stopped instead:"
        " start it again once that is done)"
    )


async def test_a_dependency_that_comes_back_within_the_deadline_lets_start_up_go_on() -> None:
    attempts = 0

    async def connect() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise Unavailable("command database", "starting up")
        return "pool"

    assert await started("command database", connect, Outages(), time.monotonic() + 10) == "pool"


async def test_a_refusal_fails_start_up_at_once() -> None:
    attempts = 0

    async def connect() -> None:
        nonlocal attempts
        attempts += 1
        raise Refused("command database", "password authentication failed")

    began = time.monotonic()
    with pytest.raises(StartupError, match="refused the service"):
        await started("command database", connect, Outages(), time.monotonic() + 30)
    assert attempts == 1 and time.monotonic() - began < 1


async def test_a_bug_at_start_up_is_raised_as_itself_not_reported_as_unreachable() -> None:
    async def connect() -> None:
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        await started("broker", connect, Outages(), time.monotonic() + 30)


async def test_an_attempt_still_waiting_at_the_deadline_is_not_called_unreachable() -> None:
    # A migration waiting for another instance's lock gets no answer, but its database
    # answers: start-up says what it was still waiting for, not that it is unreachable.
    async def migrate() -> None:
        await asyncio.Event().wait()

    with pytest.raises(StartupError) as raised:
        await started("migrating the command database", migrate, Outages(), time.monotonic() + 0.2)
    assert str(raised.value) == (
        "migrating the command database: still waiting for an answer when"
        " FINANCING_STARTUP_TIMEOUT ran out"
    )


async def test_an_attempt_cut_at_the_deadline_says_why_the_one_before_failed() -> None:
    """Regression: a read-only query database without the schema failed its first
    attempt, the second was still waiting when the timeout ran out, and start-up's error
    said only "still waiting for an answer" (the reason had been a warning line)."""
    attempts = 0

    async def migrate() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise Unavailable("query database", "takes no writes, and its schema lacks 5")
        await asyncio.Event().wait()

    with pytest.raises(StartupError) as raised:
        await started("migrating the query database", migrate, Outages(), time.monotonic() + 0.5)
    assert attempts == 2
    assert str(raised.value) == (
        "migrating the query database: still waiting for an answer when"
        " FINANCING_STARTUP_TIMEOUT ran out; the attempt before: query database"
        " unavailable: takes no writes, and its schema lacks 5"
    )


async def test_a_deadline_that_comes_in_a_pause_between_attempts_says_the_last_error() -> None:
    """Regression: when the loop ran late, the deadline's timer fired in the pause
    before the next attempt, and start-up said it was still waiting for an answer."""

    failed = asyncio.Event()

    async def connect() -> None:
        failed.set()
        raise Unavailable("broker", "connection refused")

    async def late_loop() -> None:
        await failed.wait()  # run once the first attempt failed and its pause began
        # The loop held, without a turn, until the pause's end and the deadline have both
        # passed: their timers come due together.
        until = deadline + 0.05
        while time.monotonic() < until:
            pass

    deadline = time.monotonic() + 0.15
    stall = asyncio.create_task(late_loop())
    with pytest.raises(StartupError) as raised:
        # The first pause is at most 0.1 s: within the deadline, so it is slept.
        await started("broker", connect, Outages(), deadline)
    await stall
    assert str(raised.value) == (
        "broker: gave up when FINANCING_STARTUP_TIMEOUT ran out:"
        " broker unavailable: connection refused"
    )


def test_health_names_each_dependency_down_and_each_queue_not_consumed() -> None:
    """Regression: /health said "not healthy" whatever was down."""
    outages = Outages()
    service = Service(components=frozenset())
    service.consuming = {"events_query": asyncio.Event(), "SellInvoice": asyncio.Event()}
    service.consuming["SellInvoice"].set()
    assert _unhealthy(service, outages) == ["queue events_query not consumed"]
    outages.failed(Unavailable("queue events_query", "ACCESS_REFUSED"))
    # The queue refused is said once, as the outage it is.
    assert _unhealthy(service, outages) == ["queue events_query unavailable"]
    outages._ended("queue events_query")
    outages.failed(Unavailable("query database", "connection refused"))
    outages.failed(Unavailable("broker", "connection reset"))
    service.consuming["events_query"].set()
    assert _unhealthy(service, outages) == ["broker unavailable", "query database unavailable"]
