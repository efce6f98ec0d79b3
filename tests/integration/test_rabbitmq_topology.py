"""The declared topology matches the wire contract, also on a broker the reference used."""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from contextlib import suppress

import aio_pika
import pytest
from structlog.testing import capture_logs

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.consumer import Deliveries, QueueConsumer, consume
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.hand_back import REFERENCE_COMMAND_QUEUES
from financing.adapters.rabbitmq.publisher import AmqpCommandSender, Publisher
from financing.adapters.rabbitmq.topology import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE
from financing.application import codec, routes
from financing.application.errors import Refused
from financing.application.memory import InMemoryEventStore
from financing.application.messages import CreateIssuer
from financing.application.pipeline import Handler, exactly_once, sending
from financing.application.ports import CommandSender, EventStore
from financing.application.read_models import PROJECTED_EVENTS
from financing.application.retry import DELIVERIES, Outages
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
EVENT_NAMES = (
    "BidOnInvoicePlacedEvent",
    "BidOnInvoiceRejectedEvent",
    "InvoiceFinancedEvent",
    "InvoiceApprovedEvent",
    "InvoiceReversedEvent",
    "IssuerRegistered",
    "InvestorRegistered",
)
EVENT_QUEUES = {f"events_{name}" for name in EVENT_NAMES}


def expected_bindings() -> list[tuple[str, str, str, str]]:
    """`events` feeds `financing_events`, which routes each event queue its one name and the
    projector every projected name; what it routes nowhere goes to `financing_unrouted`."""
    bindings = [
        (EVENTS_EXCHANGE, topology.EVENTS_ROUTER, "", ""),
        (topology.UNROUTED, topology.UNROUTED, "", ""),
        (topology.DEFERRALS, topology.DEFERRALS, "", ""),  # where deferred messages wait
    ]
    bindings += [(topology.EVENTS_ROUTER, f"events_{name}", "", name) for name in EVENT_NAMES]
    bindings += [
        (topology.EVENTS_ROUTER, topology.PROJECTOR_QUEUE, "", name)
        for name in sorted(PROJECTED_EVENTS)
    ]
    return sorted(bindings)


def every_handler(store: EventStore, sender: CommandSender) -> list[tuple[str, Handler]]:
    """(message name, handler) of every consumer the service runs but the projector."""
    return [
        *((r.message_name, exactly_once(store, r.consumer, r.handler)) for r in routes.COMMANDS),
        *((r.message_name, exactly_once(store, r.consumer, r.handler)) for r in routes.POLICIES),
        *((r.message_name, sending(sender, r.handler)) for r in routes.INTEGRATION),
    ]


