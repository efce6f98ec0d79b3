"""The command handlers and saga policies over an in-memory event store, wired as
the broker wires them: every message travels encoded (name, JSON body,
aggregateID header) in a `MemoryDelivery`, and goes through the pipeline's own
parts (`selected`, `decoded`, `exactly_once`) for the consumer of each route,
with the consumer names and the other-name outcomes production uses.

What the bus leaves out is `retried`: a failure propagates, so a test sees the
handler's error itself (the retrying is tested in test_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

from financing.adapters.rabbitmq import topology
from financing.application import routes
from financing.application.memory import InMemoryEventStore
from financing.application.messages import Command
from financing.application.pipeline import (
    HandlerPart,
    Outcome,
    Step,
    StoreHandler,
    decoded,
    exactly_once,
    selected,
)
from financing.application.ports import Envelope, StoredEvent
from financing.domain.aggregates import Aggregate, Investor, Invoice
from financing.domain.events import DomainEvent
from tests.support.deliveries import MemoryDelivery, envelope_of

A = TypeVar("A", bound=Aggregate)

__all__ = ["InMemoryBus", "MemoryDelivery", "envelope_of"]


@dataclass(frozen=True)
class Consumer:
    """One route's consumer: the queue it reads and the step each delivery goes through."""

    route: routes.Route[StoreHandler]
    queue: str
    step: Step

    @classmethod
    def of(
        cls,
        route: routes.Route[StoreHandler],
        store: InMemoryEventStore,
        handler_parts: Iterable[HandlerPart] = (),
    ) -> Consumer:
        """The step production composes for `route`, without `retried`."""
        subscription = topology.subscription(route.message_name)
        handler = exactly_once(store, route.consumer, route.handler)
        for part in handler_parts:
            handler = part(handler)
        step = selected(subscription.names, subscription.others)(decoded(handler))
        return cls(route, subscription.queue.name, step)

    async def deliver(self, envelope: Envelope) -> Outcome:
        return await self.step(MemoryDelivery(envelope, source=self.queue))


class InMemoryBus:
    def __init__(self, handler_parts: Sequence[HandlerPart] = ()) -> None:
        self.store = InMemoryEventStore()
        self.commands = {
            r.message_name: Consumer.of(r, self.store, handler_parts) for r in routes.COMMANDS
        }
        self.policies = {
            r.message_name: Consumer.of(r, self.store, handler_parts) for r in routes.POLICIES
        }
        # The outcome of every delivery, in order (a published event has one per policy).
        self.outcomes: list[Outcome] = []

    async def send(self, command: Command, message_id: UUID | None = None) -> list[DomainEvent]:
        """Deliver `command` to its queue's consumer; the events that consumer appended."""
        consumer = self.commands[command.name()]
        return await self._deliver([consumer], envelope_of(command, message_id))

    async def publish(self, stored: StoredEvent) -> list[DomainEvent]:
        """Deliver a relayed event to every policy consumer, as the `events` fanout
        exchange does (each ignores the names it does not handle); the events appended."""
        return await self.publish_envelope(stored.envelope())

    async def publish_envelope(self, envelope: Envelope) -> list[DomainEvent]:
        """`publish` of a message as some publisher wrote it: the events appended."""
        return await self._deliver(self.policies.values(), envelope)

    async def run(self, command: Command, message_id: UUID | None = None) -> list[DomainEvent]:
        """Send `command`, then relay every event appended, in commit order, to
        the policies until the saga comes to rest; every event appended, in the
        order the relayer would publish them."""
        start = len(self.store.events)
        await self.send(command, message_id)
        relayed = start
        while relayed < len(self.store.events):
            await self.publish(self.store.events[relayed])
            relayed += 1
        return [stored.event for stored in self.store.events[start:]]

    async def _deliver(
        self, consumers: Iterable[Consumer], envelope: Envelope
    ) -> list[DomainEvent]:
        start = len(self.store.events)
        for consumer in consumers:
            self.outcomes.append(await consumer.deliver(envelope))
        return [stored.event for stored in self.store.events[start:]]

    def stored(self, event_name: str) -> list[StoredEvent]:
        return [stored for stored in self.store.events if stored.name == event_name]

    async def investor(self, investor_id: UUID) -> Investor:
        return await self._load(Investor, investor_id)

    async def invoice(self, invoice_id: UUID) -> Invoice:
        return await self._load(Invoice, invoice_id)

    async def _load(self, cls: type[A], aggregate_id: UUID) -> A:
        aggregate = cls(aggregate_id)
        return aggregate.replay(s.event for s in await self.store.stream(aggregate_id))
