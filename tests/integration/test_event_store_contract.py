"""One contract for every event store: in memory and on PostgreSQL.

`EventStoreContract` holds the tests; each implementation subclasses it and
provides the `store` fixture, so only the PostgreSQL suite asks for a
database (the in-memory one runs without any server). The PostgreSQL suite
adds the tests of snapshots, of recording times and of what a processed message
leaves behind in processed_messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from financing.adapters.postgres import event_store as event_store_module
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.application import handlers, policies
from financing.application.errors import (
    AlreadyProcessed,
    ConcurrencyConflict,
    EventNotInStore,
    ReadAfterWrite,
    ReusedMessageId,
)
from financing.application.memory import InMemoryEventStore
from financing.application.messages import CreateInvestor, CreateIssuer
from financing.application.pipeline import (
    Outcome,
    OutcomeKind,
    Step,
    StoreHandler,
    decoded,
    exactly_once,
    selected,
)
from financing.application.ports import (
    REFUSED,
    Cause,
    EventStore,
    Processed,
    RelayedEvent,
    StoredEvent,
    body_digest,
    event_message_id,
)
from financing.domain.aggregates import Investor, Invoice, RuleViolation
from financing.domain.events import (
    Bid,
    BidOnInvoicePlacedEvent,
    InvestorCreatedEvent,
    InvestorFundsAddedEvent,
    InvoiceFinancedEvent,
)
from tests.support import infra
from tests.support.deliveries import MemoryDelivery, envelope_of


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_store", "commands") as pool:
        yield pool


async def _truncate(pool: asyncpg.Pool) -> None:
    await pool.execute("TRUNCATE events, snapshots, processed_messages RESTART IDENTITY")


class Boom(Exception):
    pass


class LentInTurn:
    """A pool lending each of its connections once, in turn, so that a test sees each
    one's statements (asyncpg's query logger on it)."""

    def __init__(self, conns: list[Any]) -> None:
        self._conns = list(conns)

    async def acquire(self) -> Any:
        return self._conns.pop(0)

    async def release(self, conn: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def create_investor(store: EventStore, investor_id: UUID, balance: str) -> None:
    async with store.unit_of_work() as uow:
        investor = await uow.load(Investor, investor_id)
        investor.create(Decimal(balance))
        await uow.save(investor)


async def place_bid(
    store: EventStore, investor_id: UUID, amount: str, invoice_id: UUID | None = None
) -> None:
    async with store.unit_of_work() as uow:
        investor = await uow.load(Investor, investor_id)
        investor.place_bid(invoice_id or uuid4(), Decimal(amount))
        await uow.save(investor)


async def all_events(store: EventStore, batch_size: int = 500) -> list[StoredEvent]:
    return [event async for event in store.read_all(batch_size)]


def keys(events: list[StoredEvent]) -> list[tuple[UUID, int]]:
    return [(event.aggregate_id, event.version) for event in events]


def investor_state(investor: Investor) -> tuple[int, Decimal, Decimal, Decimal]:
    return investor.version, investor.balance, investor.reserved, investor.committed


class EventStoreContract:
    """What every EventStore does; a subclass per implementation provides `store`."""

    @pytest.fixture
    def store(self) -> EventStore:
        raise NotImplementedError("a subclass provides the store under test")

    async def test_a_stream_is_read_from_a_version_or_by_its_last_events(
        self, store: EventStore
    ) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")  # versions 1-2
        for _ in range(3):
            await place_bid(store, investor_id, "1")  # 3-5

        async def versions(**window: Any) -> list[int]:
            return [event.version for event in await store.stream(investor_id, **window)]

        assert await versions() == [1, 2, 3, 4, 5]
        assert await versions(from_version=4) == [4, 5]
        assert await versions(last=2) == [4, 5]
        assert await versions(from_version=2, last=10) == [2, 3, 4, 5]
        assert await versions(from_version=6) == []

    async def test_saved_events_are_loaded_back_into_the_aggregate(self, store: EventStore) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100.10")

        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, investor_id)

        assert investor.exists
        assert investor.version == 2
        assert investor.stored_version == 2
        assert investor.balance == Decimal("100.10")
        assert [e.event for e in await store.stream(investor_id)] == [
            InvestorCreatedEvent(investor_id=investor_id),
            InvestorFundsAddedEvent(investor_id=investor_id, amount=Decimal("100.10")),
        ]

    async def test_event_bodies_are_stored_exactly_as_encoded(self, store: EventStore) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100.10")

        added = (await store.stream(investor_id))[1]

        assert added.name == "InvestorFundsAddedEvent"
        assert added.aggregate_type == "Investor"
        # Money is written exactly, in its shortest plain form.
        assert added.body == '{"Amount":100.1}'
        assert added.event == InvestorFundsAddedEvent(investor_id, Decimal("100.10"))

    async def test_loading_a_missing_aggregate_gives_an_empty_one_at_version_zero(
        self,
        store: EventStore,
    ) -> None:
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, uuid4())

        assert not investor.exists
        assert investor.version == 0
        assert investor.balance == Decimal(0)
        assert investor.changes == []

    async def test_two_aggregates_loaded_together_are_each_what_load_gives(
        self, store: EventStore
    ) -> None:
        investor_id, other_id, issuer_id, invoice_id = uuid4(), uuid4(), uuid4(), uuid4()
        await create_investor(store, investor_id, "100")
        await place_bid(store, investor_id, "30")
        await create_investor(store, other_id, "7")
        async with store.unit_of_work() as uow:
            invoice = await uow.load(Invoice, invoice_id)
            invoice.create(issuer_id, Decimal("10"))
            await uow.save(invoice)

        async with store.unit_of_work() as uow:
            investor, listed = await uow.load_both(Investor, investor_id, Invoice, invoice_id)
            missing, other = await uow.load_both(Investor, uuid4(), Investor, other_id)
            same, again = await uow.load_both(Investor, other_id, Investor, other_id)
        async with store.unit_of_work() as uow:
            alone = await uow.load(Investor, investor_id)

        assert (
            investor_state(investor)
            == investor_state(alone)
            == (
                3,
                Decimal("70"),
                Decimal("30"),
                Decimal("0"),
            )
        )
        assert (listed.version, listed.asking_price, listed.issuer_id) == (
            1,
            Decimal("10"),
            issuer_id,
        )
        assert (missing.exists, missing.version) == (False, 0)
        assert investor_state(other) == investor_state(same) == investor_state(again)
        assert investor_state(other) == (2, Decimal("7"), Decimal("0"), Decimal("0"))

    async def test_two_writers_of_one_stream_conflict_and_the_loser_retries_without_loss(
        self,
        store: EventStore,
    ) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")
        both_loaded = asyncio.Barrier(2)

        async def bid(amount: str) -> None:
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                await both_loaded.wait()
                investor.place_bid(uuid4(), Decimal(amount))
                await uow.save(investor)

        results = await asyncio.gather(bid("30"), bid("40"), return_exceptions=True)

        assert sorted(type(r).__name__ for r in results) == ["ConcurrencyConflict", "NoneType"]
        # The versions it had loaded: a retry that loads later ones lost to progress.
        [conflict] = [r for r in results if isinstance(r, ConcurrencyConflict)]
        assert conflict.loaded_at == ((investor_id, 2),)
        winner, loser = ("30", "40") if results[0] is None else ("40", "30")
        stream = await store.stream(investor_id)
        assert [e.version for e in stream] == [1, 2, 3]
        placed = stream[2].event
        assert isinstance(placed, BidOnInvoicePlacedEvent)
        assert placed.bid_amount == Decimal(winner)

        await place_bid(store, investor_id, loser)  # the retry reloads, then succeeds

        amounts = [
            e.event.bid_amount
            for e in await store.stream(investor_id)
            if isinstance(e.event, BidOnInvoicePlacedEvent)
        ]
        assert amounts == [Decimal(winner), Decimal(loser)]

    async def test_a_conflict_on_one_stream_discards_the_whole_unit_of_work(
        self,
        store: EventStore,
    ) -> None:
        contested, bystander = uuid4(), uuid4()
        await create_investor(store, contested, "100")

        with pytest.raises(ConcurrencyConflict):
            async with store.unit_of_work() as uow:
                stale = await uow.load(Investor, contested)
                fresh = await uow.load(Investor, bystander)
                await place_bid(store, contested, "10")  # another writer commits first
                fresh.create(Decimal("5"))
                stale.place_bid(uuid4(), Decimal("20"))
                await uow.save(fresh)
                await uow.save(stale)
                await uow.record("consumer", "message-1")

        assert await store.stream(bystander) == []
        assert [e.version for e in await store.stream(contested)] == [1, 2, 3]
        async with store.unit_of_work() as uow:
            assert not await uow.recorded("consumer", "message-1")

    async def test_a_recorded_message_is_seen_by_its_consumer_only(self, store: EventStore) -> None:
        async with store.unit_of_work() as uow:
            assert not await uow.recorded("projector", "m-1")
            await uow.record("projector", "m-1")

        async with store.unit_of_work() as uow:
            assert await uow.recorded("projector", "m-1")
            assert not await uow.recorded("relayer", "m-1")
            assert not await uow.recorded("projector", "m-2")

    async def test_recording_a_processed_message_again_conflicts(self, store: EventStore) -> None:
        async with store.unit_of_work() as uow:
            await uow.record("projector", "m-1")

        with pytest.raises(AlreadyProcessed):
            async with store.unit_of_work() as uow:
                await uow.record("projector", "m-1")

    async def test_forgetting_a_refusal_removes_that_record_and_no_other(
        self, store: EventStore
    ) -> None:
        refused = Processed("BidOnInvoice", REFUSED, "balance 0 is less than the bid 5")
        async with store.unit_of_work() as uow:
            await uow.record("bids", "refused-1", refused)
            await uow.record("bids", "applied-1")
            await uow.record("other", "refused-1", refused)

        await store.forget_refusal("bids", "refused-1")
        await store.forget_refusal("bids", "applied-1")  # not a refusal: kept

        async with store.unit_of_work() as uow:
            assert await uow.recorded("bids", "refused-1") is None
            assert await uow.recorded("bids", "applied-1") is not None
            assert await uow.recorded("other", "refused-1") == refused
            await uow.record("bids", "refused-1")  # judged again, it can be recorded again

    async def test_a_copy_of_a_processed_message_appends_nothing(self, store: EventStore) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")

        async def process_bid_message() -> None:
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                investor.place_bid(uuid4(), Decimal("10"))
                await uow.save(investor)
                await uow.record("bids", "message-7")

        await process_bid_message()
        with pytest.raises(AlreadyProcessed):
            await process_bid_message()  # breaks no rule: only its record says it is a copy

        assert [e.version for e in await store.stream(investor_id)] == [1, 2, 3]

    async def test_a_unit_of_work_acting_on_an_event_the_store_does_not_hold_writes_nothing(
        self, store: EventStore
    ) -> None:
        """Regression: a policy took any event under the id the store derives for it for one
        of the store's. Published by another under that id (at a version the stream has not
        reached, or over an event it holds), it financed an invoice with a bid never
        placed, and its record took the id of the event appended there later."""
        investor_id, other_id = uuid4(), uuid4()
        await create_investor(store, investor_id, "100")
        [_, added] = await store.stream(investor_id)
        held = RelayedEvent(investor_id, 2, added.name, added.body)
        forged = [
            dataclasses.replace(held, version=3),
            dataclasses.replace(held, body=added.body.replace("100", "500")),
            dataclasses.replace(held, name="InvestorFundsReleasedEvent"),
            dataclasses.replace(held, aggregate_id=other_id),
        ]
        assert forged[1].body != held.body

        async def act_on(event: RelayedEvent, message_id: str, save: bool) -> None:
            async with store.unit_of_work() as uow:
                await uow.acting_on(event)
                if save:
                    other = await uow.load(Investor, other_id)
                    other.create(Decimal("1"))
                    await uow.save(other)
                await uow.record("policy", message_id)

        for n, event in enumerate(forged):
            for save in (True, False):
                with pytest.raises(EventNotInStore, match="is not an event of this service"):
                    await act_on(event, f"forged-{n}-{save}", save)
        assert await store.stream(other_id) == []
        async with store.unit_of_work() as uow:
            assert [
                await uow.recorded("policy", f"forged-{n}-{s}")
                for n in range(4)
                for s in (True, False)
            ] == [None] * 8

        await act_on(held, "held", save=True)
        assert [e.version for e in await store.stream(other_id)] == [1, 2]
        async with store.unit_of_work() as uow:
            assert await uow.recorded("policy", "held") is not None

    async def test_a_message_processed_twice_at_once_takes_effect_once(
        self, store: EventStore
    ) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")
        both_checked = asyncio.Barrier(2)

        async def process_bid_message() -> None:
            async with store.unit_of_work() as uow:
                assert not await uow.recorded("bids", "message-7")
                investor = await uow.load(Investor, investor_id)
                await both_checked.wait()
                investor.place_bid(uuid4(), Decimal("10"))
                await uow.save(investor)
                await uow.record("bids", "message-7")

        results = await asyncio.gather(
            process_bid_message(), process_bid_message(), return_exceptions=True
        )

        assert sorted(type(r).__name__ for r in results) == ["ConcurrencyConflict", "NoneType"]
        assert [e.version for e in await store.stream(investor_id)] == [1, 2, 3]
        async with store.unit_of_work() as uow:
            assert await uow.recorded("bids", "message-7")

    async def test_an_exception_inside_the_unit_of_work_leaves_nothing_behind(
        self,
        store: EventStore,
    ) -> None:
        investor_id = uuid4()

        with pytest.raises(Boom):
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                investor.create(Decimal("50"))
                await uow.save(investor)
                await uow.record("investors", "message-1")
                raise Boom

        assert await store.stream(investor_id) == []
        assert await all_events(store) == []
        async with store.unit_of_work() as uow:
            assert not await uow.recorded("investors", "message-1")
            assert not (await uow.load(Investor, investor_id)).exists

    async def test_reading_after_a_write_in_one_unit_of_work_is_refused(
        self, store: EventStore
    ) -> None:
        investor_id = uuid4()

        with pytest.raises(ReadAfterWrite):
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                investor.create(Decimal("50"))
                await uow.save(investor)
                await uow.load(Invoice, uuid4())

        with pytest.raises(ReadAfterWrite):
            async with store.unit_of_work() as uow:
                await uow.record("investors", "message-1")
                await uow.recorded("investors", "message-2")

        assert await all_events(store) == []

    async def test_saving_an_unchanged_aggregate_is_not_a_write(self, store: EventStore) -> None:
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, uuid4())
            await uow.save(investor)
            assert not (await uow.load(Invoice, uuid4())).exists

        assert await all_events(store) == []

    async def test_an_aggregate_saved_again_appends_only_its_new_events(
        self, store: EventStore
    ) -> None:
        investor_id = uuid4()
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, investor_id)
            investor.create(Decimal("100"))
            await uow.save(investor)
            investor.place_bid(uuid4(), Decimal("10"))
            await uow.save(investor)
        assert investor.changes == []

        async with store.unit_of_work() as uow:
            investor.place_bid(uuid4(), Decimal("20"))
            await uow.save(investor)

        stream = await store.stream(investor_id)
        assert [e.version for e in stream] == [1, 2, 3, 4]
        assert [e.name for e in stream] == [
            "InvestorCreatedEvent",
            "InvestorFundsAddedEvent",
            "BidOnInvoicePlacedEvent",
            "BidOnInvoicePlacedEvent",
        ]

    async def test_stream_gives_one_aggregate_s_events_in_version_order(
        self, store: EventStore
    ) -> None:
        first, second = uuid4(), uuid4()
        await create_investor(store, first, "100")
        await create_investor(store, second, "100")
        for amount in ("1", "2", "3"):
            await place_bid(store, first, amount)
            await place_bid(store, second, amount)

        stream = await store.stream(first)

        assert [(e.aggregate_id, e.version) for e in stream] == [(first, v) for v in range(1, 6)]
        assert [
            e.event.bid_amount for e in stream[2:] if isinstance(e.event, BidOnInvoicePlacedEvent)
        ] == [
            Decimal("1"),
            Decimal("2"),
            Decimal("3"),
        ]

    async def test_read_all_gives_every_committed_event_once_in_commit_order(
        self,
        store: EventStore,
    ) -> None:
        first, second, third = uuid4(), uuid4(), uuid4()
        await create_investor(store, first, "100")
        await create_investor(store, second, "0")
        await place_bid(store, first, "10")
        await create_investor(store, third, "7")
        await place_bid(store, first, "20")
        expected = [
            (first, 1),
            (first, 2),
            (second, 1),
            (second, 2),  # funds of 0 added
            (first, 3),
            (third, 1),
            (third, 2),
            (first, 4),
        ]

        for batch_size in (1, 2, 3, 500):
            assert keys(await all_events(store, batch_size)) == expected

    async def test_event_message_ids_derive_from_aggregate_and_version(
        self, store: EventStore
    ) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")

        stream = await store.stream(investor_id)
        everything = await all_events(store)

        expected = [event_message_id(investor_id, 1), event_message_id(investor_id, 2)]
        assert [e.message_id for e in stream] == expected
        assert [e.message_id for e in everything] == expected
        assert [e.envelope().message_id for e in stream] == [str(i) for i in expected]
        assert len(set(expected)) == 2

    # Correlation and causation

    async def test_appended_events_keep_the_cause_of_their_unit_of_work(
        self, store: EventStore
    ) -> None:
        investor_id, other = uuid4(), uuid4()
        cause = Cause(correlation_id="saga-1", causation_id="message-1")
        async with store.unit_of_work(cause) as uow:
            investor = await uow.load(Investor, investor_id)
            investor.create(Decimal("100"))
            await uow.save(investor)
        await create_investor(store, other, "5")  # no cause: another unit of work

        stream = await store.stream(investor_id)
        everything = await all_events(store)

        assert [(e.correlation_id, e.causation_id) for e in stream] == [
            ("saga-1", "message-1"),
            ("saga-1", "message-1"),
        ]
        assert [(e.aggregate_id, e.correlation_id, e.causation_id) for e in everything] == [
            (investor_id, "saga-1", "message-1"),
            (investor_id, "saga-1", "message-1"),
            (other, None, None),
            (other, None, None),
        ]

    async def test_each_unit_of_work_gives_its_events_its_own_cause(
        self, store: EventStore
    ) -> None:
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")
        for n in (1, 2):
            async with store.unit_of_work(Cause(f"saga-{n}", f"bid-{n}")) as uow:
                investor = await uow.load(Investor, investor_id)
                investor.place_bid(uuid4(), Decimal(n))
                await uow.save(investor)

        stream = await store.stream(investor_id)

        assert [(e.version, e.correlation_id, e.causation_id) for e in stream] == [
            (1, None, None),
            (2, None, None),
            (3, "saga-1", "bid-1"),
            (4, "saga-2", "bid-2"),
        ]


class TestInMemoryEventStore(EventStoreContract):
    @pytest.fixture
    def store(self) -> EventStore:
        return InMemoryEventStore()


class TestPostgresEventStore(EventStoreContract):
    @pytest.fixture
    async def store(self, pool: asyncpg.Pool) -> EventStore:
        await _truncate(pool)
        return PostgresEventStore(pool)

    # Round trips and transactions

    async def test_a_unit_of_work_sends_one_statement_per_read_and_one_for_all_its_writes(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool, snapshot_interval=2)
        investor_id = uuid4()
        sent: list[str] = []

        def note(query: object) -> None:
            sent.append(getattr(query, "query", ""))

        async def create(single: Any, investor_id: UUID, message_id: str) -> None:
            async with PostgresEventStore(single, snapshot_interval=2).unit_of_work(
                Cause("saga-1", message_id)
            ) as uow:
                assert not await uow.recorded("create_investor", message_id)
                investor = await uow.load(Investor, investor_id)
                investor.create(Decimal("10"))  # versions 1-2: a snapshot is due
                await uow.save(investor)
                await uow.record("create_investor", message_id)

        async with pool.acquire() as conn:
            single = infra.OneConnectionPool(conn)
            # Once first: the driver's first use of a statement on a connection may
            # look up the types it uses.
            await create(single, uuid4(), "message-0")
            conn.add_query_logger(note)
            await create(single, investor_id, "message-1")
            conn.remove_query_logger(note)

        # seen, load, then one write (no BEGIN, no COMMIT), which notifies the relayer
        # itself at its commit: no other unit of work was committing
        assert len(sent) == 3, sent
        assert sent[2].startswith("WITH appended AS") and "pg_notify" in sent[2]
        assert [e.version for e in await store.stream(investor_id)] == [1, 2]
        assert (
            await pool.fetchval(
                "SELECT version FROM snapshots WHERE aggregate_id = $1", investor_id
            )
            == 2
        )
        async with store.unit_of_work() as uow:
            assert await uow.recorded("create_investor", "message-1")

    async def test_a_unit_of_work_committing_beside_another_rings_the_bell_after_its_commit(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        async with pool.acquire() as first, pool.acquire() as second, pool.acquire() as locker:
            sent: dict[int, list[str]] = {id(first): [], id(second): []}
            for conn in (first, second):
                conn.add_query_logger(
                    lambda query, conn=conn: sent[id(conn)].append(getattr(query, "query", ""))
                )
            store = PostgresEventStore(LentInTurn([first, second]))
            held, beside = uuid4(), uuid4()

            async def create(investor_id: UUID, message_id: str | None) -> None:
                async with store.unit_of_work() as uow:
                    investor = Investor(investor_id)
                    investor.create(Decimal("10"))
                    await uow.save(investor)
                    if message_id is not None:
                        await uow.record("create_investor", message_id)

            async with locker.transaction():
                # The first unit of work's write records a message: it waits for the lock.
                await locker.execute("LOCK TABLE processed_messages IN EXCLUSIVE MODE")
                waiting = asyncio.create_task(create(held, "message-1"))
                await infra.wait_until(
                    lambda: locker.fetchval(
                        "SELECT count(*) > 0 FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    ),
                    what="the first write waiting for the lock",
                )
                await create(beside, None)
            await asyncio.wait_for(waiting, timeout=15)

        writes = {
            conn: [q for q in queries if q.startswith("WITH appended AS")]
            for conn, queries in sent.items()
        }
        rings = {
            conn: [q for q in queries if q.startswith("SELECT set_config")]
            for conn, queries in sent.items()
        }
        # The first began its commit alone: its write notifies, and it rings no bell.
        assert len(writes[id(first)]) == 1 and "pg_notify" in writes[id(first)][0]
        assert rings[id(first)] == []
        # The second committed while the first's write was on its way: it rings after.
        assert len(writes[id(second)]) == 1 and "pg_notify" not in writes[id(second)][0]
        assert len(rings[id(second)]) == 1
        assert [len(await PostgresEventStore(pool).stream(i)) for i in (held, beside)] == [2, 2]

    async def test_an_open_unit_of_work_holds_no_transaction_while_its_handler_decides(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool)
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, uuid4())
            investor.create(Decimal("10"))
            await uow.save(investor)
            # Nothing is written yet, and nothing of ours holds the server's horizon:
            # events committed meanwhile by others are relayable at once.
            assert await store.stream(investor.id) == []
            in_transaction = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND backend_xid IS NOT NULL"
            )
            assert in_transaction == 0
        assert [e.version for e in await store.stream(investor.id)] == [1, 2]

    # Snapshots

    async def test_loading_from_snapshots_matches_a_full_replay(self, pool: asyncpg.Pool) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool, snapshot_interval=2)
        investor_id = uuid4()
        steps: list[Callable[[Investor], object]] = [
            lambda i: i.create(Decimal("100")),  # versions 1-2: snapshot at 2
            lambda i: i.place_bid(uuid4(), Decimal("30")),  # 3
            lambda i: i.place_bid(uuid4(), Decimal("20")),  # 4: snapshot
            lambda i: i.release_funds(Decimal("20")),  # 5
            lambda i: i.commit_funds(Decimal("30")),  # 6: snapshot
            lambda i: i.place_bid(uuid4(), Decimal("50")),  # 7
        ]
        for step in steps:
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                step(investor)
                await uow.save(investor)

        async with store.unit_of_work() as uow:
            loaded = await uow.load(Investor, investor_id)
        replayed = Investor(investor_id).replay(e.event for e in await store.stream(investor_id))

        assert investor_state(loaded) == investor_state(replayed)
        assert investor_state(loaded) == (7, Decimal("20"), Decimal("50"), Decimal("30"))
        assert loaded.changes == []
        snapshot = await pool.fetchrow(
            "SELECT version, aggregate_type FROM snapshots WHERE aggregate_id = $1", investor_id
        )
        assert snapshot is not None
        assert (snapshot["version"], snapshot["aggregate_type"]) == (6, "Investor")

    async def test_loading_starts_from_the_snapshot_and_replays_only_later_events(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool, snapshot_interval=2)
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")  # snapshot at version 2
        await place_bid(store, investor_id, "10")  # version 3, after the snapshot
        # Mark the snapshot: a load that ignores it, or replays events it covers, shows.
        marked = {"balance": "1000", "reserved": "0", "committed": "0"}
        await pool.execute(
            "UPDATE snapshots SET state = $2::jsonb WHERE aggregate_id = $1",
            investor_id,
            json.dumps(marked),
        )

        async with store.unit_of_work() as uow:
            loaded = await uow.load(Investor, investor_id)

        assert investor_state(loaded) == (3, Decimal("990"), Decimal("10"), Decimal("0"))

    async def test_two_aggregates_loaded_together_take_one_statement_from_their_snapshots(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool, snapshot_interval=2)
        first, second = uuid4(), uuid4()
        for investor_id, balance in ((first, "1000"), (second, "2000")):
            await create_investor(store, investor_id, "100")  # snapshot at version 2
            await place_bid(store, investor_id, "10")  # version 3, after the snapshot
            # Mark each snapshot: a load that ignores it, or replays events it covers, shows.
            await pool.execute(
                "UPDATE snapshots SET state = $2::jsonb WHERE aggregate_id = $1",
                investor_id,
                json.dumps({"balance": balance, "reserved": "0", "committed": "0"}),
            )
        sent: list[str] = []

        def note(query: object) -> None:
            sent.append(getattr(query, "query", ""))

        async with pool.acquire() as conn:
            single = infra.OneConnectionPool(conn)
            conn.add_query_logger(note)
            async with PostgresEventStore(single).unit_of_work() as uow:  # type: ignore[arg-type]
                one, two = await uow.load_both(Investor, first, Investor, second)
            conn.remove_query_logger(note)

        assert len(sent) == 1, sent
        assert investor_state(one) == (3, Decimal("990"), Decimal("10"), Decimal("0"))
        assert investor_state(two) == (3, Decimal("1990"), Decimal("10"), Decimal("0"))

    async def test_a_load_that_replayed_an_interval_of_events_takes_a_snapshot_saved_or_not(
        self, pool: asyncpg.Pool
    ) -> None:
        """Regression (probes): a stream left without a recent snapshot (its row missing,
        here deleted) was replayed whole by every command until it crossed its next
        multiple of the interval (53,000 events each time), and by every command its
        aggregate refused for ever."""
        await _truncate(pool)
        store = PostgresEventStore(pool, snapshot_interval=5)
        investor_id = uuid4()
        await create_investor(store, investor_id, "100")
        for _ in range(9):
            await place_bid(store, investor_id, "1")  # versions 3-11, snapshot at 10
        await pool.execute("DELETE FROM snapshots WHERE aggregate_id = $1", investor_id)
        with pytest.raises(RuleViolation):  # refused: writes nothing of its own
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                investor.place_bid(uuid4(), Decimal("1000"))
        snapshot = "SELECT version FROM snapshots WHERE aggregate_id = $1"
        assert await pool.fetchval(snapshot, investor_id) == 11
        await place_bid(store, investor_id, "1")  # version 12: no multiple of 5 crossed
        assert await pool.fetchval(snapshot, investor_id) == 11  # 1 event replayed
        async with store.unit_of_work() as uow:
            loaded = await uow.load(Investor, investor_id)
        assert investor_state(loaded) == (12, Decimal("90"), Decimal("10"), Decimal("0"))

    async def test_folding_a_long_stream_gives_the_rest_of_the_process_turns(
        self, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Regression (a probe): a stream of 53,000 events replayed without a snapshot held
        the event loop 0.44 s per load, several loads back to back: health checks waited
        seconds and the relayer lost its lock."""
        await _truncate(pool)
        store = PostgresEventStore(pool, snapshot_interval=100_000)
        investor_id = uuid4()
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, investor_id)
            investor.create(Decimal("100"))
            for _ in range(1_500):
                investor.place_bid(uuid4(), Decimal("0.01"))
            await uow.save(investor)
        loop = asyncio.get_running_loop()
        turns = 0
        seen_at: list[int] = []  # the turns the rest of the loop had, as each event is decoded

        def turn() -> None:  # a callback the loop runs once each time round
            nonlocal turns, ticking
            turns += 1
            ticking = loop.call_soon(turn)

        ticking = loop.call_soon(turn)

        real = event_store_module._event

        def decoded(name: str, body: str, aggregate_id: UUID) -> Any:
            seen_at.append(turns)
            return real(name, body, aggregate_id)

        monkeypatch.setattr(event_store_module, "_event", decoded)
        try:
            async with store.unit_of_work() as uow:
                loaded = await uow.load(Investor, investor_id)
        finally:
            ticking.cancel()
        assert loaded.version == 1_502 and len(seen_at) == 1_502
        assert seen_at[-1] - seen_at[0] >= 2, "the fold never let another task run"

    async def test_an_invoice_restored_from_a_snapshot_keeps_its_winning_bid(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool, snapshot_interval=2)
        invoice_id, issuer_id, investor_id = uuid4(), uuid4(), uuid4()
        bid = Bid(investor_id=investor_id, amount=Decimal("120.50"))
        invoice_steps: list[Callable[[Invoice], object]] = [
            lambda i: i.create(issuer_id, Decimal("100.25")),
            lambda i: i.bid(bid),  # version 2: snapshot
            lambda i: i.approve(),
        ]
        for step in invoice_steps:
            async with store.unit_of_work() as uow:
                invoice = await uow.load(Invoice, invoice_id)
                step(invoice)
                await uow.save(invoice)

        async with store.unit_of_work() as uow:
            loaded = await uow.load(Invoice, invoice_id)
        replayed = Invoice(invoice_id).replay(e.event for e in await store.stream(invoice_id))

        assert loaded.snapshot() == replayed.snapshot()
        assert loaded.version == replayed.version == 3
        assert loaded.winning_bid == bid
        assert loaded.asking_price == Decimal("100.25")

    # What a processed message leaves behind

    async def test_stored_events_are_read_back_with_the_time_their_transaction_recorded_them(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool)
        investor_id = uuid4()
        before = await pool.fetchval("SELECT clock_timestamp()")
        await create_investor(store, investor_id, "100")
        after = await pool.fetchval("SELECT clock_timestamp()")

        stream = await store.stream(investor_id)
        everything = await all_events(store)

        [first, second] = [e.recorded_at for e in stream]
        assert first is not None and first.utcoffset() is not None  # a point in time
        assert before <= first <= after
        assert first == second  # one transaction, one time
        assert [e.recorded_at for e in everything] == [first, second]

    async def test_a_processed_message_is_recorded_with_its_name_correlation_and_outcome(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool)
        async with store.unit_of_work(Cause("saga-1", "message-1")) as uow:
            await uow.record(
                "approve_financing",
                "message-1",
                Processed("ApproveFinancing", "unchanged", "Invoice 1: is AVAILABLE", 0),
            )
        async with store.unit_of_work(Cause("saga-1", "message-2")) as uow:
            await uow.record("create_investor", "message-2", Processed("CreateInvestor", events=2))

        assert await processed_messages(pool) == [
            ("approve_financing", "message-1", "ApproveFinancing", "saga-1", "unchanged",
             "Invoice 1: is AVAILABLE", 0),
            ("create_investor", "message-2", "CreateInvestor", "saga-1", "processed", None, 2),
        ]  # fmt: skip

    async def test_a_message_recorded_without_details_is_processed_with_nothing_else_known(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool)
        async with store.unit_of_work() as uow:
            await uow.record("projector", "m-1")

        assert await processed_messages(pool) == [
            ("projector", "m-1", None, None, "processed", None, 0)
        ]

    @pytest.mark.parametrize("correlation_id", ["saga-9", None], ids=["correlated", "foreign"])
    async def test_a_delivered_command_leaves_its_cause_on_its_events_and_its_outcome_recorded(
        self, pool: asyncpg.Pool, correlation_id: str | None
    ) -> None:
        # Through the pipeline's parts, as a command consumer runs them (but `retried`).
        store, step = await _command_step(pool, "CreateInvestor", handlers.create_investor)
        investor_id, message_id = uuid4(), str(uuid4())
        envelope = envelope_of(CreateInvestor(investor_id, Decimal("10")), message_id)
        if correlation_id is not None:
            envelope = dataclasses.replace(envelope, headers={"correlation_id": correlation_id})
        correlation = correlation_id or message_id  # a foreign message starts its own

        assert await step(MemoryDelivery(envelope)) == Outcome.processed(2)

        assert [(e.correlation_id, e.causation_id) for e in await store.stream(investor_id)] == [
            (correlation, message_id),
            (correlation, message_id),
        ]
        assert await processed_messages(pool) == [
            ("create_investor", message_id, "CreateInvestor", correlation, "processed", None, 2)
        ]

    async def test_the_event_a_consumer_processed_last_is_dated_by_its_record(
        self, pool: asyncpg.Pool
    ) -> None:
        """What dates a queue deleted under its consumer in every instance (the standby
        of a queue had no delivery of its own to date it): when the store recorded the
        event whose message id the consumer's newest record names."""
        await _truncate(pool)
        store = PostgresEventStore(pool)
        now = datetime.now(UTC)
        assert await store.last_processed_recorded_at("a_policy", now) is None
        first, second = uuid4(), uuid4()
        for saga, investor in (("saga-1", first), ("saga-2", second)):
            async with store.unit_of_work(Cause(saga, f"command-{saga}")) as uow:
                created = await uow.load(Investor, investor)
                created.create(Decimal("100"))
                await uow.save(created)
        async with store.unit_of_work(Cause("saga-1", "command-bid")) as uow:
            bidding = await uow.load(Investor, first)
            bidding.place_bid(uuid4(), Decimal("10"))  # later in saga-1's correlation
            await uow.save(bidding)
        [created, _, placed] = await store.stream(first)
        [_, later] = await store.stream(second)
        assert created.recorded_at < placed.recorded_at and created.recorded_at < later.recorded_at

        # Not the correlation's earliest event: the one the record names.
        taken: list[datetime] = []
        for saga, event in (("saga-1", placed), ("saga-2", later)):
            message_id = event.envelope().message_id
            async with store.unit_of_work(Cause(saga, message_id)) as uow:
                await uow.record("a_policy", message_id)
            taken.append(await pool.fetchval("SELECT clock_timestamp()"))
            assert await store.last_processed_recorded_at("a_policy", taken[-1]) == (
                event.recorded_at
            )
        assert await store.last_processed_recorded_at("another_policy", taken[-1]) is None
        # Those processed after a time are not taken for it (what a queue deleted then
        # held is dated by what its consumer had processed by then).
        assert await store.last_processed_recorded_at("a_policy", taken[0]) == placed.recorded_at
        assert await store.last_processed_recorded_at("a_policy", now) is None

    async def test_a_copy_is_a_duplicate_and_another_message_under_its_id_is_refused(
        self, pool: asyncpg.Pool
    ) -> None:
        await _truncate(pool)
        store = PostgresEventStore(pool)
        step = decoded(exactly_once(store, "create_investor", handlers.create_investor))
        message_id = str(uuid4())
        first = envelope_of(CreateInvestor(uuid4(), Decimal("10")), message_id)
        reusing = CreateInvestor(uuid4(), Decimal("20"))
        other = envelope_of(reusing, message_id)
        assert await step(MemoryDelivery(first)) == Outcome.processed(2)

        assert (await step(MemoryDelivery(first))).kind is OutcomeKind.DUPLICATE
        with pytest.raises(ReusedMessageId, match="already processed a CreateInvestor message"):
            await step(MemoryDelivery(other))

        async with store.unit_of_work() as uow:
            recorded = await uow.recorded("create_investor", message_id)
        assert recorded == Processed("CreateInvestor", "processed", "", 2, body_digest(first.body))
        assert await store.stream(reusing.id) == []

    async def test_a_forged_bid_is_dead_lettered_and_the_bid_placed_at_its_version_offered(
        self, pool: asyncpg.Pool
    ) -> None:
        """Regression: a BidOnInvoicePlacedEvent published by another under the id the store
        derives for the investor's next version financed the invoice with a bid never
        placed; the bid the investor placed next, at that version, was then dead-lettered
        as reusing a processed id, its funds left reserved for good."""
        store, step = await _command_step(
            pool, "BidOnInvoicePlacedEvent", policies.bid_placed_offers_bid_to_invoice
        )
        investor_id, invoice_id = uuid4(), uuid4()
        await create_investor(store, investor_id, "100")
        async with store.unit_of_work() as uow:
            invoice = await uow.load(Invoice, invoice_id)
            invoice.create(uuid4(), Decimal("10"))
            await uow.save(invoice)
        forged = BidOnInvoicePlacedEvent(investor_id, invoice_id, Decimal("50"))

        with pytest.raises(EventNotInStore):
            await step(MemoryDelivery(envelope_of(forged, version=3)))

        assert [e.name for e in await store.stream(invoice_id)] == ["InvoiceCreatedEvent"]
        await place_bid(store, investor_id, "20", invoice_id)
        [placed] = (await store.stream(investor_id))[2:]
        assert await step(MemoryDelivery(placed.envelope())) == Outcome.processed(1)
        [financed] = (await store.stream(invoice_id))[1:]
        assert financed.event == InvoiceFinancedEvent(
            invoice_id, Decimal("10"), Bid(investor_id, Decimal("20"))
        )

    async def test_a_delivered_command_that_changed_nothing_is_recorded_unchanged_and_why(
        self, pool: asyncpg.Pool
    ) -> None:
        _, step = await _command_step(pool, "CreateIssuer", handlers.create_issuer)
        issuer_id, first, again = uuid4(), str(uuid4()), str(uuid4())
        await step(MemoryDelivery(envelope_of(CreateIssuer(issuer_id), first)))

        outcome = await step(MemoryDelivery(envelope_of(CreateIssuer(issuer_id), again)))

        assert outcome == Outcome(OutcomeKind.UNCHANGED, f"Issuer {issuer_id}: already exists")
        assert await processed_messages(pool) == [
            ("create_issuer", first, "CreateIssuer", first, "processed", None, 1),
            ("create_issuer", again, "CreateIssuer", again, "unchanged", outcome.detail, 0),
        ]

    async def test_a_delivered_command_a_rule_refused_is_recorded_refused_and_why(
        self, pool: asyncpg.Pool
    ) -> None:
        _, step = await _command_step(pool, "CreateInvestor", handlers.create_investor)
        message_id = str(uuid4())
        command = CreateInvestor(uuid4(), Decimal("-1"))

        rule = f"investor {command.id}: initial balance must be >= 0, got -1"
        for _ in range(2):  # a copy is dead-lettered again for the rule recorded
            with pytest.raises(RuleViolation, match=re.escape(rule)):  # to be dead-lettered
                await step(MemoryDelivery(envelope_of(command, message_id)))

        assert await processed_messages(pool) == [
            ("create_investor", message_id, "CreateInvestor", message_id, "refused", rule, 0),
        ]


async def _command_step(
    pool: asyncpg.Pool, name: str, handler: StoreHandler
) -> tuple[PostgresEventStore, Step]:
    """An empty event store, and a command's delivery through the pipeline's parts as its
    consumer runs them (but `retried`), under the handler's name."""
    await _truncate(pool)
    store = PostgresEventStore(pool)
    step = selected(frozenset({name}), OutcomeKind.DEAD_LETTERED)(
        decoded(exactly_once(store, handler.__name__, handler))
    )
    return store, step


async def processed_messages(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    """Every processed message as recorded, oldest first."""
    rows = await pool.fetch(
        "SELECT consumer, message_id, name, correlation_id, outcome, detail, events"
        " FROM processed_messages ORDER BY processed_at, consumer, message_id"
    )
    return [tuple(row.values()) for row in rows]
