"""What the broker says of a queue: how many messages wait in it, how many consumers read it."""

from __future__ import annotations

from dataclasses import dataclass

import aiormq

from financing.adapters.rabbitmq.connection import Broker, close_channel, translated


@dataclass(frozen=True)
class QueueDepth:
    name: str
    waiting: int  # messages ready to be delivered (not those delivered and unacked)
    consumers: int


async def queue_depth(broker: Broker, name: str) -> QueueDepth | None:
    """The queue's depth by passive declaration; None when the broker has no such queue.

    A passive declaration of a missing queue closes the channel, so each
    inquiry has a channel of its own.
    """
    channel = await broker.channel()
    try:
        with translated():
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
        declared = queue.declaration_result
        return QueueDepth(name, declared.message_count or 0, declared.consumer_count or 0)
    finally:
        await close_channel(channel)
