"""What `financing_unrouted`'s consumer makes of each message routed to no consumer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from financing.adapters.rabbitmq.topology import unrouted
from financing.application.pipeline import IGNORED, OutcomeKind
from financing.application.ports import Envelope
from tests.support.deliveries import MemoryDelivery


@dataclass
class NameNotAString(MemoryDelivery):
    """Its `name` header is no string (an AMQP array, a number): unreadable before decoding."""

    @property
    def name(self) -> str | None:
        return None


def event(name: str) -> Envelope:
    return Envelope(message_id=str(uuid.uuid4()), name=name, body=b"{}")


async def test_a_handled_name_here_means_a_missing_binding_which_is_declared_again() -> None:
    """Regression: dead-lettered saying that its name header must be a string, which it
    was; nothing declared the missing binding again."""
    asked: list[str] = []
    step = unrouted(lambda: asked.append("declare"))

    outcome = await step(MemoryDelivery(event("InvestorFundsReleasedEvent")))

    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert "the binding of its queue to 'financing_events' was missing" in outcome.detail
    assert "`financing dead-letters requeue` routes it again" in outcome.detail
    assert asked == ["declare"]


async def test_a_handled_name_that_is_not_a_string_is_dead_lettered_as_such() -> None:
    asked: list[str] = []
    step = unrouted(lambda: asked.append("declare"))

    outcome = await step(NameNotAString(event("InvestorFundsReleasedEvent")))

    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert outcome.detail.endswith("its name header must be a string")
    assert asked == []


async def test_a_name_nobody_handles_is_ignored() -> None:
    asked: list[str] = []
    step = unrouted(lambda: asked.append("declare"))

    assert await step(MemoryDelivery(event("SomeoneElsesEvent"))) == IGNORED
    assert await step(NameNotAString(event("SomeoneElsesEvent"))) == IGNORED
    assert asked == []
