"""Retention: deduplication records older than the retention window are pruned.

Every consumer keeps the id of each message it processed so that a
redelivery changes nothing; without pruning those records grow for ever.
Every few minutes this worker deletes the ones older than the window
(`FINANCING_DEDUP_RETENTION`, 7 days by default), in bounded batches so that
no statement holds locks for long, database after database. An outage is
retried quietly (`retry.Outages` logs its start and end once); a bug stops
the worker, and with it the service, loudly, as in the relayer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import timedelta
from typing import Protocol

from financing.application.retry import NO_BUG_RETRIES, Outages, RetryPolicy, retry_or_raise
from financing.logging import get_logger

log = get_logger(__name__)

INTERVAL_SECONDS = 300.0
BATCH_SIZE = 1000


class DeduplicationRecords(Protocol):
    async def prune(self, older_than: timedelta, limit: int) -> int:
        """Delete at most `limit` records older than `older_than`; how many were deleted."""
        ...


class Retention:
    def __init__(
        self,
        records: Mapping[str, DeduplicationRecords],
        outages: Outages,
        *,
        keep: timedelta,
        interval: float = INTERVAL_SECONDS,
        batch_size: int = BATCH_SIZE,
        policy: RetryPolicy = NO_BUG_RETRIES,
    ) -> None:
        self._records = records  # by database
        self._outages = outages
        self._keep = keep
        self._interval = interval
        self._batch_size = batch_size
        self._policy = policy

    async def run(self) -> None:
        """Prune now, then every `interval` seconds, until cancelled."""
        while True:
            await self.prune()
            await asyncio.sleep(self._interval)

    async def prune(self) -> dict[str, int]:
        """Prune every database once; how many records each lost."""
        return {
            database: await self._prune(database, records)
            for database, records in self._records.items()
        }

    async def _prune(self, database: str, records: DeduplicationRecords) -> int:
        pruned = 0
        while True:
            count = await retry_or_raise(
                lambda: records.prune(self._keep, self._batch_size),
                policy=self._policy,
                outages=self._outages,
                what=f"pruning deduplication records of the {database}",
            )
            pruned += count
            if count < self._batch_size:
                break
            await asyncio.sleep(0)  # a long backlog does not starve the other tasks
        if pruned:
            log.info(
                "pruned deduplication records",
                database=database,
                count=pruned,
                older_than_seconds=self._keep.total_seconds(),
            )
        return pruned
