"""The topology is declared again while the service runs: what was deleted under it
(a binding, a queue nobody consumes) is made again, and a queue gone is said."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress

import aio_pika
import pytest
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.queues import QueueDepth
from financing.adapters.rabbitmq.topology_watch import TopologyWatch
from financing.application.errors import Unavailable
from financing.application.ports import Envelope
from financing.application.retry import Outages
from tests.support import rabbitmq
from tests.support.infra import wait_until

PLACED = "BidOnInvoicePlacedEvent"
# The queues nobody consumes.
UNCONSUMED = (topology.DEAD_LETTER_QUEUE, topology.DEFERRALS)


@pytest.fixture
async def declared() -> AsyncIterator[tuple[rabbitmq.Vhost, Broker, Publisher]]:
    async with rabbitmq.private_vhost("fin_topology_watch") as vhost:
        broker = Broker([vhost.url], Outages())
        publisher = Publisher(broker)
        try:
            await topology.declare_on(broker)
            yield vhost, broker, publisher
        finally:
            await publisher.close()
            await broker.close()


async def unbind_placed(broker: Broker) -> None:
    """An operator's (or a foreign application's) deletion of one binding."""
    channel = await broker.channel()
    queue = await channel.get_queue(f"events_{PLACED}", ensure=False)
    await queue.unbind(
        topology.EVENTS_ROUTER, routing_key="", arguments={"x-match": "all", "name": PLACED}
    )
    await channel.close()


def restored(queue: str) -> float:
    value = REGISTRY.get_sample_value("financing_topology_restored_total", {"queue": queue})
    return value or 0.0


async def test_a_deleted_binding_and_deleted_queues_nobody_consumes_are_made_again(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    """Regression: a binding deleted under the service was never declared again (its
    consumer's sagas stalled for good, not a line said), and neither was a queue
    nobody consumes (a policy's `expires` took `financing_deferred` with what it held)."""
    vhost, broker, publisher = declared
    expected = sorted(await rabbitmq.list_bindings_with_arguments(vhost.name))
    await unbind_placed(broker)
    channel = await broker.channel()
    for name in UNCONSUMED:
        await channel.queue_delete(name)
    await channel.close()
    assert sorted(await rabbitmq.list_bindings_with_arguments(vhost.name)) != expected
    before = {name: restored(name) for name in UNCONSUMED}

    watch = TopologyWatch(publisher, broker)
    with capture_logs() as logs:
        await watch.declare_once()
        await watch.declare_once()  # nothing gone the second time: nothing said

    assert sorted(await rabbitmq.list_bindings_with_arguments(vhost.name)) == expected
    assert set(UNCONSUMED) <= set(await rabbitmq.list_queues(vhost.name))
    said = [(line["log_level"], line.get("queue")) for line in logs]
    assert said == [("warning", name) for name in UNCONSUMED], logs
    assert {name: restored(name) - before[name] for name in UNCONSUMED} == {
        name: 1.0 for name in UNCONSUMED
    }


async def test_asked_to_declare_soon_the_watch_does_not_wait_for_its_interval(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    vhost, broker, publisher = declared
    expected = sorted(await rabbitmq.list_bindings_with_arguments(vhost.name))
    watch = TopologyWatch(publisher, broker, interval=3600)
    running = asyncio.create_task(watch.run())
    try:
        await unbind_placed(broker)
        watch.declare_soon()

        async def bound_again() -> bool:
            return sorted(await rabbitmq.list_bindings_with_arguments(vhost.name)) == expected

        await wait_until(bound_again, timeout=10, what="the binding declared again")
    finally:
        running.cancel()
        with suppress(asyncio.CancelledError):
            await running


async def conflicting(broker: Broker, queue: str) -> None:
    """`queue` deleted and declared again by someone else with an argument of its own."""
    channel = await broker.channel()
    await channel.queue_delete(queue)
    await channel.declare_queue(queue, durable=True, arguments={"x-max-length": 10})
    await channel.close()


async def test_a_part_the_broker_refuses_keeps_no_other_from_being_declared(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    """Regression: a command queue declared again by someone else with other arguments
    stopped the declaration at that queue: the bindings after it stayed missing (events
    dead-lettered from financing_unrouted for as long), and, from the relayer's publish
    returned unroutable, the refusal stopped the relayer and the service (exit 1); and a
    publish returned unroutable, the topology once declared again, failed all the same: a
    broker outage, `/health` 503, where the broker never went."""
    vhost, broker, publisher = declared
    expected = sorted(await rabbitmq.list_bindings_with_arguments(vhost.name))
    await conflicting(broker, "ReverseFinancing")  # a command queue, declared early
    await unbind_placed(broker)  # a binding of a policy's queue, declared after it
    channel = await broker.channel()
    router = await channel.get_exchange(topology.EVENTS_ROUTER, ensure=False)
    await router.unbind(topology.EVENTS_EXCHANGE)  # every event now routed nowhere
    await channel.close()
    watch = TopologyWatch(publisher, broker)
    with capture_logs() as logs:
        # Returned (no queue took it): the topology declared again, and published again.
        await publisher.publish_events([event()])
        await watch.declare_once()
        await watch.declare_once()

    assert sorted(await rabbitmq.list_bindings_with_arguments(vhost.name)) == expected
    refused = [line for line in logs if line["event"] == "the topology could not be declared again"]
    assert len(refused) == 1, logs  # said once while it lasts
    assert "queue 'ReverseFinancing' exists with other arguments" in refused[0]["error"]


def event() -> Envelope:
    return Envelope(message_id=str(uuid.uuid4()), name=PLACED, body=b"{}")


@pytest.mark.parametrize("queue", UNCONSUMED)
async def test_a_queue_nobody_consumes_deleted_meanwhile_is_made_again_as_it_is_published_to(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher], queue: str
) -> None:
    """Regression: a deferral or a dead letter published after its queue was deleted came
    back unroutable: a broker outage ("returned as unroutable (NO_ROUTE)", `/health` 503),
    the queue declared again silently on the retry, its loss neither said nor counted."""
    vhost, broker, publisher = declared
    copy = aio_pika.Message(b"{}", headers={"name": "BidOnInvoice"}, expiration=600)
    keep = publisher.keep_dead_letter if queue == topology.DEAD_LETTER_QUEUE else None
    await (keep(copy) if keep else publisher.defer(copy, "BidOnInvoice"))  # declared, used
    channel = await broker.channel()
    await channel.queue_delete(queue)
    await channel.close()
    before = restored(queue)

    with capture_logs() as logs:
        await (keep(copy) if keep else publisher.defer(copy, "BidOnInvoice"))

    assert [(line["log_level"], line.get("queue")) for line in logs] == [("warning", queue)]
    assert restored(queue) - before == 1.0
    assert (await rabbitmq.list_queues(vhost.name))[queue]["messages_ready"] == 1


async def test_the_deferrals_binding_deleted_alone_is_declared_again_without_a_loss_said(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    _, broker, publisher = declared
    copy = aio_pika.Message(b"{}", headers={"name": "BidOnInvoice"}, expiration=600)
    await publisher.defer(copy, "BidOnInvoice")
    channel = await broker.channel()
    queue = await channel.get_queue(topology.DEFERRALS, ensure=False)
    await queue.unbind(topology.DEFERRALS)
    await channel.close()

    with capture_logs() as logs:
        await publisher.defer(copy, "BidOnInvoice")  # returned, then bound and published again

    assert [line for line in logs if line["log_level"] != "debug"] == []


async def test_a_deletion_met_by_many_publishes_and_the_watch_at_once_is_said_once(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    """Regression: looked for on the probe's channel, which the broker closes for a queue
    it does not have, the deletion failed the declarations and probes sharing it (a
    broker outage, `/health` 503), and each publish that met it said and counted it."""
    vhost, broker, publisher = declared
    copy = aio_pika.Message(b"{}", headers={"name": "BidOnInvoice"}, expiration=600)
    await publisher.defer(copy, "BidOnInvoice")
    channel = await broker.channel()
    await channel.queue_delete(topology.DEFERRALS)
    await channel.close()
    before = restored(topology.DEFERRALS)

    with capture_logs() as logs:
        await asyncio.gather(
            *(publisher.defer(copy, "BidOnInvoice") for _ in range(8)),
            TopologyWatch(publisher, broker).declare_once(),
            *(publisher.probe() for _ in range(4)),
        )

    said = [line for line in logs if line["log_level"] != "debug"]
    assert [(line["log_level"], line.get("queue")) for line in said] == [
        ("warning", topology.DEFERRALS)
    ], said
    assert restored(topology.DEFERRALS) - before == 1.0
    assert (await rabbitmq.list_queues(vhost.name))[topology.DEFERRALS]["messages_ready"] == 8


@contextlib.asynccontextmanager
async def reference_projector(
    vhost: rabbitmq.Vhost,
) -> AsyncIterator[tuple[AbstractExchange, AbstractQueue, str]]:
    """The reference's projector, reading `events_query` bound to `events` as it binds it:
    the exchange, the queue and the consumer's tag."""
    reference = await aio_pika.connect(vhost.url)
    try:
        channel = await reference.channel()
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        queue = await channel.declare_queue(topology.REFERENCE_PROJECTOR_QUEUE, durable=True)
        await queue.bind(events, routing_key="")

        async def projected(message: AbstractIncomingMessage) -> None:
            await message.ack()

        yield events, queue, await queue.consume(projected)
    finally:
        await reference.close()


async def test_the_reference_projectors_queue_is_retired_once_its_reader_is_gone_for_good(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    """Regression: a reference projector still reading `events_query` when the service
    started, stopped after it (a swap that starts the new before stopping the old), left
    the queue bound to `events` and read by no one: it took every event until the
    service's next start, towards the broker's alarms. The watch retires it once two
    declarations in a row found it unread, and says so once."""
    vhost, broker, publisher = declared
    async with reference_projector(vhost) as (events, queue, tag):
        bound = (topology.EVENTS_EXCHANGE, topology.REFERENCE_PROJECTOR_QUEUE, "", "")
        watch = TopologyWatch(publisher, broker)
        watch.started(await topology.declare_on(broker))  # read as the service starts

        async def declared_twice() -> list[str]:
            with capture_logs() as logs:
                await watch.declare_once()
                await watch.declare_once()
            return [line["event"] for line in logs if line["log_level"] != "debug"]

        assert await declared_twice() == []  # read: left as it is
        assert bound in await rabbitmq.list_bindings_with_arguments(vhost.name)

        await queue.cancel(tag)  # the reference's projector stops
        await events.publish(aio_pika.Message(b"{}", headers={"name": PLACED}), "")
        said = await declared_twice()
        assert said == [
            "the reference's projector queue is read by no one and no longer fed; delete it"
            f" once what it holds is of no use (rabbitmqctl delete_queue -p VHOST"
            f" {topology.REFERENCE_PROJECTOR_QUEUE})"
        ]
        assert bound not in await rabbitmq.list_bindings_with_arguments(vhost.name)
        assert await declared_twice() == []  # said once
        await events.publish(aio_pika.Message(b"{}", headers={"name": PLACED}), "")
        queues = await rabbitmq.list_queues(vhost.name)
        assert queues[topology.REFERENCE_PROJECTOR_QUEUE]["messages_ready"] == 1


async def test_the_reference_projectors_queue_read_at_start_is_retired_once_its_reader_left(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    """Regression: a reference projector reading `events_query` when the service started,
    and gone before the first declaration while it ran (30 s), left the queue bound for
    good: the watch took it for retired at start-up."""
    vhost, broker, publisher = declared
    async with reference_projector(vhost) as (events, queue, tag):
        watch = TopologyWatch(publisher, broker)
        watch.started(await topology.declare_on(broker))
        await queue.cancel(tag)  # gone before the watch's first declaration
        await events.publish(aio_pika.Message(b"{}", headers={"name": PLACED}), "")
        await watch.declare_once()
        await watch.declare_once()
        bound = (topology.EVENTS_EXCHANGE, topology.REFERENCE_PROJECTOR_QUEUE, "", "")
        assert bound not in await rabbitmq.list_bindings_with_arguments(vhost.name)


async def test_a_reference_projectors_queue_the_broker_has_not_is_not_looked_for(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher],
) -> None:
    """Regression: every declaration while the service ran (every 30 s, in each process
    that consumes) looked for `events_query` on brokers without it, and the broker logged
    each look as an error (`not_found`)."""
    _, broker, publisher = declared
    watch = TopologyWatch(publisher, broker)
    watch.started(await topology.declare_on(broker))
    looked: list[str] = []
    queue_depth = publisher.queue_depth

    async def counted(name: str) -> QueueDepth | None:
        looked.append(name)
        return await queue_depth(name)

    publisher.queue_depth = counted  # type: ignore[method-assign]
    for _ in range(3):
        await watch.declare_once()
    assert topology.REFERENCE_PROJECTOR_QUEUE not in looked


async def test_a_retirement_that_failed_is_tried_again(
    declared: tuple[rabbitmq.Vhost, Broker, Publisher], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a retirement of `events_query` that failed (an outage at that moment)
    was taken for done: the queue stayed bound, and growing, for the life of the process."""
    vhost, broker, publisher = declared
    async with reference_projector(vhost) as (_, queue, tag):
        watch = TopologyWatch(publisher, broker)
        watch.started(await topology.declare_on(broker))
        await queue.cancel(tag)
        retire = topology.retire_reference_projector_queue
        failures = [Unavailable("broker", "a moment's outage")]

        async def failing_once(broker: Broker) -> topology.ReferenceQueue:
            if failures:
                raise failures.pop()
            return await retire(broker)

        monkeypatch.setattr(topology, "retire_reference_projector_queue", failing_once)
        for _ in range(4):  # two to fail, two more to retire
            await watch.declare_once()
        bound = (topology.EVENTS_EXCHANGE, topology.REFERENCE_PROJECTOR_QUEUE, "", "")
        assert not failures
        assert bound not in await rabbitmq.list_bindings_with_arguments(vhost.name)
