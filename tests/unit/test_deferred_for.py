"""How long a deferred delivery has waited: counted from its copies, not read off clocks
that may disagree."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.dead_letters import (
    DEFERRED_AT_HEADER,
    DEFERRED_CLOCK_HEADER,
    DEFERRED_DELAY_HEADER,
    DEFERRED_FOR_HEADER,
    DEFERRED_PAST_WAIT_HEADER,
    LATE_BY,
    came_back_late,
    deferred_for,
    past_wait_from,
)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass
class Delivered:
    headers: dict[str, Any] = field(default_factory=dict)


def waited(**headers: Any) -> float:
    return deferred_for(cast(AbstractIncomingMessage, Delivered(dict(headers))))


def stamped(ago: timedelta) -> str:
    return (datetime.now(UTC) - ago).isoformat()


def copy(before: str, delay: str, clock: str | None = None, *, stamp: str = "") -> dict[str, Any]:
    """The deferral headers of a copy put aside `delay` seconds after waiting `before`."""
    headers = {
        DEFERRED_AT_HEADER: stamp or stamped(timedelta(seconds=1)),
        DEFERRED_FOR_HEADER: before,
        DEFERRED_DELAY_HEADER: delay,
    }
    if clock is not None:
        headers[DEFERRED_CLOCK_HEADER] = clock
    return headers


def test_a_delivery_never_deferred_has_not_waited() -> None:
    assert waited() == 0.0


@pytest.mark.parametrize("step", [timedelta(seconds=90), timedelta(minutes=-10)])
def test_the_wait_is_counted_whatever_the_wall_clocks_say(step: timedelta) -> None:
    """Regression: measured from the first deferral's stamp by the reader's clock, a clock
    stepped forward 90 s (an NTP correction, a resumed virtual machine) dead-lettered a bid
    deferred a second before, "it waited 92.1 s"; one stepped back let it wait on."""
    assert waited(**copy("1.250", "0.500", stamp=stamped(step))) == 1.75  # another host's


@pytest.mark.skipif(not BOOT_ID.exists(), reason="no boot id: only the delays are counted")
def test_a_copy_away_longer_than_its_delay_counts_the_time_it_was_away() -> None:
    """Regression: counted by delays alone, a copy held in the deferrals' queue behind one
    put aside for longer (the broker expires messages at the head of a queue only) was
    counted as back on time: bids deferred one after another waited 60 s of a 40 s wait,
    their reasons saying 43 s."""
    boot = BOOT_ID.read_text().strip()
    clock = f"{boot} {time.monotonic() - 7.0:.3f}"  # put aside 7 s ago for 0.25 s
    assert waited(**copy("2.000", "0.250", clock)) == pytest.approx(9.0, abs=0.5)


def test_a_copy_of_another_host_counts_its_delay() -> None:
    clock = f"another-boot {time.monotonic() - 7.0:.3f}"
    assert waited(**copy("2.000", "0.250", clock)) == 2.25


def test_a_copy_of_an_earlier_release_has_waited_since_its_stamp() -> None:
    assert waited(**{DEFERRED_AT_HEADER: stamped(timedelta(seconds=30))}) == pytest.approx(
        30.0, abs=1.0
    )


def test_a_count_without_its_stamp_waits_anew() -> None:
    """Regression (a fleet of 0.5.1 and 0.5.2): 0.5.1's `dead-letters requeue` leaves out
    the stamp and keeps the count 0.5.2 wrote; the requeued bid, counted as having waited
    already, was dead-lettered at once, 20 of 20, its investor registered seconds later."""
    assert waited(**{DEFERRED_FOR_HEADER: "23.128", DEFERRED_DELAY_HEADER: "5.000"}) == 0.0


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "-3", b"\xff"])
def test_a_wait_the_service_does_not_write_is_no_wait(value: object) -> None:
    assert waited(**copy(cast(str, value), "1.000")) == 0.0
    assert waited(**copy("1.000", cast(str, value))) == 0.0


def late(**headers: Any) -> bool:
    return came_back_late(cast(AbstractIncomingMessage, Delivered(dict(headers))))


@pytest.mark.skipif(not BOOT_ID.exists(), reason="no boot id: time away cannot be told")
@pytest.mark.parametrize(
    ("away", "is_late"),
    [(0.3, False), (0.25 + LATE_BY - 1, False), (0.25 + LATE_BY + 1, True), (70.0, True)],
)
def test_a_copy_is_late_only_when_away_far_longer_than_its_delay(
    away: float, is_late: bool
) -> None:
    """Held behind copies put aside for longer (at most 5 s) it is on time; away for as
    long as the service was stopped, late."""
    clock = f"{BOOT_ID.read_text().strip()} {time.monotonic() - away:.3f}"
    assert late(**copy("2.000", "0.250", clock)) is is_late


def test_a_copy_of_another_host_or_never_deferred_is_not_late() -> None:
    assert not late(**copy("2.000", "0.250", f"another-boot {time.monotonic() - 70:.3f}"))
    assert not late()


def test_a_copy_of_an_earlier_release_is_late_its_time_away_unknown() -> None:
    assert late(**{DEFERRED_AT_HEADER: stamped(timedelta(seconds=30))})


def test_a_copy_that_had_its_pass_past_its_wait_is_never_late_again() -> None:
    """Regression: under a backlog every return is late, and 20,000 bids naming
    investors that never come went round for ever, none dead-lettered after 4 minutes."""
    headers = {DEFERRED_AT_HEADER: stamped(timedelta(seconds=30))}
    assert late(**headers)
    assert not late(**headers, **{DEFERRED_PAST_WAIT_HEADER: "61.000"})


def test_the_pass_of_a_copy_an_earlier_release_requeued_is_not_read() -> None:
    """0.5.5's `dead-letters requeue` leaves out the deferral headers it knows, and keeps
    this one: a requeued message waits anew, pass and all."""
    message = cast(AbstractIncomingMessage, Delivered({DEFERRED_PAST_WAIT_HEADER: "61.000"}))
    assert past_wait_from(message) is None
    stamped_copy = Delivered(
        {DEFERRED_AT_HEADER: stamped(timedelta(seconds=1)), DEFERRED_PAST_WAIT_HEADER: "61.000"}
    )
    assert past_wait_from(cast(AbstractIncomingMessage, stamped_copy)) == 61.0
