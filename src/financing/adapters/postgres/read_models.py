"""The read models in the query database (tables created by sql/queries.sql).

Money is NUMERIC, so sums are exact. Each batch is one transaction that first
records its message ids in `processed_messages` and then projects only the
events whose id was not there yet: the record and the effect commit together.
The ordering rules for events that arrive out of order are those of
`financing.application.read_models`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import QUERY_DATABASE, Connection, acquired
from financing.application.read_models import (
    ADVANCES_FROM,
    AVAILABLE,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    investor_change,
    invoice_advance,
)
from financing.domain import events as ev
from financing.domain.aggregates import InvoiceStatus
from financing.domain.events import Bid, DomainEvent
from financing.domain.money import ZERO

DEFAULT_SCHEMA = "read_models"

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


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
    """`ReadModelStore` on PostgreSQL; `schema` must have been created (migrate "queries")."""

    def __init__(self, pool: asyncpg.Pool, schema: str = DEFAULT_SCHEMA) -> None:
        self._pool = pool
        self._dependency = QUERY_DATABASE
        self.schema = schema
        s = quoted_schema(schema)
        self._record_sql = (
            f"INSERT INTO {s}.processed_messages (message_id) SELECT unnest($1::text[])"
            " ON CONFLICT DO NOTHING RETURNING message_id"
        )
        # One statement per table, so that a batch applied table by table, each in
        # event order, creates rows in the order one-by-one projection would.
        self._issuer_sql = f"INSERT INTO {s}.issuers (id) VALUES ($1) ON CONFLICT DO NOTHING"
        # An investor's creation is a change of nothing: it only makes the row.
        self._investor_sql = (
            f"INSERT INTO {s}.investors AS i (id, balance, reserved, committed)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET"
            " balance = i.balance + excluded.balance,"
            " reserved = i.reserved + excluded.reserved,"
            " committed = i.committed + excluded.committed"
        )
        # $7: whether the event is the invoice's creation (which fills in the issuer
        # and the asking price of a row that later events made first); otherwise it
        # advances the status from one of $8, keeping the first winning bid.
        self._invoice_sql = (
            f"INSERT INTO {s}.invoices AS i"
            " (id, issuer_id, asking_price, status, winning_investor_id, winning_amount)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET"
            " issuer_id = CASE WHEN $7 THEN excluded.issuer_id ELSE i.issuer_id END,"
            " asking_price = CASE WHEN $7 THEN excluded.asking_price ELSE i.asking_price END,"
            " status = CASE WHEN $7 THEN i.status ELSE excluded.status END,"
            " winning_investor_id = CASE WHEN $7 THEN i.winning_investor_id"
            " ELSE coalesce(i.winning_investor_id, excluded.winning_investor_id) END,"
            " winning_amount = CASE WHEN $7 THEN i.winning_amount"
            " ELSE coalesce(i.winning_amount, excluded.winning_amount) END"
            " WHERE CASE WHEN $7 THEN i.issuer_id IS NULL ELSE i.status = ANY($8::text[]) END"
        )
        self._investors_sql = (
            f"SELECT id, balance, reserved, committed FROM {s}.investors ORDER BY created"
        )
        self._invoices_sql = (
            "SELECT id, issuer_id, asking_price, status, winning_investor_id, winning_amount"
            f" FROM {s}.invoices WHERE issuer_id IS NOT NULL ORDER BY created"
        )
        self._issuers_sql = f"SELECT id FROM {s}.issuers ORDER BY created"

    async def apply(self, batch: Sequence[tuple[str, DomainEvent]]) -> None:
        if not batch:
            return
        async with acquired(self._pool, self._dependency) as conn, conn.transaction():
            # Recorded first: a concurrent writer of the same ids waits here
            # until this transaction ends, then skips them.
            fresh = {
                row["message_id"]
                for row in await conn.fetch(
                    self._record_sql, [message_id for message_id, _ in batch]
                )
            }
            # One pipelined statement per table, each in event order: the tables are
            # independent, so this is what projecting event by event would do.
            changes: dict[str, list[tuple[Any, ...]]] = {}
            for message_id, event in batch:
                if message_id in fresh:
                    fresh.discard(message_id)  # a duplicate later in the batch is skipped
                    if (change := self._change(event)) is not None:
                        sql, args = change
                        changes.setdefault(sql, []).append(args)
            for sql, rows in changes.items():
                await conn.executemany(sql, rows)

    def _change(self, event: DomainEvent) -> tuple[str, tuple[Any, ...]] | None:
        """The statement that projects `event`, with its arguments; None if it changes
        no read model."""
        match event:
            case ev.IssuerCreatedEvent(issuer_id=issuer):
                return self._issuer_sql, (issuer,)
            case ev.InvestorCreatedEvent(investor_id=investor):
                return self._investor_sql, (investor, ZERO, ZERO, ZERO)
            case ev.InvoiceCreatedEvent(invoice_id=invoice, issuer_id=issuer, asking_price=price):
                return self._invoice_sql, (
                    invoice,
                    issuer,
                    price,
                    AVAILABLE.value,
                    None,
                    None,
                    True,
                    [],
                )
        if (change := investor_change(event)) is not None:
            return self._investor_sql, (
                change.investor_id,
                change.balance,
                change.reserved,
                change.committed,
            )
        if (advance := invoice_advance(event)) is not None:
            return self._invoice_sql, (
                advance.invoice_id,
                None,
                advance.price,
                advance.status.value,
                advance.bid.investor_id,
                advance.bid.amount,
                False,
                sorted(status.value for status in ADVANCES_FROM[advance.status]),
            )
        return None

    async def investors(self) -> list[InvestorRow]:
        return [
            InvestorRow(_uuid(r["id"]), r["balance"], r["reserved"], r["committed"])
            for r in await self._fetch(self._investors_sql)
        ]

    async def invoices(self) -> list[InvoiceRow]:
        return [
            InvoiceRow(
                id=_uuid(r["id"]),
                issuer_id=_uuid(r["issuer_id"]),
                asking_price=r["asking_price"],
                status=InvoiceStatus(r["status"]),
                winning_bid=_bid(r["winning_investor_id"], r["winning_amount"]),
            )
            for r in await self._fetch(self._invoices_sql)
        ]

    async def issuers(self) -> list[IssuerRow]:
        return [IssuerRow(_uuid(r["id"])) for r in await self._fetch(self._issuers_sql)]

    async def _fetch(self, sql: str) -> list[asyncpg.Record]:
        async with acquired(self._pool, self._dependency) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql)
            return rows


def _uuid(value: UUID) -> UUID:
    # asyncpg returns its own UUID subclass; rows hold plain uuid.UUID values.
    return UUID(bytes=value.bytes)


def _bid(investor_id: UUID | None, amount: Decimal | None) -> Bid | None:
    if investor_id is None or amount is None:
        return None
    return Bid(investor_id=_uuid(investor_id), amount=amount)
