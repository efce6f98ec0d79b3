"""The read models in the query database (tables created by sql/queries.sql).

Money is NUMERIC, so sums are exact. Each batch is one transaction that first
records its message ids in `processed_messages` and then projects only the
events whose id was not there yet: the record and the effect commit together.
The ordering rules for events that arrive out of order are those of
`financing.application.read_models`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import QUERY_DATABASE, Connection, acquired
from financing.application import codec
from financing.application.read_models import (
    ADVANCES_FROM,
    AVAILABLE,
    EMPTY,
    NOT_RECORDED,
    ForeignEvent,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    in_turns,
    investor_change,
    invoice_advance,
)
from financing.domain import events as ev
from financing.domain.aggregates import InvoiceStatus
from financing.domain.events import Bid, DomainEvent
from financing.domain.money import ZERO, add

DEFAULT_SCHEMA = "read_models"

# The keys a copy of a projected message fails on: its record, or (an event of another
# relayer) its place in the journal.
_COPIES = frozenset({"processed_messages_pkey", "foreign_events_message_id_key"})

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PARAMETER = re.compile(r"\$(\d+)")


def quoted_schema(schema: str) -> str:
    """`schema` as a quoted SQL identifier; only plain lowercase names are accepted."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return f'"{schema}"'


async def create_tables(conn: Connection, schema: str) -> None:
    """Create the read-model tables in `schema` (the function sql/queries.sql defines)."""
    quoted_schema(schema)
    await conn.execute("SELECT public.financing_create_read_models($1)", schema)


