"""Publishing with publisher confirms: a publish returns once the broker holds the message.

Every publish is bounded by `confirm_timeout`, so a caller (a gRPC request,
a consumer dead-lettering a message) fails fast while the broker is down
instead of waiting for it to come back; once more when the process was too busy
to read the confirm in time (`financing.cpu.patient_timeout`). The publisher's channels are
its own: when the broker closes one (the connection dropped, permissions were revoked
for a moment), the next publish opens a new one.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractMessage

from financing.adapters.rabbitmq.connection import (
    BROKER,
    Broker,
    SharedAttempt,
    close_channel,
    describe,
    failed_by_a_lost_connection,
    is_broker_error,
    translated,
)
from financing.adapters.rabbitmq.envelopes import header_text, to_amqp
from financing.adapters.rabbitmq.queues import QueueDepth, depth_of, gone
from financing.adapters.rabbitmq.topology import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTERS,
    DEFERRALS,
    EVENTS_EXCHANGE,
    EVENTS_ROUTER,
    Declaration,
    QueueSpec,
    command_queue,
    declarations,
    declare_deferrals,
    declare_events_exchange,
    said_restored,
)
from financing.application import codec
from financing.application.errors import AwaitingOperator, Refused, Unavailable, Unconfirmed
from financing.application.messages import Command
from financing.application.ports import Cause, Envelope, handed
from financing.application.retry import OUTAGE_QUIET
from financing.cpu import BUSY_SHARE, patient_timeout
from financing.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")


# Where the probe's message goes: no queue can be named so (the broker reserves `amq.`
# names), so it is routed nowhere and dropped.
PROBE_ROUTING_KEY = "amq.financing.probe"


# How old the probe's channel may be (seconds): no older than an outage's quiet
# (retry.OUTAGE_QUIET), so that a probe ending an outage begun by a refusal asks on a
# channel opened after that refusal, whose permissions the broker checks anew.
PROBE_CHANNEL_AGE = OUTAGE_QUIET
# How long a refused publish to `events` fails the probe when none is tried since.
REFUSAL_REMEMBERED = 15.0
# How long a command queue the broker refused to declare is taken as refused.
REFUSAL_KEPT = 10.0


class PublishFailed(Unavailable):
    """The broker did not confirm a publish: nacked, unroutable, timed out or disconnected.

    The message may or may not have reached the broker; publishing it again
    is safe because every consumer deduplicates by message id.
    """

    def __init__(self, detail: str, *, unroutable: bool = False, refused: bool = False) -> None:
        super().__init__(BROKER, detail)
        # Returned by the broker: no queue, and no alternate exchange, took it.
        self.unroutable = unroutable
        # Refused by the broker (the channel closed for it, a nack), not lost with the
        # connection nor left unconfirmed.
        self.refused = refused


@dataclass
class _Lane:
    """A confirming channel of the publisher's, opened again once the broker closed it,
    and the exchange its publishes go to unless told otherwise."""

    exchange_of: Callable[[AbstractChannel], Awaitable[AbstractExchange]]
    channel: AbstractChannel | None = None
    exchange: AbstractExchange | None = None
    # Opened by one caller at a time; callers of the other lane do not wait for it.
    opening: asyncio.Lock = field(default_factory=asyncio.Lock)

    def opened(self) -> tuple[AbstractChannel, AbstractExchange] | None:
        """The channel and exchange, if the channel is open."""
        if self.channel is None or self.channel.is_closed or self.exchange is None:
            return None
        return self.channel, self.exchange


async def _default_exchange(channel: AbstractChannel) -> AbstractExchange:
    return channel.default_exchange


class _SideChannel:
    """A channel of the publisher's beside its lanes, where the broker may refuse (and
    close it) without harm to the publishes: opened again once closed, one however many
    ask at once; and, given `renewed_after`, once it is so many seconds old."""

    def __init__(
        self, broker: Broker, *, confirms: bool, renewed_after: float | None = None
    ) -> None:
        self._broker = broker
        self._confirms = confirms
        self._renewed_after = renewed_after
        self._channel: AbstractChannel | None = None
        self._opened_at = 0.0  # time.monotonic()
        self._opening = asyncio.Lock()

    async def get(self) -> AbstractChannel:
        async with self._opening:
            renewed = self._renewed_after
            if renewed is not None and time.monotonic() - self._opened_at >= renewed:
                await self.close()
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._broker.channel(publisher_confirms=self._confirms)
                self._opened_at = time.monotonic()
            return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await close_channel(self._channel)
        self._channel = None


class PublishUnconfirmed(PublishFailed, Unconfirmed):
    """A publish that may have reached the broker: written, or on its way, when its confirm
    timed out or its connection or channel was lost. One that did not get so far (no
    channel), or that the broker returned or nacked, is a plain PublishFailed."""


class EventsRefused(PublishFailed, AwaitingOperator):
    """The last publish to `events` was refused and none confirmed since (`probe_events`):
    the write permission on it revoked, or a queue bound to it full and refusing
    publishes. Said as such once when an outage under way turns out to be one: begun as
    a lost connection, it was said to last 32 s more without a word of the refusal."""


def unconfirmed(what: str, waited: float, busy: float) -> str:
    """Why `what` failed: not confirmed within `waited` s, the process busy for the
    share `busy` of it. A process that kept a core busy (list replies, sagas) left the
    broker's confirms unread: its outage line said "broker unavailable" while the
    broker confirmed another client's publishes within milliseconds."""
    said = f"{what}: not confirmed within {waited:.1f} s"
    if busy >= BUSY_SHARE:
        said += (
            f" (this process wanted a core {busy:.0%} of that time: its own load may have"
            " kept the confirms unread)"
        )
    return said


