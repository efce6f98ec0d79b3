"""Each queue's depth and consumers are exported while the service runs: the dead letters
waiting for an operator, a backlog, a queue no process reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import REGISTRY

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.depth_watch import TOPOLOGY_QUEUES, DepthWatch
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application.retry import Outages
from financing.metrics import QUEUE_CONSUMERS, QUEUE_MESSAGES_READY
from tests.support import rabbitmq
from tests.support.infra import wait_until


@pytest.fixture
async def declared() -> AsyncIterator[tuple[Broker, Publisher]]:
    async with rabbitmq.private_vhost("fin_depth_watch") as vhost:
        broker = Broker([vhost.url], Outages())
        publisher = Publisher(broker)
        QUEUE_MESSAGES_READY.clear()  # another test's readings
        QUEUE_CONSUMERS.clear()
        try:
            await topology.declare_on(broker)
            yield broker, publisher
        finally:
            await publisher.close()
            await broker.close()


def ready(queue: str) -> float | None:
    return REGISTRY.get_sample_value("financing_queue_messages_ready", {"queue": queue})


async def letters(waiting: int) -> bool:
    return ready(topology.DEAD_LETTER_QUEUE) == waiting


def consumers(queue: str) -> float | None:
    return REGISTRY.get_sample_value("financing_queue_consumers", {"queue": queue})


async def accept(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def test_dead_letters_waiting_and_a_queue_without_consumers_are_exported(
    declared: tuple[Broker, Publisher],
) -> None:
    """Regression: the dead letters still waiting and a queue nobody read (no process ran
    the projector) were exported by nothing of the service: the only dead-letter metric
    counted them as published, and alerted for 15 minutes."""
    broker, publisher = declared
    channel = await broker.channel()
    for n in range(3):
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id=f"letter-{n}"), topology.DEAD_LETTER_QUEUE
        )
    reader = await channel.get_queue("SellInvoice", ensure=False)
    await reader.consume(accept, no_ack=False)

    await DepthWatch(publisher).read_once()

    assert ready(topology.DEAD_LETTER_QUEUE) == 3
    assert consumers(topology.DEAD_LETTER_QUEUE) == 0
    assert consumers("SellInvoice") == 1
    assert consumers(topology.PROJECTOR_QUEUE) == 0
    assert {queue for queue in TOPOLOGY_QUEUES if ready(queue) is None} == set()
    await channel.close()


async def test_a_queue_deleted_under_the_service_has_no_reading_until_declared_again(
    declared: tuple[Broker, Publisher],
) -> None:
    broker, publisher = declared
    watch = DepthWatch(publisher)
    await watch.read_once()
    assert ready(topology.DEFERRALS) == 0
    channel = await broker.channel()
    await channel.queue_delete(topology.DEFERRALS)

    await watch.read_once()  # the missing queue does not stop the others' readings

    assert ready(topology.DEFERRALS) is None
    assert consumers(topology.DEFERRALS) is None
    assert ready(topology.DEAD_LETTER_QUEUE) == 0
    await topology.declare_on(broker)
    await watch.read_once()
    assert ready(topology.DEFERRALS) == 0
    await channel.close()


async def test_the_watch_reads_again_at_its_interval(declared: tuple[Broker, Publisher]) -> None:
    broker, publisher = declared
    running = asyncio.create_task(DepthWatch(publisher, interval=0.1).run())
    try:
        await wait_until(lambda: letters(0), timeout=10, what="a first reading")
        channel = await broker.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id="letter"), topology.DEAD_LETTER_QUEUE
        )
        await wait_until(lambda: letters(1), timeout=10, what="the letter counted")
        await channel.close()
    finally:
        running.cancel()
        with suppress(asyncio.CancelledError):
            await running
