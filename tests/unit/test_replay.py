"""Replaying the event store into read models in batches (`rebuild.replay`), with
in-memory stores: the order of batches, one applied at a time, the next one read
meanwhile, and failures on either side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from datetime import datetime
from uuid import uuid4

import pytest

from financing.adapters.postgres.rebuild import replay
from financing.application.errors import Unavailable
from financing.application.memory import InMemoryEventStore, following
from financing.application.ports import StoredEvent
from financing.application.read_models import EMPTY, NOT_RECORDED, InMemoryReadModels
from financing.domain.aggregates import Issuer
from financing.domain.events import DomainEvent

DEADLINE = 5.0


async def round_trip() -> None:
    """What a database round trip does to its caller: it waits for the answer, which
    comes on a later turn of the loop, and other tasks run meanwhile."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()
    loop.call_soon(answer.set_result, None)
    await answer


class ReadInBatches(InMemoryEventStore):
    """An event store whose reads take turns, a batch at a time, as a database's do;
    it can fail after `fail_after` events."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.given = 0
        self.fail_after = fail_after
        self.gave_more = asyncio.Event()  # set at each event given

    async def read_all(
        self, batch_size: int = 500, after: StoredEvent | None = None
    ) -> AsyncIterator[StoredEvent]:
        for index, stored in enumerate(following(list(self.events), after)):
            if index % batch_size == 0:
                await round_trip()  # the one that reads the next batch
            if index == self.fail_after:
                raise Unavailable("database", "connection lost")
            self.given += 1
            self.gave_more.set()
            yield stored


class Recorded:
    """Read models that record each batch they are given and how many are applied at once."""

    def __init__(self) -> None:
        self.models = InMemoryReadModels()
        self.batches: list[list[str]] = []
        self.applying = 0
        self.most_at_once = 0
        self.cancelled = 0

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        self.applying += 1
        self.most_at_once = max(self.most_at_once, self.applying)
        try:
            self.batches.append([message_id for message_id, _ in batch])
            await self.applied(len(self.batches))
            return await self.models.apply(batch, digests, recorded)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.applying -= 1

    async def applied(self, number: int) -> None:
        """The database's part of applying batch `number` (from 1): a few round trips."""
        for _ in range(3):
            await round_trip()


async def issuers(store: InMemoryEventStore, count: int) -> list[str]:
    """`count` issuers created, one event each; their events' message ids in commit order."""
    for _ in range(count):
        async with store.unit_of_work() as uow:
            issuer = Issuer(uuid4())
            issuer.create()
            await uow.save(issuer)
    return [stored.message_id for stored in store.events]


async def test_every_event_is_applied_once_in_commit_order_one_batch_at_a_time() -> None:
    store, target = ReadInBatches(), Recorded()
    ids = await issuers(store, 10)

    assert await replay(store, target, batch_size=3) == (10, store.events[-1])

    assert target.batches == [ids[0:3], ids[3:6], ids[6:9], ids[9:]]
    assert target.most_at_once == 1
    reference = InMemoryReadModels()
    await reference.apply([(stored.message_id, stored.event) for stored in store.events])
    assert await target.models.issuers() == await reference.issuers()


async def test_the_next_batch_is_read_while_one_is_applied() -> None:
    store = ReadInBatches()
    await issuers(store, 6)

    class WaitsForTheNextBatch(Recorded):
        async def applied(self, number: int) -> None:
            # The first batch is not done until the second has been read: a replay
            # that waited for it before reading on would never get there.
            if number == 1:
                async with asyncio.timeout(DEADLINE):
                    while store.given < 6:
                        store.gave_more.clear()
                        await store.gave_more.wait()

    target = WaitsForTheNextBatch()
    assert await replay(store, target, batch_size=3) == (6, store.events[-1])
    assert len(target.batches) == 2


async def test_a_batch_that_fails_to_apply_fails_the_replay_and_none_is_applied_after() -> None:
    store = ReadInBatches()
    ids = await issuers(store, 9)

    class FailsTheSecond(Recorded):
        async def applied(self, number: int) -> None:
            await super().applied(number)
            if number == 2:
                raise Unavailable("database", "connection lost")

    target = FailsTheSecond()
    with pytest.raises(Unavailable):
        await replay(store, target, batch_size=3)
    assert target.batches == [ids[0:3], ids[3:6]]
    assert [row.id for row in await target.models.issuers()] == [
        stored.event.aggregate_id for stored in store.events[:3]
    ]
    assert target.applying == 0


async def test_a_read_that_fails_while_a_batch_is_applied_cancels_it() -> None:
    store = ReadInBatches(fail_after=4)
    await issuers(store, 9)

    class NeverDone(Recorded):
        async def applied(self, number: int) -> None:
            await asyncio.Event().wait()

    target = NeverDone()
    before = asyncio.all_tasks()  # the session's own, such as a shared broker connection's
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(Unavailable):
            await replay(store, target, batch_size=3)
    assert target.cancelled == 1
    assert target.applying == 0
    assert asyncio.all_tasks() == before


async def test_a_replay_after_an_event_applies_only_those_that_follow_it() -> None:
    """The rebuild's catch-up goes on from the last event its replay read, rather than
    reading the whole store again while the live projector waits."""
    store, target = ReadInBatches(), Recorded()
    ids = await issuers(store, 7)

    count, last = await replay(store, target, batch_size=3, after=store.events[3])

    assert (count, last) == (3, store.events[-1])
    assert target.batches == [ids[4:7]]
    assert await replay(store, Recorded(), batch_size=3, after=last) == (0, last)
