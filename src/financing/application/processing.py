"""Which handler consumes which queue, and the exactly-once wrapper around it.

Every store-backed handler runs in one unit of work that first checks whether
the message was already processed and, after the handler's appends, records
it: the effect and the record commit together, so a redelivered message
changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from financing.application import handlers, integration, policies
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    InvestorRegistered,
    IssuerRegistered,
    Message,
    ReverseFinancing,
    SellInvoice,
)
from financing.application.ports import CommandSender, Envelope, EventStore, UnitOfWork
from financing.domain import events as ev

Process = Callable[[Envelope, Message], Awaitable[None]]
StoreHandler = Callable[[UnitOfWork, Any], Awaitable[None]]
SendingHandler = Callable[[CommandSender, Any, str], Awaitable[None]]

COMMAND_HANDLERS: dict[str, StoreHandler] = {
    CreateIssuer.name(): handlers.create_issuer,
    CreateInvestor.name(): handlers.create_investor,
    SellInvoice.name(): handlers.sell_invoice,
    BidOnInvoice.name(): handlers.bid_on_invoice,
    ApproveFinancing.name(): handlers.approve_financing,
    ReverseFinancing.name(): handlers.reverse_financing,
}

POLICIES: dict[str, StoreHandler] = {
    ev.BidOnInvoicePlacedEvent.name(): policies.bid_placed_offers_bid_to_invoice,
    ev.BidOnInvoiceRejectedEvent.name(): policies.rejected_bid_releases_funds,
    ev.InvoiceFinancedEvent.name(): policies.financing_releases_excess_bid,
    ev.InvoiceApprovedEvent.name(): policies.approval_commits_funds,
    ev.InvoiceReversedEvent.name(): policies.reversal_releases_funds,
}

INTEGRATION_HANDLERS: dict[str, SendingHandler] = {
    IssuerRegistered.name(): integration.issuer_registered_creates_issuer,
    InvestorRegistered.name(): integration.investor_registered_creates_investor,
}


def event_queue(consumer: str) -> str:
    """The queue a consumer of the `events` exchange owns (reference naming)."""
    return f"events_{consumer}"


@dataclass(frozen=True)
class Subscription:
    """One consumer: the queue it owns and the single message name it handles.

    `from_events` queues are bound to the `events` exchange; the others are
    command queues on the default exchange. On an events queue, messages of
    other names are acked and ignored; on a command queue they were misrouted
    and are dead-lettered.
    """

    queue: str
    message_name: str
    from_events: bool
    process: Process


def exactly_once(store: EventStore, consumer: str, handler: StoreHandler) -> Process:
    async def process(envelope: Envelope, message: Message) -> None:
        async with store.unit_of_work() as uow:
            if await uow.seen(consumer, envelope.message_id):
                return
            await handler(uow, message)
            await uow.record(consumer, envelope.message_id)

    return process


def sending(sender: CommandSender, handler: SendingHandler) -> Process:
    async def process(envelope: Envelope, message: Message) -> None:
        await handler(sender, message, envelope.message_id)

    return process


def command_subscriptions(store: EventStore) -> list[Subscription]:
    return [
        Subscription(name, name, False, exactly_once(store, name, handler))
        for name, handler in COMMAND_HANDLERS.items()
    ]


def policy_subscriptions(store: EventStore) -> list[Subscription]:
    return [
        Subscription(event_queue(name), name, True, exactly_once(store, event_queue(name), handler))
        for name, handler in POLICIES.items()
    ]


def integration_subscriptions(sender: CommandSender) -> list[Subscription]:
    return [
        Subscription(event_queue(name), name, True, sending(sender, handler))
        for name, handler in INTEGRATION_HANDLERS.items()
    ]
