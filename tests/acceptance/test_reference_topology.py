"""The service starts on a broker where the reference already declared its queues."""

from __future__ import annotations

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from tests.acceptance import expected as ex
from tests.acceptance.bus import EVENTS_EXCHANGE
from tests.acceptance.driver import Financing, financing_for
from tests.acceptance.system import local_system

pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]

# What the reference (watermill, durable queue and pub/sub configs) leaves behind:
# durable queues without arguments, the event queues bound to `events`.
REFERENCE_COMMAND_QUEUES = (
    "SellInvoice",
    "BidOnInvoice",
    "ApproveFinancing",
    "ReverseFinancing",
    "CreateInvestor",
    "CreateIssuer",
)
REFERENCE_EVENT_QUEUES = (
    "events_BidOnInvoicePlacedEvent",
    "events_BidOnInvoiceRejectedEvent",
    "events_InvoiceFinancedEvent",
    "events_InvoiceApprovedEvent",
    "events_InvoiceReversedEvent",
    "events_InvestorRegistered",
    "events_IssuerRegistered",
    "events_query",
)


async def declare_reference_queues(channel: AbstractChannel) -> None:
    exchange = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    for name in REFERENCE_COMMAND_QUEUES:
        await channel.declare_queue(name, durable=True)
    for name in REFERENCE_EVENT_QUEUES:
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, routing_key="")


async def finance_and_reverse(financing: Financing) -> None:
    """A whole saga, financed then reversed, awaited on the bus."""
    financed = await financing.finance_invoice(asking_price=10, bid=20)
    since = financing.events.mark()

    await financing.reverse(financed.invoice_id)

    await ex.expect_events(
        financing.events,
        [
            ex.invoice_reversed(financed.invoice_id, 10, financed.investor_id, 20),
            ex.investor_funds_released(financed.investor_id, 10),
        ],
        since=since,
    )


async def test_service_works_on_a_vhost_with_the_reference_queues() -> None:
    async with (
        local_system(prepare=declare_reference_queues) as system,
        financing_for(system) as financing,
    ):
        await finance_and_reverse(financing)
