"""Command handlers through the exactly-once wrapper over the in-memory event store."""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID, uuid4

import pytest

from financing.adapters.rabbitmq import topology
from financing.application import routes
from financing.application.errors import MissingAggregate, RuleViolation
from financing.application.messages import (
    COMMAND_TYPES,
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    ReverseFinancing,
    SellInvoice,
)
from financing.application.pipeline import OutcomeKind
from financing.domain import events as ev
from financing.domain.aggregates import ForeignId, InvoiceStatus
from tests.unit.bus import InMemoryBus

D = Decimal


@pytest.fixture
def bus() -> InMemoryBus:
    return InMemoryBus()


async def registered(bus: InMemoryBus, balance: str = "100") -> tuple[UUID, UUID]:
    """A registered issuer and investor (with `balance`)."""
    issuer, investor = uuid4(), uuid4()
    await bus.send(CreateIssuer(issuer))
    await bus.send(CreateInvestor(investor, D(balance)))
    return issuer, investor


async def on_sale(bus: InMemoryBus, issuer: UUID, asking: str = "10") -> UUID:
    invoice = uuid4()
    await bus.send(SellInvoice(invoice, issuer, D(asking)))
    return invoice


def test_each_command_has_a_queue_named_exactly_after_it() -> None:
    queues = [topology.subscription(route.message_name).queue for route in routes.COMMANDS]
    assert sorted(queue.name for queue in queues) == sorted(t.name() for t in COMMAND_TYPES)
    assert not any(queue.bound_to_events for queue in queues)


def test_a_misrouted_message_on_a_command_queue_is_dead_lettered() -> None:
    for route in routes.COMMANDS:
        assert topology.subscription(route.message_name).others is OutcomeKind.DEAD_LETTERED


def test_each_command_consumer_is_named_after_its_handler() -> None:
    # The consumer name keys the processed-message records: renaming one would
    # make every message it already processed look new.
    assert {route.message_name: route.consumer for route in routes.COMMANDS} == {
        "CreateIssuer": "create_issuer",
        "CreateInvestor": "create_investor",
        "SellInvoice": "sell_invoice",
        "BidOnInvoice": "bid_on_invoice",
        "ApproveFinancing": "approve_financing",
        "ReverseFinancing": "reverse_financing",
    }


# Scenario 1


async def test_create_issuer_appends_issuer_created(bus: InMemoryBus) -> None:
    issuer = uuid4()
    assert await bus.send(CreateIssuer(issuer)) == [ev.IssuerCreatedEvent(issuer)]


async def test_creating_a_registered_issuer_again_appends_nothing(bus: InMemoryBus) -> None:
    issuer = uuid4()
    await bus.send(CreateIssuer(issuer))
    assert await bus.send(CreateIssuer(issuer)) == []
    assert bus.outcomes[-1].kind is OutcomeKind.UNCHANGED
    assert bus.outcomes[-1].detail == f"Issuer {issuer}: already exists"


# Scenario 2


async def test_create_investor_appends_created_then_funds_added(bus: InMemoryBus) -> None:
    investor = uuid4()
    assert await bus.send(CreateInvestor(investor, D("100"))) == [
        ev.InvestorCreatedEvent(investor),
        ev.InvestorFundsAddedEvent(investor, D("100")),
    ]


async def test_create_investor_with_negative_balance_is_refused(bus: InMemoryBus) -> None:
    with pytest.raises(RuleViolation):
        await bus.send(CreateInvestor(uuid4(), D("-1")))
    assert bus.store.events == []


# Scenarios 3 and 4


async def test_sell_invoice_by_a_registered_issuer_appends_invoice_created(
    bus: InMemoryBus,
) -> None:
    issuer, _ = await registered(bus)
    invoice = uuid4()
    assert await bus.send(SellInvoice(invoice, issuer, D("20"))) == [
        ev.InvoiceCreatedEvent(invoice, issuer, D("20"))
    ]
    assert (await bus.invoice(invoice)).status is InvoiceStatus.AVAILABLE


async def test_sell_invoice_by_an_unregistered_issuer_stores_no_invoice(bus: InMemoryBus) -> None:
    invoice = uuid4()
    with pytest.raises(MissingAggregate, match="issuer"):
        await bus.send(SellInvoice(invoice, uuid4(), D("20")))
    assert bus.store.events == []
    assert bus.store.processed == set()


