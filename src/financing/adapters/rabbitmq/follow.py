"""Following the `events` exchange live, as an onlooker (`financing tail`).

The onlooker reads copies through a queue of its own, exclusive and
auto-deleted, bound to `events`: no consumer of the service misses anything
it reads, and the queue disappears with the onlooker's connection. Copies are
taken without acknowledgement: an onlooker that goes away loses nothing that
matters.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.connection import BROKER, Broker, close_channel, translated
from financing.adapters.rabbitmq.topology import declare_events_exchange
from financing.application.errors import Unavailable


async def follow_events(
    broker: Broker,
    on_event: Callable[[AbstractIncomingMessage], None],
    on_following: Callable[[], None] = lambda: None,
) -> None:
    """Call `on_event` with each message published on `events` from now on, until
    cancelled; `on_following` once the queue is bound. Unavailable when the
    broker goes away: what was published meanwhile cannot be followed. An error
    `on_event` raises (its output gone: BrokenPipeError) ends the following, and
    is raised here."""
    channel = await broker.channel()
    closed = asyncio.Event()
    failed: list[Exception] = []
    channel.close_callbacks.add(lambda *_: closed.set())
    try:
        with translated():
            queue = await channel.declare_queue(
                f"financing_tail_{uuid.uuid4().hex[:12]}", exclusive=True, auto_delete=True
            )
            await queue.bind(await declare_events_exchange(channel), routing_key="")

            async def received(message: AbstractIncomingMessage) -> None:
                if failed:
                    return
                try:
                    on_event(message)
                except Exception as error:
                    failed.append(error)
                    closed.set()

            await queue.consume(received, no_ack=True)
        on_following()
        await closed.wait()
        if failed:
            raise failed[0]
        raise Unavailable(BROKER, "the connection to the broker was lost")
    finally:
        await close_channel(channel)
