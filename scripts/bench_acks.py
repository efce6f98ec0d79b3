"""Acks coalesced by `ChannelAcks` against one `basic.ack` per message, consuming alone.

`python -m scripts.bench_acks [--messages N] [--rounds R]` fills a queue of a
throwaway vhost, then consumes it with prefetch 64, every delivery settled by
a task of its own that yields once (as a handler would) and acks, in turn:
through `ChannelAcks`, as the service acks, and with aio-pika's
`message.ack()`, one frame per message. It prints the client's and the
broker's CPU per message, messages per second and the ack frames written.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.acks import ChannelAcks
from scripts.bench_common import process_cpu_seconds
from tests.support import rabbitmq

PREFETCH = 64


def broker_cpu_seconds() -> float:
    return process_cpu_seconds(int(subprocess.check_output(["pgrep", "-o", "beam.smp"], text=True)))


async def consume(url: str, messages: int, coalesced: bool) -> str:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue(durable=True, exclusive=True)
        for _ in range(messages):
            await channel.default_exchange.publish(
                aio_pika.Message(b"x" * 100), routing_key=queue.name
            )
        await channel.set_qos(prefetch_count=PREFETCH)
        underlay = await channel.get_underlay_channel()
        acks = ChannelAcks(lambda tag, multiple: underlay.basic_ack(tag, multiple=multiple))
        settled = 0
        finished = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def settle(message: AbstractIncomingMessage) -> None:
            nonlocal settled
            await asyncio.sleep(0)  # a handler's work, reduced to one turn of the loop
            if coalesced:
                await acks.ack(message.delivery_tag or 0)
            else:
                await message.ack()
            settled += 1
            if settled == messages:
                finished.set()

        async def received(message: AbstractIncomingMessage) -> None:
            acks.delivered(message.delivery_tag or 0)
            task = asyncio.create_task(settle(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        cpu, broker, started = time.process_time(), broker_cpu_seconds(), time.perf_counter()
        await queue.consume(received)
        await finished.wait()
        cpu = time.process_time() - cpu
        broker = broker_cpu_seconds() - broker
        elapsed = time.perf_counter() - started
    finally:
        await connection.close()
    frames = acks.frames if coalesced else messages
    return (
        f"{'ChannelAcks' if coalesced else 'one ack each':12s}  client {1e6 * cpu / messages:6.1f}"
        f" us/msg  broker {1e6 * broker / messages:6.1f} us/msg"
        f"  {messages / elapsed:7,.0f} msg/s  {frames} ack frames"
    )


async def main(messages: int, rounds: int) -> None:
    async with rabbitmq.private_vhost("fin_bench_acks") as vhost:
        for _ in range(rounds):
            for coalesced in (True, False):
                print(await consume(vhost.url, messages, coalesced), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    uvloop.run(main(args.messages, args.rounds))
