"""Deduplication records pruned by age, in bounded batches (`workers.retention` drives it).

Each consumer records the ids of the messages it processed, so that a
redelivery changes nothing; a record older than any redelivery the broker
makes only takes space. A batch is one short statement deleting at most
`limit` rows found through the `processed_at` index, so it holds few locks
for little time. Rows another instance is pruning at the same moment are
skipped rather than waited for (SKIP LOCKED): every instance that records processed
messages runs the worker.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from financing.adapters.postgres.connection import COMMAND_DATABASE, QUERY_DATABASE, acquired
from financing.adapters.postgres.read_models import DEFAULT_SCHEMA, quoted_schema


class PostgresDeduplicationRecords:
    """The processed-message records of one table."""

    def __init__(self, pool: asyncpg.Pool, table: str, dependency: str) -> None:
        self._pool = pool
        self._dependency = dependency
        # The age is measured by the database's clock, which wrote processed_at.
        self._prune_sql = (
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {table} WHERE processed_at < now() - $1::interval"
            # In age order, so that the planner goes through the index: with LIMIT alone
            # it expected to meet old rows soon in a plain scan, and read the whole table
            # when there were none.
            " ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED))"
        )

    async def prune(self, older_than: timedelta, limit: int) -> int:
        """Delete at most `limit` records older than `older_than`; how many were deleted."""
        async with acquired(self._pool, self._dependency) as conn:
            status: str = await conn.execute(self._prune_sql, older_than, limit)
        return int(status.rsplit(" ", 1)[-1])  # "DELETE <count>"


def command_records(pool: asyncpg.Pool) -> PostgresDeduplicationRecords:
    """The command and policy handlers' records, in the event store."""
    return PostgresDeduplicationRecords(pool, "processed_messages", COMMAND_DATABASE)


def projector_records(pool: asyncpg.Pool) -> PostgresDeduplicationRecords:
    """The projector's records, beside the read models."""
    table = f"{quoted_schema(DEFAULT_SCHEMA)}.processed_messages"
    return PostgresDeduplicationRecords(pool, table, QUERY_DATABASE)


def deduplication_records(
    command_pool: asyncpg.Pool | None, query_pool: asyncpg.Pool | None
) -> dict[str, PostgresDeduplicationRecords]:
    """The records of every database this process has open, by database."""
    records = {}
    if command_pool is not None:
        records[COMMAND_DATABASE] = command_records(command_pool)
    if query_pool is not None:
        records[QUERY_DATABASE] = projector_records(query_pool)
    return records