async def test_sell_invoice_redelivered_once_its_issuer_is_registered_creates_the_invoice(
    bus: InMemoryBus,
) -> None:
    # A refused message is not recorded as processed, so its retry can succeed.
    issuer, invoice, message_id = uuid4(), uuid4(), uuid4()
    command = SellInvoice(invoice, issuer, D("20"))
    with pytest.raises(MissingAggregate):
        await bus.send(command, message_id)
    await bus.send(CreateIssuer(issuer))
    assert await bus.send(command, message_id) == [ev.InvoiceCreatedEvent(invoice, issuer, D("20"))]


async def test_selling_an_invoice_for_nothing_appends_nothing(bus: InMemoryBus) -> None:
    issuer, _ = await registered(bus)
    assert await bus.send(SellInvoice(uuid4(), issuer, D("0"))) == []


# Scenarios 5 and 7 (the command step)


async def test_bid_within_the_balance_appends_bid_placed(bus: InMemoryBus) -> None:
    issuer, investor = await registered(bus, "100")
    invoice = await on_sale(bus, issuer, "10")
    assert await bus.send(BidOnInvoice(investor, invoice, D("20"))) == [
        ev.BidOnInvoicePlacedEvent(investor, invoice, D("20"))
    ]
    bidder = await bus.investor(investor)
    assert (bidder.balance, bidder.reserved) == (D("80"), D("20"))


async def test_bid_above_the_balance_appends_nothing(bus: InMemoryBus) -> None:
    issuer, investor = await registered(bus, "5")
    invoice = await on_sale(bus, issuer, "10")
    before = list(bus.store.events)
    with pytest.raises(RuleViolation, match="balance"):
        await bus.send(BidOnInvoice(investor, invoice, D("10")))
    assert bus.store.events == before


async def test_bid_on_an_invoice_that_does_not_exist_reserves_nothing(bus: InMemoryBus) -> None:
    # docs/domain.md defect 7: the reference reserved the funds forever
    _, investor = await registered(bus, "100")
    before = list(bus.store.events)
    with pytest.raises(MissingAggregate, match="invoice"):
        await bus.send(BidOnInvoice(investor, uuid4(), D("20")))
    assert bus.store.events == before
    bidder = await bus.investor(investor)
    assert (bidder.balance, bidder.reserved) == (D("100"), D("0"))


async def test_bid_by_an_investor_that_does_not_exist_is_refused(bus: InMemoryBus) -> None:
    issuer, _ = await registered(bus)
    invoice = await on_sale(bus, issuer)
    before = list(bus.store.events)
    with pytest.raises(MissingAggregate, match="investor"):
        await bus.send(BidOnInvoice(uuid4(), invoice, D("20")))
    assert bus.store.events == before


async def test_a_redelivered_bid_reserves_the_funds_once(bus: InMemoryBus) -> None:
    issuer, investor = await registered(bus, "100")
    invoice = await on_sale(bus, issuer)
    message_id = uuid4()
    command = BidOnInvoice(investor, invoice, D("20"))
    assert len(await bus.send(command, message_id)) == 1
    assert await bus.send(command, message_id) == []
    assert bus.outcomes[-1].kind is OutcomeKind.DUPLICATE
    assert (await bus.investor(investor)).reserved == D("20")


async def test_the_same_bid_sent_twice_as_two_messages_is_two_bids(bus: InMemoryBus) -> None:
    issuer, investor = await registered(bus, "100")
    invoice = await on_sale(bus, issuer)
    command = BidOnInvoice(investor, invoice, D("20"))
    await bus.send(command)
    await bus.send(command)
    assert (await bus.investor(investor)).reserved == D("40")


# Scenarios 8 and 9 (the command step)


async def financed(bus: InMemoryBus) -> tuple[UUID, UUID]:
    """An investor (100) whose bid of 20 financed an invoice asking 10."""
    issuer, investor = await registered(bus, "100")
    invoice = await on_sale(bus, issuer, "10")
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    assert (await bus.invoice(invoice)).status is InvoiceStatus.FINANCED
    return investor, invoice


