"""Turns on aggregates: the retries of one process that lost a race on an aggregate take
their next attempts one at a time, in the order they came.

Optimistic concurrency lets every writer of a stream try at once and all but one lose;
each loser reloads and tries again, at once with the others that lost. A burst of 600
bids of one investor in one process cost 2,421 attempts that lost; with the losers in
line, a retry races only the first attempts of messages just delivered and the other
processes' writers. First attempts take no turn: the common case pays nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable


class AggregateTurns:
    """A lock per aggregate id, held by one attempt at a time, kept while anyone uses it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def taken(self, aggregate_ids: Iterable[str]) -> AsyncIterator[None]:
        """The turns of `aggregate_ids`, taken in a fixed order (no two attempts can each
        hold one the other waits for), for the block."""
        async with contextlib.AsyncExitStack() as stack:
            for aggregate_id in sorted(set(aggregate_ids)):
                self._users[aggregate_id] += 1
                stack.callback(self._left, aggregate_id)
                lock = self._locks.setdefault(aggregate_id, asyncio.Lock())
                await stack.enter_async_context(lock)
            yield

    def _left(self, aggregate_id: str) -> None:
        self._users[aggregate_id] -= 1
        if not self._users[aggregate_id]:
            del self._users[aggregate_id]
            del self._locks[aggregate_id]

    def __len__(self) -> int:
        """The aggregates whose turns are held or waited for."""
        return len(self._locks)


# The process's: the consumers of every queue that write an aggregate share its turns.
TURNS = AggregateTurns()
