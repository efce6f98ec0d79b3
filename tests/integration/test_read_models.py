"""Contract of ReadModelStore, run against the in-memory and the PostgreSQL read models.

`ReadModelContract` holds the tests; each implementation subclasses it and
provides the `store` fixture, so only the PostgreSQL suite asks for a
database (the in-memory one runs without any server).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import asyncpg
import pytest

from financing.adapters.postgres.connection import QUERY_DATABASE
from financing.adapters.postgres.read_models import PostgresReadModels, create_tables
from financing.application.errors import Unavailable
from financing.application.read_models import (
    InMemoryReadModels,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    ReadModelStore,
)
from financing.domain import events as ev
from financing.domain.aggregates import InvoiceStatus
from financing.domain.events import Bid, DomainEvent
from tests.support import infra
from tests.support.service import ROOT

D = Decimal
AVAILABLE = InvoiceStatus.AVAILABLE
FINANCED = InvoiceStatus.FINANCED
APPROVED = InvoiceStatus.APPROVED
REVERSED = InvoiceStatus.REVERSED


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_read_models", "queries") as pool:
        yield pool


async def fresh_read_models(pool: asyncpg.Pool) -> PostgresReadModels:
    """Read models in a fresh, empty schema of their own."""
    schema = f"read_models_{uuid4().hex[:12]}"
    async with pool.acquire() as conn:
        await create_tables(conn, schema)
    return PostgresReadModels(pool, schema)


async def apply(store: ReadModelStore, *events: DomainEvent) -> None:
    """Apply each event once, under a new message id, in one batch."""
    await store.apply([(str(uuid4()), event) for event in events])


async def investor(store: ReadModelStore, investor_id: UUID) -> InvestorRow:
    [row] = [row for row in await store.investors() if row.id == investor_id]
    return row


async def invoice(store: ReadModelStore, invoice_id: UUID) -> InvoiceRow:
    [row] = [row for row in await store.invoices() if row.id == invoice_id]
    return row


def created_investor(investor_id: UUID, balance: str = "0") -> list[DomainEvent]:
    events: list[DomainEvent] = [ev.InvestorCreatedEvent(investor_id)]
    if D(balance) > 0:
        events.append(ev.InvestorFundsAddedEvent(investor_id, D(balance)))
    return events


class ReadModelContract:
    """What every ReadModelStore does; a subclass per implementation provides `store`."""

    @pytest.fixture
    def store(self) -> ReadModelStore:
        raise NotImplementedError("a subclass provides the store under test")

    async def test_apply_says_which_messages_it_projected_now(self, store: ReadModelStore) -> None:
        investor_id = uuid4()
        created = (str(uuid4()), ev.InvestorCreatedEvent(investor_id))
        added = (str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, D(5)))
        assert await store.apply([created]) == {created[0]}
        # One projected before, one new, and the new one's copy in the same batch.
        assert await store.apply([created, added, added]) == {added[0]}
        assert await store.apply([created, added]) == set()
        assert await investor(store, investor_id) == InvestorRow(investor_id, D(5), D(0), D(0))

    async def test_a_digest_given_with_a_message_is_recorded_with_its_id(
        self, store: ReadModelStore
    ) -> None:
        issuer = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        relayed = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        # At once (nothing projected before), then one beside a copy (recorded first).
        assert await store.apply([issuer, relayed], {issuer[0]: "d-1"}) == {issuer[0], relayed[0]}
        later = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        assert await store.apply([issuer, later], {issuer[0]: "d-2", later[0]: "d-3"}) == {later[0]}
        wanted = [issuer[0], relayed[0], later[0], str(uuid4())]
        assert await store.digests(wanted) == {issuer[0]: "d-1", later[0]: "d-3"}

    async def test_apply_keeps_when_each_event_was_recorded_with_its_record(
        self, store: ReadModelStore
    ) -> None:
        at = datetime(2026, 12, 5, 10, 0, 0, 123456, tzinfo=UTC)
        first = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        timeless = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))  # another relayer's
        await store.apply([first, timeless], recorded={first[0]: at})
        # A copy given another time changes nothing of what was kept.
        await store.apply([first], recorded={first[0]: at + timedelta(seconds=1)})

        wanted = [first[0], timeless[0], str(uuid4())]
        assert await store.recorded_at(wanted) == {first[0]: at}

    async def test_the_events_applied_with_a_digest_are_kept_in_the_order_applied(
        self, store: ReadModelStore
    ) -> None:
        # Kept beside the read models' schema, for the whole database (a rebuild replaces
        # the schema): from those kept before this test.
        earlier = await store.foreign_events(limit=1_000_000)
        start = earlier[-1].position if earlier else 0
        foreign = [(str(uuid4()), ev.IssuerCreatedEvent(uuid4())) for _ in range(3)]
        relayed = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        digests = {message_id: f"d-{message_id}" for message_id, _ in foreign}
        await store.apply([foreign[0], relayed, foreign[1], foreign[0]], digests)
        await store.apply([foreign[1], foreign[2]], digests)  # a copy, then a new one

        kept = await store.foreign_events(after=start)
        assert [(k.message_id, k.event, k.digest) for k in kept] == [
            (message_id, event, digests[message_id]) for message_id, event in foreign
        ]
        assert await store.foreign_events(after=kept[0].position, limit=1) == [kept[1]]
        assert await store.foreign_events(after=kept[-1].position) == []

    # Investors

    async def test_new_investor_has_nothing_in_balance_reserved_or_committed(
        self,
        store: ReadModelStore,
    ) -> None:
        investor_id = uuid4()
        await apply(store, ev.InvestorCreatedEvent(investor_id))
        assert await store.investors() == [InvestorRow(investor_id, D(0), D(0), D(0))]

    async def test_added_funds_increase_the_balance(self, store: ReadModelStore) -> None:
        investor_id = uuid4()
        await apply(store, *created_investor(investor_id, "100"))
        assert await investor(store, investor_id) == InvestorRow(investor_id, D(100), D(0), D(0))

    async def test_placed_bid_moves_funds_from_balance_to_reserved(
        self, store: ReadModelStore
    ) -> None:
        investor_id = uuid4()
        await apply(store, *created_investor(investor_id, "100"))
        await apply(store, ev.BidOnInvoicePlacedEvent(investor_id, uuid4(), D(30)))
        assert await investor(store, investor_id) == InvestorRow(investor_id, D(70), D(30), D(0))

    async def test_released_funds_move_back_from_reserved_to_balance(
        self, store: ReadModelStore
    ) -> None:
        investor_id = uuid4()
        await apply(store, *created_investor(investor_id, "100"))
        await apply(store, ev.BidOnInvoicePlacedEvent(investor_id, uuid4(), D(30)))
        await apply(store, ev.InvestorFundsReleasedEvent(investor_id, D(10)))
        assert await investor(store, investor_id) == InvestorRow(investor_id, D(80), D(20), D(0))

    async def test_committed_funds_move_from_reserved_to_committed(
        self, store: ReadModelStore
    ) -> None:
        investor_id = uuid4()
        await apply(store, *created_investor(investor_id, "100"))
        await apply(store, ev.BidOnInvoicePlacedEvent(investor_id, uuid4(), D(30)))
        await apply(store, ev.InvestorFundsCommittedEvent(investor_id, D(20)))
        assert await investor(store, investor_id) == InvestorRow(investor_id, D(70), D(10), D(20))

    @pytest.mark.parametrize("amount", ["0", "-5"])
    async def test_amounts_of_zero_or_less_change_nothing(
        self, store: ReadModelStore, amount: str
    ) -> None:
        investor_id, stranger = uuid4(), uuid4()
        await apply(store, *created_investor(investor_id, "100"))
        await apply(store, ev.BidOnInvoicePlacedEvent(investor_id, uuid4(), D(30)))
        for who in (investor_id, stranger):
            await apply(
                store,
                ev.InvestorFundsAddedEvent(who, D(amount)),
                ev.BidOnInvoicePlacedEvent(who, uuid4(), D(amount)),
                ev.InvestorFundsReleasedEvent(who, D(amount)),
                ev.InvestorFundsCommittedEvent(who, D(amount)),
            )
        assert await store.investors() == [InvestorRow(investor_id, D(70), D(30), D(0))]

    async def test_three_additions_of_a_tenth_read_back_exactly_three_tenths(
        self,
        store: ReadModelStore,
    ) -> None:
        investor_id = uuid4()
        await apply(store, ev.InvestorCreatedEvent(investor_id))
        for _ in range(3):
            await apply(store, ev.InvestorFundsAddedEvent(investor_id, D("0.1")))
        row = await investor(store, investor_id)
        assert row.balance == D("0.3")
        assert float(row.balance) == 0.3

    # Invoices

    async def test_created_invoice_is_available_without_a_winning_bid(
        self, store: ReadModelStore
    ) -> None:
        invoice_id, issuer_id = uuid4(), uuid4()
        await apply(store, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D("20.50")))
        assert await store.invoices() == [
            InvoiceRow(invoice_id, issuer_id, D("20.50"), AVAILABLE, None)
        ]

    async def test_financed_invoice_records_the_winning_bid(self, store: ReadModelStore) -> None:
        invoice_id, issuer_id, bid = uuid4(), uuid4(), Bid(uuid4(), D(20))
        await apply(store, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D(10)))
        await apply(store, ev.InvoiceFinancedEvent(invoice_id, D(10), bid))
        assert await invoice(store, invoice_id) == InvoiceRow(
            invoice_id, issuer_id, D(10), FINANCED, bid
        )

    @pytest.mark.parametrize(
        ("event_type", "status"),
        [(ev.InvoiceApprovedEvent, APPROVED), (ev.InvoiceReversedEvent, REVERSED)],
    )
    async def test_approved_or_reversed_invoice_keeps_its_winning_bid(
        self,
        store: ReadModelStore,
        event_type: type[ev.InvoiceApprovedEvent] | type[ev.InvoiceReversedEvent],
        status: InvoiceStatus,
    ) -> None:
        invoice_id, issuer_id, bid = uuid4(), uuid4(), Bid(uuid4(), D(20))
        await apply(store, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D(10)))
        await apply(store, ev.InvoiceFinancedEvent(invoice_id, D(10), bid))
        await apply(store, event_type(invoice_id, D(10), bid))
        assert await invoice(store, invoice_id) == InvoiceRow(
            invoice_id, issuer_id, D(10), status, bid
        )

    async def test_rejected_bid_changes_no_invoice(self, store: ReadModelStore) -> None:
        invoice_id, issuer_id = uuid4(), uuid4()
        await apply(store, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D(10)))
        await apply(store, ev.BidOnInvoiceRejectedEvent(invoice_id, Bid(uuid4(), D(5))))
        await apply(store, ev.BidOnInvoiceRejectedEvent(uuid4(), Bid(uuid4(), D(5))))
        assert await store.invoices() == [InvoiceRow(invoice_id, issuer_id, D(10), AVAILABLE, None)]

    # Issuers and lists

    async def test_created_issuer_is_listed(self, store: ReadModelStore) -> None:
        issuer_id = uuid4()
        await apply(store, ev.IssuerCreatedEvent(issuer_id))
        assert await store.issuers() == [IssuerRow(issuer_id)]

    async def test_lists_are_empty_before_any_event(self, store: ReadModelStore) -> None:
        assert await store.investors() == []
        assert await store.invoices() == []
        assert await store.issuers() == []

    async def test_lists_keep_creation_order_whatever_is_updated_later(
        self,
        store: ReadModelStore,
    ) -> None:
        # Ids sorted in reverse, so neither id order nor update order can pass for creation order.
        investors = sorted((uuid4() for _ in range(3)), reverse=True)
        invoices = sorted((uuid4() for _ in range(3)), reverse=True)
        issuers = sorted((uuid4() for _ in range(3)), reverse=True)
        for i in range(3):
            await apply(store, ev.IssuerCreatedEvent(issuers[i]))
            await apply(store, ev.InvestorCreatedEvent(investors[i]))
            await apply(store, ev.InvoiceCreatedEvent(invoices[i], issuers[i], D(10)))
        await apply(
            store,
            ev.InvestorFundsAddedEvent(investors[0], D(5)),
            ev.InvoiceFinancedEvent(invoices[0], D(10), Bid(investors[0], D(10))),
        )
        assert [row.id for row in await store.investors()] == investors
        assert [row.id for row in await store.invoices()] == invoices
        assert [row.id for row in await store.issuers()] == issuers

    async def test_one_batch_lists_rows_in_the_order_of_their_first_events(
        self, store: ReadModelStore
    ) -> None:
        # As the relayer delivers a saga's events: an update of an older row first, then
        # rows created and updated in between. A batch projects them as one by one would.
        old_investor, old_invoice, issuer = uuid4(), uuid4(), uuid4()
        await apply(store, *created_investor(old_investor, "100"))
        await apply(store, ev.InvoiceCreatedEvent(old_invoice, issuer, D(10)))
        first, second = uuid4(), uuid4()
        first_invoice, second_invoice = uuid4(), uuid4()
        await apply(
            store,
            ev.InvestorFundsAddedEvent(old_investor, D(5)),
            ev.InvoiceFinancedEvent(old_invoice, D(10), Bid(old_investor, D(10))),
            ev.InvestorCreatedEvent(first),
            ev.InvoiceCreatedEvent(first_invoice, issuer, D(20)),
            ev.InvestorCreatedEvent(second),
            ev.InvestorFundsAddedEvent(second, D(50)),
            ev.InvoiceCreatedEvent(second_invoice, issuer, D(30)),
            ev.InvoiceFinancedEvent(second_invoice, D(30), Bid(second, D(30))),
            ev.InvestorFundsAddedEvent(first, D(7)),
            ev.InvoiceApprovedEvent(second_invoice, D(30), Bid(second, D(30))),
        )

        assert await store.investors() == [
            InvestorRow(old_investor, D(105), D(0), D(0)),
            InvestorRow(first, D(7), D(0), D(0)),
            InvestorRow(second, D(50), D(0), D(0)),
        ]
        assert [(row.id, row.status) for row in await store.invoices()] == [
            (old_invoice, FINANCED),
            (first_invoice, AVAILABLE),
            (second_invoice, APPROVED),
        ]

    # Idempotency

    async def test_message_applied_again_changes_nothing(self, store: ReadModelStore) -> None:
        investor_id = uuid4()
        batch: list[tuple[str, DomainEvent]] = [
            (str(uuid4()), ev.InvestorCreatedEvent(investor_id)),
            (str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, D(100))),
            (str(uuid4()), ev.BidOnInvoicePlacedEvent(investor_id, uuid4(), D(30))),
        ]
        await store.apply(batch)
        await store.apply(batch)
        await store.apply(batch[1:2])
        assert await store.investors() == [InvestorRow(investor_id, D(70), D(30), D(0))]

    async def test_message_repeated_within_one_batch_is_applied_once(
        self, store: ReadModelStore
    ) -> None:
        investor_id = uuid4()
        added = (str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, D(100)))
        await store.apply([(str(uuid4()), ev.InvestorCreatedEvent(investor_id)), added, added])
        assert await store.investors() == [InvestorRow(investor_id, D(100), D(0), D(0))]

    async def test_a_batch_of_projected_and_fresh_messages_projects_the_fresh_ones_once(
        self, store: ReadModelStore
    ) -> None:
        investor_id, issuer_id = uuid4(), uuid4()
        created = (str(uuid4()), ev.InvestorCreatedEvent(investor_id))
        added = (str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, D(100)))
        await store.apply([created, added])
        more = (str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, D(5)))
        issuer = (str(uuid4()), ev.IssuerCreatedEvent(issuer_id))
        await store.apply([added, more, created, issuer, more])
        assert await store.investors() == [InvestorRow(investor_id, D(105), D(0), D(0))]
        assert await store.issuers() == [IssuerRow(issuer_id)]

    async def test_creation_seen_again_under_another_id_resets_nothing(
        self, store: ReadModelStore
    ) -> None:
        investor_id, invoice_id, issuer_id = uuid4(), uuid4(), uuid4()
        bid = Bid(investor_id, D(10))
        await apply(store, *created_investor(investor_id, "100"))
        await apply(store, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D(10)))
        await apply(store, ev.InvoiceFinancedEvent(invoice_id, D(10), bid))
        await apply(
            store,
            ev.InvestorCreatedEvent(investor_id),
            ev.InvoiceCreatedEvent(invoice_id, uuid4(), D(99)),
        )
        assert await store.investors() == [InvestorRow(investor_id, D(100), D(0), D(0))]
        assert await store.invoices() == [InvoiceRow(invoice_id, issuer_id, D(10), FINANCED, bid)]

    # Events out of order (a foreign publisher)

    async def test_investor_event_before_its_creation_starts_the_investor_at_zero(
        self,
        store: ReadModelStore,
    ) -> None:
        investor_id = uuid4()
        await apply(store, ev.InvestorFundsAddedEvent(investor_id, D(100)))
        await apply(store, ev.BidOnInvoicePlacedEvent(investor_id, uuid4(), D(40)))
        await apply(store, ev.InvestorCreatedEvent(investor_id))
        assert await store.investors() == [InvestorRow(investor_id, D(60), D(40), D(0))]

    async def test_invoice_is_listed_once_its_creation_arrives_with_its_latest_status(
        self,
        store: ReadModelStore,
    ) -> None:
        invoice_id, issuer_id, bid = uuid4(), uuid4(), Bid(uuid4(), D(12))
        await apply(store, ev.InvoiceFinancedEvent(invoice_id, D(10), bid))
        await apply(store, ev.InvoiceApprovedEvent(invoice_id, D(10), bid))
        assert await store.invoices() == []  # its issuer is not known yet
        assert await store.unlisted_invoices() == [invoice_id]
        await apply(store, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D(10)))
        assert await store.invoices() == [InvoiceRow(invoice_id, issuer_id, D(10), APPROVED, bid)]
        assert await store.unlisted_invoices() == []

    @pytest.mark.parametrize(
        ("first", "then"),
        [
            (ev.InvoiceReversedEvent, ev.InvoiceApprovedEvent),
            (ev.InvoiceApprovedEvent, ev.InvoiceReversedEvent),
        ],
    )
    async def test_stale_invoice_event_does_not_undo_a_later_status(
        self,
        store: ReadModelStore,
        first: type[ev.InvoiceReversedEvent | ev.InvoiceApprovedEvent],
        then: type[ev.InvoiceReversedEvent | ev.InvoiceApprovedEvent],
    ) -> None:
        """Either end of an invoice (approved or reversed) is for good: an event that
        would move it again is a stale one (another relayer's, out of order)."""
        invoice_id, issuer_id, bid = uuid4(), uuid4(), Bid(uuid4(), D(10))
        await apply(store, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D(10)))
        await apply(store, first(invoice_id, D(10), bid))
        await apply(store, ev.InvoiceFinancedEvent(invoice_id, D(10), Bid(uuid4(), D(11))))
        await apply(store, then(invoice_id, D(10), bid))
        status = REVERSED if first is ev.InvoiceReversedEvent else APPROVED
        assert await store.invoices() == [InvoiceRow(invoice_id, issuer_id, D(10), status, bid)]

    async def test_out_of_order_events_within_one_batch_project_as_one_by_one(
        self, store: ReadModelStore
    ) -> None:
        late, stale, issuer_id = uuid4(), uuid4(), uuid4()
        investor_id, bid = uuid4(), Bid(uuid4(), D(10))
        await apply(
            store,
            ev.InvoiceFinancedEvent(late, D(10), bid),
            ev.InvoiceCreatedEvent(stale, issuer_id, D(20)),
            ev.InvestorFundsAddedEvent(investor_id, D(100)),
            ev.InvoiceApprovedEvent(late, D(10), bid),
            ev.InvoiceReversedEvent(stale, D(20), bid),
            ev.BidOnInvoicePlacedEvent(investor_id, stale, D(40)),
            ev.InvoiceCreatedEvent(late, issuer_id, D(10)),
            ev.InvoiceFinancedEvent(stale, D(20), Bid(uuid4(), D(11))),
            ev.InvestorCreatedEvent(investor_id),
            ev.InvoiceApprovedEvent(stale, D(20), bid),
        )
        assert await store.invoices() == [
            InvoiceRow(late, issuer_id, D(10), APPROVED, bid),
            InvoiceRow(stale, issuer_id, D(20), REVERSED, bid),
        ]
        assert await store.investors() == [InvestorRow(investor_id, D(60), D(40), D(0))]