class PostgresReadModels:
    """`ReadModelStore` on PostgreSQL; `schema` must have been created (migrate "queries").

    `journal`: keep the events of another relayer in `foreign_events` (the live read
    models); a rebuild's target replays them from there and keeps none."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str = DEFAULT_SCHEMA,
        *,
        journal: bool = True,
    ) -> None:
        self._pool = pool
        self._dependency = QUERY_DATABASE
        self.schema = schema
        self._journal = journal
        s = quoted_schema(schema)
        # Each message id with when the event store recorded its event (NULL for another
        # relayer's), `recorded`.
        records = (
            f"INSERT INTO {s}.processed_messages (message_id, recorded_at)"
            " SELECT * FROM unnest($1::text[], $2::timestamptz[])"
        )
        # Each conflict named by its columns, so that a unique index dropped fails the
        # statement (an outage, `schema.require_indexes`), where a bare ON CONFLICT never
        # meets a conflict again and projects a copy twice.
        self._record_sql = f"{records} ON CONFLICT (message_id) DO NOTHING RETURNING message_id"
        # Fails on the key when a message id was recorded before.
        self._record_all_sql = records
        # The keys the plain INSERTs of `_at_once` rely on, each named as the conflict
        # target of an insert of no row, which the statement's plan checks: without the key
        # (a DBA's drop, an index left invalid) the statement fails (42P10, an outage),
        # where a copy would have been recorded and projected again.
        self._records_keyed_sql = (
            f"INSERT INTO {s}.processed_messages (message_id) SELECT NULL::text WHERE false"
            " ON CONFLICT (message_id) DO NOTHING"
        )
        self._journal_keyed_sql = (
            "INSERT INTO foreign_events (message_id) SELECT NULL::text WHERE false"
            " ON CONFLICT (message_id) DO NOTHING"
        )
        # In the order projected (the batch's). Fails on the key when one was kept
        # before, as `_record_all_sql` does: the journal, never pruned, tells copies of
        # the events of another relayer after their records in processed_messages are.
        self._journal_sql = (
            "INSERT INTO foreign_events (message_id, name, aggregate_id, body, digest)"
            " SELECT message_id, name, aggregate_id, body, digest"
            " FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[])"
            " WITH ORDINALITY AS new (message_id, name, aggregate_id, body, digest, ordinality)"
            " ORDER BY ordinality"
        )
        self._foreign_sql = (
            "SELECT position, message_id, name, aggregate_id, body, digest FROM foreign_events"
            " WHERE position > $1 ORDER BY position LIMIT $2"
        )
        self._digests_sql = (
            "SELECT message_id, digest FROM foreign_events WHERE message_id = ANY($1::text[])"
        )
        self._recorded_at_sql = (
            f"SELECT message_id, recorded_at FROM {s}.processed_messages"
            " WHERE message_id = ANY($1::text[]) AND recorded_at IS NOT NULL"
        )
        # Statements of _at_once, by the projecting statements they combine.
        self._combined: dict[tuple[str, ...], str] = {}
        # One statement per table for a whole batch (per round, for invoices),
        # each inserting in the order of the rows' first events, so rows are
        # created in the order one-by-one projection would create them.
        self._project_issuers_sql = (
            f"INSERT INTO {s}.issuers (id) SELECT id FROM unnest($1::uuid[])"
            " WITH ORDINALITY AS new (id, ordinality) ORDER BY ordinality"
            " ON CONFLICT (id) DO NOTHING"
        )
        # Each investor once, with the sum of its batch's changes (additions
        # commute); an investor's creation is a change of nothing: it only makes the row.
        self._project_investors_sql = (
            f"INSERT INTO {s}.investors AS i (id, balance, reserved, committed)"
            " SELECT id, balance, reserved, committed"
            " FROM unnest($1::uuid[], $2::numeric[], $3::numeric[], $4::numeric[])"
            " WITH ORDINALITY AS new (id, balance, reserved, committed, ordinality)"
            " ORDER BY ordinality ON CONFLICT (id) DO UPDATE SET"
            " balance = i.balance + excluded.balance,"
            " reserved = i.reserved + excluded.reserved,"
            " committed = i.committed + excluded.committed"
            " WHERE (excluded.balance, excluded.reserved, excluded.committed) <> (0, 0, 0)"
        )
        # Each invoice once per round. A row with an issuer is the invoice's
        # creation, which fills in the issuer and the asking price of a row that
        # later events made first; any other advances the status, forward only
        # (ADVANCES_FROM), keeping the first winning bid.
        advances = " ".join(
            f"WHEN '{status.value}' THEN i.status IN ("
            + ", ".join(sorted(f"'{before.value}'" for before in froms))
            + ")"
            for status, froms in ADVANCES_FROM.items()
        )
        self._project_invoices_sql = (
            f"INSERT INTO {s}.invoices AS i"
            " (id, issuer_id, asking_price, status, winning_investor_id, winning_amount)"
            " SELECT id, issuer_id, asking_price, status, winning_investor_id, winning_amount"
            " FROM unnest($1::uuid[], $2::uuid[], $3::numeric[], $4::text[], $5::uuid[],"
            " $6::numeric[]) WITH ORDINALITY AS new (id, issuer_id, asking_price, status,"
            " winning_investor_id, winning_amount, ordinality)"
            " ORDER BY ordinality ON CONFLICT (id) DO UPDATE SET"
            " issuer_id = coalesce(excluded.issuer_id, i.issuer_id),"
            " asking_price = CASE WHEN excluded.issuer_id IS NULL THEN i.asking_price"
            " ELSE excluded.asking_price END,"
            " status = CASE WHEN excluded.issuer_id IS NULL THEN excluded.status"
            " ELSE i.status END,"
            " winning_investor_id = coalesce(i.winning_investor_id, excluded.winning_investor_id),"
            " winning_amount = coalesce(i.winning_amount, excluded.winning_amount)"
            " WHERE CASE WHEN excluded.issuer_id IS NOT NULL THEN i.issuer_id IS NULL"
            f" ELSE CASE excluded.status {advances} ELSE false END END"
        )
        self._investors_sql = (
            f"SELECT id, balance, reserved, committed FROM {s}.investors ORDER BY created"
        )
        self._invoices_sql = (
            "SELECT id, issuer_id, asking_price, status, winning_investor_id, winning_amount"
            f" FROM {s}.invoices WHERE issuer_id IS NOT NULL ORDER BY created"
        )
        self._issuers_sql = f"SELECT id FROM {s}.issuers ORDER BY created"
        self._unlisted_sql = f"SELECT id FROM {s}.invoices WHERE issuer_id IS NULL ORDER BY created"
        # Only records of events the store recorded as recently (by its own clock, kept
        # with each record; NULL for another relayer's): `financing check` takes every
        # older event for projected whatever the records say, and after a rebuild every
        # record was made just now (700,000 ids held, +110 MB).
        self._projected_since_sql = (
            f"SELECT message_id FROM {s}.processed_messages"
            " WHERE processed_at >= now() - make_interval(secs => $1)"
            " AND (recorded_at IS NULL OR recorded_at >= now() - make_interval(secs => $1))"
        )
        # The newest records, by when they were made (the index pruning goes by).
        self._last_projected_sql = (
            f"SELECT max(recorded_at) FROM (SELECT recorded_at FROM {s}.processed_messages"
            " WHERE processed_at <= $1 ORDER BY processed_at DESC LIMIT 256) AS newest"
        )
        self._counts_sql = (
            f"SELECT (SELECT count(*) FROM {s}.investors),"
            f" (SELECT count(*) FROM {s}.invoices WHERE issuer_id IS NOT NULL),"
            f" (SELECT count(*) FROM {s}.issuers)"
        )

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        if not batch:
            return frozenset()
        message_ids = list(dict.fromkeys(message_id for message_id, _ in batch))
        times = [recorded.get(message_id) for message_id in message_ids]
        if not self._journal:
            digests = EMPTY
        changes = _Changes.of(batch, set(message_ids))
        async with acquired(self._pool, self._dependency) as conn:
            if changes.rounds() <= 1:
                # Usually no message of a batch was projected before: then one
                # statement records them all and projects the batch, one round trip.
                try:
                    journal = _journal(batch, digests, message_ids)
                    await conn.execute(*self._at_once(message_ids, times, changes, journal))
                    return frozenset(message_ids)
                except asyncpg.UniqueViolationError as error:
                    if error.constraint_name not in _COPIES:
                        raise
            # Some were (or are being) projected by another transaction: record
            # first, in a transaction of its own, and project only the fresh ones.
            async with conn.transaction():
                # A concurrent writer of the same ids waits here until this
                # transaction ends, then skips them.
                fresh = frozenset(
                    row["message_id"]
                    for row in await conn.fetch(self._record_sql, message_ids, times)
                )
                if kept := [m for m in fresh if m in digests]:
                    # Copies of events of another relayer whose records were pruned.
                    fresh -= {
                        row["message_id"] for row in await conn.fetch(self._digests_sql, kept)
                    }
                journal = _journal(batch, digests, fresh)
                for sql, args in self._statements(_Changes.of(batch, set(fresh)), journal):
                    await conn.execute(sql, *args)
                return fresh

    def _statements(
        self, changes: _Changes, journal: list[list[Any]] | None
    ) -> Iterator[tuple[str, list[list[Any]]]]:
        """The statements that project `changes`, one per table (per round for invoices),
        and keep the events of another relayer (`journal`, the columns of `_journal`)."""
        if journal:
            yield self._journal_keyed_sql, []
            yield self._journal_sql, journal
        if changes.issuers:
            yield self._project_issuers_sql, [list(changes.issuers)]
        if changes.investors:
            yield self._project_investors_sql, _columns(changes.investor_rows())
        for rows in changes.invoice_rounds():
            yield self._project_invoices_sql, _columns(rows)

    def _at_once(
        self,
        message_ids: list[str],
        times: list[datetime | None],
        changes: _Changes,
        journal: list[list[Any]] | None,
    ) -> tuple[Any, ...]:
        """One statement (with its arguments) that records `message_ids` (with `times`)
        and projects `changes` (at most one round): each part a data-modifying WITH query
        of its own table, its parameters numbered after those before it."""
        statements = list(self._statements(changes, journal))
        args: list[Any] = [message_ids, times]
        for _, columns in statements:
            args.extend(columns)
        key = tuple(sql for sql, _ in statements)
        combined = self._combined.get(key)
        if combined is None:
            parts, count = [self._record_all_sql, self._records_keyed_sql], 2
            for sql, columns in statements:
                parts.append(_renumbered(sql, count))
                count += len(columns)
            queries = ", ".join(f"part{i} AS ({part})" for i, part in enumerate(parts))
            # No row: every data-modifying part runs to its end all the same. A row of no
            # columns (a bare SELECT) goes through asyncpg's free list of records, which
            # since 0.31 writes 8 bytes past such a record's end: hidden by pymalloc's
            # rounding, it corrupted the heap of a process on another allocator
            # (PYTHONMALLOC=malloc: aborted at the first projected batch).
            combined = self._combined[key] = f"WITH {queries} SELECT WHERE false"
        return (combined, *args)

    async def digests(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        rows = await self._fetch(self._digests_sql, list(message_ids))
        return {row["message_id"]: row["digest"] for row in rows}

    async def recorded_at(self, message_ids: Sequence[str]) -> Mapping[str, datetime]:
        rows = await self._fetch(self._recorded_at_sql, list(message_ids))
        return {row["message_id"]: row["recorded_at"] for row in rows}

    async def last_projected_recorded_at(self, before: datetime) -> datetime | None:
        """When the store recorded the newest event projected last before `before`, by any
        instance: what the projector's queue held, lost with it, was relayed after it.
        None where no record says (none yet, or only another relayer's events)."""
        [row] = await self._fetch(self._last_projected_sql, before)
        recorded: datetime | None = row[0]
        return recorded

    async def foreign_events(self, after: int = 0, limit: int = 1000) -> list[ForeignEvent]:
        rows = await self._fetch(self._foreign_sql, after, limit)
        return [_foreign(row) for row in rows]

    async def foreign_events_missing_from(self, schema: str) -> list[ForeignEvent]:
        """The events of another relayer kept and not recorded as processed in the read
        models of `schema` (a rebuild's), in the order kept."""
        rows = await self._fetch(
            "SELECT position, message_id, name, aggregate_id, body, digest"
            " FROM foreign_events AS kept WHERE NOT EXISTS (SELECT FROM"
            f" {quoted_schema(schema)}.processed_messages AS done"
            " WHERE done.message_id = kept.message_id) ORDER BY position"
        )
        return [_foreign(row) for row in rows]

    async def investors(self) -> list[InvestorRow]:
        return await in_turns(await self._fetch(self._investors_sql), _investor)

    async def invoices(self) -> list[InvoiceRow]:
        return await in_turns(await self._fetch(self._invoices_sql), _invoice)

    async def issuers(self) -> list[IssuerRow]:
        return await in_turns(await self._fetch(self._issuers_sql), _issuer)

    async def unlisted_invoices(self) -> list[UUID]:
        return [_uuid(row["id"]) for row in await self._fetch(self._unlisted_sql)]

    async def view(self, recent: float) -> ProjectedView:
        """The rows, and the message ids projected in the last `recent` seconds (by the
        server's clock) of events recorded in that time too, as one snapshot: what
        `financing check` compares with a replay of the events projected by then."""
        async with (
            acquired(self._pool, self._dependency) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            at: datetime = await conn.fetchval("SELECT now()")
            investors = await conn.fetch(self._investors_sql)
            invoices = await conn.fetch(self._invoices_sql)
            issuers = await conn.fetch(self._issuers_sql)
            unlisted = await conn.fetch(self._unlisted_sql)
            projected = await conn.fetch(self._projected_since_sql, recent)
        return ProjectedView(
            investors=await in_turns(investors, _investor),
            invoices=await in_turns(invoices, _invoice),
            issuers=await in_turns(issuers, _issuer),
            unlisted=[_uuid(row["id"]) for row in unlisted],
            projected=frozenset(row["message_id"] for row in projected),
            at=at,
        )

    async def counts(self) -> tuple[int, int, int]:
        """How many investors, listed invoices and issuers there are, without reading
        the rows (what `investors()`, `invoices()` and `issuers()` would list)."""
        async with acquired(self._pool, self._dependency) as conn:
            row = await conn.fetchrow(self._counts_sql)
        assert row is not None  # a SELECT without FROM returns one row
        return row[0], row[1], row[2]

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with acquired(self._pool, self._dependency) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows


@dataclass(frozen=True)
class ProjectedView:
    """The read models as of one moment (`PostgresReadModels.view`)."""

    investors: list[InvestorRow]
    invoices: list[InvoiceRow]
    issuers: list[IssuerRow]
    unlisted: list[UUID]  # invoices made by later events, their creation not projected
    projected: AbstractSet[str]  # message ids projected recently
    at: datetime  # the moment, by the query database's clock


def _investor(r: asyncpg.Record) -> InvestorRow:
    return InvestorRow(_uuid(r["id"]), r["balance"], r["reserved"], r["committed"])


def _invoice(r: asyncpg.Record) -> InvoiceRow:
    return InvoiceRow(
        id=_uuid(r["id"]),
        issuer_id=_uuid(r["issuer_id"]),
        asking_price=r["asking_price"],
        status=InvoiceStatus(r["status"]),
        winning_bid=_bid(r["winning_investor_id"], r["winning_amount"]),
    )


def _issuer(r: asyncpg.Record) -> IssuerRow:
    return IssuerRow(_uuid(r["id"]))


def _uuid(value: UUID) -> UUID:
    # asyncpg returns its own UUID subclass; rows hold plain uuid.UUID values.
    return UUID(bytes=value.bytes)


def _bid(investor_id: UUID | None, amount: Decimal | None) -> Bid | None:
    if investor_id is None or amount is None:
        return None
    return Bid(investor_id=_uuid(investor_id), amount=amount)


_InvoiceRow = tuple[UUID, UUID | None, Decimal, str, UUID | None, Decimal | None]


class _Changes:
    """What a batch does to each table, gathered so that each table takes one
    statement: issuers in order of first sight, investors with the sum of their
    changes, and invoices in rounds, round k holding the k-th event of every
    invoice that has one (within a round each invoice appears once, in order of
    first sight; applying the rounds in turn is applying the events in turn,
    since rows do not depend on each other)."""

    def __init__(self) -> None:
        self.issuers: dict[UUID, None] = {}
        self.investors: dict[UUID, tuple[Decimal, Decimal, Decimal]] = {}
        self.invoices: dict[UUID, list[_InvoiceRow]] = {}

    @classmethod
    def of(cls, batch: Sequence[tuple[str, DomainEvent]], wanted: set[str]) -> _Changes:
        """The changes of the events in `batch` whose message id is in `wanted`, each
        id once: a copy later in the batch is skipped (`wanted` is used up)."""
        changes = cls()
        for message_id, event in batch:
            if message_id in wanted:
                wanted.discard(message_id)
                changes.add(event)
        return changes

    def add(self, event: DomainEvent) -> None:
        match event:
            case ev.IssuerCreatedEvent(issuer_id=issuer):
                self.issuers[issuer] = None
            case ev.InvestorCreatedEvent(investor_id=investor):
                self.investors.setdefault(investor, (ZERO, ZERO, ZERO))
            case ev.InvoiceCreatedEvent(invoice_id=invoice, issuer_id=issuer, asking_price=price):
                created: _InvoiceRow = (invoice, issuer, price, AVAILABLE.value, None, None)
                self.invoices.setdefault(invoice, []).append(created)
            case _:
                if (change := investor_change(event)) is not None:
                    balance, reserved, committed = self.investors.get(
                        change.investor_id, (ZERO, ZERO, ZERO)
                    )
                    self.investors[change.investor_id] = (
                        add(balance, change.balance),
                        add(reserved, change.reserved),
                        add(committed, change.committed),
                    )
                elif (advance := invoice_advance(event)) is not None:
                    invoice, bid = advance.invoice_id, advance.bid
                    advanced: _InvoiceRow = (
                        invoice,
                        None,
                        advance.price,
                        advance.status.value,
                        bid.investor_id,
                        bid.amount,
                    )
                    self.invoices.setdefault(invoice, []).append(advanced)

    def investor_rows(self) -> list[tuple[UUID, Decimal, Decimal, Decimal]]:
        return [(investor, *amounts) for investor, amounts in self.investors.items()]

    def rounds(self) -> int:
        """How many statements the invoices take: the most events of one invoice."""
        return max(map(len, self.invoices.values()), default=0)

    def invoice_rounds(self) -> Iterator[list[_InvoiceRow]]:
        for k in range(self.rounds()):
            yield [events[k] for events in self.invoices.values() if len(events) > k]


def _journal(
    batch: Sequence[tuple[str, DomainEvent]], digests: Mapping[str, str], fresh: Collection[str]
) -> list[list[Any]] | None:
    """The columns of `foreign_events` rows for the events of another relayer (those with
    a digest) that `fresh` holds, the first of each message id, in the batch's order."""
    if not digests:
        return None
    rows: dict[str, tuple[Any, ...]] = {}
    for message_id, event in batch:
        digest = digests.get(message_id)
        if digest is not None and message_id in fresh and message_id not in rows:
            name, body = codec.name_of(event), codec.encode_text(event)
            rows[message_id] = (message_id, name, event.aggregate_id, body, digest)
    return _columns(list(rows.values())) if rows else None


def _foreign(row: asyncpg.Record) -> ForeignEvent:
    event = codec.decode(row["name"], row["body"], row["aggregate_id"])
    assert isinstance(event, DomainEvent)  # kept as one (`_journal`)
    return ForeignEvent(row["position"], row["message_id"], event, row["digest"])


def _columns(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows (at least one) as one list per column: the arrays a statement unnests."""
    return [list(column) for column in zip(*rows, strict=True)]


def _renumbered(sql: str, offset: int) -> str:
    """`sql` with its parameters $n numbered from offset + 1."""
    return _PARAMETER.sub(lambda m: f"${int(m[1]) + offset}", sql)
