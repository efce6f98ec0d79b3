"""The broker topology of contract.md section 2, and the connection to it.

Every queue the reference also declares (command queues, `events_<handler>`)
is declared durable with no arguments: re-declaring an existing queue with
other arguments fails with PRECONDITION_FAILED. Queues that need an
x-argument must have a name of our own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection

from financing.logging import get_logger

EVENTS_EXCHANGE = "events"
DEAD_LETTER_QUEUE = "financing_dead_letters"

# How long to wait before reconnecting after the broker went away.
RECONNECT_INTERVAL = 1.0
CONNECT_TIMEOUT = 10.0

log = get_logger(__name__)


async def declare_events_exchange(channel: AbstractChannel) -> AbstractExchange:
    return await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )


async def declare_command_queue(channel: AbstractChannel, name: str) -> AbstractQueue:
    return await channel.declare_queue(name, durable=True)


async def declare_event_queue(
    channel: AbstractChannel, name: str, *, arguments: dict[str, Any] | None = None
) -> AbstractQueue:
    """A durable queue bound to the `events` exchange.

    Pass `arguments` only for a queue of our own name (see the module docstring).
    """
    exchange = await declare_events_exchange(channel)
    queue = await channel.declare_queue(name, durable=True, arguments=arguments or None)
    await queue.bind(exchange, routing_key="")
    return queue


async def declare_dead_letter_queue(channel: AbstractChannel) -> AbstractQueue:
    return await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)


def describe_url(url: str) -> str:
    """The broker URL without credentials: safe to log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


async def connect(url: str) -> AbstractRobustConnection:
    """A connection that reconnects by itself and restores channels and consumers.

    The first attempt fails fast (raises) when the broker is unreachable, so
    the caller decides whether to retry at start-up.
    """
    log.info("connecting to broker", broker=describe_url(url))
    # Options given in the URL's query (reconnect_interval=...) take precedence.
    options: dict[str, Any] = (
        {}
        if "reconnect_interval" in parse_qs(urlsplit(url).query)
        else {"reconnect_interval": RECONNECT_INTERVAL}
    )
    connection: AbstractRobustConnection = await aio_pika.connect_robust(
        url, timeout=CONNECT_TIMEOUT, **options
    )
    log.info("connected to broker", broker=describe_url(url))
    return connection