async def test_approve_financing_of_a_financed_invoice_appends_invoice_approved(
    bus: InMemoryBus,
) -> None:
    investor, invoice = await financed(bus)
    assert await bus.send(ApproveFinancing(invoice)) == [
        ev.InvoiceApprovedEvent(invoice, D("10"), ev.Bid(investor, D("20")))
    ]


async def test_reverse_financing_of_a_financed_invoice_appends_invoice_reversed(
    bus: InMemoryBus,
) -> None:
    investor, invoice = await financed(bus)
    assert await bus.send(ReverseFinancing(invoice)) == [
        ev.InvoiceReversedEvent(invoice, D("10"), ev.Bid(investor, D("20")))
    ]


@pytest.mark.parametrize("command", [ApproveFinancing, ReverseFinancing])
async def test_approving_or_reversing_an_invoice_not_financed_appends_nothing(
    bus: InMemoryBus, command: type[ApproveFinancing | ReverseFinancing]
) -> None:
    issuer, _ = await registered(bus)
    invoice = await on_sale(bus, issuer)
    message_id = uuid4()
    assert await bus.send(command(invoice), message_id) == []
    assert bus.outcomes[-1].kind is OutcomeKind.UNCHANGED
    assert "is AVAILABLE; only a FINANCED invoice can be" in bus.outcomes[-1].detail
    # A no-op is still an answer: the message is done with.
    consumer = bus.commands[command.name()].route.consumer
    assert (consumer, str(message_id)) in bus.store.processed


@pytest.mark.parametrize("command", [ApproveFinancing, ReverseFinancing])
async def test_approving_or_reversing_twice_appends_one_event(
    bus: InMemoryBus, command: type[ApproveFinancing | ReverseFinancing]
) -> None:
    _, invoice = await financed(bus)
    assert len(await bus.send(command(invoice))) == 1
    assert await bus.send(command(invoice)) == []


async def test_reversing_an_approved_invoice_appends_nothing(bus: InMemoryBus) -> None:
    _, invoice = await financed(bus)
    await bus.send(ApproveFinancing(invoice))
    assert await bus.send(ReverseFinancing(invoice)) == []
    assert (await bus.invoice(invoice)).status is InvoiceStatus.APPROVED


@pytest.mark.parametrize("command", [ApproveFinancing, ReverseFinancing])
async def test_approving_or_reversing_an_invoice_that_does_not_exist_is_refused(
    bus: InMemoryBus, command: type[ApproveFinancing | ReverseFinancing]
) -> None:
    with pytest.raises(MissingAggregate, match="invoice"):
        await bus.send(command(uuid4()))
    assert bus.store.events == []


# Ids are unique across aggregate types


async def test_a_command_naming_another_types_id_is_refused_and_changes_nothing(
    bus: InMemoryBus,
) -> None:
    """Regression: an aggregate was loaded by id alone, so an issuer's or an investor's
    stream passed for an invoice (which existed, at version > 0): bids on it reserved
    funds, and its approval appended invoice events to the issuer's stream."""
    issuer, investor = await registered(bus, "100")
    invoice = await on_sale(bus, issuer)
    refused = {
        "an issuer's id as the invoice's": BidOnInvoice(investor, issuer, D("20")),
        "an investor's id as the invoice's": BidOnInvoice(investor, investor, D("20")),
        "an invoice's id as the investor's": BidOnInvoice(invoice, invoice, D("20")),
        "approving an issuer": ApproveFinancing(issuer),
        "reversing an investor": ReverseFinancing(investor),
        "an investor's id as the issuer's": SellInvoice(uuid4(), investor, D("20")),
        "an issuer's id as the new invoice's": SellInvoice(issuer, issuer, D("20")),
        "registering an issuer's id as an investor": CreateInvestor(issuer, D("50")),
        "registering an invoice's id as an issuer": CreateIssuer(invoice),
    }
    before = list(bus.store.events)
    for case, command in refused.items():
        with pytest.raises(ForeignId, match="is the id of an") as raised:
            await bus.send(command)
        assert raised.type is ForeignId, case
    assert bus.store.events == before
    bidder = await bus.investor(investor)
    assert (bidder.balance, bidder.reserved) == (D("100"), D("0"))
