"""In-memory implementations of the ports, for fast tests of handlers and policies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

from financing.application import codec
from financing.application.errors import (
    AlreadyProcessed,
    ConcurrencyConflict,
    EventNotInStore,
    ReadAfterWrite,
)
from financing.application.messages import Command
from financing.application.ports import (
    PROCESSED,
    REFUSED,
    A,
    B,
    Cause,
    Processed,
    RelayedEvent,
    StoredEvent,
)
from financing.domain.aggregates import Aggregate


class InMemoryUnitOfWork:
    def __init__(self, store: InMemoryEventStore, cause: Cause | None) -> None:
        self._store = store
        self._cause = cause
        self._appends: list[tuple[Aggregate, int]] = []
        self._records: list[tuple[str, str]] = []
        self._outcomes: dict[tuple[str, str], Processed] = {}
        self._acting_on: RelayedEvent | None = None

    def _reading(self, what: str) -> None:
        # Same rule as the PostgreSQL store, so handler tests catch a violation.
        if self._appends or self._records:
            raise ReadAfterWrite(f"{what} after a write in the same unit of work")

    async def recorded(self, consumer: str, message_id: str) -> Processed | None:
        self._reading("recorded")
        return self._store.outcomes.get((consumer, message_id))

    async def load(self, cls: type[A], aggregate_id: UUID) -> A:
        self._reading("load")
        return cls(aggregate_id).replay(
            stored.event for stored in await self._store.stream(aggregate_id)
        )

    async def load_both(
        self, first: type[A], first_id: UUID, second: type[B], second_id: UUID
    ) -> tuple[A, B]:
        return await self.load(first, first_id), await self.load(second, second_id)

    async def save(self, aggregate: Aggregate) -> None:
        if aggregate.changes:
            self._appends.append((aggregate, aggregate.stored_version))

    async def record(self, consumer: str, message_id: str, what: Processed = PROCESSED) -> None:
        self._records.append((consumer, message_id))
        self._outcomes[(consumer, message_id)] = what

    async def acting_on(self, event: RelayedEvent) -> None:
        self._acting_on = event

    def commit(self) -> None:
        store = self._store
        if (self._appends or self._records) and self._acting_on is not None:
            store.holds(self._acting_on)
        for aggregate, expected in self._appends:
            if store.version(aggregate.id) != expected:
                raise ConcurrencyConflict(
                    f"{aggregate.aggregate_type} {aggregate.id} moved past {expected}",
                    loaded_at=tuple((saved.id, version) for saved, version in self._appends),
                )
        for record in self._records:
            if record in store.processed:
                raise AlreadyProcessed(f"message {record[1]} already processed by {record[0]}")
        for aggregate, expected in self._appends:
            for offset, event in enumerate(aggregate.changes, start=1):
                store.events.append(
                    StoredEvent(
                        position=len(store.events) + 1,
                        aggregate_type=aggregate.aggregate_type,
                        aggregate_id=aggregate.id,
                        version=expected + offset,
                        name=codec.name_of(event),
                        body=codec.encode_text(event),
                        correlation_id=self._cause.correlation_id if self._cause else None,
                        causation_id=self._cause.causation_id if self._cause else None,
                    )
                )
            aggregate.changes.clear()
        store.processed.update(self._records)
        store.outcomes.update(self._outcomes)


class InMemoryEventStore:
    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.processed: set[tuple[str, str]] = set()
        # (consumer, message id) -> what became of it
        self.outcomes: dict[tuple[str, str], Processed] = {}

    @asynccontextmanager
    async def unit_of_work(self, cause: Cause | None = None) -> AsyncIterator[InMemoryUnitOfWork]:
        uow = InMemoryUnitOfWork(self, cause)
        yield uow
        uow.commit()

    def holds(self, event: RelayedEvent) -> None:
        """EventNotInStore unless the store holds `event` (as the PostgreSQL store tells)."""
        held = (
            (e.name, e.body)
            for e in self.events
            if e.aggregate_id == event.aggregate_id and e.version == event.version
        )
        if next(held, None) != (event.name, event.body):
            raise EventNotInStore(event.not_held())

    def version(self, aggregate_id: UUID) -> int:
        return sum(1 for e in self.events if e.aggregate_id == aggregate_id)

    async def stream(
        self, aggregate_id: UUID, *, from_version: int = 1, last: int | None = None
    ) -> list[StoredEvent]:
        found = [
            e for e in self.events if e.aggregate_id == aggregate_id and e.version >= from_version
        ]
        return found if last is None else found[len(found) - min(last, len(found)) :]

    async def forget_refusal(self, consumer: str, message_id: str) -> None:
        key = (consumer, message_id)
        if key in self.outcomes and self.outcomes[key].outcome == REFUSED:
            del self.outcomes[key]
            self.processed.discard(key)

    async def read_all(
        self, batch_size: int = 500, after: StoredEvent | None = None
    ) -> AsyncIterator[StoredEvent]:
        for event in following(list(self.events), after):
            yield event


class InMemoryCommandSender:
    def __init__(self) -> None:
        self.sent: list[tuple[Command, UUID]] = []
        self.causes: list[Cause] = []

    async def send(self, command: Command, message_id: UUID, cause: Cause) -> None:
        self.sent.append((command, message_id))
        self.causes.append(cause)


def following(events: list[StoredEvent], after: StoredEvent | None) -> list[StoredEvent]:
    """The events after `after` (all of them without it), in their order."""
    if after is None:
        return events
    positions = [event.position for event in events]
    return events[positions.index(after.position) + 1 :] if after.position in positions else []