async def start(
    broker: Broker, outages: Outages, handlers: list[tuple[str, Handler]]
) -> tuple[list[asyncio.Task[None]], Publisher]:
    """Every handler on the queue the topology gives its message, wired as the service
    wires them: the whole topology declared first, then each queue consumed."""
    publisher = Publisher(broker)
    dead_letters = DeadLetters(publisher, outages, DELIVERIES)
    consumers: list[tuple[QueueConsumer, Deliveries]] = []
    for name, handler in handlers:
        subscription = topology.subscription(name)
        step = subscription.step(
            handler,
            policy=DELIVERIES,
            outages=outages,
        )
        deliveries = Deliveries(step)
        consumer = QueueConsumer(
            broker, subscription.queue, dead_letters, outages, deliveries.receive, prefetch=32
        )
        consumers.append((consumer, deliveries))
    channel = await broker.channel()
    await topology.declare(channel)
    await channel.close()
    tasks = [asyncio.create_task(consume(*pair)) for pair in consumers]

    async def all_consuming() -> bool:
        for task in tasks:
            if task.done():
                task.result()  # surface a start-up failure such as PRECONDITION_FAILED
        connection = await broker.connection()
        for consumer, _ in consumers:
            state = await rabbitmq.queue_state(connection, consumer.spec.name)
            if state is None or state[1] != 1:
                return False
        return all(consumer.consuming.is_set() for consumer, _ in consumers)

    await wait_until(all_consuming, what="every consumer consuming")
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
        outages = Outages()
        broker = Broker([vhost.url], outages)
        try:
            publisher = Publisher(broker)
            handlers = every_handler(InMemoryEventStore(), AmqpCommandSender(publisher))
            tasks, consumers_publisher = await start(broker, outages, handlers)
            await stop(tasks, consumers_publisher)
            await publisher.close()
        finally:
            await broker.close()

        queues = await rabbitmq.list_queues(vhost.name)
        ours = {
            DEAD_LETTER_QUEUE,
            topology.PROJECTOR_QUEUE,
            topology.UNROUTED,
            topology.DEFERRALS,
        }
        assert set(queues) == COMMAND_QUEUES | EVENT_QUEUES | ours
        for name, queue in queues.items():
            assert queue["durable"] is True, name
            if name not in {topology.PROJECTOR_QUEUE, topology.DEFERRALS}:
                assert queue["arguments"] == [], name
        exchanges = await rabbitmq.list_exchanges(vhost.name)
        assert exchanges[EVENTS_EXCHANGE]["type"] == "fanout"
        assert exchanges[EVENTS_EXCHANGE]["durable"] is True
        assert exchanges[topology.EVENTS_ROUTER]["type"] == "headers"
        assert (
            sorted(await rabbitmq.list_bindings_with_arguments(vhost.name)) == expected_bindings()
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
        outages = Outages()
        broker = Broker([vhost.url], outages)
        try:
            publisher = Publisher(broker)
            handlers = every_handler(store, AmqpCommandSender(publisher))
            # Our own consumer that needs an argument gets a queue of its own name.
            channel = await broker.channel()
            await topology.PROJECTOR.queue.declare(channel)
            await channel.close()
            tasks, consumers_publisher = await start(broker, outages, handlers)

            async def waiting_command_processed() -> bool:
                return [e.aggregate_id for e in store.events] == [issuer]

            await wait_until(waiting_command_processed, what="the command left by the reference")
            await stop(tasks, consumers_publisher)
            await publisher.close()
        finally:
            await broker.close()

        queues = await rabbitmq.list_queues(vhost.name)
        for name in COMMAND_QUEUES | EVENT_QUEUES:
            assert queues[name]["arguments"] == [], name
        assert queues[topology.PROJECTOR_QUEUE]["arguments"] == [
            ["x-single-active-consumer", "bool", True]
        ]
        # The reference bound its queues to `events` directly: they now receive only their names.
        assert (
            sorted(await rabbitmq.list_bindings_with_arguments(vhost.name)) == expected_bindings()
        )


async def test_an_event_reaches_only_the_queues_of_its_consumers_and_foreign_queues() -> None:
    """Each consumer receives only the names it handles (not every event, as a fanout to
    every queue would do); a foreign consumer's queue bound to `events` still receives
    everything; what no consumer handles lands in `financing_unrouted`."""
    async with rabbitmq.private_vhost("fin_routing") as vhost:
        connection = await aio_pika.connect(vhost.url)
        try:
            channel = await connection.channel()
            await topology.declare(channel)
            events = await topology.declare_events_exchange(channel)
            foreign = await channel.declare_queue("foreign_listener", durable=True)
            await foreign.bind(events, routing_key="")
            for name in ("BidOnInvoicePlacedEvent", "IssuerRegistered", "SomethingElse", None):
                headers = {"_watermill_message_uuid": str(uuid.uuid4())}
                if name is not None:
                    headers["name"] = name
                await events.publish(aio_pika.Message(b"{}", headers=headers), routing_key="")

            async def ready() -> dict[str, int]:
                queues = await rabbitmq.list_queues(vhost.name)
                return {name: row["messages_ready"] for name, row in queues.items()}

            expected = {
                "events_BidOnInvoicePlacedEvent": 1,
                topology.PROJECTOR_QUEUE: 1,
                "events_IssuerRegistered": 1,
                topology.UNROUTED: 2,  # no name, and a name nobody handles
                "foreign_listener": 4,
            }

            async def routed() -> bool:
                counts = await ready()
                return all(counts.get(queue) == count for queue, count in expected.items())

            await wait_until(routed, what="every message in the queues of its consumers")
            counts = await ready()
            others = {queue: n for queue, n in counts.items() if queue not in expected}
            assert not any(others.values()), others
        finally:
            await connection.close()


async def test_a_queue_that_exists_with_the_other_type_is_refused_naming_it_and_the_way_out() -> (
    None
):
    async with rabbitmq.private_vhost() as vhost:
        quorum = Broker([vhost.url], Outages(), queue_type="quorum")
        try:
            await topology.declare_on(quorum)
            await topology.declare_on(quorum)  # declaring again with the same type is fine
        finally:
            await quorum.close()
        classic = Broker([vhost.url], Outages())
        try:
            with pytest.raises(Refused) as refused:
                await topology.declare_on(classic)
        finally:
            await classic.close()
        types = {
            name: row["type"] for name, row in (await rabbitmq.list_queues(vhost.name)).items()
        }

    assert set(types.values()) == {"quorum"}
    # Every one named at once: one a start-up took a restart for each.
    named = sorted(types)
    message = str(refused.value)
    assert message.startswith("broker refused the service: queues "), message
    assert sorted(re.findall(r"'([a-zA-Z_]+)'", message.split(" exist as ")[0])) == named
    assert (
        " exist as quorum (or another type) queues, and FINANCING_QUEUE_TYPE asks for classic."
        " Either set FINANCING_QUEUE_TYPE to the type they have, or move them to classic"
    ) in message, message
    assert '"Switching the queue type"' in message, message


async def test_queues_of_the_other_type_stop_start_up_before_any_is_declared() -> None:
    """Regression (a probe): on a broker holding the reference's classic queues, a quorum
    start-up was refused at the first of them, having made the service's own queues
    quorum first; then a classic start-up, the message's first way out, was refused
    for those."""
    async with rabbitmq.private_vhost() as vhost:
        plain = await aio_pika.connect(vhost.url)
        channel = await plain.channel()
        for name in REFERENCE_COMMAND_QUEUES:
            await channel.declare_queue(name, durable=True)
        await plain.close()
        quorum = Broker([vhost.url], Outages(), queue_type="quorum")
        try:
            with pytest.raises(Refused, match="exist as classic queues"):
                await topology.declare_on(quorum)
        finally:
            await quorum.close()
        assert sorted(await rabbitmq.list_queues(vhost.name)) == sorted(REFERENCE_COMMAND_QUEUES)
        classic = Broker([vhost.url], Outages())
        try:
            await topology.declare_on(classic)
        finally:
            await classic.close()


async def test_a_reference_projector_queue_the_user_may_not_touch_is_left_with_a_warning() -> None:
    """Retiring `events_query` is a clean-up: a broker user without the rights to unbind
    or delete it must not keep the service from starting."""
    async with rabbitmq.private_vhost("fin_retire") as vhost:
        plain = await aio_pika.connect(vhost.url)
        channel = await plain.channel()
        events = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(topology.REFERENCE_PROJECTOR_QUEUE, durable=True)
        await queue.bind(events, routing_key="")
        await plain.close()
        untouchable = f"^(?!{topology.REFERENCE_PROJECTOR_QUEUE}$).*"
        permissions = [untouchable, untouchable, ".*"]  # configure, write, read
        await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost.name, "guest", *permissions],
            check=True,
            capture_output=True,
            timeout=60,
        )
        broker = Broker([vhost.url], Outages())
        try:
            with capture_logs() as logs:
                await topology.declare_on(broker)
        finally:
            await broker.close()
        [warning] = [line for line in logs if "could not be retired" in line["event"]]
        assert warning["log_level"] == "warning", warning
        assert topology.REFERENCE_PROJECTOR_QUEUE in await rabbitmq.list_queues(vhost.name)


