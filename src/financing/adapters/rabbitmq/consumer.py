"""Consuming one queue: decode, process with retries, ack only after the commit.

A message is acked only after `Subscription.process` returned (its
transaction committed) or after its dead-letter copy was confirmed, so
nothing is lost: anything else leaves it unacked and the broker redelivers
it, where the exactly-once wrapper absorbs the duplicate.
"""

from __future__ import annotations

import asyncio
import random
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ConsumerTag,
)

from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.envelopes import (
    AGGREGATE_ID_HEADER,
    MESSAGE_UUID_HEADER,
    NAME_HEADER,
    delivery_channel_open,
    from_amqp,
    header_text,
    readable_name,
)
from financing.adapters.rabbitmq.publisher import BROKER_ERRORS as PUBLISH_ERRORS
from financing.adapters.rabbitmq.publisher import PublishFailed
from financing.adapters.rabbitmq.topology import (
    declare_command_queue,
    declare_dead_letter_queue,
    declare_event_queue,
)
from financing.application import codec
from financing.application.errors import (
    ConcurrencyConflict,
    MissingAggregate,
    PoisonMessage,
    RuleViolation,
)
from financing.application.messages import Message
from financing.application.ports import Envelope
from financing.application.processing import Subscription
from financing.logging import get_logger

log = get_logger(__name__)

# Errors of the broker connection: transient, retried for as long as the service runs.
BROKER_ERRORS: tuple[type[BaseException], ...] = (PublishFailed, *PUBLISH_ERRORS)

# On cancellation, how long in-flight messages may take to finish.
SHUTDOWN_GRACE = 3.0
# An ack is one frame to write, but on a connection that has just died aiormq
# can wait forever for room in its write buffer.
ACK_TIMEOUT = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    base_delay: float = 0.05  # first backoff; doubles on each attempt
    max_delay: float = 5.0
    max_attempts: int = 5  # unexpected errors, then dead-letter
    missing_attempts: int = 7  # MissingAggregate: about 3 s of backoff, then dead-letter
    conflict_attempts: int = 100  # ConcurrencyConflict: retried soon, almost unbounded

    def backoff(self, attempt: int) -> float:
        """Capped exponential delay before retry number `attempt` (from 1), jittered."""
        delay = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 30))
        return delay / 2 + random.uniform(0, delay / 2)

    def conflict_delay(self) -> float:
        # Spread competing writers apart; the winner has already committed.
        return random.uniform(0, self.base_delay)


@dataclass(frozen=True)
class _Done:
    pass


@dataclass(frozen=True)
class _Reject:
    reason: str


@dataclass(frozen=True)
class _Abandon:
    """The delivery channel closed: the broker redelivers the message."""


_Outcome = _Done | _Reject | _Abandon


async def run_subscription(
    connection: AbstractRobustConnection,
    subscription: Subscription,
    dead_letters: DeadLetters,
    *,
    prefetch: int = 32,
    retry: RetryPolicy = RetryPolicy(),  # frozen, hence safely shared
    redeliver_times: int = 1,
    infrastructure_errors: tuple[type[BaseException], ...] = (),
    shutdown_grace: float = SHUTDOWN_GRACE,
    consuming: asyncio.Event | None = None,
) -> None:
    """Consume `subscription.queue` until cancelled; `consuming` is set once it consumes.

    On cancellation it stops consuming, gives in-flight messages
    `shutdown_grace` seconds to finish, then returns; unacked messages go
    back to the queue.

    `redeliver_times` > 1 (for tests) processes every message that many
    times, to prove that processing is idempotent under redelivery storms.
    """
    consumer = _Consumer(
        subscription, dead_letters, retry, redeliver_times, BROKER_ERRORS + infrastructure_errors
    )
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.set_qos(prefetch_count=prefetch)
        if subscription.from_events:
            queue = await declare_event_queue(channel, subscription.queue)
        else:
            queue = await declare_command_queue(channel, subscription.queue)
        await declare_dead_letter_queue(channel)
        # A robust queue re-registers this consumer after a reconnection.
        tag = await queue.consume(consumer.on_message)
        log.info("consuming", queue=subscription.queue, handles=subscription.message_name)
        if consuming is not None:
            consuming.set()
        try:
            await asyncio.Event().wait()
        finally:
            await consumer.stop(queue, tag, shutdown_grace)
    finally:
        # Closing returns every unacked message to the queue; closing it even
        # while disconnected keeps the robust connection from restoring it.
        with suppress(*BROKER_ERRORS):
            await asyncio.wait_for(channel.close(), timeout=2.0)


