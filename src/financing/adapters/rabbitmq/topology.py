"""The broker topology of docs/contract.md section 2: which queue feeds each consumer.

Commands travel on a durable queue named exactly after the command, through
the default exchange. Events, domain and integration alike, go to the fanout
exchange `events`; every consumer of events owns a durable queue
`events_<name>` bound to it, named after the message it handles, as the
reference names them.

Every queue the reference also declares is declared durable with no
arguments: re-declaring an existing queue with other arguments fails with
PRECONDITION_FAILED. A queue that needs an x-argument gets a name of our own
(the projector's `events_financing_projector`).

FINANCING_QUEUE_TYPE=quorum declares every queue as a quorum queue (replicated
across a cluster's nodes), the reference-named ones included; a queue that
already exists with the other type (the reference's classic queues) stops
start-up with a message naming it and saying what to do.

Each consumer of events receives only the names it handles. `events` (a
fanout, as the reference declares it) feeds an exchange of our own,
`financing_events`, of type headers; each of our event queues is bound there
once per name it handles (`name` header equal). So an event reaches two
queues or so (its handler's and the projector's) rather than every queue
bound to `events`, and a consumer no longer receives, decodes and acks what it
only ignores. Foreign publishers keep publishing to `events`, and foreign
consumers keep binding their own queues to it. A message whose `name` routes
nowhere (no name, a name nobody handles, a name that is not a string) goes to
`financing_unrouted` (the alternate exchange), whose consumer dead-letters
what it cannot read and ignores the rest: nothing vanishes silently, and a
poison message is dead-lettered once, not by every consumer.

A delivery that names an aggregate no message has created yet is deferred
(pipeline.retried): published to `financing_deferred`, a fanout exchange of our
own, under its queue's name as the routing key, with an expiration. Its one
queue, also `financing_deferred`, has no consumer and dead-letters to the
default exchange: an expired message goes back to the queue its routing key
names, where it is delivered again.

The reference's projector read `events_query`, bound to `events`; ours reads a
queue of its own. On a broker the reference used, `events_query` is unbound
from `events` once nothing reads it, so that it does not grow until the
broker's alarms block every publisher, and deleted if it is empty; wherever
the topology is declared (start-up, `financing populate`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from financing import metrics
from financing.adapters.rabbitmq.connection import BROKER, Broker, close_channel, translated
from financing.adapters.rabbitmq.queues import delete_queue, existing_queue, gone
from financing.application import routes
from financing.application.errors import Refused, Unavailable
from financing.application.messages import COMMAND_TYPES
from financing.application.moments import moment
from financing.application.pipeline import (
    IGNORED,
    Delivery,
    Handler,
    HandlerPart,
    Outcome,
    OutcomeKind,
    Step,
    compose,
)
from financing.application.read_models import PROJECTED_EVENTS
from financing.application.retry import Outages, RetryPolicy
from financing.logging import get_logger

log = get_logger(__name__)

EVENTS_EXCHANGE = "events"
EVENTS_ROUTER = "financing_events"
UNROUTED = "financing_unrouted"
DEAD_LETTER_QUEUE = "financing_dead_letters"
DEFERRALS = "financing_deferred"  # the exchange and the queue of deferred deliveries
PROJECTOR_QUEUE = "events_financing_projector"
REFERENCE_PROJECTOR_QUEUE = "events_query"
COMMAND_NAMES = frozenset(command.name() for command in COMMAND_TYPES)
CLASSIC = "classic"
QUEUE_TYPE_ARGUMENT = "x-queue-type"


class QueueOfAnotherType(Exception):
    """A queue exists of another type than the one declared (its name the argument)."""


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue with its arguments, fed by `events` or not.

    A queue fed by `events` with `routed_names` receives only those names
    (through `financing_events`; a plain binding to `events` that an earlier
    version, or the reference, left is removed); without, it receives every
    message published to `events`, as foreign consumers' queues do.
    """

    name: str
    bound_to_events: bool
    arguments: Mapping[str, Any] = field(default_factory=dict)
    routed_names: frozenset[str] = frozenset()

    @property
    def single_active_consumer(self) -> bool:
        return bool(self.arguments.get("x-single-active-consumer"))

    @property
    def queue_type(self) -> str:
        return str(self.arguments.get(QUEUE_TYPE_ARGUMENT, CLASSIC))

    def of_type(self, queue_type: str) -> QueueSpec:
        """This queue, declared as a `queue_type` queue (config.QUEUE_TYPES)."""
        arguments = {k: v for k, v in self.arguments.items() if k != QUEUE_TYPE_ARGUMENT}
        if queue_type != CLASSIC:
            arguments[QUEUE_TYPE_ARGUMENT] = queue_type
        return replace(self, arguments=arguments)

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        try:
            queue = await self.declare_alone(channel)
        except QueueOfAnotherType as conflict:
            raise Refused(BROKER, _type_conflict([self.name], self.queue_type)) from conflict
        with translated():
            if not self.bound_to_events:
                return queue
            events = await declare_events_exchange(channel)
            if not self.routed_names:
                await queue.bind(events, routing_key="")
                return queue
            router = await declare_events_router(channel, self.queue_type)
            for name in sorted(self.routed_names):
                await queue.bind(router, routing_key="", arguments=_by_name(name))
            await queue.unbind(events, routing_key="")
            return queue

    async def declare_alone(self, channel: AbstractChannel) -> AbstractQueue:
        """The queue itself, bound to nothing; QueueOfAnotherType where it exists of
        another type, Refused where it exists with other arguments."""
        try:
            with translated():
                return await channel.declare_queue(
                    self.name, durable=True, arguments=dict(self.arguments) or None
                )
        except Refused as refused:
            if QUEUE_TYPE_ARGUMENT in refused.detail:
                raise QueueOfAnotherType(self.name) from refused
            raise Refused(BROKER, self._arguments_conflict(refused.detail)) from refused

    def _arguments_conflict(self, said: str) -> str:
        return (
            f"queue {self.name!r} exists with other arguments than the service declares"
            f" ({said}). Move what it holds elsewhere (a shovel), delete it (rabbitmqctl"
            f" delete_queue -p VHOST {self.name}) and the service declares it anew; set"
            " what the broker allows with a policy (rabbitmqctl set_policy), not queue"
            " arguments, and never one that drops or expires what a consumer of the"
            ' service has not taken (docs/deployment.md, "Broker policies")'
        )