class TestInMemoryReadModels(ReadModelContract):
    @pytest.fixture
    def store(self) -> ReadModelStore:
        return InMemoryReadModels()


class TestPostgresReadModels(ReadModelContract):
    @pytest.fixture
    async def store(self, pool: asyncpg.Pool) -> ReadModelStore:
        return await fresh_read_models(pool)

    async def test_the_event_projected_last_is_dated_by_its_record(
        self, pool: asyncpg.Pool
    ) -> None:
        """What dates the projector's queue deleted under it in every instance: when the
        store recorded the events projected last, whichever instance projected them."""
        store = await fresh_read_models(pool)
        assert await store.last_projected_recorded_at(datetime.now(UTC)) is None
        at = datetime(2026, 12, 5, 10, 0, 0, 123456, tzinfo=UTC)
        older = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        newer = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        timeless = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))  # another relayer's
        await store.apply([older], recorded={older[0]: at})
        between = await pool.fetchval("SELECT clock_timestamp()")
        await store.apply([newer], recorded={newer[0]: at + timedelta(1)})
        await store.apply([timeless])

        assert await store.last_projected_recorded_at(datetime.now(UTC)) == at + timedelta(1)
        # Those projected after a time are not taken for it.
        assert await store.last_projected_recorded_at(between) == at

    async def test_counts_are_the_lengths_of_the_lists_an_unlisted_invoice_left_out(
        self, pool: asyncpg.Pool
    ) -> None:
        store = await fresh_read_models(pool)
        assert await store.counts() == (0, 0, 0)
        listed, unlisted, issuer_id, bid = uuid4(), uuid4(), uuid4(), Bid(uuid4(), D(12))
        await apply(
            store,
            ev.IssuerCreatedEvent(issuer_id),
            *created_investor(uuid4(), "50"),
            *created_investor(uuid4()),
            ev.InvoiceCreatedEvent(listed, issuer_id, D(10)),
            ev.InvoiceFinancedEvent(unlisted, D(10), bid),  # its creation not seen yet
        )
        lists = await store.investors(), await store.invoices(), await store.issuers()
        assert await store.counts() == (2, 1, 1) == tuple(len(rows) for rows in lists)

    async def test_an_event_of_another_relayer_is_told_a_copy_after_its_record_is_pruned(
        self, pool: asyncpg.Pool
    ) -> None:
        """Regression (review): the records of processed messages are pruned after a week;
        the digest of an event of another relayer went with its record, and a different
        event under its id was then projected, and not kept for a rebuild to replay."""
        store = await fresh_read_models(pool)
        first = (str(uuid4()), ev.IssuerCreatedEvent(uuid4()))
        other = (first[0], ev.IssuerCreatedEvent(uuid4()))
        assert await store.apply([first], {first[0]: "d-1"}) == {first[0]}
        await pool.execute(f'DELETE FROM "{store.schema}".processed_messages')  # pruned

        assert await store.apply([first], {first[0]: "d-1"}) == set()
        assert await store.apply([other], {other[0]: "d-2"}) == set()
        assert await store.digests([first[0]]) == {first[0]: "d-1"}
        assert await store.issuers() == [IssuerRow(first[1].issuer_id)]

    async def test_batch_that_fails_half_way_applies_nothing(self, store: ReadModelStore) -> None:
        investor_id, issuer_id = uuid4(), uuid4()
        huge = D("9e131071")
        await store.apply([(str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, huge))])
        # The issuer's row is written first; adding `huge` again then overflows NUMERIC.
        created = (str(uuid4()), ev.IssuerCreatedEvent(issuer_id))
        added = (str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, huge))
        with pytest.raises(asyncpg.DataError):
            await store.apply([created, added])
        assert await store.issuers() == []
        assert await store.investors() == [InvestorRow(investor_id, huge, D(0), D(0))]
        await store.apply([created])  # its message id was not recorded either
        assert await store.issuers() == [IssuerRow(issuer_id)]

    @pytest.mark.parametrize("table", ["investors", "issuers"])
    async def test_a_row_key_a_dba_dropped_is_an_outage_not_a_bug(
        self, pool: asyncpg.Pool, table: str
    ) -> None:
        """Regression (a DBA's probe): an upsert whose unique index was dropped failed as a
        bug, each event dead-lettered after three tries; it is an outage until the index is
        made again (`schema.require_indexes` names it). An issuer's row, whose conflict was
        not named, was made twice for a copy."""
        store = await fresh_read_models(pool)
        await pool.execute(f'ALTER TABLE "{store.schema}".{table} DROP CONSTRAINT {table}_pkey')
        created = (
            ev.InvestorCreatedEvent(uuid4())
            if table == "investors"
            else ev.IssuerCreatedEvent(uuid4())
        )
        with pytest.raises(Unavailable) as applying:
            await apply(store, created)
        assert applying.value.dependency == QUERY_DATABASE
        assert "no unique or exclusion constraint" in str(applying.value)
        await pool.execute(f'ALTER TABLE "{store.schema}".{table} ADD PRIMARY KEY (id)')
        await apply(store, created)
        assert len(await (store.investors() if table == "investors" else store.issuers())) == 1

    async def test_a_batch_fails_while_the_records_key_is_lacking_and_no_copy_is_applied(
        self, pool: asyncpg.Pool
    ) -> None:
        """Regression (a DBA's probe): the statement that records and projects a batch at
        once relied on the records' key to fail on a copy, with nothing failing once the
        key was dropped until the inspection looked: a copy was projected again. It fails
        itself now (an outage) while the key is lacking."""
        schema = (await fresh_read_models(pool)).schema
        store = PostgresReadModels(pool, schema)
        investor = uuid4()
        added = (str(uuid4()), ev.InvestorFundsAddedEvent(investor, D(5)))
        await store.apply([(str(uuid4()), ev.InvestorCreatedEvent(investor)), added])
        await pool.execute(
            f'ALTER TABLE "{schema}".processed_messages DROP CONSTRAINT processed_messages_pkey'
        )
        with pytest.raises(Unavailable, match="no unique or exclusion constraint"):
            await store.apply([added])  # a copy
        await pool.execute(
            f'ALTER TABLE "{schema}".processed_messages ADD PRIMARY KEY (message_id)'
        )
        assert await store.apply([added]) == frozenset()
        assert await store.investors() == [InvestorRow(investor, D(5), D(0), D(0))]

    async def test_unreachable_database_raises_unavailable_naming_the_query_database(
        self,
    ) -> None:
        # A pool that connects lazily to a port nothing listens on.
        unreachable = await asyncpg.create_pool(
            host="127.0.0.1", port=1, user="postgres", database="postgres", min_size=0
        )
        store = PostgresReadModels(unreachable)
        try:
            with pytest.raises(Unavailable) as reading:
                await store.investors()
            with pytest.raises(Unavailable) as applying:
                await apply(store, ev.IssuerCreatedEvent(uuid4()))
            assert reading.value.dependency == applying.value.dependency == QUERY_DATABASE
        finally:
            await unreachable.close()


