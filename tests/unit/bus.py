"""The command handlers and saga policies over an in-memory event store, wired as
the broker wires them: every message travels encoded (name, JSON body,
aggregateID header) and is decoded by the consumer, as it would be off a queue.
"""

from __future__ import annotations

from typing import TypeVar
from uuid import UUID, uuid4

from financing.application import codec
from financing.application.memory import InMemoryEventStore
from financing.application.messages import Command
from financing.application.ports import Envelope, StoredEvent
from financing.application.processing import (
    Subscription,
    command_subscriptions,
    policy_subscriptions,
)
from financing.domain.aggregates import Aggregate, Investor, Invoice
from financing.domain.events import DomainEvent

A = TypeVar("A", bound=Aggregate)


class InMemoryBus:
    def __init__(self) -> None:
        self.store = InMemoryEventStore()
        self.commands = {s.message_name: s for s in command_subscriptions(self.store)}
        self.policies = {s.message_name: s for s in policy_subscriptions(self.store)}

    async def send(self, command: Command, message_id: UUID | None = None) -> list[DomainEvent]:
        """Deliver `command` to its handler; the events that handler appended."""
        envelope = Envelope(
            message_id=str(message_id or uuid4()), name=command.name(), body=codec.encode(command)
        )
        return await self._deliver(self.commands[command.name()], envelope)

    async def publish(self, stored: StoredEvent) -> list[DomainEvent]:
        """Deliver a relayed event to the policy consuming it; the events it appended."""
        policy = self.policies.get(stored.name)
        if policy is None:
            return []
        return await self._deliver(policy, stored.envelope())

    async def run(self, command: Command, message_id: UUID | None = None) -> list[DomainEvent]:
        """Send `command`, then relay every event appended, in commit order, to
        the policy consuming it until the saga comes to rest; every event
        appended, in the order the relayer would publish them."""
        start = len(self.store.events)
        await self.send(command, message_id)
        relayed = start
        while relayed < len(self.store.events):
            await self.publish(self.store.events[relayed])
            relayed += 1
        return [stored.event for stored in self.store.events[start:]]

    async def _deliver(self, subscription: Subscription, envelope: Envelope) -> list[DomainEvent]:
        message = codec.decode(envelope.name, envelope.body, envelope.aggregate_id)
        start = len(self.store.events)
        await subscription.process(envelope, message)
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
