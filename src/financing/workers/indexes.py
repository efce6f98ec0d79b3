"""Index watch: a unique index the service's writes rely on, dropped while it runs.

Start-up waits for every unique index of a database the process writes
(`schema.require_indexes`), and an outage of that database lasts while one is
lacking. A DBA who drops one while the service runs (`ALTER TABLE ... DROP
CONSTRAINT`) meets no statement that fails where a plain insert relied on it:
every few seconds this worker looks, and a lack begins its database's outage,
said once with what makes the index again, which the outage's check ends once it
is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from financing.application.errors import AwaitingOperator
from financing.application.retry import Outages

INTERVAL_SECONDS = 10.0


class IndexWatch:
    def __init__(
        self,
        checks: Mapping[str, Callable[[], Awaitable[None]]],
        outages: Outages,
        *,
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self._checks = checks  # by database: AwaitingOperator while an index is lacking
        self._outages = outages
        self._interval = interval

    async def run(self) -> None:
        """Look every `interval` seconds (start-up looked first), until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.look()

    async def look(self) -> None:
        """Begin the outage of each database that lacks a unique index. One already out is
        its outage's check's to look at; one that does not answer now is said by the
        statements that meet it."""
        for database, check in self._checks.items():
            if database in self._outages.down():
                continue
            try:
                await check()
            except AwaitingOperator as error:
                self._outages.failed(error)
