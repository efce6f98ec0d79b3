"""What the broker says of a queue: how many messages wait in it, how many consumers read
it; and whether it has an exchange."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiormq
from aio_pika.abc import AbstractChannel, AbstractQueue
from pamqp.constants import DOMAIN_REGEX

from financing.adapters.rabbitmq.connection import Broker, close_channel, translated

T = TypeVar("T")


@dataclass(frozen=True)
class QueueDepth:
    name: str
    waiting: int  # messages ready to be delivered (not those delivered and unacked)
    consumers: int


@contextlib.asynccontextmanager
async def existing_queue(broker: Broker, name: str) -> AsyncIterator[AbstractQueue | None]:
    """The queue `name` on a channel of its own, declared passively (nothing is created);
    None when the broker has no such queue.

    A passive declaration of a missing queue closes the channel, so each inquiry has
    a channel of its own; closing it returns every message fetched and not acked to
    the queue, in its original position. For the operator's commands, which ask a few
    questions and exit, and what a running service does once (retiring the reference's
    projector queue); what it asks again and again it asks on a channel it keeps
    (`Publisher.queue_depth`).
    """
    async with _passively(
        broker, lambda channel: channel.declare_queue(name, passive=True)
    ) as queue:
        yield queue


async def delete_queue(
    broker: Broker, queue: AbstractQueue, *, if_unused: bool, if_empty: bool
) -> None:
    """`queue` deleted, with the broker's guards where it has them: if unused, if empty.

    A quorum queue has none (RabbitMQ 3.x answers NOT_IMPLEMENTED, which closes the
    whole connection: the service's retirement of a reference's quorum `events_query`
    was a broker outage every minute, and `broker hand-back` could not finish on a
    quorum deployment). Such a queue, which the caller found unused and empty enough
    as it declared it, is deleted unguarded. The broker's refusals are the caller's to
    translate (a guard's, PRECONDITION_FAILED, left to it)."""
    guarded = (if_unused or if_empty) and await _is_classic(broker, queue.name)
    if guarded:
        await queue.delete(if_unused=if_unused, if_empty=if_empty)
    else:
        await queue.delete(if_unused=False, if_empty=False)


async def _is_classic(broker: Broker, name: str) -> bool:
    """Whether `name` is a classic queue as the reference declares them: declared so (durable,
    no arguments) on a channel of its own, which the broker refuses, closing that channel
    alone, for a queue of another type (or other arguments). A queue deleted meanwhile is
    made again so: classic, empty, unused."""
    channel = await broker.channel()
    try:
        with translated():
            try:
                await channel.declare_queue(name, durable=True)
            except aiormq.exceptions.ChannelPreconditionFailed:
                return False
        return True
    finally:
        await close_channel(channel)


@contextlib.asynccontextmanager
async def _passively(
    broker: Broker, declare: Callable[[AbstractChannel], Awaitable[T]]
) -> AsyncIterator[T | None]:
    """What `declare` (a passive declaration) gives on a channel of its own, None when the
    broker has no such queue or exchange (it closes the channel then)."""
    channel = await broker.channel()
    try:
        with translated():
            try:
                declared: T | None = await declare(channel)
            except aiormq.exceptions.ChannelNotFoundEntity as error:
                if not gone(error):
                    raise  # an outage of the broker's, said as such
                declared = None
        yield declared
    finally:
        await close_channel(channel)


def gone(error: aiormq.exceptions.ChannelNotFoundEntity) -> bool:
    """Whether the broker's NOT_FOUND says it has no such queue or exchange. It says so too
    of a classic durable queue whose home node is down or out of reach (a node of a
    cluster stopped), which it still has: taken for a queue deleted, it would be said
    lost with what it held, and it is back with its node."""
    return "home node" not in str(error)


async def queue_depth(broker: Broker, name: str) -> QueueDepth | None:
    """The queue's depth; None when the broker has no such queue."""
    async with existing_queue(broker, name) as queue:
        return None if queue is None else depth_of(queue)


def depth_of(queue: AbstractQueue) -> QueueDepth:
    """The depth the broker said of `queue` when it was declared."""
    declared = queue.declaration_result
    return QueueDepth(queue.name, declared.message_count or 0, declared.consumer_count or 0)


# What a queue's name may be: the AMQP client refuses any other before asking the broker.
QUEUE_NAME_RULE = "at most 255 bytes of letters, digits, spaces and -_.:@#,/+"


def is_queue_name(name: str) -> bool:
    """Whether `name` follows QUEUE_NAME_RULE."""
    return len(name.encode()) <= 255 and bool(DOMAIN_REGEX["queue-name"].fullmatch(name))


async def queue_exists(broker: Broker, name: str) -> bool:
    """Whether the broker has the queue `name` (never one that is no queue name)."""
    return is_queue_name(name) and await queue_depth(broker, name) is not None


async def exchange_exists(broker: Broker, name: str) -> bool:
    """Whether the broker has the exchange `name` (`_passively`)."""
    async with _passively(
        broker, lambda channel: channel.declare_exchange(name, passive=True)
    ) as exchange:
        return exchange is not None
