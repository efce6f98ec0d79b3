"""How long a deferred delivery has waited: its copies' expirations added up, by no clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.dead_letters import (
    DEFERRED_AT_HEADER,
    DEFERRED_FOR_HEADER,
    deferred_for,
)


@dataclass
class Delivered:
    headers: dict[str, Any] = field(default_factory=dict)


def waited(**headers: Any) -> float:
    return deferred_for(cast(AbstractIncomingMessage, Delivered(dict(headers))))


def stamped(ago: timedelta) -> str:
    return (datetime.now(UTC) - ago).isoformat()


def test_a_delivery_never_deferred_has_not_waited() -> None:
    assert waited() == 0.0


@pytest.mark.parametrize("step", [timedelta(seconds=90), timedelta(minutes=-10)])
def test_the_wait_is_the_sum_of_the_expirations_whatever_the_clocks_say(step: timedelta) -> None:
    """Regression: measured from the first deferral's stamp by the reader's clock, a clock
    stepped forward 90 s (an NTP correction, a resumed virtual machine) dead-lettered a bid
    deferred a second before, "it waited 92.1 s"; one stepped back let it wait on."""
    assert waited(**{DEFERRED_AT_HEADER: stamped(step), DEFERRED_FOR_HEADER: "1.250"}) == 1.25


def test_a_copy_of_an_earlier_release_has_waited_since_its_stamp() -> None:
    assert waited(**{DEFERRED_AT_HEADER: stamped(timedelta(seconds=30))}) == pytest.approx(
        30.0, abs=1.0
    )


@pytest.mark.parametrize("value", ["soon", "nan", "inf", "-3", b"\xff"])
def test_a_wait_the_service_does_not_write_is_no_wait(value: object) -> None:
    stamp = stamped(timedelta(seconds=30))
    assert waited(**{DEFERRED_AT_HEADER: stamp, DEFERRED_FOR_HEADER: value}) == 0.0


def test_a_count_without_its_stamp_waits_anew() -> None:
    """Regression (a fleet of 0.5.1 and 0.5.2): 0.5.1's `dead-letters requeue` leaves out
    the stamp and keeps the count 0.5.2 wrote; the requeued bid, counted as having waited
    already, was dead-lettered at once, 20 of 20, its investor registered seconds later."""
    assert waited(**{DEFERRED_FOR_HEADER: "23.128"}) == 0.0
