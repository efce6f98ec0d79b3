"""The database server's clock as this host sees it.

The relayer stamps each event with the command database's time of its commit
(`recorded_at`), and the projector measures an event's delay to its projection
from that stamp: by this host's clock, a host 30 s ahead of the database server
read every delay 30 s longer, and one behind read every delay 0. `DatabaseClock`
reads the server's clock every CLOCK_INTERVAL (half a round trip's precision) and
tells the time by it in between with this host's monotonic clock, which no step of
the host's wall clock moves (an offset added to the wall clock read every delay
90 s longer from a step of the host's clock until the next reading); it says when
the two clocks differ by SKEW_SAID or more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from financing import metrics
from financing.adapters.postgres.connection import acquired
from financing.application.errors import Unavailable
from financing.logging import get_logger

log = get_logger(__name__)

CLOCK_INTERVAL = 60.0
# Clocks this far apart are said (once, until they are back within half of it).
SKEW_SAID = 1.0


class DatabaseClock:
    """The time by the database server's clock: as last read (the host's until then),
    and the host's monotonic clock since; and the offset of the two clocks as then."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        dependency: str,
        *,
        interval: float = CLOCK_INTERVAL,
        host_clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._host_clock = host_clock
        self._dependency = dependency
        self._interval = interval
        self.offset = 0.0  # the server's clock minus this host's, in seconds
        self._skewed = False
        # The server's time, as last read (the host's until then), and the monotonic
        # clock's then.
        self._read = (host_clock(), time.monotonic())

    def now(self) -> datetime:
        theirs, then = self._read
        return datetime.fromtimestamp(theirs + time.monotonic() - then, UTC)

    async def run(self) -> None:
        while True:
            try:
                await self.measure()
            except Unavailable as error:  # the database's outage, which others report
                log.debug("the database server's clock was not read", error=repr(error))
            await asyncio.sleep(self._interval)  # the measuring period

    async def measure(self) -> None:
        """Read the server's clock, taken to be read half way through the round trip."""
        async with acquired(self._pool, self._dependency) as conn:
            sent, sent_then = self._host_clock(), time.monotonic()
            theirs: datetime = await conn.fetchval("SELECT clock_timestamp()")
            answered, answered_then = self._host_clock(), time.monotonic()
        self._read = (theirs.timestamp(), (sent_then + answered_then) / 2)
        self.offset = theirs.timestamp() - (sent + answered) / 2
        metrics.DATABASE_CLOCK_OFFSET.labels(self._dependency).set(self.offset)
        skewed = abs(self.offset) >= (SKEW_SAID / 2 if self._skewed else SKEW_SAID)
        if skewed and not self._skewed:
            log.warning(
                "this host's clock and the database server's differ: keep them in step"
                " (NTP); projection delays are measured by the server's",
                database=self._dependency,
                offset_seconds=round(self.offset, 3),
            )
        elif self._skewed and not skewed:
            log.info(
                "this host's clock and the database server's agree again",
                database=self._dependency,
                offset_seconds=round(self.offset, 3),
            )
        self._skewed = skewed
