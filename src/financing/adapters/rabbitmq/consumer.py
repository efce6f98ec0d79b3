"""Consuming a queue: the channel kept open, and each delivery settled by its outcome.

`QueueConsumer` keeps one queue consumed for as long as it runs. When its
channel closes (the connection dropped, the broker closed the channel) it
opens a new one through the `Broker` and consumes again; unacked messages of
the old channel go back to the queue and are delivered again.

`AmqpDelivery` is a delivery as the application's pipeline sees it; its
`settle` is the one place where a message is acked or dead-lettered: acked
only after its outcome is final (the handler's transaction committed, or its
dead-letter copy was confirmed). Anything else leaves it unacked and the
broker delivers it again, where the exactly-once records absorb the duplicate.
The acks of a channel go out through its `ChannelAcks`, which writes the acks
asked for together in as few frames as their order allows.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, ConsumerTag
from aiormq.exceptions import ChannelClosed

from financing import metrics
from financing.adapters.rabbitmq.acks import ChannelAcks
from financing.adapters.rabbitmq.connection import (
    Broker,
    broker_errors_ignored,
    close_channel,
    describe,
    is_broker_error,
    translated,
)
from financing.adapters.rabbitmq.dead_letters import (
    DeadLetters,
    NotDeferrable,
    came_back_late,
    deferred_for,
    past_wait_from,
)
from financing.adapters.rabbitmq.envelopes import (
    AGGREGATE_ID_HEADER,
    MAX_MESSAGE_ID_BYTES,
    MESSAGE_UUID_HEADER,
    delivery_channel_open,
    from_amqp,
    header_text,
    readable_name,
    shortened,
)
from financing.adapters.rabbitmq.topology import (
    QueueSpec,
    said_consumed_again,
    said_declared_anew,
)
from financing.application.errors import Refused, Unavailable
from financing.application.pipeline import Outcome, OutcomeKind, Step
from financing.application.ports import (
    CAUSATION_HEADER,
    CORRELATION_HEADER,
    RECORDED_AT_HEADER,
    Envelope,
    usable_correlation_id,
)
from financing.application.retry import NO_BUG_RETRIES, GaveUp, Outages, retry_or_raise
from financing.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# The characters of a header value a log line shows: as many as a message id may have.
LOGGED_HEADER_CHARS = MAX_MESSAGE_ID_BYTES

# An ack is one frame to write, but on a connection that has just died aiormq
# can wait forever for room in its write buffer.
ACK_TIMEOUT = 5.0
# Seconds a message whose settling failed is held before it is given back.
RELEASE_PAUSE = 1.0
# On cancellation, how long in-flight messages may take to finish: within the grace the
# service gives its components (`grace.SHUTDOWN_GRACE`).
IN_FLIGHT_GRACE = 3.0

SETTLED_BY_ACK = frozenset(
    {OutcomeKind.PROCESSED, OutcomeKind.UNCHANGED, OutcomeKind.DUPLICATE, OutcomeKind.IGNORED}
)


class AmqpDelivery:
    """One delivered AMQP message, as the pipeline's `Delivery`."""

    def __init__(
        self,
        message: AbstractIncomingMessage,
        source: str,
        dead_letters: DeadLetters,
        acks: ChannelAcks,
        abandon: Callable[[str], None],
    ) -> None:
        self._message = message
        self._source = source
        self._dead_letters = dead_letters
        self._acks = acks
        self._abandon = abandon  # give up the channel, so that the broker delivers again
        self._tag = message.delivery_tag or 0

    @property
    def source(self) -> str:
        return self._source

    @property
    def name(self) -> str | None:
        return readable_name(self._message)

    def envelope(self) -> Envelope:
        return from_amqp(self._message)

    def deliverable(self) -> bool:
        return delivery_channel_open(self._message)

    @property
    def waited(self) -> float:
        return deferred_for(self._message)

    @property
    def late(self) -> bool:
        return came_back_late(self._message)

    @property
    def past_wait_from(self) -> float | None:
        return past_wait_from(self._message)

    def log_fields(self) -> dict[str, Any]:
        """What identifies the message in every log line about it, read leniently, each
        value at most LOGGED_HEADER_CHARS long: a publisher's headers of any length were
        copied whole into every line (250 KB lines, the log growing faster than what was
        published)."""
        headers = self._message.headers or {}
        message_id = header_text(headers.get(MESSAGE_UUID_HEADER)) or self._message.message_id
        fields = {
            "queue": self._source,
            "name": self.name,
            "message_id": message_id,
            "aggregate_id": header_text(headers.get(AGGREGATE_ID_HEADER)) or None,
        }
        # A message without a correlation, or with one that cannot be kept, starts one of
        # its own: its id (Envelope.correlation_id).
        correlation = header_text(headers.get(CORRELATION_HEADER))
        if not usable_correlation_id(correlation):
            correlation = message_id or ""
        if correlation:
            fields[CORRELATION_HEADER] = correlation
        if headers.get(CAUSATION_HEADER) is not None:
            fields[CAUSATION_HEADER] = header_text(headers.get(CAUSATION_HEADER))
        return {
            key: shortened(value, LOGGED_HEADER_CHARS) if isinstance(value, str) else value
            for key, value in fields.items()
        }

    async def settle(self, outcome: Outcome) -> None:
        """`_settle`; a bug in settling (a dead letter the retries gave up on) is logged
        and the message given back (`given_back_after`): raised, it stopped the projector,
        which settles a batch at once, and with it the service, again at each start."""
        try:
            await self._settle(outcome)
        except Exception as error:
            await self.given_back_after(error, "settling a delivery failed")

    async def given_back_after(self, error: Exception, what: str) -> None:
        """After a bug: logged, then the message is given back after a pause, freeing its
        slot, so that what fails for good (a dead-letter queue the broker refuses) is not
        tried again hundreds of times a second."""
        log.error(what, error=describe(error), exc_info=error)
        await asyncio.sleep(RELEASE_PAUSE)  # the pause before the broker's next try
        await self.release()

    async def _settle(self, outcome: Outcome) -> None:
        if outcome.kind in SETTLED_BY_ACK:
            await self._ack()
        elif outcome.kind is OutcomeKind.DEAD_LETTERED:
            if await self._dead_letters.keep(
                self._message, reason=outcome.detail, source_queue=self._source
            ):
                # At WARNING: most dead letters are refused commands (a domain rule);
                # a bug was logged as an error, with its traceback, when it gave up.
                log.warning("message dead-lettered", reason=outcome.detail)
                await self._ack()
            else:
                log.debug("delivery channel closed before dead-lettering; expecting a redelivery")
        elif outcome.kind is OutcomeKind.DEFERRED:
            try:
                deferred = await self._dead_letters.defer(
                    self._message,
                    source_queue=self._source,
                    delay=outcome.delay,
                    past_wait_from=outcome.past_wait_from,
                    reason=outcome.detail,
                )
            except (NotDeferrable, GaveUp) as refused:
                # Not for waiting (its size), or the broker refuses the deferrals' queue
                # for good (another queue type): kept aside, not redelivered for ever.
                reason = f"{outcome.detail}; it could not be deferred: {refused}"
                await self._settle(Outcome.dead_letter(reason))
                return
            if deferred:
                # Said once, when it is first put aside (at most one line when it is
                # dead-lettered too); each return is a line at DEBUG only: a message
                # waiting a minute came back a dozen times.
                (log.debug if self.waited else log.info)(
                    "message deferred",
                    reason=outcome.detail,
                    waited=round(self.waited, 1),
                    delay=outcome.delay,
                )
                await self._ack()
            else:
                log.debug("delivery channel closed before deferring; expecting a redelivery")
        else:
            log.debug("delivery channel closed; expecting a redelivery")

    async def _ack(self) -> None:
        try:
            async with asyncio.timeout(ACK_TIMEOUT):
                await self._acks.ack(self._tag)
        except Exception as error:
            if not is_broker_error(error):
                raise
            if delivery_channel_open(self._message):
                # The frame was not written (the connection blocked by a broker alarm
                # past the timeout): on a channel still open the broker would hold the
                # message unacked, and its prefetch slot, until the channel closes.
                self._abandon("an ack could not be written on the open channel")
            # The broker delivers the message again; deduplication absorbs the copy.
            log.debug("ack lost; expecting a redelivery")

    async def release(self) -> None:
        """Hand the message back to the broker for another delivery."""
        try:
            async with asyncio.timeout(ACK_TIMEOUT):
                await self._acks.settle_otherwise(self._tag, self._message.nack(requeue=True))
        except Exception as error:
            if not is_broker_error(error):
                raise
            if delivery_channel_open(self._message):
                # As for an ack: the broker gives the message to another delivery only
                # once the channel is closed.
                self._abandon("a delivery could not be given back on the open channel")


