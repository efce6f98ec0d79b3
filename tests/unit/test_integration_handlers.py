"""Integration handlers: Registering's events become our commands, sent once per event."""

from __future__ import annotations

import json
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
from structlog.testing import capture_logs

from financing.adapters.rabbitmq import topology
from financing.application import codec, routes
from financing.application.errors import Refused, Unavailable
from financing.application.memory import InMemoryCommandSender
from financing.application.messages import (
    Command,
    CreateInvestor,
    CreateIssuer,
    InvestorRegistered,
    IssuerRegistered,
)
from financing.application.pipeline import (
    Outcome,
    OutcomeKind,
    decoded,
    retried,
    selected,
    sending,
)
from financing.application.ports import Cause, Envelope, derived_message_id
from financing.application.retry import Backoff, Limit, Outages, RetryPolicy
from tests.unit.bus import MemoryDelivery

D = Decimal


class FailingSender:
    """A sender whose broker refuses every command."""

    def __init__(self) -> None:
        self.attempts = 0

    async def send(self, command: Command, message_id: UUID, cause: Cause) -> None:
        self.attempts += 1
        raise Unavailable("broker", "connection refused")


async def deliver(
    sender: InMemoryCommandSender | FailingSender,
    event: IssuerRegistered | InvestorRegistered,
    message_id: str,
    headers: dict[str, str] | None = None,
) -> Outcome:
    """Through the parts production composes for the event's route (but `retried`)."""
    [route] = [r for r in routes.INTEGRATION if r.message_name == event.name()]
    feed = topology.subscription(route.message_name)
    step = selected(feed.names, feed.others)(decoded(sending(sender, route.handler)))
    # As it arrives from Registering: no aggregateID header.
    envelope = Envelope(
        message_id=message_id, name=event.name(), body=codec.encode(event), headers=headers or {}
    )
    return await step(MemoryDelivery(envelope, source=feed.queue.name))


def test_each_integration_event_has_its_own_queue_on_the_events_exchange() -> None:
    subscriptions = [topology.subscription(r.message_name) for r in routes.INTEGRATION]
    assert sorted((s.queue.name, *s.names, s.queue.bound_to_events) for s in subscriptions) == [
        ("events_InvestorRegistered", "InvestorRegistered", True),
        ("events_IssuerRegistered", "IssuerRegistered", True),
    ]
    assert all(s.others is OutcomeKind.IGNORED for s in subscriptions)


async def test_a_registered_issuer_is_sent_create_issuer() -> None:
    sender = InMemoryCommandSender()
    issuer = uuid4()
    assert await deliver(sender, IssuerRegistered(issuer, "ACME"), "msg-1") == Outcome.processed()
    assert sender.sent == [(CreateIssuer(issuer), derived_message_id("msg-1", "CreateIssuer"))]


async def test_a_registered_investor_is_sent_create_investor_with_its_balance() -> None:
    sender = InMemoryCommandSender()
    investor = uuid4()
    await deliver(sender, InvestorRegistered(investor, "Zoë", D("100.1")), "msg-2")
    assert sender.sent == [
        (CreateInvestor(investor, D("100.1")), derived_message_id("msg-2", "CreateInvestor"))
    ]


def test_a_balance_from_registering_reaches_the_command_body_exactly() -> None:
    registered = codec.decode(
        "InvestorRegistered", f'{{"ID":"{uuid4()}","Name":"Z","Balance":0.1}}'.encode()
    )
    assert isinstance(registered, InvestorRegistered)
    body = codec.encode(CreateInvestor(registered.id, registered.balance))
    assert json.loads(body, parse_float=Decimal)["Balance"] == D("0.1")


@pytest.mark.parametrize(
    "event",
    [IssuerRegistered(uuid4(), "ACME"), InvestorRegistered(uuid4(), "Zoë", D("5"))],
    ids=["issuer", "investor"],
)
async def test_a_redelivered_integration_event_sends_the_command_with_the_same_id(
    event: IssuerRegistered | InvestorRegistered,
) -> None:
    # The command handler deduplicates by this id, so a redelivery is harmless.
    sender = InMemoryCommandSender()
    message_id = str(uuid4())
    await deliver(sender, event, message_id)
    await deliver(sender, event, message_id)
    assert len(sender.sent) == 2
    assert sender.sent[0] == sender.sent[1]