async def _fanout_into(
    channel: AbstractChannel, exchange: str, queue: QueueSpec, queue_type: str
) -> AbstractExchange:
    """The durable fanout exchange `exchange`, with `queue` (of `queue_type`) bound to it."""
    with translated():
        fanout = await channel.declare_exchange(
            exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
    declared = await queue.of_type(queue_type).declare(channel)
    with translated():
        await declared.bind(fanout, routing_key="")
    return fanout


def _by_name(name: str) -> dict[str, Any]:
    return {"x-match": "all", "name": name}


@dataclass(frozen=True)
class Subscription:
    """What one consumer reads: its queue, the names it handles, and what becomes of others.

    On a command queue every message should be its one command: any other was
    misrouted and is dead-lettered, since acking it would lose it. A queue fed by
    `events` receives only its names (through `financing_events`); another name, which
    a plain binding to `events` left by an earlier release or the reference brings
    until it is removed, is ignored.
    """

    queue: QueueSpec
    names: frozenset[str]

    @property
    def others(self) -> OutcomeKind:
        return OutcomeKind.IGNORED if self.queue.bound_to_events else OutcomeKind.DEAD_LETTERED

    def step(
        self,
        handler: Handler,
        *,
        policy: RetryPolicy,
        outages: Outages,
        handler_parts: Iterable[HandlerPart] = (),
    ) -> Step:
        """The whole path of this consumer's deliveries to `handler` (pipeline.compose)."""
        return compose(
            handler,
            names=self.names,
            others=self.others,
            policy=policy,
            outages=outages,
            handler_parts=handler_parts,
        )


def subscription(message_name: str) -> Subscription:
    """The queue of the consumer that handles `message_name`."""
    names = frozenset({message_name})
    if message_name in COMMAND_NAMES:
        queue = QueueSpec(message_name, bound_to_events=False)
    else:
        queue = QueueSpec(f"events_{message_name}", bound_to_events=True, routed_names=names)
    return Subscription(queue, names)


PROJECTOR = Subscription(
    # One active consumer at a time: events are projected in the order they arrive.
    QueueSpec(
        PROJECTOR_QUEUE,
        bound_to_events=True,
        arguments={"x-single-active-consumer": True},
        routed_names=PROJECTED_EVENTS,
    ),
    PROJECTED_EVENTS,
)
# Fed by the alternate exchange of `financing_events`: what no consumer's binding takes.
UNROUTED_QUEUE = QueueSpec(UNROUTED, bound_to_events=False)
DEAD_LETTERS = QueueSpec(DEAD_LETTER_QUEUE, bound_to_events=False)


def command_queue(name: str) -> QueueSpec:
    return QueueSpec(name, bound_to_events=False)


async def declare_events_exchange(channel: AbstractChannel) -> AbstractExchange:
    with translated():
        return await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )


# Deferred deliveries wait here, unconsumed, until their expiration: then the broker
# dead-letters each to the default exchange under its routing key, its queue's name.
DEFERRAL_QUEUE = QueueSpec(
    DEFERRALS, bound_to_events=False, arguments={"x-dead-letter-exchange": ""}
)


async def declare_deferrals(
    channel: AbstractChannel, queue_type: str = CLASSIC
) -> AbstractExchange:
    """`financing_deferred`, the exchange a deferred delivery is published to, and its queue."""
    return await _fanout_into(channel, DEFERRALS, DEFERRAL_QUEUE, queue_type)


async def declare_events_router(
    channel: AbstractChannel, queue_type: str = CLASSIC
) -> AbstractExchange:
    """`financing_events`, fed by `events`; what it routes nowhere goes to `financing_unrouted`."""
    await _fanout_into(channel, UNROUTED, UNROUTED_QUEUE, queue_type)
    with translated():
        router = await channel.declare_exchange(
            EVENTS_ROUTER,
            aio_pika.ExchangeType.HEADERS,
            durable=True,
            arguments={"alternate-exchange": UNROUTED},
        )
        await router.bind(await declare_events_exchange(channel), routing_key="")
        return router


# Every queue a consumer of this service reads, whether or not it runs in this process.
ROUTED_MESSAGES: tuple[str, ...] = tuple(
    route.message_name for table in (routes.COMMANDS, routes.POLICIES) for route in table
) + tuple(route.message_name for route in routes.INTEGRATION)
CONSUMED_QUEUES: tuple[QueueSpec, ...] = (
    *(subscription(name).queue for name in ROUTED_MESSAGES),
    PROJECTOR.queue,
    UNROUTED_QUEUE,
)
ROUTED_NAMES = frozenset(name for queue in CONSUMED_QUEUES for name in queue.routed_names)
# The integration events of other contexts (Registering's), which no event store keeps.
_INTEGRATION = frozenset(route.message_name for route in routes.INTEGRATION)


Declaration = Callable[[AbstractChannel], Awaitable[object]]


def declarations(queue_type: str = CLASSIC) -> list[tuple[str, Declaration]]:
    """The parts of the topology in the order they are declared, each with its name: the
    exchanges, the dead-letter queue, the deferrals' and every queue a consumer of the
    service reads."""
    return [
        ("the exchanges", lambda channel: declare_events_router(channel, queue_type)),
        (f"queue {DEAD_LETTER_QUEUE!r}", DEAD_LETTERS.of_type(queue_type).declare),
        (f"queue {DEFERRALS!r}", lambda channel: declare_deferrals(channel, queue_type)),
        *(
            (f"queue {queue.name!r}", queue.of_type(queue_type).declare)
            for queue in CONSUMED_QUEUES
        ),
    ]