async def test_a_replay_that_remembers_nothing_holds_only_its_rows() -> None:
    """`financing check` replays a whole event store, whose message ids are unique: its
    replay keeps no record of them (165 MB a million events), so a copy applies again."""
    replay = InMemoryReadModels(remember=False)
    investor_id = uuid4()
    created = (str(uuid4()), ev.InvestorCreatedEvent(investor_id))
    added = (str(uuid4()), ev.InvestorFundsAddedEvent(investor_id, D(5)))
    assert await replay.apply([created, added, added], {added[0]: "d"}) == {created[0], added[0]}
    assert await replay.investors() == [InvestorRow(investor_id, D(10), D(0), D(0))]
    assert await replay.foreign_events() == []
    assert await replay.digests([added[0]]) == {}


# Batches applied in a process whose allocator leaves no slack past a block's end.
UNDER_MALLOC = """
import asyncio, sys
from decimal import Decimal
from uuid import uuid4
import asyncpg
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.domain import events as ev

async def main():
    pool = await asyncpg.create_pool(sys.argv[1], min_size=1, max_size=1)
    read_models = PostgresReadModels(pool)
    for _ in range(300):
        investor = uuid4()
        await read_models.apply([
            (str(uuid4()), ev.InvestorCreatedEvent(investor)),
            (str(uuid4()), ev.InvestorFundsAddedEvent(investor, Decimal(1))),
        ])
    await pool.close()
    print("applied")

asyncio.run(main())
"""


async def test_batches_applied_under_the_c_allocator_leave_its_heap_whole() -> None:
    """Regression: each batch's statement answered a row of no columns, which asyncpg (0.31
    and later) keeps on a free list by writing 8 bytes past the record's end; with
    PYTHONMALLOC=malloc the service aborted (free(): invalid pointer) at its first
    projected batches, 11 of 11 runs."""
    async with infra.migrated_database("fin_read_models_malloc", "queries") as db:
        applying = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            UNDER_MALLOC,
            db.dsn(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONMALLOC": "malloc", "PYTHONPATH": str(ROOT / "src")},
        )
        async with asyncio.timeout(120):
            out, err = await applying.communicate()
    assert applying.returncode == 0, err.decode()[-2000:]
    assert out.decode().split() == ["applied"]
