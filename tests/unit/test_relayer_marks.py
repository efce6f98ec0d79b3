"""When the relayer moves its checkpoint: MARK_AFTER after a batch began to be published,
however long the broker took to confirm it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from uuid import uuid4

import pytest

from financing.application.ports import Envelope, StoredEvent
from financing.application.retry import Outages
from financing.workers import relayer as relayer_module
from financing.workers.relayer import Relayer
from tests.unit.test_relayer_wake_up import Bell, HeldLock

EVENTS = [StoredEvent(n, "Issuer", uuid4(), 1, "IssuerCreatedEvent", "{}") for n in range(1, 5)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Outbox:
    """The four EVENTS, read in batches; the checkpoint's moves kept in `marks`."""

    def __init__(self) -> None:
        self.marks: list[list[int]] = []
        self.read_all = asyncio.Event()

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        start = 0 if after is None else EVENTS.index(after) + 1
        if start == len(EVENTS):
            self.read_all.set()
        return EVENTS[start : start + limit]

    async def lag(self) -> tuple[int, float]:
        return 0, 0.0

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        self.marks.append([event.position for event in events])


class SlowBroker:
    """Each batch confirmed a second after it was published."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        self.clock.now += 1.0


async def test_a_batch_confirmed_slower_than_mark_after_is_marked_before_the_next_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the time was counted from a batch's confirm, so that the next batch
    was read before the checkpoint moved: under load it trailed by two batches' time."""
    clock = Clock()
    monkeypatch.setattr(relayer_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    outbox = Outbox()
    relaying = Relayer(
        outbox, SlowBroker(clock), HeldLock(), Bell(), Outages(), batch_size=2, mark_after=0.5
    )
    running = asyncio.create_task(relaying.run())
    try:
        await asyncio.wait_for(outbox.read_all.wait(), 5)
        assert outbox.marks == [[1, 2], [3, 4]]
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