OnDelivery = Callable[[AmqpDelivery], None]


class _Ended(asyncio.Event):
    """Set once a consuming channel is to be given up; why, when it is still open."""

    reason = ""

    def end(self, reason: str) -> None:
        if not self.is_set():
            self.reason = reason
            self.set()


# Seconds between two looks at a queue whose declaration the broker refuses (declared
# again by someone else with other arguments), whatever the retry's pace: each look
# costs a channel the broker closes, and each closed channel leaves aiormq's callbacks on
# the connection (4 kB): at the retry's pace, 43 a minute, 20 MB an hour while it lasted.
REFUSED_PACE = 10.0
# Seconds the consumer's records may take to say when the event it processed last was
# recorded, as it consumes a queue deleted under it again; records that do not answer
# by then (a lock a DBA holds, an outage) are looked up again every RECORDS_PACE seconds,
# the consumer consuming meanwhile, for RECORDS_WAITED seconds at most.
LOOKED_UP_WITHIN = 5.0
RECORDS_PACE = 5.0
RECORDS_WAITED = 300.0

# When the event a consumer processed last before a time (its argument) was recorded,
# by its records, which every instance shares; None where no record says.
LastProcessed = Callable[[datetime], Awaitable[datetime | None]]
# What says a queue lost: given when the event processed last was recorded, and
# whether the records could not be read (`unread`).
Saying = Callable[[datetime | None, bool], None]