async def declare(channel: AbstractChannel, queue_type: str = CLASSIC) -> None:
    """Every part of the topology (`declarations`), before anything is published or
    consumed: a message published after start-up then waits in its queue even if its
    consumer runs elsewhere or later, and a queue of another type than
    FINANCING_QUEUE_TYPE stops start-up (where a first dead letter or deferral would
    otherwise find it, and fail for ever)."""
    for _, part in declarations(queue_type):
        await part(channel)


async def refuse_queues_of_another_type(broker: Broker) -> list[str]:
    """Refused, naming every one, where queues the topology declares exist of another type
    than the broker's (FINANCING_QUEUE_TYPE), before anything is declared: found by
    declaring them, the first conflict stopped start-up after the queues declared before
    it had been made of the asked type, which then stopped a start-up of the other type
    too; and one start-up named one queue, a switch of type taking one restart each.
    The names of those the broker does not have."""
    queue_type = broker.queue_type
    found: list[str] = []
    missing: list[str] = []
    # One after another: the broker closes the channel of a queue it does not have, and
    # aiormq hands that channel's number to the next channel opened before it has told
    # the broker the close is done; asked side by side, the broker then closed the whole
    # connection ("second 'channel.open' seen") in 5 start-ups of 12.
    for spec in (*CONSUMED_QUEUES, DEAD_LETTERS, DEFERRAL_QUEUE):
        async with existing_queue(broker, spec.name) as queue:
            if queue is None:
                missing.append(spec.name)
                continue
            try:
                await spec.of_type(queue_type).declare_alone(queue.channel)
            except QueueOfAnotherType:
                found.append(spec.name)
    if found:
        raise Refused(BROKER, _type_conflict(found, queue_type))
    return missing


async def queues_missing(connection: AbstractConnection, names: Iterable[str]) -> list[str]:
    """Of the queues `names`, those the broker does not have, each looked for passively
    (nothing is created) on `connection`, one after another: the broker closes the
    channel of a queue it does not have, and the next look takes a channel of its own. A
    queue the broker will not show (its permissions), or has on a node out of reach, is
    not said missing."""
    missing: list[str] = []
    channel: AbstractChannel | None = None
    try:
        for name in names:
            if channel is None:
                channel = await connection.channel()
            try:
                await channel.declare_queue(name, passive=True)
            except (
                aiormq.exceptions.ChannelNotFoundEntity,
                aiormq.exceptions.ChannelAccessRefused,
            ) as error:
                if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity) and gone(error):
                    missing.append(name)
                closed, channel = channel, None  # closed by the broker
                await close_channel(closed)
    finally:
        if channel is not None:
            await close_channel(channel)
    return missing


async def restored_on(connection: AbstractConnection, queue: str, declare: Declaration) -> None:
    """`queue`, nobody's to consume and found missing, declared again on `connection` (a
    channel of its own), and said so (`said_restored`)."""
    await on_a_channel(connection.channel, declare)
    said_restored(queue)


def _type_conflict(names: list[str], wanted: str) -> str:
    """The refusal of queues `names`, of another type than `wanted`, and the way out."""
    existing = CLASSIC if wanted != CLASSIC else "quorum (or another type)"
    if len(names) == 1:
        [name] = names
        return (
            f"queue {name!r} exists as a {existing} queue, and FINANCING_QUEUE_TYPE"
            f" asks for {wanted}. Either set FINANCING_QUEUE_TYPE to the type it has, or"
            f" move it to {wanted}: stop what consumes it, let it drain, delete it"
            f" (rabbitmqctl delete_queue -p VHOST {name}) and start the service"
            " again, which declares it anew"
        )
    return (
        f"queues {', '.join(map(repr, names))} exist as {existing} queues, and"
        f" FINANCING_QUEUE_TYPE asks for {wanted}. Either set FINANCING_QUEUE_TYPE to the"
        f" type they have, or move them to {wanted}: stop what consumes them, let them"
        " drain, delete each (rabbitmqctl delete_queue -p VHOST NAME) and start the"
        ' service again (docs/scaling.md, "Switching the queue type", keeps the dead'
        " letters)"
    )