class Publisher:
    """Two confirming channels of its own, each shared by concurrent callers: one for
    `events`, one for every publish to a queue (commands, dead letters, deferrals, routing
    again). The broker closes a channel whose publish it refuses, with every publish in
    flight on it: on one channel, a refused publish to `events` (its write permission
    alone revoked, a bound queue full) failed the commands gRPC calls were queueing at the
    same moment, and a command's call waited seconds for the retries."""

    def __init__(
        self, broker: Broker, *, confirm_timeout: float = 5.0, keeps_topology: bool = True
    ) -> None:
        self._broker = broker
        self._confirm_timeout = confirm_timeout
        # The service's publisher declares the whole topology again where it may have been
        # lost (`_open`, `publish_events`); an operator's command that publishes to what
        # is there (`dead-letters requeue`) leaves it as it finds it: it made again a queue
        # an operator had deleted, and on a broker handed back to the reference the
        # service's exchanges and queues, which would take a copy of every event for ever.
        self._keeps_topology = keeps_topology
        self._events = _Lane(declare_events_exchange)
        self._queues = _Lane(_default_exchange)
        self._probing = SharedAttempt(
            self._probe_once,
            lambda _: PublishFailed("the probe was cancelled before it was answered"),
        )
        # The probe's own channel, and the declarations': a refused probe or declaration
        # closes its own, never those publishes share, nor each other's (a command queue
        # the broker refused, declared again at each call, failed the probes beside it:
        # Commands NOT_SERVING, a broker outage that was none).
        # Renewed every PROBE_CHANNEL_AGE seconds: a channel remembers the permissions the
        # broker granted it while it is busy (RabbitMQ 3.10), and the probe's, used every
        # second, took revoked permissions for granted for good: Commands SERVING, and a
        # broker outage a refused command began said over, while every command was refused.
        self._probe = _SideChannel(broker, confirms=True, renewed_after=PROBE_CHANNEL_AGE)
        self._declaring = _SideChannel(broker, confirms=False)
        # Why and when (time.monotonic()) the last publish to `events` failed, until one
        # is confirmed again.
        self._events_refused: tuple[str, float] | None = None
        # `financing_deferred` as declared on the channel of publishes to queues (`defer`).
        self._deferrals: tuple[AbstractChannel, AbstractExchange] | None = None
        # The refusals `declare_topology` said, while they last.
        self._refusals: set[str] = set()
        # The connection the whole topology was last declared on (`declared_on`).
        self._topology_on: object | None = None
        # The channel `queue_exists` asks on, one question at a time; `restore`, one
        # queue at a time.
        self._inquiry = _SideChannel(broker, confirms=False)
        self._inquiring = asyncio.Lock()
        self._restoring_one = asyncio.Lock()

    async def channel(self) -> AbstractChannel:
        """The channel of publishes to queues (`_open`)."""
        channel, _ = await self._open(self._queues)
        return channel

    async def _open(self, lane: _Lane) -> tuple[AbstractChannel, AbstractExchange]:
        """`lane`'s channel and exchange, opened again if the channel closed.

        Opened again, it is used only once the whole topology is declared again: a broker
        that lost it (its virtual host deleted and made again, its definitions lost) took
        the events published meanwhile and confirmed them, routed to the queues of the
        consumers that came back first and to no other (nothing returned them as
        unroutable): 8 and 9 sagas left half way in two such losses under load. A
        declaration that fails does not keep the channel closed: publishes to queues it
        does not concern (commands) go on, and an event routed nowhere is returned, and
        declared for then (`publish_events`). Each lane opens on its own: a command waited
        for the whole topology to be declared again each time a refused publish to
        `events` closed the events' channel."""
        if (open_now := lane.opened()) is not None:
            return open_now
        async with lane.opening:
            if (open_now := lane.opened()) is not None:
                return open_now  # opened by another caller meanwhile
            # Its first channel, on the connection start-up declared the topology on.
            declared = lane.channel is None and self._topology_on is self._broker.current
            if self._keeps_topology and not declared:
                try:
                    await self.declare_topology()
                except Unavailable as error:
                    log.debug("declaring the topology on a new channel failed", error=repr(error))
            async with asyncio.timeout(self._confirm_timeout):
                channel = await self._broker.channel(publisher_confirms=True)
                try:
                    exchange = await lane.exchange_of(channel)
                except BaseException:
                    await close_channel(channel)
                    raise
            lane.channel, lane.exchange = channel, exchange
            return channel, exchange

    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        """Publish to the `events` exchange, in order; returns when all are confirmed.

        All publishes are put in flight before any confirm is awaited: the
        channel writes them in call order, and awaiting confirms one by one
        would cap throughput at a fraction of this.
        """
        if not envelopes:
            return
        what = f"{len(envelopes)} event(s)"
        publishes: list[tuple[Envelope | AbstractMessage, str]] = [
            (envelope, "") for envelope in envelopes
        ]
        try:
            try:
                await self._confirmed(what, self._events, publishes)
            except PublishFailed as failed:
                if not failed.unroutable or not await self._declared_topology_again():
                    raise
                await self._confirmed(what, self._events, publishes)  # the same ids again
        except PublishFailed as failed:
            if failed.refused:  # a lost connection is the probe's to find, and to end
                self._events_refused = (failed.detail, time.monotonic())
            raise
        self._events_refused = None

    async def _declared_topology_again(self) -> bool:
        """`events` feeds an exchange whose alternate exchange takes whatever no queue
        does, so an event returned as unroutable means that part of the topology was
        deleted under the service (an exchange, a binding), which no consumer notices.
        It is declared again, so that the events are published again at once; whether
        it was (else the caller's publish failed: a broker outage)."""
        if not self._keeps_topology:
            return False
        log.warning("events were returned as unroutable; declaring the topology again")
        try:
            await self.declare_topology()
        except Unavailable as error:
            log.debug("declaring the topology again failed", error=repr(error))
            return False
        return True

    async def declare_topology(self) -> None:
        """The whole topology declared (again), a part at a time on the probe's channel
        (`_declared`): what exists is left as it is, what was deleted is made again. A
        part the broker refuses (a queue someone declared again with other arguments)
        is said, once while it lasts, and the others are declared all the same: the
        refusal stopped the declaration of every part after it (the bindings it should
        have restored left missing), and, raised, stopped the relayer and the service."""
        refused: set[str] = set()
        for what, part in declarations(self._broker.queue_type):
            try:
                await self._declared(what, part)
            except Refused as error:
                refused.add(error.detail)
                if error.detail not in self._refusals:
                    log.warning("the topology could not be declared again", error=error.detail)
        self._refusals = refused

    def declared_on(self, connection: object) -> None:
        """Start-up declared the whole topology on `connection`: each lane's first channel
        on it does not declare it again. Declared again by each, one part after another,
        right after start-up, the health probe waited behind it with the broker 200 ms
        away each way, and the broker was said down as the service started. A channel
        opened again (closed by a refusal: an exchange deleted under the service) or on
        another connection (a broker that lost its topology closed the connection)
        declares it, as ever."""
        self._topology_on = connection

    async def queue_exists(self, name: str) -> bool:
        """Whether the broker has the queue `name` (`queue_depth`)."""
        return await self.queue_depth(name) is not None

    async def queue_depth(self, name: str) -> QueueDepth | None:
        """The queue `name`'s depth, None when the broker has no such queue: asked on a
        channel kept for such questions, one at a time, and opened again only after a
        queue was found missing (the broker closes the channel of a passive declaration
        it cannot answer). A running service asks again and again (each restore, the
        topology watch every 30 s): one request each, where a channel of its own
        (`queues.queue_depth`, the operator's commands, which ask a few questions and
        exit) costs two more and a channel opened and closed in the broker's log. Asked on
        the probe's, a missing queue closed the channel under the probes and declarations
        sharing it (a broker outage that was none)."""
        async with self._inquiring:

            async def passive(channel: AbstractChannel) -> QueueDepth | None:
                try:
                    return depth_of(await channel.declare_queue(name, passive=True))
                except aiormq.exceptions.ChannelNotFoundEntity as error:
                    if not gone(error):
                        raise  # an outage of the broker's, said as such
                    return None

            return await self._timed(f"queue {name!r}", "looked for", self._inquiry.get, passive)

    def unconsumed(self) -> dict[str, Declaration]:
        """The queues of the service nobody consumes, each with its declaration."""
        queue_type = self._broker.queue_type
        return {
            DEAD_LETTER_QUEUE: DEAD_LETTERS.of_type(queue_type).declare,
            DEFERRALS: lambda side: declare_deferrals(side, queue_type),
        }

    async def restore_unconsumed(self) -> None:
        """Declare the queues nobody consumes again (`restore`)."""
        for queue, declare in self.unconsumed().items():
            await self.restore(queue, declare)

    async def restore(self, queue: str, declare: Declaration) -> None:
        """Declare `queue`, which nobody consumes, again (`declare`), and say so if it was
        gone (`topology.said_restored`): deleted under the service by an operator or a
        policy's `expires`, with what it held. One at a time, so that a deletion several
        publishes and the topology watch meet at once is said and counted once."""
        async with self._restoring_one:
            gone = not await self.queue_exists(queue)
            await self._declared(f"queue {queue!r}", declare)
            if gone:
                said_restored(queue)

    async def send_to_queue(self, queue: str, envelope: Envelope) -> None:
        """Publish to `queue` through the default exchange; unroutable means failure."""
        await self.send_message_to_queue(queue, to_amqp(envelope))

    async def send_message_to_queue(self, queue: str, message: AbstractMessage) -> None:
        what = f"{header_text(message.headers.get('name', 'message'))} to queue {queue!r}"
        await self._confirmed(what, self._queues, [(message, queue)])

    async def defer(self, message: AbstractMessage, queue: str) -> None:
        """Publish `message` (confirmed) to `financing_deferred`, whose queue hands it back
        to `queue` once its expiration has passed.

        The exchange and its queue are declared (`_declared`) before the publishing
        channel's first deferral, and again when a deferral finds them gone
        (`_restoring`). Declared before every deferral, the declaration waited behind the
        channel's publishes: while a large backlog drained, it timed out, and the broker
        was taken for gone (a false outage, `/health` 503) and the message deferred
        twice."""
        channel, _ = await self._opened(f"deferring to queue {queue!r}", self._queues)
        queue_type = self._broker.queue_type

        def declare(side: AbstractChannel) -> Awaitable[AbstractExchange]:
            return declare_deferrals(side, queue_type)

        declared = self._deferrals
        if declared is None or declared[0] is not channel:
            await self._declared(repr(DEFERRALS), declare)
            with translated():
                exchange = await channel.get_exchange(DEFERRALS, ensure=False)
            declared = self._deferrals = (channel, exchange)
        what = f"{header_text(message.headers.get('name', 'message'))} deferred to {queue!r}"
        via = declared[1]
        await self._restoring(
            DEFERRALS,
            declare,
            lambda: self._confirmed(what, self._queues, [(message, queue)], via=via),
        )

    async def keep_dead_letter(self, message: AbstractMessage) -> None:
        """Publish `message` (confirmed) to `financing_dead_letters`."""
        what = f"{header_text(message.headers.get('name', 'message'))} dead-lettered"
        await self._restoring(
            DEAD_LETTER_QUEUE,
            DEAD_LETTERS.of_type(self._broker.queue_type).declare,
            lambda: self._confirmed(what, self._queues, [(message, DEAD_LETTER_QUEUE)]),
        )

    async def _restoring(
        self, queue: str, declare: Declaration, publish: Callable[[], Awaitable[None]]
    ) -> None:
        """`publish` to `queue`, which nobody consumes; returned unroutable, it found the
        queue deleted under the service (an operator, a policy's `expires`; or only its
        binding, the deferrals'): the queue is declared again, a deletion said
        (`topology.said_restored`), and `publish` tried once more. It was a broker
        outage before, `/health` 503, and the loss went unsaid."""
        try:
            await publish()
        except PublishFailed as failed:
            if not failed.unroutable:
                raise
            await self.restore(queue, declare)
            await publish()

    async def route_again(self, message: AbstractMessage) -> None:
        """Publish `message` (confirmed) to `financing_events`, which routes it by its
        `name` header to the queues bound for that name, and what it routes nowhere to
        `financing_unrouted` again (a dead letter of that queue, requeued)."""
        channel, _ = await self._opened("routing a message again", self._queues)
        with translated():
            router = await channel.get_exchange(EVENTS_ROUTER, ensure=False)
        what = f"{header_text(message.headers.get('name', 'message'))} routed again"
        await self._confirmed(what, self._queues, [(message, "")], via=router)

    async def probe(self) -> None:
        """Return if publishing can work now: the channel of publishes to queues is open and the
        broker takes a declaration and a publish (it refuses them without the configure
        or the write permission). Whether a command can be queued: `Commands` readiness.

        One probe at a time, which a caller's own deadline does not cancel (aiormq closes
        a channel whose call is cancelled), on a channel of its own, so that neither a
        cancelled nor a refused probe closes a channel publishes use. Callers
        meanwhile wait for the same probe."""
        await self._probing()

    async def probe_events(self) -> None:
        """`probe`, and the last publish to `events`, if one failed, confirmed since: the
        check that ends a broker outage.

        A publish to `events` can be refused where the probe's is not (the write
        permission on `events` alone revoked, a bound queue full and rejecting
        publishes), and the probe cannot publish to `events` itself without reaching
        every queue bound to it. So an outage a refused publish to `events` started
        ends only once the relayer, which retries by itself, has one confirmed; a check
        passing meanwhile would end it every second and the next refusal start it again.
        The relayer tries again at least every few seconds (its backoff and confirm
        timeout), so a refusal without a newer attempt for REFUSAL_REMEMBERED seconds
        means it stopped relaying (a standby took over): that refusal no longer counts.
        Commands are queued through the default exchange meanwhile, so `Commands`
        readiness asks `probe` alone."""
        if self._events_refused is not None:
            detail, at = self._events_refused
            if time.monotonic() - at < REFUSAL_REMEMBERED:
                raise EventsRefused(
                    f"publishing to {EVENTS_EXCHANGE!r} failed ({detail}),"
                    " and none has been confirmed since"
                )
        await self.probe()

    async def _probe_once(self) -> None:
        await self._opened("probing the broker", self._queues)
        try:
            async with asyncio.timeout(self._confirm_timeout):
                channel = await self._probe.get()
                with translated():
                    await declare_events_exchange(channel)
                    # Publishing needs the write permission, which a declaration does
                    # not: a message no queue can take, confirmed and dropped by the broker.
                    await channel.default_exchange.publish(
                        aio_pika.Message(b"", delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                        PROBE_ROUTING_KEY,
                        mandatory=False,
                    )
        except TimeoutError:
            raise PublishFailed("no answer to a probe within the timeout") from None

    async def declare_command_queue(self, name: str) -> None:
        await self.declare_queue(command_queue(name))

    async def declare_queue(self, spec: QueueSpec) -> None:
        """`spec` declared, of the service's queue type (`_declared`)."""
        await self._declared(f"queue {spec.name!r}", spec.of_type(self._broker.queue_type).declare)

    async def _declared(self, what: str, declare: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        """`declare(channel)` within the confirm timeout, on the declarations' channel: a
        declaration the broker refuses (other arguments, a limit reached) closes its
        channel, which would fail every publish in flight on a channel they share, and on
        that one it would wait behind them."""
        return await self._timed(what, "declared", self._declaring.get, declare)

    async def _timed(
        self,
        what: str,
        done: str,
        channel: Callable[[], Awaitable[AbstractChannel]],
        act: Callable[[AbstractChannel], Awaitable[T]],
    ) -> T:
        """`act` on `channel()` within the confirm timeout; the broker's failures, the
        timeout's included, as PublishFailed saying what was not `done`."""
        try:
            async with asyncio.timeout(self._confirm_timeout):
                opened = await channel()
                with translated():
                    return await act(opened)
        except TimeoutError:
            raise PublishFailed(f"{what} not {done} within the timeout") from None
        except PublishFailed:
            raise
        except Unavailable as error:
            raise PublishFailed(f"{what} not {done}: {error.detail}") from error

    async def _opened(self, what: str, lane: _Lane) -> tuple[AbstractChannel, AbstractExchange]:
        try:
            return await self._open(lane)
        except TimeoutError:
            raise PublishFailed(f"{what}: no channel within {self._confirm_timeout} s") from None
        except Unavailable as error:
            raise PublishFailed(f"{what}: {error.detail}") from error

    async def _confirmed(
        self,
        what: str,
        lane: _Lane,
        publishes: Sequence[tuple[Envelope | AbstractMessage, str]],
        via: AbstractExchange | None = None,
    ) -> None:
        """Publish each (message, routing key) on `lane`, to its exchange or `via`."""
        _, exchange = await self._opened(what, lane)
        handed()  # from now on, cut short, it may have been written
        began = time.monotonic()
        try:
            async with patient_timeout(self._confirm_timeout) as load:
                sending = [
                    (via or exchange).publish(
                        to_amqp(message) if isinstance(message, Envelope) else message,
                        routing_key,
                        mandatory=True,
                    )
                    for message, routing_key in publishes
                ]
                if len(sending) == 1:
                    # Awaited where it is: a task of its own would cost the loop a turn.
                    results = [await _settled(sending[0])]
                else:
                    results = await _in_turn(sending)
        except TimeoutError:
            waited = time.monotonic() - began
            raise PublishUnconfirmed(unconfirmed(what, waited, load.share())) from None
        # Refused if the broker refused any of them (closing the channel for it, or a nack):
        # the others in flight are failed with the channel, by a bare error.
        refused = any(
            isinstance(result, aiormq.exceptions.ChannelClosed | aiormq.exceptions.DeliveryError)
            for result in results
        )
        for result in results:
            if isinstance(result, aiormq.exceptions.PublishError):
                raise PublishFailed(f"{what}: {_describe(result)}", unroutable=True) from result
            if isinstance(result, BaseException):
                if is_broker_error(result) or failed_by_a_lost_connection(result):
                    # Nacked, the broker took no responsibility for it; lost with its
                    # channel or connection, it may have been queued before.
                    failed = (
                        PublishFailed
                        if isinstance(result, aiormq.exceptions.DeliveryError)
                        else PublishUnconfirmed
                    )
                    raise failed(f"{what}: {_describe(result)}", refused=refused) from result
                raise result  # not the broker's doing: a bug
            if not isinstance(result, aiormq.spec.Basic.Ack):
                raise PublishFailed(f"{what}: not acknowledged by the broker ({result!r})")

    @property
    def confirm_timeout(self) -> float:
        """How long a publish waits for its confirm before it fails."""
        return self._confirm_timeout

    async def close(self) -> None:
        self._probing.cancel()
        for lane in (self._events, self._queues):
            if lane.channel is not None:
                await close_channel(lane.channel)
            lane.channel = None
        for side in (self._probe, self._declaring, self._inquiry):
            await side.close()


async def _in_turn(sending: Sequence[Coroutine[Any, Any, object]]) -> list[object]:
    """What each publish of `sending` returned or raised, all put in flight at once, their
    confirms awaited together; a publish that fails for want of anything but the broker
    (a MemoryError building its frames) cancels those after it. aiormq writes a
    channel's publishes one at a time, in the order they take its lock, held from a
    publish's frames to their write; one that failed before it was written handed the
    lock to the next, which was written: relayed events went out of order, an
    aggregate's later version before its earlier one, which foreign consumers drop as a
    copy. Cancelled in the step that saw the failure, before the next one's turn comes,
    those after it are never written; the batch is published again from the first."""
    tasks: list[asyncio.Task[object]] = []

    async def in_turn(index: int, publish: Coroutine[Any, Any, object]) -> object:
        try:
            return await publish
        except Exception as error:  # a lost connection's CancelledError is not one
            if not is_broker_error(error):
                for later in tasks[index + 1 :]:
                    later.cancel()
            raise

    # Each task's first step comes after the list holds them all.
    tasks.extend(asyncio.ensure_future(in_turn(i, publish)) for i, publish in enumerate(sending))
    try:
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        # A task cancelled before its first step (by the failure above, or with this one:
        # a confirm's timeout, a relayer's lost lock) never awaited its publish, which
        # Python would say in a warning as it is collected: closed here, never written.
        for publish in sending:
            if inspect.getcoroutinestate(publish) == inspect.CORO_CREATED:
                publish.close()


async def _settled(publish: Awaitable[object]) -> object:
    """What `publish` returned or raised, as `gather(..., return_exceptions=True)` gives it."""
    try:
        return await publish
    except Exception as error:
        return error
    except asyncio.CancelledError as error:
        if not failed_by_a_lost_connection(error):
            raise  # this task is being cancelled
        return error


def _describe(error: BaseException) -> str:
    if isinstance(error, aiormq.exceptions.PublishError):
        return f"returned as unroutable ({getattr(error.frame, 'reply_text', '')})"
    if isinstance(error, aiormq.exceptions.DeliveryError):
        return "rejected (nack) by the broker"
    return describe(error)


class AmqpCommandSender:
    """Sends a command to the queue named after it (docs/contract.md section 2).

    The queue is declared (durable, no arguments, like the reference) before
    the first send, so a command accepted before its handler ever started is
    kept rather than returned as unroutable; declared again only once a send
    finds it gone (returned as unroutable).

    One declaration of a queue at a time, which the calls needing it meanwhile
    share (`SharedAttempt`): each call declared it itself, so a flood of calls
    at start-up, or after a publish failed, put as many declarations on the
    declarations' channel; one cut short by its call's deadline closed that
    channel (aiormq closes a channel whose request is cancelled) under all the
    others, and the broker was logged as down while it answered.
    """

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._declared: set[str] = set()
        self._declaring: dict[str, SharedAttempt[None]] = {}
        # The queues the broker refused to declare (declared again with other arguments),
        # with when and how: for REFUSAL_KEPT seconds a command for one is refused at
        # once, not declared again at each call (every client's retry a refused frame).
        self._refused: dict[str, tuple[float, Refused]] = {}

    async def send(self, command: Command, message_id: UUID, cause: Cause) -> None:
        queue = command.name()
        if queue not in self._declared:
            await self._declare(queue)
        envelope = Envelope(
            message_id=str(message_id),
            name=queue,
            body=codec.encode(command),
            headers=cause.headers(),
        )
        try:
            await self._publisher.send_to_queue(queue, envelope)
        except PublishFailed as failed:
            if failed.unroutable:  # the queue deleted meanwhile: declared again next time
                self._declared.discard(queue)
            raise

    async def _declare(self, queue: str) -> None:
        refused = self._refused.get(queue)
        if refused is not None and time.monotonic() - refused[0] < REFUSAL_KEPT:
            raise refused[1]
        declaring = self._declaring.get(queue)
        if declaring is None:
            declaring = self._declaring[queue] = SharedAttempt(
                partial(self._publisher.declare_command_queue, queue),
                lambda _: PublishFailed(f"queue {queue!r} not declared: the connection was lost"),
            )
        try:
            await declaring()
        except Refused as error:
            self._refused[queue] = (time.monotonic(), error)
            raise
        self._refused.pop(queue, None)
        self._declared.add(queue)


__all__ = [
    "AmqpCommandSender",
    "EventsRefused",
    "PublishFailed",
    "PublishUnconfirmed",
    "Publisher",
]
