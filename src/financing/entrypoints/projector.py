"""The projector: folds the events on the `events` exchange into the read models.

It consumes a queue of its own name, declared with `x-single-active-consumer`,
so only one instance projects at a time and events are applied in the order
the broker delivers them. When it falls behind it takes everything already
delivered (up to `batch_size`), applies it in one transaction and only then
acks it.

- Messages it does not project (integration events, commands) are acked.
- A poison message (bad headers, bad JSON) is dead-lettered with its reason,
  then acked; the messages around it are projected as usual.
- A batch that cannot be applied is retried, with backoff, until it can; none
  of its messages is acked meanwhile. This covers the database being down, and
  also any other error: skipping an event would silently diverge the read
  models, so an unexpected error stops the projection (logged loudly) instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from financing.adapters.rabbitmq.consumer import ACK_TIMEOUT
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.envelopes import (
    AGGREGATE_ID_HEADER,
    MESSAGE_UUID_HEADER,
    NAME_HEADER,
    from_amqp,
    header_text,
    readable_name,
)
from financing.adapters.rabbitmq.publisher import BROKER_ERRORS
from financing.adapters.rabbitmq.topology import declare_event_queue
from financing.application import codec
from financing.application.errors import PoisonMessage
from financing.application.ports import Envelope
from financing.application.read_models import (
    PROJECTED_EVENTS,
    ReadModelStore,
    ReadModelsUnavailable,
)
from financing.domain.events import DomainEvent
from financing.logging import get_logger

log = get_logger(__name__)

# Our own name (not the reference's `events_query`): it carries an x-argument.
PROJECTOR_QUEUE = "events_financing_projector"
QUEUE_ARGUMENTS = {"x-single-active-consumer": True}


RETRY_INITIAL_DELAY = 0.1
RETRY_MAX_DELAY = 5.0


@dataclass(frozen=True)
class _Event:
    message: AbstractIncomingMessage
    envelope: Envelope
    event: DomainEvent


@dataclass(frozen=True)
class _Poison:
    message: AbstractIncomingMessage
    reason: str


@dataclass(frozen=True)
class _Ignored:
    message: AbstractIncomingMessage
    name: str


_Delivery = _Event | _Poison | _Ignored


async def run_projector(
    connection: AbstractRobustConnection,
    read_models: ReadModelStore,
    dead_letters: DeadLetters,
    *,
    batch_size: int = 100,
    redeliver_times: int = 1,
    infrastructure_errors: tuple[type[BaseException], ...] = (),
    consuming: asyncio.Event | None = None,
) -> None:
    """Project until cancelled; `consuming` is set once the queue delivers to it.

    `redeliver_times` (tests only) applies every batch that many times, as a
    redelivery storm would: the read models must come out the same.
    `infrastructure_errors` are the errors expected while a dependency is down;
    they are retried quietly, anything else is retried with its traceback logged.
    """
    if batch_size < 1 or redeliver_times < 1:
        raise ValueError("batch_size and redeliver_times must be >= 1")
    expected: tuple[type[BaseException], ...] = (ReadModelsUnavailable, *infrastructure_errors)
    channel = await connection.channel()
    try:
        # The broker delivers at most one batch ahead of what was acked.
        await channel.set_qos(prefetch_count=batch_size)
        queue = await declare_event_queue(channel, PROJECTOR_QUEUE, arguments=QUEUE_ARGUMENTS)
        delivered: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            delivered.put_nowait(message)  # synchronous: keeps delivery order

        # A robust channel restores this consumer after a reconnection.
        await queue.consume(on_message)
        log.info("projector started", queue=PROJECTOR_QUEUE, batch_size=batch_size)
        if consuming is not None:
            consuming.set()
        while True:
            messages = [await delivered.get()]
            while len(messages) < batch_size and not delivered.empty():
                messages.append(delivered.get_nowait())
            batch = [_classify(message) for message in messages]
            await _apply(read_models, batch, redeliver_times, expected)
            await _settle(batch, dead_letters)
    finally:
        if not channel.is_closed:
            await asyncio.shield(channel.close())


def _classify(message: AbstractIncomingMessage) -> _Delivery:
    name = readable_name(message)
    if name is not None and name not in PROJECTED_EVENTS:
        return _Ignored(message, name)
    try:
        envelope = from_amqp(message)
        if envelope.name not in PROJECTED_EVENTS:
            return _Ignored(message, envelope.name)
        event = codec.decode(envelope.name, envelope.body, envelope.aggregate_id)
    except PoisonMessage as exc:
        return _Poison(message, str(exc))
    assert isinstance(event, DomainEvent)  # PROJECTED_EVENTS names domain events only
    return _Event(message, envelope, event)


async def _apply(
    read_models: ReadModelStore,
    batch: Sequence[_Delivery],
    redeliver_times: int,
    expected: tuple[type[BaseException], ...],
) -> None:
    events = [(d.envelope.message_id, d.event) for d in batch if isinstance(d, _Event)]
    if not events:
        return
    delay = RETRY_INITIAL_DELAY
    while True:
        try:
            for _ in range(redeliver_times):
                await read_models.apply(events)
        except expected as exc:
            log.warning(
                "projection failed, retrying",
                events=len(events),
                first_message_id=events[0][0],
                error=str(exc),
                retry_in=delay,
            )
        except Exception:
            log.exception(
                "projection failed unexpectedly, retrying",
                events=len(events),
                first_message_id=events[0][0],
                retry_in=delay,
            )
        else:
            for delivery in batch:
                if isinstance(delivery, _Event):
                    log.debug(
                        "event projected",
                        name=delivery.envelope.name,
                        message_id=delivery.envelope.message_id,
                        aggregate_id=delivery.envelope.aggregate_id,
                    )
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_DELAY)


async def _settle(batch: Sequence[_Delivery], dead_letters: DeadLetters) -> None:
    """Dead-letter the poison messages, then ack the whole batch."""
    settled: list[AbstractIncomingMessage] = []
    for delivery in batch:
        if isinstance(delivery, _Poison):
            if not await _dead_letter(delivery, dead_letters):
                continue
        elif isinstance(delivery, _Ignored):
            log.debug("message not projected, ignored", name=delivery.name)
        settled.append(delivery.message)
    await _ack(settled)


async def _dead_letter(poison: _Poison, dead_letters: DeadLetters) -> bool:
    """Whether the poison message is now kept as a dead letter (and may be acked)."""
    message = poison.message
    headers = message.headers or {}
    log.error(
        "poison message, dead-lettering it",
        reason=poison.reason,
        name=header_text(headers.get(NAME_HEADER)),
        message_id=header_text(headers.get(MESSAGE_UUID_HEADER)),
        aggregate_id=header_text(headers.get(AGGREGATE_ID_HEADER)),
        queue=PROJECTOR_QUEUE,
    )
    if await dead_letters.keep(message, reason=poison.reason, source_queue=PROJECTOR_QUEUE):
        return True
    log.warning("cannot dead-letter, left for redelivery", queue=PROJECTOR_QUEUE)
    return False


async def _ack(messages: Sequence[AbstractIncomingMessage]) -> None:
    """Ack in delivery order, all within ACK_TIMEOUT.

    When an ack fails, the channel died after the work was done: the broker
    delivers the message again and the read models skip it by its message id.
    """
    try:
        async with asyncio.timeout(ACK_TIMEOUT):
            results = await asyncio.gather(
                *(message.ack() for message in messages), return_exceptions=True
            )
    except TimeoutError:
        log.warning("acks not written in time, messages will be redelivered", count=len(messages))
        return
    for result in results:
        if isinstance(result, BROKER_ERRORS):
            log.warning("ack failed, message will be redelivered", error=repr(result))
        elif isinstance(result, BaseException):
            raise result