def said_restored(queue: str) -> None:
    """A queue nobody consumes was found deleted under the service, and declared again."""
    metrics.TOPOLOGY_RESTORED.labels(queue).inc()
    log.warning(
        "a queue of the service was deleted under it, with what it held; declared again"
        " (an operator, or a policy's `expires`: keep such policies off it)",
        queue=queue,
    )


def said_consumed_again(
    queue: QueueSpec,
    cancelled_at: datetime,
    last_recorded: datetime | None = None,
    last_processed: datetime | None = None,
    *,
    in_hand: datetime | None = None,
    unread: bool = False,
) -> None:
    """The consumer of `queue`, which the broker cancelled at `cancelled_at` (the queue
    deleted, or the node holding it down), consumes it again: what the queue held, and
    what was published to it meanwhile, may be gone. Counted and said once, with how to
    have the events again: an operator who deleted a queue under the service (or a
    limit that kept it from being declared again) lost its events for good, and the
    line that ended the outage said nothing of them. `last_recorded`: when the last
    event delivered to this process before then was recorded; `last_processed`: when
    the event its consumer processed last, in any instance, was; what was queued behind
    them, lost with the queue, was relayed after them (a backlog older than a minute was
    missed by a rewind from a minute before the cancel, and an instance that had no
    delivery, the standby of a queue with a single active consumer, said so). `in_hand`:
    when the oldest delivery the process held unsettled was recorded, lost with the queue
    too (dated by the last delivery alone, a rewind missed the 25 oldest of 135).
    `unread`: the consumer's records could not be read (then they are not said to date
    nothing: they may date what it held before every other time the line gives)."""
    metrics.CONSUMERS_CANCELLED.labels(queue.name).inc()
    fields: dict[str, str] = {"queue": queue.name, "cancelled_at": moment(cancelled_at)}
    if queue.bound_to_events and queue.routed_names and queue.routed_names <= _INTEGRATION:
        fields["events"] = (
            "the integration events published meanwhile did not reach it, nor did what it"
            " held: no event store keeps them, so no rewind sends them again; have their"
            " publisher (Registering) publish them again"
        )
    elif queue.bound_to_events:
        # A minute earlier: an event recorded before the queue went and relayed after.
        dated = [at for at in (in_hand, last_recorded, last_processed) if at is not None]
        since = moment(min([cancelled_at, *dated]) - timedelta(minutes=1))
        if in_hand is not None:
            fields["oldest_in_hand_recorded_at"] = moment(in_hand)
        if last_recorded is not None:
            fields["last_delivered_recorded_at"] = moment(last_recorded)
        if last_processed is not None:
            fields["last_processed_recorded_at"] = moment(last_processed)
        fields["events"] = "what it held and the events relayed meanwhile did not reach it; " + (
            _rewind(
                since,
                "a minute before the oldest event it held in hand, the last delivered to it"
                " or processed from it, or before the cancel",
            )
        )
        if unread:
            fields["unread"] = (
                "the consumer's records, which may date what it held earlier, could not be"
                " read (the database down, or a lock held on them): where a backlog waited"
                " in it, rewind from before its oldest event"
            )
        elif not dated:
            fields["undated"] = (
                "neither this process's deliveries nor the consumer's records date what it"
                " held: where a backlog waited in it, rewind from before its oldest event"
            )
    log.warning(
        "consuming again after the broker cancelled the consumer (its queue deleted, with"
        " what it held, or the node holding it down)",
        **fields,
    )