async def test_two_integration_messages_send_commands_with_different_ids() -> None:
    sender = InMemoryCommandSender()
    event = IssuerRegistered(uuid4(), "ACME")
    await deliver(sender, event, "first")
    await deliver(sender, event, "second")
    assert sender.sent[0][1] != sender.sent[1][1]


def test_the_derived_command_id_depends_on_the_message_id_and_the_command() -> None:
    assert derived_message_id("m", "CreateIssuer") == derived_message_id("m", "CreateIssuer")
    assert derived_message_id("m", "CreateIssuer") != derived_message_id("m", "CreateInvestor")
    assert derived_message_id("m", "CreateIssuer") != derived_message_id("n", "CreateIssuer")


@pytest.mark.parametrize(
    "event",
    [IssuerRegistered(uuid4(), "ACME"), InvestorRegistered(uuid4(), "Zoë", D("5"))],
    ids=["issuer", "investor"],
)
async def test_an_error_sending_the_command_propagates(
    event: IssuerRegistered | InvestorRegistered,
) -> None:
    # docs/domain.md defect 11: the reference ignored the error and acked the event
    sender = FailingSender()
    with pytest.raises(Unavailable, match="connection refused"):
        await deliver(sender, event, "msg-3")
    assert sender.attempts == 1


EVENTS = [IssuerRegistered(uuid4(), "ACME"), InvestorRegistered(uuid4(), "Zoë", D("5"))]


class RefusingSender(InMemoryCommandSender):
    """A sender whose broker refuses the command's queue (declared again with other
    arguments) for its first `refusals` sends, until an operator mends it."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals

    async def send(self, command: Command, message_id: UUID, cause: Cause) -> None:
        if self.refusals:
            self.refusals -= 1
            raise Refused("broker", f"queue {command.name()!r} exists with other arguments")
        await super().send(command, message_id, cause)


@pytest.mark.parametrize("event", EVENTS, ids=["issuer", "investor"])
async def test_a_command_queue_the_broker_refuses_is_an_outage_until_mended_not_a_dead_letter(
    event: IssuerRegistered | InvestorRegistered,
) -> None:
    """Regression: the refusal of the command's queue dead-lettered the event at once,
    where the queue's own consumer takes it as an outage of that queue: the
    registration waited for an operator to requeue it by hand, after mending the queue."""
    sender = RefusingSender(refusals=3)
    outages = Outages()
    policy = RetryPolicy(unavailable=Limit(Backoff(0.001, 0.001), None))
    [route] = [r for r in routes.INTEGRATION if r.message_name == event.name()]
    step = retried(policy, outages)(decoded(sending(sender, route.handler)))
    envelope = Envelope(message_id=str(uuid4()), name=event.name(), body=codec.encode(event))

    with capture_logs() as logs:
        outcome = await step(MemoryDelivery(envelope, source=event.name()))

    assert outcome.kind is OutcomeKind.PROCESSED
    [(command, _)] = sender.sent
    queue = f"queue {command.name()}"
    said = [(line["event"], line.get("error")) for line in logs if line["log_level"] == "warning"]
    assert said == [
        (f"{queue} unavailable", f"queue {command.name()!r} exists with other arguments"),
        (f"{queue} recovered", None),
    ]
    assert not outages.down()


@pytest.mark.parametrize("event", EVENTS, ids=["issuer", "investor"])
async def test_the_command_is_sent_in_the_events_correlation_caused_by_the_event(
    event: IssuerRegistered | InvestorRegistered,
) -> None:
    sender = InMemoryCommandSender()
    message_id = str(uuid4())
    await deliver(sender, event, message_id, headers={"correlation_id": "saga-3"})
    assert sender.causes == [Cause(correlation_id="saga-3", causation_id=message_id)]
    [(command, command_id)] = sender.sent
    assert command_id == derived_message_id(message_id, command.name())


@pytest.mark.parametrize("event", EVENTS, ids=["issuer", "investor"])
async def test_an_event_without_a_correlation_id_sends_the_command_in_a_correlation_of_its_own(
    event: IssuerRegistered | InvestorRegistered,
) -> None:
    # Registering (a foreign publisher) sends none: the event starts the saga.
    sender = InMemoryCommandSender()
    message_id = str(uuid4())
    await deliver(sender, event, message_id)
    assert sender.causes == [Cause(correlation_id=message_id, causation_id=message_id)]
