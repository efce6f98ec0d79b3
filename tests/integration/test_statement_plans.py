"""Statements that run over and over read what they need, not their whole table: each is
planned by PostgreSQL over tables of thousands of rows, and the rows its plan read are
counted from `EXPLAIN ANALYZE`. A plan that scans the table reads every row; one that
goes through an index reads the few it returns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any
from uuid import uuid4

import asyncpg
import pytest

from financing.adapters.postgres.event_store import _LOAD_BOTH, transactions_elsewhere
from financing.adapters.postgres.outbox import (
    _CHECKPOINT_VALUES,
    _LAG,
    _MARK_RELAYED,
    _PENDING,
    PostgresOutbox,
)
from financing.adapters.postgres.retention import command_records
from tests.support import infra

# Rows in the table besides the few a statement should read.
BULK = 20_000
# A table large enough for the planner to prefer a (parallel) scan of all of it when it
# cannot tell how few rows match.
LARGE = 400_000


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_plans", "commands") as pool:
        yield pool


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


async def rows_read(conn: asyncpg.Connection, table: str, sql: str, *args: object) -> int:
    """How many rows of `table` the plan of `sql` read: those it kept and those its
    filters removed, over every loop (each loop's counted as their rounded average)."""
    [explained] = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))
    return sum(
        (
            node["Actual Rows"]
            + node.get("Rows Removed by Filter", 0)
            + node.get("Rows Removed by Index Recheck", 0)
        )
        * node["Actual Loops"]
        for node in _nodes(explained["Plan"])
        if node.get("Relation Name") == table
    )


async def events_of_many_streams(conn: asyncpg.Connection, count: int = BULK) -> None:
    await conn.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, version, name, body)"
        " SELECT 'Invoice', gen_random_uuid(), 1, 'InvoiceCreatedEvent', '{}'"
        f" FROM generate_series(1, {count})"
    )


async def relayed_but_three(conn: asyncpg.Connection) -> None:
    """A LARGE store relayed but for its last three events."""
    await events_of_many_streams(conn, LARGE)
    await conn.execute(
        "INSERT INTO relay_checkpoints (name, transaction_id, position)"
        " SELECT 'relayer', transaction_id, position FROM events"
        " ORDER BY position DESC OFFSET 3 LIMIT 1"
    )
    await conn.execute("ANALYZE events")


async def test_loading_two_aggregates_reads_only_the_events_after_their_snapshots(
    pool: asyncpg.Pool,
) -> None:
    """Regression: a bid's load (investor and invoice at once) read the investor's whole
    stream and filtered it: 11,000 events read for the 100 after the snapshot, the
    handling of a bid ten times slower on a long-lived investor."""
    investor, invoice = uuid4(), uuid4()
    async with pool.acquire() as conn:
        await events_of_many_streams(conn)
        await conn.execute(
            "INSERT INTO events (aggregate_type, aggregate_id, version, name, body)"
            " SELECT 'Investor', $1, v, 'InvestorFundsAddedEvent', '{}'"
            " FROM generate_series(1, 5050) AS v",
            investor,
        )
        await conn.execute(
            "INSERT INTO events (aggregate_type, aggregate_id, version, name, body)"
            " VALUES ('Invoice', $1, 1, 'InvoiceCreatedEvent', '{}')",
            invoice,
        )
        await conn.execute(
            "INSERT INTO snapshots (aggregate_id, aggregate_type, version, state)"
            " VALUES ($1, 'Investor', 5000, '{}')",
            investor,
        )
        await conn.execute("ANALYZE events")
        args = (investor, "Investor", invoice, "Invoice")

        rows = await conn.fetch(_LOAD_BOTH, *args)
        read = await rows_read(conn, "events", _LOAD_BOTH, *args)

    versions = [(row["version"], row["part"]) for row in rows if row["aggregate_id"] == investor]
    assert versions == [(5000, 0), *((v, 1) for v in range(5001, 5051))]
    assert len(rows) == 1 + 50 + 1
    # The 51 events it returns (EXPLAIN gives each loop's rows as their rounded average).
    assert read <= 52, read


async def test_the_relayers_lag_reads_only_the_events_behind_its_checkpoint(
    pool: asyncpg.Pool,
) -> None:
    """Regression: the lag, measured every 5 s by every relayer, scanned the whole events
    table (57 ms at 434,000 events) to count the few not relayed yet."""
    async with pool.acquire() as conn:
        await relayed_but_three(conn)
        checkpoint = await conn.fetchrow(_CHECKPOINT_VALUES, "relayer")
        assert checkpoint is not None

        read = await rows_read(conn, "events", _LAG, *checkpoint)

    count, _ = await PostgresOutbox(pool).lag()
    assert count == 3
    assert read == 3


async def test_pruning_with_nothing_old_enough_reads_no_record(pool: asyncpg.Pool) -> None:
    """The prune goes through the age index in age order: a plain scan, which the
    planner chose for large tables with LIMIT alone, read the whole table when no record
    was old enough (every 5 minutes, on each database)."""
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO processed_messages (consumer, message_id, processed_at)"
            " SELECT 'bid_on_invoice', g::text, now() - g * interval '1 second'"
            f" FROM generate_series(1, {BULK}) AS g"
        )
        await conn.execute("ANALYZE processed_messages")
        prune = command_records(pool)._prune_sql  # deletes nothing: no record is old enough
        read = await rows_read(conn, "processed_messages", prune, timedelta(days=7), 1000)

    assert read == 0
    assert await command_records(pool).prune(timedelta(days=7), 1000) == 0


async def test_moving_the_relayers_checkpoint_reads_only_the_events_after_it(
    pool: asyncpg.Pool,
) -> None:
    """Regression (a probe at 1.35 million events): each move of the checkpoint read the
    whole commit-order index up to it (0.4-2.3 s a move), every batch waiting behind it:
    a saga took up to 1.3 s, and at 2.7 million events a move outlasted the statement
    timeout, the relayer said the command database down for 48 s. The read of the next
    batch seeks them too."""
    async with pool.acquire() as conn:
        await relayed_but_three(conn)
        following = [
            row["position"]
            for row in await conn.fetch(
                "SELECT position FROM events ORDER BY position DESC LIMIT 3"
            )
        ]
        moving = await rows_read(conn, "events", _MARK_RELAYED, "relayer", following)
        elsewhere = await transactions_elsewhere(conn)
        pending = await rows_read(conn, "events", _PENDING, "relayer", 100, elsewhere)

    assert moving <= 2 * len(following), moving
    assert pending <= len(following), pending