async def test_a_reference_projector_queue_of_quorum_type_is_retired_with_no_outage() -> None:
    """Regression (a probe): a reference that ran on quorum queues left a quorum
    `events_query`, which the service deleted "if unused and empty": RabbitMQ 3.x refuses
    that of a quorum queue with an error that closes the whole connection, a broker
    outage said every minute as the retirement was tried again."""
    async with rabbitmq.private_vhost("fin_retire_q") as vhost:
        plain = await aio_pika.connect(vhost.url)
        channel = await plain.channel()
        events = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            topology.REFERENCE_PROJECTOR_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(events, routing_key="")
        await plain.close()
        broker = Broker([vhost.url], Outages(), queue_type="quorum")
        try:
            connection = await broker.connection()
            with capture_logs() as logs:
                retired = await topology.declare_on(broker)
            assert not connection.is_closed
        finally:
            await broker.close()
        assert retired is topology.ReferenceQueue.ABSENT, logs
        assert topology.REFERENCE_PROJECTOR_QUEUE not in await rabbitmq.list_queues(vhost.name)


async def test_a_deferrals_queue_of_the_other_type_stops_start_up_not_the_first_deferral() -> None:
    """Regression: `financing_deferred` was declared by the first deferral only, so one
    left from a classic deployment let a quorum one start healthy, and its first message
    waiting for an aggregate failed to settle about once a second, for ever."""
    async with rabbitmq.private_vhost() as vhost:
        classic = Broker([vhost.url], Outages())
        try:
            channel = await classic.channel()
            await topology.declare_deferrals(channel)  # a classic deployment deferred once
            await channel.close()
        finally:
            await classic.close()
        quorum = Broker([vhost.url], Outages(), queue_type="quorum")
        try:
            with pytest.raises(Refused, match="queue 'financing_deferred' exists as a classic"):
                await topology.declare_on(quorum)
        finally:
            await quorum.close()


async def test_start_up_declares_where_deferred_messages_wait() -> None:
    async with rabbitmq.private_vhost() as vhost:
        broker = Broker([vhost.url], Outages())
        try:
            await topology.declare_on(broker)
        finally:
            await broker.close()
        queues = await rabbitmq.list_queues(vhost.name)

    assert topology.DEFERRALS in queues