class QueueConsumer:
    """Keeps `queue` consumed, reopening its channel whenever it closes.

    `on_delivery` is called synchronously for every message, in delivery order.
    """

    def __init__(
        self,
        broker: Broker,
        queue: QueueSpec,
        dead_letters: DeadLetters,
        outages: Outages,
        on_delivery: OnDelivery,
        *,
        prefetch: int,
        last_processed: LastProcessed | None = None,
        consumed_before: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """`last_processed`: when the event its consumer processed last before a time, in
        any instance, was recorded (the consumer's records), to date what a queue deleted
        under it held; `consumed_before`, for a queue none of whose messages is an event
        of the store: whether the records say it was consumed before (its queue found
        missing as the process starts was deleted, not new)."""
        self._broker = broker
        self._last_processed = last_processed
        self._consumed_before = consumed_before
        # Declared with the broker's queue type, as everything declared on it is.
        self._queue = queue.of_type(broker.queue_type)
        self._dead_letters = dead_letters
        self._outages = outages
        self._on_delivery = on_delivery
        self._prefetch = prefetch
        self._channel: AbstractChannel | None = None
        self._acks: ChannelAcks | None = None  # the current channel's
        self._refused_at: float | None = None  # when its declaration was last refused
        # When the broker last cancelled the consumer, until it consumes again; and the
        # `recorded_at` of the last event delivered to it (what was queued behind it was
        # relayed after it).
        self._cancelled_at: datetime | None = None
        self._last_recorded: object = None
        # The `recorded_at` of the oldest delivery in hand as the broker cancelled the
        # consumer: lost with the queue too, as its channel gives it back.
        self._in_hand_recorded: object = None
        # Its queue was found missing (`found_missing`), until it consumes: as the process
        # started (False), or as the broker's connection was opened again (True).
        self._found_missing: bool | None = None
        # Lines that wait for the consumer's records (`_said`).
        self._saying: set[asyncio.Task[None]] = set()
        # The acks of the channel whose first delivery from a queue with a single active
        # consumer said that this process is that consumer now.
        self._active_on: ChannelAcks | None = None
        self.consuming = asyncio.Event()
        # Exported from 0: a rule's `increase` does not count a series born at 1, so the
        # first letters of a queue went unalerted, and a process's first cancel was
        # alerted by the rule's other half alone, which a restart ended at once.
        metrics.DEAD_LETTERS.labels(queue.name)
        metrics.CONSUMERS_CANCELLED.labels(queue.name)

    @property
    def spec(self) -> QueueSpec:
        return self._queue

    async def consumed_before(self) -> bool:
        """Whether the consumer's records say its queue was consumed before, by any
        instance (a deployment that ran before), as far as they answer within
        LOOKED_UP_WITHIN."""
        last_processed = self._last_processed
        if last_processed is not None:
            _, processed = await _looked_up(lambda: last_processed(datetime.now(UTC)))
            return processed is not None
        if self._consumed_before is not None:
            _, consumed = await _looked_up(self._consumed_before)
            return bool(consumed)
        return False

    def found_missing(self, *, reopened: bool = False) -> None:
        """Its queue was missing as the process started, or as the broker's connection was
        opened again (`reopened`), and was declared: said once it consumes
        (`said_declared_anew`), where the consumer's records say it was consumed before
        (not a new deployment's)."""
        self._found_missing = reopened

    async def run(self) -> None:
        """Consume until cancelled; `consuming` is set while the broker delivers to it."""
        first = True
        while True:
            channel, queue, tag, ended, acks = await self._retry_open()
            channel.close_callbacks.add(lambda *_, ended=ended: ended.set())
            if channel.is_closed:
                ended.set()
            # Said once; consuming again after an outage is said by the outage's end.
            (log.info if first else log.debug)("consuming", queue=self._queue.name)
            first = False
            self.consuming.set()
            try:
                await ended.wait()
                self.consuming.clear()
                if channel.is_closed:
                    log.debug("consumer channel closed; opening another", queue=self._queue.name)
                else:
                    # Given up while open (`_Ended`): what the channel holds unacked goes
                    # back to the queue, which is declared again.
                    log.warning(
                        "consuming again on a new channel",
                        queue=self._queue.name,
                        reason=ended.reason,
                    )
                    acks.close()
                    await close_channel(channel)
            finally:
                # Stopping, the consumer stops taking deliveries, and those it holds go
                # back to the queue when the channel is closed (`close`), after what is
                # in flight. A queue's single active consumer keeps consuming until
                # then: cancelled first, the broker made the next consumer active while
                # this one still held deliveries, which came back behind newer ones
                # (the projector's rows out of their order after a rolling restart).
                if not channel.is_closed and not self._queue.single_active_consumer:
                    with broker_errors_ignored():
                        await asyncio.wait_for(queue.cancel(tag), timeout=1.0)

    async def _retry_open(
        self,
    ) -> tuple[AbstractChannel, AbstractQueue, ConsumerTag, _Ended, ChannelAcks]:
        return await retry_or_raise(
            self._open,
            policy=NO_BUG_RETRIES,
            outages=self._outages,
            what=f"consuming {self._queue.name}",
        )

    async def _open(
        self,
    ) -> tuple[AbstractChannel, AbstractQueue, ConsumerTag, _Ended, ChannelAcks]:
        """A channel consuming the queue, what is set once it is to be given up (the
        caller also sets it when the channel closes), and its acks."""
        if self._refused_at is not None:
            # The pace at which a refused queue is looked at again (REFUSED_PACE).
            await asyncio.sleep(max(self._refused_at + REFUSED_PACE - time.monotonic(), 0.0))
        channel = await self._broker.channel(prefetch=self._prefetch)
        ended = _Ended()
        try:
            with translated():
                underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(lambda _: self._cancelled(ended))
            acks = ChannelAcks(lambda tag, multiple: underlay.basic_ack(tag, multiple=multiple))
            try:
                queue = await self._queue.declare(channel)
                with translated():
                    tag = await queue.consume(functools.partial(self._received, acks, ended.end))
            except Refused as error:
                # The queue made again under the service with other arguments or another
                # type: an outage of this queue alone until the operator mends it (it
                # stopped the whole service before, which could not start again).
                self._refused_at = time.monotonic()
                raise Unavailable(f"queue {self._queue.name}", error.detail) from error
            except Unavailable as error:
                if isinstance(error.__cause__, ChannelClosed) and self._broker.connected:
                    # The broker is there but will not let this queue be consumed (its
                    # permissions, an exclusive consumer elsewhere): an outage of the
                    # queue alone, which the broker's own check must not end.
                    raise Unavailable(f"queue {self._queue.name}", error.detail) from error
                raise
        except BaseException:
            await close_channel(channel)
            raise
        self._channel, self._acks = channel, acks
        self._refused_at = None
        if self._cancelled_at is not None:
            spec, cancelled_at = self._queue, self._cancelled_at
            delivered, in_hand = _moment(self._last_recorded), _moment(self._in_hand_recorded)
            self._cancelled_at, self._in_hand_recorded = None, None

            def consumed_again(processed: datetime | None, unread: bool) -> None:
                said_consumed_again(
                    spec, cancelled_at, delivered, processed, in_hand=in_hand, unread=unread
                )

            await self._said(cancelled_at, consumed_again)
        elif (reopened := self._found_missing) is not None and self._last_processed is not None:

            def declared_anew(processed: datetime | None, unread: bool) -> None:
                if processed is not None:  # none: a new deployment's queue, or unknown
                    said_declared_anew(self._queue, processed, reopened=reopened)

            await self._said(datetime.now(UTC), declared_anew)
        elif reopened is not None and self._consumed_before is not None:
            # Unknown (no answer) is not said, as a new deployment's queue is not.
            _, consumed = await _looked_up(self._consumed_before)
            if consumed:
                said_declared_anew(self._queue, None, reopened=reopened)
        self._found_missing = None
        return channel, queue, tag, ended, acks

    async def _said(self, before: datetime, say: Saying) -> None:
        """`say`, given when the event the consumer processed last before `before` was
        recorded: looked up now, within LOOKED_UP_WITHIN; where the records do not answer
        by then, said once they do, looked up in the background while the consumer
        consumes (a standby whose lookup met a DBA's lock said `undated` at once, and a
        rewind by its line missed 186 events), or `unread` after RECORDS_WAITED."""
        if self._last_processed is None:
            say(None, False)
            return
        ask = functools.partial(self._last_processed, before)
        answered, processed = await _looked_up(ask)
        if answered:
            say(processed, False)
            return
        task = asyncio.create_task(_said_later(ask, say))
        self._saying.add(task)
        task.add_done_callback(self._saying.discard)

    def _cancelled(self, ended: _Ended) -> None:
        """The broker cancelled the consumer: its queue deleted, or the node holding it
        down (`said_consumed_again` once it consumes again)."""
        if self._cancelled_at is None:
            self._cancelled_at = datetime.now(UTC)
            if self._acks is not None:
                self._in_hand_recorded = self._acks.oldest_unsettled()
        ended.end(
            "the broker cancelled the consumer (its queue deleted, or the cluster node"
            " holding it down)"
        )

    async def _received(
        self,
        acks: ChannelAcks,
        abandon: Callable[[str], None],
        message: AbstractIncomingMessage,
    ) -> None:
        recorded = message.headers.get(RECORDED_AT_HEADER) if message.headers else None
        if message.delivery_tag is not None:
            acks.delivered(message.delivery_tag, recorded)
        if recorded is not None:
            self._last_recorded = recorded
        if self._queue.single_active_consumer and self._active_on is not acks:
            # RabbitMQ tells a consumer nothing when it becomes the active one (after a
            # take-over, or as the first): its first delivery says so, once per channel.
            self._active_on = acks
            log.info(
                "deliveries come to this process: the active consumer of its queue",
                queue=self._queue.name,
            )
        self._on_delivery(
            AmqpDelivery(message, self._queue.name, self._dead_letters, acks, abandon)
        )

    async def close(self) -> None:
        """Close the current channel: every message not yet acked goes back to the queue.
        A line still waiting for the consumer's records is not said."""
        for task in self._saying:
            task.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            if self._acks is not None:
                self._acks.close()
            await close_channel(channel)


async def _said_later(ask: Callable[[], Awaitable[datetime | None]], say: Saying) -> None:
    """`say` once the records answer `ask`, asked every RECORDS_PACE seconds; `unread`
    after RECORDS_WAITED."""
    waited_until = time.monotonic() + RECORDS_WAITED
    while time.monotonic() < waited_until:
        await asyncio.sleep(RECORDS_PACE)  # the records' pace, not a condition's wait
        answered, processed = await _looked_up(ask)
        if answered:
            say(processed, False)
            return
    say(None, True)


async def _looked_up(ask: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Whether the consumer's records answered `ask` within LOOKED_UP_WITHIN, and what
    they answered if they did."""
    try:
        async with asyncio.timeout(LOOKED_UP_WITHIN):
            return True, await ask()
    except (TimeoutError, Unavailable):
        return False, None


def _moment(value: object) -> datetime | None:
    """A `recorded_at` header's time; None where it is none (a foreign publisher's)."""
    try:
        at = datetime.fromisoformat(header_text(value)) if value is not None else None
    except ValueError:
        return None
    return at if at is not None and at.tzinfo is not None else None


class Deliveries:
    """Runs `step` on each delivery of a queue, concurrently up to the prefetch, and
    settles it by its outcome."""

    def __init__(self, step: Step, *, shutdown_grace: float = IN_FLIGHT_GRACE) -> None:
        self._step = step
        self._shutdown_grace = shutdown_grace
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    def receive(self, delivery: AmqpDelivery) -> None:
        if self._stopping:
            return  # left unacked: back to the queue when the channel closes
        task = asyncio.create_task(self._deliver(delivery))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _deliver(self, delivery: AmqpDelivery) -> None:
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(**delivery.log_fields()):
            try:
                outcome = await self._step(delivery)
            except Exception as error:  # a bug of the step: it classifies what it raises
                await delivery.given_back_after(error, "handling a delivery failed")
                return
            await delivery.settle(outcome)
            metrics.settled(
                delivery.source, outcome.kind.value, time.perf_counter() - started, outcome.events
            )

    async def stop(self) -> None:
        """Take no more deliveries; give the ones in flight a grace period, then cancel them."""
        self._stopping = True
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=self._shutdown_grace)
        pending = set(self._in_flight)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def consume(consumer: QueueConsumer, deliveries: Deliveries) -> None:
    """Run a consumer whose deliveries go through `deliveries`, until cancelled."""
    try:
        await consumer.run()
    finally:
        await deliveries.stop()
        await consumer.close()
