"""Publishing with publisher confirms: a publish returns once the broker holds the message.

Every publish is bounded by `confirm_timeout`, so a caller (a gRPC request,
a consumer dead-lettering a message) fails fast while the broker is down
instead of waiting for the robust connection to come back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import suppress
from uuid import UUID

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractMessage,
    AbstractRobustConnection,
)

from financing.adapters.rabbitmq.envelopes import header_text, to_amqp
from financing.adapters.rabbitmq.topology import declare_command_queue, declare_events_exchange
from financing.application import codec
from financing.application.messages import Command
from financing.application.ports import Envelope

# What the broker or the connection to it can raise.
BROKER_ERRORS: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)


class PublishFailed(Exception):
    """The broker did not confirm a publish: nacked, unroutable, timed out or disconnected.

    The message may or may not have reached the broker; publishing it again
    is safe because every consumer deduplicates by message id.
    """


class Publisher:
    """One channel with publisher confirms, shared by concurrent callers."""

    def __init__(
        self, channel: AbstractChannel, events: AbstractExchange, confirm_timeout: float
    ) -> None:
        self._channel = channel
        self._events = events
        self._confirm_timeout = confirm_timeout

    @classmethod
    async def open(
        cls, connection: AbstractRobustConnection, *, confirm_timeout: float = 5.0
    ) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        events = await declare_events_exchange(channel)
        return cls(channel, events, confirm_timeout)

    @property
    def channel(self) -> AbstractChannel:
        return self._channel

    @property
    def confirm_timeout(self) -> float:
        return self._confirm_timeout

    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        """Publish to the `events` exchange, in order; returns when all are confirmed.

        All publishes are put in flight before any confirm is awaited: the
        channel writes them in call order, and awaiting confirms one by one
        would cap throughput at a fraction of this.
        """
        if not envelopes:
            return
        what = f"{len(envelopes)} event(s) to {self._events.name!r}"
        await self._confirmed(
            what, [(self._events, to_amqp(envelope), "") for envelope in envelopes]
        )

    async def send_to_queue(self, queue: str, envelope: Envelope) -> None:
        """Publish to `queue` through the default exchange; unroutable means failure."""
        await self.send_message_to_queue(queue, to_amqp(envelope))

    async def send_message_to_queue(self, queue: str, message: AbstractMessage) -> None:
        what = f"{header_text(message.headers.get('name', 'message'))} to queue {queue!r}"
        await self._confirmed(what, [(self._channel.default_exchange, message, queue)])

    async def _confirmed(
        self, what: str, publishes: Sequence[tuple[AbstractExchange, AbstractMessage, str]]
    ) -> None:
        try:
            async with asyncio.timeout(self._confirm_timeout):
                results = await asyncio.gather(
                    *(
                        exchange.publish(message, routing_key, mandatory=True)
                        for exchange, message, routing_key in publishes
                    ),
                    return_exceptions=True,
                )
        except TimeoutError:
            raise PublishFailed(f"{what}: not confirmed within {self._confirm_timeout} s") from None
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                raise PublishFailed(f"{what}: {_describe(result)}") from result
            if not isinstance(result, aiormq.spec.Basic.Ack):
                raise PublishFailed(f"{what}: not acknowledged by the broker ({result!r})")

    async def close(self) -> None:
        # Also while disconnected: a closed robust channel is not restored later.
        with suppress(*BROKER_ERRORS):
            await asyncio.wait_for(self._channel.close(), timeout=self._confirm_timeout)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiormq.exceptions.PublishError):
        return f"returned as unroutable ({getattr(exc.frame, 'reply_text', '')})"
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return "rejected (nack) by the broker"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AmqpCommandSender:
    """Sends a command to the queue named after it (contract.md section 2).

    The queue is declared (durable, no arguments, like the reference) before
    the first send, so a command accepted before its handler ever started is
    kept rather than returned as unroutable.
    """

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._declared: set[str] = set()

    async def send(self, command: Command, message_id: UUID) -> None:
        queue = command.name()
        if queue not in self._declared:
            try:
                async with asyncio.timeout(self._publisher.confirm_timeout):
                    await declare_command_queue(self._publisher.channel, queue)
            except TimeoutError:
                raise PublishFailed(f"{queue}: queue not declared within the timeout") from None
            except BROKER_ERRORS as exc:
                raise PublishFailed(f"{queue}: cannot declare its queue: {_describe(exc)}") from exc
            self._declared.add(queue)
        envelope = Envelope(message_id=str(message_id), name=queue, body=codec.encode(command))
        try:
            await self._publisher.send_to_queue(queue, envelope)
        except PublishFailed:
            # Declare again next time, in case the queue was deleted meanwhile.
            self._declared.discard(queue)
            raise


__all__ = ["AmqpCommandSender", "PublishFailed", "Publisher"]
