"""The service starts on a broker where the reference already declared its queues."""

from __future__ import annotations

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel

from financing.adapters.rabbitmq.topology import REFERENCE_PROJECTOR_QUEUE
from tests.acceptance.bus import EVENTS_EXCHANGE
from tests.acceptance.driver import Financing, financing_for
from tests.acceptance.system import System, local_system

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
    await financing.reverse_financed(financed)


async def waiting_in(system: System, name: str) -> int | None:
    """How many messages wait in queue `name`; None when the broker has no such queue."""
    channel = await system.broker.connection.channel()  # closed by a missing queue
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    await channel.close()
    return queue.declaration_result.message_count


async def test_service_works_on_a_vhost_with_the_reference_queues() -> None:
    async with (
        local_system(prepare=declare_reference_queues) as system,
        financing_for(system) as financing,
    ):
        await finance_and_reverse(financing)
        # The reference projector's queue, empty and read by no one, is gone: left, it
        # would have grown by every event until the broker's alarms blocked publishers.
        assert await waiting_in(system, REFERENCE_PROJECTOR_QUEUE) is None


async def test_the_reference_projector_queue_holding_messages_is_kept_but_no_longer_fed() -> None:
    async def reference_queues_with_a_message_left(channel: AbstractChannel) -> None:
        await declare_reference_queues(channel)
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", headers={"name": "InvoiceCreatedEvent"}),
            routing_key=REFERENCE_PROJECTOR_QUEUE,
        )

    async with (
        local_system(prepare=reference_queues_with_a_message_left) as system,
        financing_for(system) as financing,
    ):
        await finance_and_reverse(financing)
        assert await waiting_in(system, REFERENCE_PROJECTOR_QUEUE) == 1
        assert system.service is not None
        [warning] = [
            line
            for line in system.service.log_lines()
            if line.get("queue") == REFERENCE_PROJECTOR_QUEUE
        ]
        assert warning["level"] == "warning" and warning["messages"] == 1, warning
