"""The declared topology matches the wire contract, also on a broker the reference used."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import suppress

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from financing.adapters.rabbitmq import (
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    AmqpCommandSender,
    DeadLetters,
    Publisher,
    connect,
    declare_event_queue,
    run_subscription,
)
from financing.application import codec
from financing.application.memory import InMemoryEventStore
from financing.application.messages import CreateIssuer
from financing.application.processing import (
    Subscription,
    command_subscriptions,
    integration_subscriptions,
    policy_subscriptions,
)
from tests.support import rabbitmq
from tests.support.infra import wait_until

COMMAND_QUEUES = {
    "SellInvoice",
    "BidOnInvoice",
    "ApproveFinancing",
    "ReverseFinancing",
    "CreateInvestor",
    "CreateIssuer",
}
EVENT_QUEUES = {
    "events_BidOnInvoicePlacedEvent",
    "events_BidOnInvoiceRejectedEvent",
    "events_InvoiceFinancedEvent",
    "events_InvoiceApprovedEvent",
    "events_InvoiceReversedEvent",
    "events_IssuerRegistered",
    "events_InvestorRegistered",
}


def every_subscription(store: InMemoryEventStore, sender: AmqpCommandSender) -> list[Subscription]:
    return [
        *command_subscriptions(store),
        *policy_subscriptions(store),
        *integration_subscriptions(sender),
    ]


async def start(
    connection: AbstractRobustConnection, subscriptions: list[Subscription]
) -> tuple[list[asyncio.Task[None]], Publisher]:
    publisher = await Publisher.open(connection)
    dead_letters = DeadLetters(publisher)
    tasks = [
        asyncio.create_task(run_subscription(connection, s, dead_letters)) for s in subscriptions
    ]

    async def all_consuming() -> bool:
        for task in tasks:
            if task.done():
                task.result()  # surface a start-up failure such as PRECONDITION_FAILED
        for subscription in subscriptions:
            state = await rabbitmq.queue_state(connection, subscription.queue)
            if state is None or state[1] != 1:
                return False
        return True

    await wait_until(all_consuming, what="every subscription consuming")
    return tasks, publisher


async def stop(tasks: list[asyncio.Task[None]], publisher: Publisher) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with suppress(asyncio.CancelledError):
            await task
    await publisher.close()


async def test_service_topology_is_durable_and_matches_the_reference() -> None:
    async with rabbitmq.private_vhost("fin_topology") as vhost:
        connection = await connect(vhost.url)
        try:
            publisher = await Publisher.open(connection)
            subscriptions = every_subscription(InMemoryEventStore(), AmqpCommandSender(publisher))
            tasks, consumers_publisher = await start(connection, subscriptions)
            await stop(tasks, consumers_publisher)
            await publisher.close()
        finally:
            await connection.close()

        queues = await rabbitmq.list_queues(vhost.name)
        assert set(queues) == COMMAND_QUEUES | EVENT_QUEUES | {DEAD_LETTER_QUEUE}
        for name, queue in queues.items():
            assert queue["durable"] is True, name
            assert queue["arguments"] == [], name
        exchanges = await rabbitmq.list_exchanges(vhost.name)
        assert exchanges[EVENTS_EXCHANGE]["type"] == "fanout"
        assert exchanges[EVENTS_EXCHANGE]["durable"] is True
        assert sorted(await rabbitmq.list_bindings(vhost.name)) == sorted(
            (EVENTS_EXCHANGE, name, "") for name in EVENT_QUEUES
        )


async def test_start_up_on_a_broker_holding_the_reference_queues_succeeds() -> None:
    async with rabbitmq.private_vhost("fin_reference") as vhost:
        issuer = uuid.uuid4()
        # What the reference leaves behind: its exchange and queues, without
        # arguments, and a command still waiting in one of them.
        plain = await aio_pika.connect(vhost.url)
        channel = await plain.channel()
        events = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        for name in COMMAND_QUEUES:
            await channel.declare_queue(name, durable=True)
        for name in EVENT_QUEUES:
            queue = await channel.declare_queue(name, durable=True)
            await queue.bind(events, routing_key="")
        await channel.default_exchange.publish(
            aio_pika.Message(
                codec.encode(CreateIssuer(issuer)),
                headers={"_watermill_message_uuid": str(uuid.uuid4()), "name": "CreateIssuer"},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="CreateIssuer",
        )
        await plain.close()

        store = InMemoryEventStore()
        connection = await connect(vhost.url)
        try:
            publisher = await Publisher.open(connection)
            subscriptions = every_subscription(store, AmqpCommandSender(publisher))
            # Our own consumer that needs an argument gets a queue of its own name.
            channel = await connection.channel()
            await declare_event_queue(
                channel, "events_financing_query", arguments={"x-single-active-consumer": True}
            )
            await channel.close()
            tasks, consumers_publisher = await start(connection, subscriptions)

            async def waiting_command_processed() -> bool:
                return [e.aggregate_id for e in store.events] == [issuer]

            await wait_until(waiting_command_processed, what="the command left by the reference")
            await stop(tasks, consumers_publisher)
            await publisher.close()
        finally:
            await connection.close()

        queues = await rabbitmq.list_queues(vhost.name)
        for name in COMMAND_QUEUES | EVENT_QUEUES:
            assert queues[name]["arguments"] == [], name
        assert queues["events_financing_query"]["arguments"] == [
            ["x-single-active-consumer", "bool", True]
        ]
        assert (EVENTS_EXCHANGE, "events_financing_query", "") in await rabbitmq.list_bindings(
            vhost.name
        )