def _rewind(since: str, dated_by: str) -> str:
    """How to have the events a queue lost again, from `since` (`dated_by` says why)."""
    return (
        f"to have them again, stop every relayer and run `financing relay rewind --since"
        f" {since}` ({dated_by}): its consumers take the events they had as copies; those"
        " no queue took meanwhile wait in financing_dead_letters (`financing dead-letters"
        " requeue --queue financing_unrouted`)"
    )


# What is said of a queue consumed before, found missing (`said_declared_anew`).
STARTED_WITHOUT = (
    "a queue of the service was missing as it started, though its consumer processed"
    " messages from it before (deleted while no instance consumed it, or a broker that"
    " lost it); declared again"
)
REOPENED_WITHOUT = (
    "a queue of the service was missing as its broker connection was opened again,"
    " though its consumer processed messages from it before (deleted while the"
    " connection was down, or a broker that lost it); declared again"
)


def said_declared_anew(
    queue: QueueSpec, last_processed: datetime | None, *, reopened: bool = False
) -> None:
    """The queue of a consumer whose records say it processed messages from it (in any
    instance) was missing as the process started, or as its broker connection was opened
    again (`reopened`), and was declared again: deleted while no instance consumed it
    (while the connection was down), or a broker that lost it (a new one). What it held,
    and what was sent to it until now, did not reach it. Counted and said once, with how
    to have its messages again where the event store keeps them (`last_processed`: when
    the event its consumer processed last was recorded): declared again with nothing
    said, ten commands the Commands API had accepted were lost without a word, and so
    were those of a queue deleted while the service was cut off the broker."""
    metrics.CONSUMERS_CANCELLED.labels(queue.name).inc()
    fields: dict[str, str] = {"queue": queue.name}
    if not queue.bound_to_events:
        fields["messages"] = (
            "the commands it held, each accepted by the Commands API (or sent by a policy"
            " or an integration handler), are lost: no event store keeps them; their"
            " clients must send them again (`financing trace` shows where each"
            " correlation stopped)"
        )
    elif last_processed is None:  # Registering's events, kept by no event store
        fields["messages"] = (
            "the integration events it held are lost: no event store keeps them; have"
            " their publisher (Registering) publish them again"
        )
    else:
        since = moment(last_processed - timedelta(minutes=1))
        fields["last_processed_recorded_at"] = moment(last_processed)
        fields["events"] = (
            "what it held and the events relayed since it went did not reach it; "
            + _rewind(since, "a minute before the event its consumer processed last")
            + "; then, where `financing check` says rows listed in another order,"
            " `financing projections rebuild`"
        )
    fields["deleted_empty"] = (
        "a queue deleted empty, with nothing sent to it since (a switch of queue type,"
        " docs/scaling.md), lost nothing"
    )
    log.warning(REOPENED_WITHOUT if reopened else STARTED_WITHOUT, **fields)


class ReferenceQueue(Enum):
    """What became of the reference projector's `events_query` when it was looked at."""

    ABSENT = "absent"  # the broker has none (or it was empty and unread: deleted)
    READ = "read"  # someone reads it: left alone
    RETIRED = "retired"  # unread: unbound from `events`, kept for what it holds
    FAILED = "failed"  # it could not be looked at or retired (an outage, the rights)