class _Consumer:
    def __init__(
        self,
        subscription: Subscription,
        dead_letters: DeadLetters,
        retry: RetryPolicy,
        redeliver_times: int,
        infrastructure_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._subscription = subscription
        self._queue = subscription.queue
        self._dead_letters = dead_letters
        self._retry = retry
        self._redeliver_times = max(1, redeliver_times)
        self._infrastructure = infrastructure_errors
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # left unacked: back to the queue when the channel closes
        task = asyncio.create_task(self._handle(message))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def stop(self, queue: AbstractQueue, tag: ConsumerTag, grace: float) -> None:
        self._stopping = True
        with suppress(*BROKER_ERRORS):
            await asyncio.wait_for(queue.cancel(tag), timeout=1.0)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace)
        pending = set(self._in_flight)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle_message(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not kill the consumer; the message stays unacked.
            log.exception("message handling failed", **self._fields(message, None))

    async def _handle_message(self, message: AbstractIncomingMessage) -> None:
        name = readable_name(message)
        if name is not None and name != self._subscription.message_name:
            if not self._subscription.from_events:
                # A command queue holds its one command: anything else was
                # misrouted, and acking it would lose it without a trace.
                reason = f"a {name!r} message on the {self._queue!r} command queue"
                await self._dead_letter(message, None, reason)
                return
            log.debug("ignoring message of another name", **self._fields(message, None))
            await self._ack(message, None)
            return
        try:
            envelope = from_amqp(message)
        except PoisonMessage as exc:
            await self._dead_letter(message, None, str(exc))
            return
        try:
            decoded = codec.decode(envelope.name, envelope.body, envelope.aggregate_id)
        except PoisonMessage as exc:
            await self._dead_letter(message, envelope, str(exc))
            return
        outcome = await self._process_times(message, envelope, decoded)
        if isinstance(outcome, _Done):
            await self._ack(message, envelope)
        elif isinstance(outcome, _Reject):
            await self._dead_letter(message, envelope, outcome.reason)
        else:
            log.info(
                "delivery channel closed; the message will be redelivered",
                **self._fields(message, envelope),
            )

    async def _process_times(
        self, message: AbstractIncomingMessage, envelope: Envelope, decoded: Message
    ) -> _Outcome:
        outcomes: list[_Outcome] = []
        if self._redeliver_times > 1:
            outcomes += await asyncio.gather(
                *(
                    self._process(message, envelope, decoded)
                    for _ in range(self._redeliver_times - 1)
                )
            )
        outcomes.append(await self._process(message, envelope, decoded))
        for outcome in outcomes:
            if isinstance(outcome, _Abandon):
                return outcome
        for outcome in outcomes:
            if isinstance(outcome, _Reject):
                return outcome
        return _Done()

    async def _process(
        self, message: AbstractIncomingMessage, envelope: Envelope, decoded: Message
    ) -> _Outcome:
        retry = self._retry
        missing = conflicts = failures = outages = 0
        while True:
            try:
                await self._subscription.process(envelope, decoded)
                return _Done()
            except MissingAggregate as exc:
                missing += 1
                if missing >= retry.missing_attempts:
                    return _Reject(f"{exc} (still missing after {missing} attempts)")
                delay = retry.backoff(missing)
                log.debug("aggregate missing; retrying", **self._fields(message, envelope))
            except (PoisonMessage, RuleViolation) as exc:
                return _Reject(f"{type(exc).__name__}: {exc}")
            except ConcurrencyConflict:
                conflicts += 1
                if conflicts >= retry.conflict_attempts:
                    return _Reject(f"concurrency conflict persisted over {conflicts} attempts")
                delay = retry.conflict_delay()
            except self._infrastructure as exc:
                outages += 1
                delay = retry.backoff(outages)
                if outages == 1 or outages % 10 == 0:
                    log.warning(
                        "infrastructure unavailable; retrying",
                        error=f"{type(exc).__name__}: {exc}",
                        attempt=outages,
                        **self._fields(message, envelope),
                    )
            except Exception as exc:
                failures += 1
                if failures >= retry.max_attempts:
                    return _Reject(f"{type(exc).__name__}: {exc} (after {failures} attempts)")
                delay = retry.backoff(failures)
                log.warning(
                    "processing failed; retrying",
                    attempt=failures,
                    exc_info=True,
                    **self._fields(message, envelope),
                )
            if not delivery_channel_open(message):
                return _Abandon()
            await asyncio.sleep(delay)
            if not delivery_channel_open(message):
                return _Abandon()

    async def _dead_letter(
        self, message: AbstractIncomingMessage, envelope: Envelope | None, reason: str
    ) -> None:
        fields = self._fields(message, envelope)
        if not await self._dead_letters.keep(message, reason=reason, source_queue=self._queue):
            log.info("delivery channel closed before dead-lettering", **fields)
            return
        log.error("message dead-lettered", reason=reason, **fields)
        await self._ack(message, envelope)

    async def _ack(self, message: AbstractIncomingMessage, envelope: Envelope | None) -> None:
        try:
            async with asyncio.timeout(ACK_TIMEOUT):
                await message.ack()
        except BROKER_ERRORS:
            # The channel died after processing: the broker redelivers the
            # message and the consumer's deduplication absorbs it.
            log.info(
                "ack lost with its channel; expecting a redelivery",
                **self._fields(message, envelope),
            )

    def _fields(
        self, message: AbstractIncomingMessage, envelope: Envelope | None
    ) -> dict[str, Any]:
        if envelope is not None:
            return {
                "name": envelope.name,
                "message_id": envelope.message_id,
                "aggregate_id": envelope.aggregate_id,
                "queue": self._queue,
            }
        headers = message.headers or {}
        return {
            "name": header_text(headers.get(NAME_HEADER)),
            "message_id": header_text(headers.get(MESSAGE_UUID_HEADER)) or message.message_id,
            "aggregate_id": header_text(headers.get(AGGREGATE_ID_HEADER)) or None,
            "queue": self._queue,
        }
