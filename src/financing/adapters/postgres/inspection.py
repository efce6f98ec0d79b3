"""What an operator must mend in a database before the service may use it as it does: the
privileges its role lacks, its tables gone, the unique indexes its writes rely on.

The database's check (its health probe, and what ends its outage: `bootstrap._answering`)
looks itself, on a session of its own, when the pool has one free: never queued behind
the service's statements (with the database far away, a probe in the pool's line ran out
of time, and the database was said down). While the pool's sessions all serve units of
work, the check gives the verdict of the last look; and a worker of the service looks
in the pool's line, as any statement waits, once the last look is LOOK_DUE seconds old.
When the check passed there without looking, an outage awaiting a grant was said over
under load, and begun again at the next refused statement; and a unique index dropped
while the pool stayed busy went unseen for as long as the load lasted.

The writes themselves need no look to stop without a unique index they rely on: each
names its key (`event_store._EVENTS_KEYED`, an upsert's conflict target) and fails
(42P10, an outage) from the moment it is gone or invalid. The look names the index and
what makes it again, and ends the outage once it is back.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
from structlog import get_logger

from financing.adapters.postgres.connection import acquired
from financing.adapters.postgres.schema import (
    DATABASES,
    WritesRefused,
    require_grants,
    require_indexes,
    require_tables,
)
from financing.application.errors import AwaitingOperator, Unavailable

log = get_logger(__name__)

# How old the last look at a database may grow while its pool has no session free for
# its check; then the inspection waits for one in the pool's line.
LOOK_DUE = 5.0


class Inspection:
    """The look at one database for what the process needs of it (`writes`: whether it
    writes there, or only reads), and its last verdict."""

    __slots__ = ("_found", "_looked_at", "_pool", "schema", "writes")

    def __init__(self, pool: asyncpg.Pool, schema: str, *, writes: bool) -> None:
        self._pool = pool
        self.schema = schema
        self.writes = writes
        self._found: AwaitingOperator | None = None
        self._looked_at = -LOOK_DUE  # never: the first look is due at once

    async def run(self) -> None:
        """Look each time the last look is LOOK_DUE seconds old (a worker of the service)."""
        while True:
            await asyncio.sleep(max(0.0, self._looked_at + LOOK_DUE - time.monotonic()))
            if time.monotonic() - self._looked_at < LOOK_DUE:
                continue  # the check looked meanwhile
            try:
                await self.look()
            except Unavailable:
                pass  # kept as the verdict; a database down is the check's to say
            except Exception:
                log.exception(
                    "looking at a database failed with a bug", dependency=DATABASES[self.schema]
                )

    async def look(self) -> None:
        """Look once: the role may read the tables its statements name and, where the
        process writes, make its writes (a privilege revoked from a statement that runs
        only now and then, as pruning does, is found so); the tables are there; and,
        where it writes, so are the unique indexes its writes rely on. AwaitingOperator
        (the verdict until the next look) for what is lacking; Unavailable where the
        database does not answer, the verdict left as it was."""
        schema = self.schema
        try:
            # One session for the whole look: taken for each question in a busy pool's
            # line, a look took 14-20 s.
            async with acquired(self._pool, DATABASES[schema]) as conn:
                refused: WritesRefused | None = None
                try:
                    await require_grants(conn, schema, writes=self.writes)
                except WritesRefused as writes_refused:
                    refused = writes_refused  # the reads looked at all the same
                await require_tables(conn, schema)
                if refused is not None:
                    raise refused
                if self.writes:
                    await require_indexes(conn, schema)
        except AwaitingOperator as found:
            self._found = found
            self.verdict()  # what this process lacks of it, if anything
            return
        finally:
            self._looked_at = time.monotonic()
        self._found = None

    def verdict(self, *, reads: bool = False) -> None:
        """AwaitingOperator, as the last look found it, while the database lacks something
        only an operator gives back that the process needs (`reads`: that its Queries
        lists need). What the writes alone lack, or what the projector alone reads
        (WritesRefused), leaves the lists be, and a process that only reads."""
        found = self._found
        if found is None or (isinstance(found, WritesRefused) and (reads or not self.writes)):
            return
        # A new error each time: one raised again keeps every traceback it went through.
        raise AwaitingOperator(found.dependency, found.detail)
