"""Rebuilding the read models (`financing projections rebuild`) over a generated event store.

The event store is filled directly with the service's own `PostgresEventStore`
(fast: many financing stories per unit of work), each story the events of a
financed bid: IssuerCreated, InvestorCreated, InvestorFundsAdded,
InvoiceCreated, BidOnInvoicePlaced, InvoiceFinanced, InvestorFundsReleased.
Then `financing.adapters.postgres.rebuild.rebuild` (what the command runs,
without the process start) replays it into an empty query database, on
uvloop as the command line runs it. The baseline is reading the same store
alone (`read_all`, decoded), the floor under any replay.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.rebuild import BATCH_SIZE, rebuild
from financing.config import Database
from financing.domain.aggregates import Aggregate, Investor, Invoice, Issuer
from financing.domain.events import Bid
from scripts.bench_append import event_store_database
from tests.support import infra

EVENTS_PER_STORY = 7
STORIES_PER_UNIT = 20


def story() -> list[Aggregate]:
    issuer, investor, invoice = Issuer(uuid.uuid4()), Investor(uuid.uuid4()), Invoice(uuid.uuid4())
    issuer.create()
    investor.create(Decimal(100))
    invoice.create(issuer.id, Decimal(10))
    investor.place_bid(invoice.id, Decimal(15))
    invoice.bid(Bid(investor_id=investor.id, amount=Decimal(15)))
    investor.release_funds(Decimal(5))
    return [issuer, investor, invoice]


async def generate(db: Database, events: int, writers: int = 4) -> int:
    """At least `events` events in the store; how many it holds."""
    pool = await create_pool(Database(db.connect_kwargs, writers), min_size=writers)
    store = PostgresEventStore(pool)
    units = -(-events // (EVENTS_PER_STORY * STORIES_PER_UNIT))
    limit = asyncio.Semaphore(writers)

    async def unit() -> None:
        async with limit, store.unit_of_work() as uow:
            for _ in range(STORIES_PER_UNIT):
                for aggregate in story():
                    await uow.save(aggregate)

    try:
        await asyncio.gather(*(unit() for _ in range(units)))
        async with pool.acquire() as conn:
            count: int = await conn.fetchval("SELECT count(*) FROM events")
        return count
    finally:
        await pool.close()


@dataclass(frozen=True)
class RebuildFigures:
    events: int
    rebuild_seconds: float
    read_seconds: float

    @property
    def rebuild_per_second(self) -> float:
        return self.events / self.rebuild_seconds

    @property
    def read_per_second(self) -> float:
        return self.events / self.read_seconds


async def read_all_seconds(pool: object, expected: int) -> float:
    store = PostgresEventStore(pool)  # type: ignore[arg-type]
    started = time.perf_counter()
    count = 0
    async for stored in store.read_all(BATCH_SIZE):  # as the rebuild reads
        stored.event  # noqa: B018 - decoding is part of any replay
        count += 1
    elapsed = time.perf_counter() - started
    if count != expected:
        raise AssertionError(f"read {count} events, expected {expected}")
    return elapsed


async def measure(events: int) -> RebuildFigures:
    async with (
        event_store_database("financing_bench_rebuild_commands") as commands,
        infra.fresh_database("financing_bench_rebuild_queries") as queries,
    ):
        stored = await generate(commands, events)
        command_pool = await create_pool(commands)
        query_pool = await create_pool(queries)
        try:
            read = await read_all_seconds(command_pool, stored)
            started = time.perf_counter()
            report = await rebuild(command_pool, query_pool)
            rebuilt = time.perf_counter() - started
            if report.events != stored or report.invoices != stored // EVENTS_PER_STORY:
                raise AssertionError(f"rebuild replayed {report}, the store holds {stored}")
            # The read alone again, after: the better of two, against one rebuild.
            read = min(read, await read_all_seconds(command_pool, stored))
        finally:
            await query_pool.close()
            await command_pool.close()
    return RebuildFigures(stored, rebuilt, read)
