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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from financing.adapters.rabbitmq.connection import translated
from financing.application import routes
from financing.application.messages import COMMAND_TYPES
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

EVENTS_EXCHANGE = "events"
EVENTS_ROUTER = "financing_events"
UNROUTED = "financing_unrouted"
DEAD_LETTER_QUEUE = "financing_dead_letters"
PROJECTOR_QUEUE = "events_financing_projector"
COMMAND_NAMES = frozenset(command.name() for command in COMMAND_TYPES)


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

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        with translated():
            queue = await channel.declare_queue(
                self.name, durable=True, arguments=dict(self.arguments) or None
            )
            if not self.bound_to_events:
                return queue
            events = await declare_events_exchange(channel)
            if not self.routed_names:
                await queue.bind(events, routing_key="")
                return queue
            router = await declare_events_router(channel)
            for name in sorted(self.routed_names):
                await queue.bind(router, routing_key="", arguments=_by_name(name))
            await queue.unbind(events, routing_key="")
            return queue


def _by_name(name: str) -> dict[str, Any]:
    return {"x-match": "all", "name": name}


@dataclass(frozen=True)
class Subscription:
    """What one consumer reads: its queue, the names it handles, and what becomes of others.

    On a command queue every message should be its one command: any other was
    misrouted and is dead-lettered, since acking it would lose it. A queue bound
    to `events` receives every event: the ones of other names are ignored.
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


async def declare_events_router(channel: AbstractChannel) -> AbstractExchange:
    """`financing_events`, fed by `events`; what it routes nowhere goes to `financing_unrouted`."""
    with translated():
        unrouted = await channel.declare_exchange(
            UNROUTED, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(UNROUTED, durable=True)
        await queue.bind(unrouted, routing_key="")
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


async def declare(channel: AbstractChannel) -> None:
    """The exchanges, the dead-letter queue and every queue a consumer of the service
    reads, before anything is published or consumed: a message published after
    start-up then waits in its queue even if its consumer runs elsewhere or later."""
    await declare_events_exchange(channel)
    await declare_events_router(channel)
    await DEAD_LETTERS.declare(channel)
    for queue in CONSUMED_QUEUES:
        await queue.declare(channel)


async def unrouted(delivery: Delivery) -> Outcome:
    """What becomes of a message `financing_events` routed to no consumer: one whose name
    nobody handles is ignored, whatever its other headers, as every consumer of `events`
    would; one without a readable name (PoisonMessage) or whose handled name could not be
    routed (it is not a string) is dead-lettered, once."""
    if delivery.name is not None and delivery.name not in ROUTED_NAMES:
        return IGNORED
    envelope = delivery.envelope()
    if envelope.name in ROUTED_NAMES:
        return Outcome.dead_letter(
            f"a {envelope.name!r} routed to no consumer: its name header must be a string"
        )
    return IGNORED
