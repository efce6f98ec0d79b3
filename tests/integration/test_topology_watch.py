"""The topology is declared again while the service runs: what was deleted under it
(a binding, a queue nobody consumes) is made again, and a queue gone is said."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology_watch import UNCONSUMED, TopologyWatch
from financing.application.retry import Outages
from tests.support import rabbitmq
from tests.support.infra import wait_until

PLACED = "BidOnInvoicePlacedEvent"


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

    watch = TopologyWatch(broker, publisher)
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
    watch = TopologyWatch(broker, publisher, interval=3600)
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