async def declare_on(broker: Broker, missing: set[str] | None = None) -> ReferenceQueue:
    """`declare` on a channel of its own, with the broker's queue type, once no queue of
    another type is found among those it declares (`refuse_queues_of_another_type`);
    then the reference's projector queue retired, and what became of it. `missing` gains
    the names of the queues the broker did not have before."""
    absent = await refuse_queues_of_another_type(broker)
    if missing is not None:
        missing.update(absent)
    [(_, exchanges), *queues] = declarations(broker.queue_type)
    await on_a_channel(broker.channel, exchanges)  # what the queues are bound to, first
    # The queues side by side, each on a channel of its own, every channel opened in one
    # turn of the loop, before any answer can close one (`refuse_queues_of_another_type`):
    # one after another, with the broker 200 ms away each way, start-up gave up when its
    # 30 s ran out while declaring them; side by side, the whole topology took 12 s.
    declared = [on_a_channel(broker.channel, part) for _, part in queues]
    # The first failure raised once every declaration is over: none left running.
    for result in await asyncio.gather(*declared, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result
    return await retire_reference_projector(broker)


async def on_a_channel(opened: Callable[[], Awaitable[AbstractChannel]], part: Declaration) -> None:
    """`part` on a channel of its own, which `opened` opens (a broker's, or one connection's),
    closed after; the broker's errors translated."""
    channel = await opened()
    try:
        with translated():
            await part(channel)
    finally:
        await close_channel(channel)


async def retire_reference_projector(broker: Broker) -> ReferenceQueue:
    """`retire_reference_projector_queue`, a clean-up the service does not need: what
    stops it (the broker user's rights, an outage) is said, and nothing else."""
    try:
        return await retire_reference_projector_queue(broker)
    except (Unavailable, Refused) as error:
        log.warning(
            "the reference's projector queue could not be retired",
            queue=REFERENCE_PROJECTOR_QUEUE,
            reason=str(error),
        )
        return ReferenceQueue.FAILED


async def retire_reference_projector_queue(broker: Broker) -> ReferenceQueue:
    """`events_query`, left by the reference and read by no one, unbound from `events`
    and deleted if empty; what it still holds is the operator's to inspect (a warning
    says how much). A queue someone reads is left alone: a reference projector still
    running beside this service must be running when this service starts (one
    reconnecting at that moment is taken for gone)."""
    name = REFERENCE_PROJECTOR_QUEUE
    async with existing_queue(broker, name) as queue:
        if queue is None:
            return ReferenceQueue.ABSENT
        declared = queue.declaration_result
        if declared.consumer_count:
            return ReferenceQueue.READ
        waiting = declared.message_count or 0
        with translated():
            await queue.unbind(EVENTS_EXCHANGE, routing_key="")
        if waiting == 0:
            with translated():
                try:
                    await delete_queue(broker, queue, if_unused=True, if_empty=True)
                except aiormq.exceptions.ChannelPreconditionFailed:
                    return ReferenceQueue.RETIRED  # read or fed since: left as it is, unbound
            log.info("the reference's projector queue, empty and unread, is deleted", queue=name)
            return ReferenceQueue.ABSENT
    log.warning(
        "the reference's projector queue is read by no one and no longer fed; delete it"
        f" once what it holds is of no use (rabbitmqctl delete_queue -p VHOST {name})",
        queue=name,
        messages=waiting,
    )
    return ReferenceQueue.RETIRED


def unrouted(binding_missing: Callable[[], None]) -> Step:
    """What becomes of a message `financing_events` routed to no consumer: one whose name
    nobody handles is ignored, whatever its other headers, as every consumer of `events`
    would; one without a readable name (PoisonMessage) or whose handled name could not be
    routed (it is not a string) is dead-lettered, once. One whose name is handled, a
    string, came here because the binding of its queue was deleted under the service:
    `binding_missing` is called (the topology is declared again) and it is dead-lettered
    saying so; `financing dead-letters requeue` routes it again."""

    async def handle(delivery: Delivery) -> Outcome:
        if delivery.name is not None and delivery.name not in ROUTED_NAMES:
            return IGNORED
        envelope = delivery.envelope()
        if envelope.name not in ROUTED_NAMES:
            return IGNORED
        if delivery.name is None:
            return Outcome.dead_letter(
                f"a {envelope.name!r} routed to no consumer: its name header must be a string"
            )
        binding_missing()
        return Outcome.dead_letter(
            f"a {envelope.name!r} routed to no consumer: the binding of its queue to"
            f" {EVENTS_ROUTER!r} was missing (deleted under the service), and the topology"
            " is declared again; `financing dead-letters requeue` routes it again"
        )

    return handle
