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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from financing.adapters.rabbitmq.connection import translated
from financing.application.messages import COMMAND_TYPES
from financing.application.pipeline import Handler, HandlerPart, OutcomeKind, Step, compose
from financing.application.read_models import PROJECTED_EVENTS
from financing.application.retry import Outages, RetryPolicy

EVENTS_EXCHANGE = "events"
DEAD_LETTER_QUEUE = "financing_dead_letters"
PROJECTOR_QUEUE = "events_financing_projector"
COMMAND_NAMES = frozenset(command.name() for command in COMMAND_TYPES)


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue, bound to `events` or not, with its arguments."""

    name: str
    bound_to_events: bool
    arguments: Mapping[str, Any] = field(default_factory=dict)

    async def declare(self, channel: AbstractChannel) -> AbstractQueue:
        with translated():
            queue = await channel.declare_queue(
                self.name, durable=True, arguments=dict(self.arguments) or None
            )
            if self.bound_to_events:
                await queue.bind(await declare_events_exchange(channel), routing_key="")
            return queue


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
    if message_name in COMMAND_NAMES:
        queue = QueueSpec(message_name, bound_to_events=False)
    else:
        queue = QueueSpec(f"events_{message_name}", bound_to_events=True)
    return Subscription(queue, frozenset({message_name}))


PROJECTOR = Subscription(
    # One active consumer at a time: events are projected in the order they arrive.
    QueueSpec(PROJECTOR_QUEUE, bound_to_events=True, arguments={"x-single-active-consumer": True}),
    PROJECTED_EVENTS,
)
DEAD_LETTERS = QueueSpec(DEAD_LETTER_QUEUE, bound_to_events=False)


def command_queue(name: str) -> QueueSpec:
    return QueueSpec(name, bound_to_events=False)


async def declare_events_exchange(channel: AbstractChannel) -> AbstractExchange:
    with translated():
        return await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )


async def declare(channel: AbstractChannel, queues: Iterable[QueueSpec]) -> None:
    """The exchange, the dead-letter queue, every command queue and `queues`, before
    anything is published or consumed: no message published after start-up can
    then fall on an exchange with no queue bound."""
    await declare_events_exchange(channel)
    await DEAD_LETTERS.declare(channel)
    for name in sorted(COMMAND_NAMES):
        await command_queue(name).declare(channel)
    for queue in queues:
        await queue.declare(channel)
