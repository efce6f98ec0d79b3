"""Deduplication records older than the retention window are pruned in bounded batches.

Against PostgreSQL: the command database's `processed_messages` and the query
database's `read_models.processed_messages`, as the schemas create them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest

from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.read_models import create_tables
from financing.adapters.postgres.retention import (
    PostgresDeduplicationRecords,
    command_records,
    deduplication_records,
    projector_records,
)
from financing.application.retry import Outages
from financing.config import Settings
from financing.entrypoints.bootstrap import bootstrap
from financing.workers.retention import Retention
from tests.support import infra

WEEK = timedelta(days=7)


@dataclass(frozen=True)
class Table:
    """A table of deduplication records, how a test adds to it, and its records' adapter."""

    database: str
    name: str
    per_consumer: bool  # whether each record names its consumer (the projector is the only one)
    records: Callable[[asyncpg.Pool], PostgresDeduplicationRecords]

    async def record(self, pool: asyncpg.Pool, prefix: str, count: int, age: timedelta) -> None:
        """`count` records named `prefix`1, 2, ... made `age` ago."""
        columns, values = ("consumer, ", "'create_issuer', ") if self.per_consumer else ("", "")
        await pool.execute(
            f"INSERT INTO {self.name} ({columns}message_id, processed_at)"
            f" SELECT {values}$1 || n, now() - $2::interval FROM generate_series(1, $3) n",
            prefix,
            age,
            count,
        )

    async def remaining(self, pool: asyncpg.Pool, prefix: str) -> int:
        count: int = await pool.fetchval(
            f"SELECT count(*) FROM {self.name} WHERE message_id LIKE $1 || '%'", prefix
        )
        return count


COMMANDS = Table("commands", "processed_messages", True, command_records)
PROJECTIONS = Table("queries", "read_models.processed_messages", False, projector_records)


@pytest.fixture(scope="module")
async def pools() -> AsyncIterator[dict[str, asyncpg.Pool]]:
    """A migrated pool per database, by schema name."""
    async with (
        infra.migrated_pool("fin_retention_commands", "commands") as commands,
        infra.migrated_pool("fin_retention_queries", "queries") as queries,
    ):
        yield {"commands": commands, "queries": queries}


async def prune_in_batches(records: PostgresDeduplicationRecords, limit: int) -> list[int]:
    """Batch after batch until one is not full, as the worker does."""
    counts = [await records.prune(WEEK, limit)]
    while counts[-1] == limit:
        counts.append(await records.prune(WEEK, limit))
    return counts


@pytest.mark.parametrize("table", [COMMANDS, PROJECTIONS], ids=lambda table: table.database)
async def test_records_older_than_the_window_go_in_batches_and_recent_ones_stay(
    pools: dict[str, asyncpg.Pool], table: Table
) -> None:
    pool = pools[table.database]
    old, recent = infra.unique_name("old"), infra.unique_name("recent")
    await table.record(pool, old, 2500, timedelta(days=8))
    await table.record(pool, recent, 10, timedelta(days=6, hours=23))

    counts = await prune_in_batches(table.records(pool), 1000)

    assert counts == [1000, 1000, 500]
    assert await table.remaining(pool, old) == 0
    assert await table.remaining(pool, recent) == 10


async def test_a_projection_is_recorded_with_the_time_it_was_recorded(
    pools: dict[str, asyncpg.Pool],
) -> None:
    query_pool = pools["queries"]
    message_id = infra.unique_name("fresh")
    await query_pool.execute(
        "INSERT INTO read_models.processed_messages (message_id) VALUES ($1)", message_id
    )

    age = await query_pool.fetchval(
        "SELECT now() - processed_at FROM read_models.processed_messages WHERE message_id = $1",
        message_id,
    )

    assert timedelta(0) <= age < timedelta(minutes=1)


async def test_rebuilt_read_models_keep_when_each_projection_was_recorded(
    pools: dict[str, asyncpg.Pool],
) -> None:
    schema = infra.unique_name("read_models_rebuilt")
    async with pools["queries"].acquire() as conn:
        await create_tables(conn, schema)
        try:
            indexed = await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = $1"
                " AND tablename = 'processed_messages' AND indexdef LIKE '%(processed_at)'",
                schema,
            )
        finally:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    assert indexed == 1


async def test_the_worker_prunes_every_open_database(pools: dict[str, asyncpg.Pool]) -> None:
    commands, queries = pools["commands"], pools["queries"]
    await commands.execute("DELETE FROM processed_messages")
    await queries.execute("DELETE FROM read_models.processed_messages")
    await COMMANDS.record(commands, infra.unique_name("old"), 30, timedelta(days=9))
    await PROJECTIONS.record(queries, infra.unique_name("old"), 20, timedelta(days=9))
    recent = infra.unique_name("recent")
    await PROJECTIONS.record(queries, recent, 3, timedelta(days=1))
    retention = Retention(
        deduplication_records(commands, queries), Outages(), keep=WEEK, batch_size=7
    )

    pruned = await retention.prune()

    assert pruned == {"command database": 30, "query database": 20}
    assert await queries.fetchval("SELECT count(*) FROM read_models.processed_messages") == 3


async def test_a_service_recording_projections_prunes_them_in_its_retention_worker(
    amqp_url: str,
) -> None:
    async with infra.fresh_database("fin_retention_service") as db, AsyncExitStack() as stack:
        settings = Settings(query_db=db, amqp_url=amqp_url)
        service = await bootstrap(settings, ["projector"], stack, deadline=time.monotonic() + 30)
        pool = await create_pool(db)
        stack.push_async_callback(pool.close)
        old, recent = infra.unique_name("old"), infra.unique_name("recent")
        await PROJECTIONS.record(pool, old, 5, timedelta(days=8))
        await PROJECTIONS.record(pool, recent, 2, timedelta(days=1))

        pruning = asyncio.create_task(service.workers["retention"]())
        try:

            async def pruned() -> bool:
                return await PROJECTIONS.remaining(pool, old) == 0

            await infra.wait_until(pruned, what="the old projections pruned")
        finally:
            pruning.cancel()
            await asyncio.gather(pruning, return_exceptions=True)
        assert await PROJECTIONS.remaining(pool, recent) == 2


async def test_a_service_without_a_database_has_no_retention_worker(amqp_url: str) -> None:
    async with AsyncExitStack() as stack:
        service = await bootstrap(
            Settings(amqp_url=amqp_url), ["commands-api"], stack, deadline=time.monotonic() + 30
        )

    assert "retention" not in service.workers
