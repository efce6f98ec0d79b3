"""The broker's own figures, the baselines of the service's: measured with aio-pika on a
vhost of the bench's own, on the same RabbitMQ and in the same run.

- publish -> deliver: one persistent message at a time, publisher confirms on,
  through a fanout exchange to N durable queues, each consumed (manual acks)
  on a connection other than the publisher's; the latency runs from the
  publish call to the delivery on the last of the N queues.
- confirmed publishes per second: persistent messages with a fixed number in
  flight on one confirming channel, to durable queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from scripts.bench_common import Percentiles
from tests.support import infra

BODY = b'{"InvestorID":"00000000-0000-0000-0000-000000000000","Amount":5}'


@contextlib.asynccontextmanager
async def own_vhost() -> AsyncIterator[str]:
    """The AMQP URL of a fresh vhost, deleted afterwards."""
    name = infra.unique_name("financing_bench_broker")
    url = await asyncio.to_thread(infra.create_vhost, name)
    try:
        yield url
    finally:
        await asyncio.to_thread(infra.delete_vhost, name)


@contextlib.asynccontextmanager
async def connections(url: str) -> AsyncIterator[tuple[AbstractRobustConnection, ...]]:
    publishing = await aio_pika.connect_robust(url)
    consuming = await aio_pika.connect_robust(url)
    try:
        yield publishing, consuming
    finally:
        await consuming.close()
        await publishing.close()


async def _fanout(channel: AbstractChannel, name: str, queues: int) -> list[str]:
    """A durable fanout exchange `name` bound to `queues` fresh durable queues."""
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
    names = []
    for index in range(queues):
        queue = await channel.declare_queue(f"{name}_{index}", durable=True)
        await queue.bind(exchange, routing_key="")
        names.append(queue.name)
    return names


def _message(message_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        BODY,
        message_id=message_id,
        headers={"name": "InvestorFundsReleasedEvent", "_watermill_message_uuid": message_id},
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish_deliver_latency(url: str, queues: int, samples: int) -> Percentiles:
    """publish -> delivered on every one of `queues` durable queues, one message at a time."""
    async with connections(url) as (publishing, consuming):
        publisher = await publishing.channel(publisher_confirms=True)
        names = await _fanout(publisher, f"bench_latency_{queues}", queues)
        exchange = await publisher.get_exchange(f"bench_latency_{queues}")
        awaited: dict[str, tuple[list[int], asyncio.Future[float]]] = {}

        async def deliver(message: AbstractIncomingMessage) -> None:
            now = time.perf_counter()
            await message.ack()
            entry = awaited.get(message.message_id or "")
            if entry is None:
                return
            left, done = entry
            left[0] -= 1
            if left[0] == 0 and not done.done():
                done.set_result(now)

        for name in names:
            channel = await consuming.channel()
            await channel.set_qos(prefetch_count=16)
            queue = await channel.declare_queue(name, durable=True, passive=True)
            await queue.consume(deliver)

        loop = asyncio.get_running_loop()
        latencies = []
        warm_up = min(20, samples)
        for index in range(warm_up + samples):
            message_id = f"latency-{queues}-{index}"
            done: asyncio.Future[float] = loop.create_future()
            awaited[message_id] = ([queues], done)
            started = time.perf_counter()
            await exchange.publish(_message(message_id), routing_key="")  # confirmed
            delivered = await asyncio.wait_for(done, 10)
            del awaited[message_id]
            if index >= warm_up:
                latencies.append(delivered - started)
        return Percentiles.of_seconds(latencies)


@dataclass(frozen=True)
class PublishRate:
    per_second: float
    published: int
    seconds: float


async def confirmed_publish_rate(
    url: str, in_flight: int, seconds: float, *, queues: int = 1, consumed: bool = False
) -> PublishRate:
    """Confirmed persistent publishes per second, `in_flight` unconfirmed at most, to
    `queues` durable queues (a fanout), drained by acking consumers when `consumed`."""
    async with connections(url) as (publishing, consuming):
        publisher = await publishing.channel(publisher_confirms=True)
        name = f"bench_rate_{queues}_{'consumed' if consumed else 'kept'}"
        names = await _fanout(publisher, name, queues)
        exchange = await publisher.get_exchange(name)
        consumers = []
        if consumed:

            async def ack(message: AbstractIncomingMessage) -> None:
                await message.ack()

            for queue_name in names:
                channel = await consuming.channel()
                await channel.set_qos(prefetch_count=256)
                queue = await channel.declare_queue(queue_name, durable=True, passive=True)
                consumers.append((queue, await queue.consume(ack)))

        published = 0
        deadline = 0.0

        async def worker(worker_id: int) -> None:
            nonlocal published
            sent = 0
            while time.perf_counter() < deadline:
                await exchange.publish(_message(f"rate-{worker_id}-{sent}"), routing_key="")
                sent += 1
                published += 1

        # A short warm-up, then the measured run.
        for run_seconds, measured in ((min(1.0, seconds / 4), False), (seconds, True)):
            published = 0
            started = time.perf_counter()
            deadline = started + run_seconds
            await asyncio.gather(*(worker(i) for i in range(in_flight)))
            elapsed = time.perf_counter() - started
            if measured:
                rate = PublishRate(published / elapsed, published, elapsed)
        for queue, tag in consumers:
            await queue.cancel(tag)
        for queue_name in names:
            await publisher.queue_delete(queue_name)
        return rate
