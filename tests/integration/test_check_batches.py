"""`financing check` reads the event store a batch at a time: every event is checked and
replayed, however many batches the store takes, without holding them all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from uuid import uuid4

import asyncpg
import pytest

from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.domain.aggregates import Investor
from financing.entrypoints.cli.check import BATCH, run_check
from tests.support import infra

INVESTORS = BATCH + 300  # two events each: three batches


@pytest.fixture
async def pools() -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool]]:
    async with (
        infra.migrated_pool("fin_check_cmd", "commands") as events,
        infra.migrated_pool("fin_check_q", "queries") as queries,
    ):
        yield events, queries


async def test_a_store_of_several_batches_is_checked_and_replayed_whole(
    pools: tuple[asyncpg.Pool, asyncpg.Pool],
) -> None:
    events_pool, queries_pool = pools
    store = PostgresEventStore(events_pool)
    for _ in range(INVESTORS):
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, uuid4())
            investor.create(Decimal("10"))
            await uow.save(investor)
    stored = [event async for event in store.read_all()]
    await PostgresReadModels(queries_pool).apply([(e.message_id, e.event) for e in stored])

    result = await run_check(events_pool, queries_pool)

    assert result.ok, result.lines()
    assert (result.invariants.events, result.invariants.investors) == (2 * INVESTORS, INVESTORS)
    assert result.read_models_compared and result.read_model_differences == []

    # One investor short in the read models is told apart.
    last = stored[-1].aggregate_id
    await queries_pool.execute("DELETE FROM read_models.investors WHERE id = $1", last)
    result = await run_check(events_pool, queries_pool)
    assert not result.ok
    short = f"investors: {INVESTORS - 1} rows, a replay gives {INVESTORS}"
    assert short in result.read_model_differences
