"""Saga policies through the exactly-once wrapper, one event at a time and as a whole saga.

Events are fed to policies as the relayer publishes them: from the store, in
commit order, with their deterministic message id.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from uuid import UUID, uuid4

import pytest

from financing.adapters.rabbitmq import topology
from financing.application import codec, routes
from financing.application.errors import MissingAggregate, UnrelayedEvent
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    ReverseFinancing,
    SellInvoice,
)
from financing.application.pipeline import OutcomeKind
from financing.application.ports import AGGREGATE_VERSION_HEADER, StoredEvent, event_message_id
from financing.domain import events as ev
from financing.domain.aggregates import InvoiceStatus
from tests.unit.bus import InMemoryBus

D = Decimal


@pytest.fixture
def bus() -> InMemoryBus:
    return InMemoryBus()


async def investor_with(bus: InMemoryBus, balance: str) -> UUID:
    investor = uuid4()
    await bus.send(CreateInvestor(investor, D(balance)))
    return investor


async def invoice_asking(bus: InMemoryBus, asking: str) -> UUID:
    issuer, invoice = uuid4(), uuid4()
    await bus.send(CreateIssuer(issuer))
    await bus.send(SellInvoice(invoice, issuer, D(asking)))
    return invoice


async def funds(bus: InMemoryBus, investor: UUID) -> tuple[Decimal, Decimal, Decimal]:
    loaded = await bus.investor(investor)
    return loaded.balance, loaded.reserved, loaded.committed


def last(bus: InMemoryBus, event_name: str) -> StoredEvent:
    return bus.stored(event_name)[-1]


def test_each_policy_owns_a_queue_on_the_events_exchange_named_after_its_event() -> None:
    subscriptions = [topology.subscription(route.message_name) for route in routes.POLICIES]
    assert sorted((s.queue.name, *s.names) for s in subscriptions) == [
        (f"events_{name}", name)
        for name in sorted(
            [
                "BidOnInvoicePlacedEvent",
                "BidOnInvoiceRejectedEvent",
                "InvoiceApprovedEvent",
                "InvoiceFinancedEvent",
                "InvoiceReversedEvent",
            ]
        )
    ]
    assert all(s.queue.bound_to_events for s in subscriptions)
    # The events exchange delivers every event to every queue: other names are ignored.
    assert all(s.others is OutcomeKind.IGNORED for s in subscriptions)


def test_each_policy_consumer_is_named_after_its_handler() -> None:
    # The consumer name keys the processed-message records.
    assert {route.message_name: route.consumer for route in routes.POLICIES} == {
        "BidOnInvoicePlacedEvent": "bid_placed_offers_bid_to_invoice",
        "BidOnInvoiceRejectedEvent": "rejected_bid_releases_funds",
        "InvoiceFinancedEvent": "financing_releases_excess_bid",
        "InvoiceApprovedEvent": "approval_commits_funds",
        "InvoiceReversedEvent": "reversal_releases_funds",
    }


# One policy at a time


async def test_a_placed_bid_covering_the_price_finances_the_invoice(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.send(BidOnInvoice(investor, invoice, D("20")))
    appended = await bus.publish(last(bus, "BidOnInvoicePlacedEvent"))
    assert appended == [ev.InvoiceFinancedEvent(invoice, D("10"), ev.Bid(investor, D("20")))]


async def test_a_placed_bid_below_the_price_is_rejected_by_the_invoice(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.send(BidOnInvoice(investor, invoice, D("5")))
    appended = await bus.publish(last(bus, "BidOnInvoicePlacedEvent"))
    assert appended == [ev.BidOnInvoiceRejectedEvent(invoice, ev.Bid(investor, D("5")))]


async def test_a_rejected_bid_releases_the_whole_bid(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.send(BidOnInvoice(investor, invoice, D("5")))
    await bus.publish(last(bus, "BidOnInvoicePlacedEvent"))
    appended = await bus.publish(last(bus, "BidOnInvoiceRejectedEvent"))
    assert appended == [ev.InvestorFundsReleasedEvent(investor, D("5"))]
    assert await funds(bus, investor) == (D("100"), D("0"), D("0"))


async def test_financing_releases_the_excess_of_the_bid(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.send(BidOnInvoice(investor, invoice, D("20")))
    await bus.publish(last(bus, "BidOnInvoicePlacedEvent"))
    appended = await bus.publish(last(bus, "InvoiceFinancedEvent"))
    assert appended == [ev.InvestorFundsReleasedEvent(investor, D("10"))]


async def test_financing_at_exactly_the_asking_price_releases_nothing(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.send(BidOnInvoice(investor, invoice, D("10")))
    await bus.publish(last(bus, "BidOnInvoicePlacedEvent"))
    assert await bus.publish(last(bus, "InvoiceFinancedEvent")) == []
    assert await funds(bus, investor) == (D("90"), D("10"), D("0"))


async def test_approval_commits_the_sold_price(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    await bus.send(ApproveFinancing(invoice))
    appended = await bus.publish(last(bus, "InvoiceApprovedEvent"))
    assert appended == [ev.InvestorFundsCommittedEvent(investor, D("10"))]


async def test_reversal_gives_the_sold_price_back(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    await bus.send(ReverseFinancing(invoice))
    appended = await bus.publish(last(bus, "InvoiceReversedEvent"))
    assert appended == [ev.InvestorFundsReleasedEvent(investor, D("10"))]


async def test_a_release_for_an_investor_that_does_not_exist_is_refused(bus: InMemoryBus) -> None:
    invoice = await invoice_asking(bus, "10")
    stranger = uuid4()
    rejection = ev.BidOnInvoiceRejectedEvent(invoice, ev.Bid(stranger, D("5")))
    stored = StoredEvent(99, "Invoice", invoice, 2, rejection.name(), codec.encode_text(rejection))
    before = list(bus.store.events)
    with pytest.raises(MissingAggregate, match="investor"):
        await bus.publish(stored)
    assert bus.store.events == before


async def test_events_a_policy_does_not_consume_are_left_alone(bus: InMemoryBus) -> None:
    investor = await investor_with(bus, "100")
    delivered = len(bus.outcomes)
    for stored in list(bus.store.events):
        assert await bus.publish(stored) == []
    assert await funds(bus, investor) == (D("100"), D("0"), D("0"))
    published = bus.outcomes[delivered:]
    assert len(published) == 2 * len(routes.POLICIES)
    assert all(outcome.kind is OutcomeKind.IGNORED for outcome in published)


# Scenarios 5, 6, 8, 9 and 10: the whole saga, events in bus order


async def test_a_bid_above_the_asking_price_finances_and_releases_the_excess(
    bus: InMemoryBus,
) -> None:
    # Scenario 5
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    bid = ev.Bid(investor, D("20"))
    assert await bus.run(BidOnInvoice(investor, invoice, D("20"))) == [
        ev.BidOnInvoicePlacedEvent(investor, invoice, D("20")),
        ev.InvoiceFinancedEvent(invoice, D("10"), bid),
        ev.InvestorFundsReleasedEvent(investor, D("10")),
    ]
    assert await funds(bus, investor) == (D("90"), D("10"), D("0"))
    financed = await bus.invoice(invoice)
    assert financed.status is InvoiceStatus.FINANCED
    assert financed.winning_bid == bid


async def test_bid_below_asking_price_is_rejected_and_released(bus: InMemoryBus) -> None:
    # Scenario 6
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    assert await bus.run(BidOnInvoice(investor, invoice, D("5"))) == [
        ev.BidOnInvoicePlacedEvent(investor, invoice, D("5")),
        ev.BidOnInvoiceRejectedEvent(invoice, ev.Bid(investor, D("5"))),
        ev.InvestorFundsReleasedEvent(investor, D("5")),
    ]
    assert await funds(bus, investor) == (D("100"), D("0"), D("0"))
    assert (await bus.invoice(invoice)).status is InvoiceStatus.AVAILABLE


async def test_approving_a_financed_invoice_commits_the_sold_price(bus: InMemoryBus) -> None:
    # Scenario 8
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    assert await bus.run(ApproveFinancing(invoice)) == [
        ev.InvoiceApprovedEvent(invoice, D("10"), ev.Bid(investor, D("20"))),
        ev.InvestorFundsCommittedEvent(investor, D("10")),
    ]
    assert await funds(bus, investor) == (D("90"), D("0"), D("10"))
    assert (await bus.invoice(invoice)).status is InvoiceStatus.APPROVED


async def test_reversing_a_financed_invoice_restores_the_balance(bus: InMemoryBus) -> None:
    # Scenario 9
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    assert await bus.run(ReverseFinancing(invoice)) == [
        ev.InvoiceReversedEvent(invoice, D("10"), ev.Bid(investor, D("20"))),
        ev.InvestorFundsReleasedEvent(investor, D("10")),
    ]
    assert await funds(bus, investor) == (D("100"), D("0"), D("0"))
    assert (await bus.invoice(invoice)).status is InvoiceStatus.REVERSED


async def test_a_second_bid_on_a_financed_invoice_is_rejected_and_released(
    bus: InMemoryBus,
) -> None:
    # Scenario 10; docs/domain.md defect 6: a different bid message must still be rejected
    first = await investor_with(bus, "100")
    second = await investor_with(bus, "50")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(first, invoice, D("20")))
    assert await bus.run(BidOnInvoice(second, invoice, D("30"))) == [
        ev.BidOnInvoicePlacedEvent(second, invoice, D("30")),
        ev.BidOnInvoiceRejectedEvent(invoice, ev.Bid(second, D("30"))),
        ev.InvestorFundsReleasedEvent(second, D("30")),
    ]
    assert await funds(bus, second) == (D("50"), D("0"), D("0"))
    assert await funds(bus, first) == (D("90"), D("10"), D("0"))
    assert (await bus.invoice(invoice)).winning_bid == ev.Bid(first, D("20"))


async def test_a_second_bid_by_the_same_investor_on_a_financed_invoice_is_rejected(
    bus: InMemoryBus,
) -> None:
    # docs/domain.md defect 6: an identical bid in a new message is a new bid, not a redelivery
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    appended = await bus.run(BidOnInvoice(investor, invoice, D("20")))
    assert [type(e) for e in appended] == [
        ev.BidOnInvoicePlacedEvent,
        ev.BidOnInvoiceRejectedEvent,
        ev.InvestorFundsReleasedEvent,
    ]
    assert await funds(bus, investor) == (D("90"), D("10"), D("0"))


# Redelivery (docs/domain.md defects 4 and 6)


async def test_a_redelivered_bid_placed_event_on_a_financed_invoice_changes_nothing(
    bus: InMemoryBus,
) -> None:
    # docs/domain.md defect 6: the reference rejected the redelivered winning bid
    # and released its funds
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    placed = last(bus, "BidOnInvoicePlacedEvent")
    before = list(bus.store.events)
    assert await bus.publish(placed) == []
    assert bus.store.events == before
    kinds = [outcome.kind for outcome in bus.outcomes[-len(routes.POLICIES) :]]
    assert sorted(kind.value for kind in kinds) == ["duplicate"] + ["ignored"] * 4
    assert bus.stored("BidOnInvoiceRejectedEvent") == []
    assert await funds(bus, investor) == (D("90"), D("10"), D("0"))


@pytest.mark.parametrize(
    "copy",
    [
        "a new message id",
        "no aggregateVersion header",
        "another version's id",
        "a version that is not a number",
    ],
)
async def test_a_copy_of_a_bid_placed_event_under_another_id_is_refused(
    bus: InMemoryBus, copy: str
) -> None:
    """Regression: a copy published again under a new id (as the reference's relayer
    publishes, with a fresh id each time) passed for a new bid: the financed invoice
    rejected it and the investor's reserved funds were released, so its approval could
    no longer commit them."""
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    envelope = last(bus, "BidOnInvoicePlacedEvent").envelope()
    headers = dict(envelope.headers)
    message_id = envelope.message_id  # the derived one, but for "a new message id"
    if copy == "a new message id":
        message_id = str(uuid4())
    elif copy == "no aggregateVersion header":
        del headers[AGGREGATE_VERSION_HEADER]
    elif copy == "another version's id":
        message_id = event_message_id(investor, int(headers[AGGREGATE_VERSION_HEADER]) + 1)
    elif copy == "a version that is not a number":
        headers[AGGREGATE_VERSION_HEADER] = "²"  # a digit to str.isdigit, not to int()
    before = list(bus.store.events)
    with pytest.raises(UnrelayedEvent, match="not an event of this service's event store"):
        await bus.publish_envelope(replace(envelope, message_id=message_id, headers=headers))
    assert bus.store.events == before
    assert await funds(bus, investor) == (D("90"), D("10"), D("0"))


async def test_a_relayed_event_has_the_same_message_id_every_time_it_is_read(
    bus: InMemoryBus,
) -> None:
    # docs/domain.md defect 4: a fresh random id per publish made duplicates undetectable
    investor = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.send(BidOnInvoice(investor, invoice, D("20")))
    first_read = last(bus, "BidOnInvoicePlacedEvent").envelope()
    (second_read,) = [s async for s in bus.store.read_all() if s.name == first_read.name]
    assert second_read.envelope().message_id == first_read.message_id


async def test_redelivering_every_event_of_a_finished_saga_changes_nothing(
    bus: InMemoryBus,
) -> None:
    first = await investor_with(bus, "100")
    second = await investor_with(bus, "100")
    invoice = await invoice_asking(bus, "10")
    await bus.run(BidOnInvoice(first, invoice, D("20")))
    await bus.run(BidOnInvoice(second, invoice, D("15")))
    await bus.run(ApproveFinancing(invoice))
    before = list(bus.store.events)
    for stored in before:
        assert await bus.publish(stored) == []
    assert bus.store.events == before
    assert await funds(bus, first) == (D("90"), D("0"), D("10"))
    assert await funds(bus, second) == (D("100"), D("0"), D("0"))


# The whole story, from registration to approval


async def test_the_financing_saga_from_registration_to_approval(bus: InMemoryBus) -> None:
    issuer, investor, invoice = uuid4(), uuid4(), uuid4()
    bid = ev.Bid(investor, D("20"))
    story = [
        CreateIssuer(issuer),
        CreateInvestor(investor, D("100")),
        SellInvoice(invoice, issuer, D("10")),
        BidOnInvoice(investor, invoice, D("20")),
        ApproveFinancing(invoice),
    ]
    published = [event for command in story for event in await bus.run(command)]
    assert published == [
        ev.IssuerCreatedEvent(issuer),
        ev.InvestorCreatedEvent(investor),
        ev.InvestorFundsAddedEvent(investor, D("100")),
        ev.InvoiceCreatedEvent(invoice, issuer, D("10")),
        ev.BidOnInvoicePlacedEvent(investor, invoice, D("20")),
        ev.InvoiceFinancedEvent(invoice, D("10"), bid),
        ev.InvestorFundsReleasedEvent(investor, D("10")),
        ev.InvoiceApprovedEvent(invoice, D("10"), bid),
        ev.InvestorFundsCommittedEvent(investor, D("10")),
    ]
    assert await funds(bus, investor) == (D("90"), D("0"), D("10"))
    assert [s.version for s in await bus.store.stream(investor)] == [1, 2, 3, 4, 5]
