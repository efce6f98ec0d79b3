"""The commit bell's coalescing, on a fake pool whose statements wait to be let through."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncpg

from financing.adapters.postgres.event_store import CommitBell
from tests.support import infra


class _Pool:
    """Hands out one connection whose statements each wait for `gate`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent = 0  # statements finished
        self.started = 0  # statements begun
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    async def acquire(self) -> _Pool:
        return self

    async def release(self, _conn: Any) -> None:
        return None

    async def execute(self, *_: Any) -> None:
        self.started += 1
        await self.gate.wait()
        self.gate.clear()
        self.sent += 1


def bell_on(pool: _Pool) -> CommitBell:
    return CommitBell(cast(asyncpg.Pool, pool))


async def test_rings_asked_for_while_one_is_sent_become_one_more_ring_after_it() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    bell.ring()
    await infra.wait_until(lambda: _now(pool.started == 1), what="the first ring to start")
    for _ in range(5):  # commits while the first ring is on its way
        bell.ring()
    pool.gate.set()
    await infra.wait_until(lambda: _now(pool.started == 2), what="the ring after them")
    pool.gate.set()
    await bell.quiet()
    assert (pool.started, pool.sent) == (2, 2)


async def test_a_ring_when_none_is_being_sent_goes_out_at_once() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    for expected in (1, 2):
        pool.gate.set()
        bell.ring()
        await bell.quiet()
        assert pool.sent == expected


async def test_no_ring_once_the_pool_is_closing() -> None:
    pool = _Pool()
    pool.closing = True
    bell = bell_on(pool)
    bell.ring()
    await bell.quiet()
    assert pool.started == 0


async def test_a_ring_that_gets_no_answer_is_given_up_when_closing() -> None:
    pool = _Pool()  # its gate never opens: a database that does not answer
    bell = bell_on(pool)
    bell.ring()
    await infra.wait_until(lambda: _now(pool.started == 1), what="the ring to start")
    await asyncio.wait_for(bell.quiet(grace=0.05), timeout=5)
    assert pool.sent == 0
    pool.gate.set()
    bell.ring()  # the bell works again afterwards
    await bell.quiet()
    assert pool.sent == 1


async def _now(value: bool) -> bool:
    return value
