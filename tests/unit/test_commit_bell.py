"""The commit bell: a ring on the committing connection, and the coalescing of rings
asked for meanwhile, on a fake pool whose statements wait to be let through."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncpg
import pytest

from financing.adapters.postgres.event_store import CommitBell
from tests.support import infra


class _Pool:
    """Hands out itself as its one connection, whose statements each wait for `gate`.
    `fail` makes the next statement fail as a database that went away does."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent = 0  # statements finished
        self.started = 0  # statements begun
        self.acquired = 0
        self.closing = False
        self.fail: BaseException | None = None

    def is_closing(self) -> bool:
        return self.closing

    async def acquire(self) -> _Pool:
        self.acquired += 1
        return self

    async def release(self, _conn: Any) -> None:
        return None

    async def execute(self, *_: Any) -> None:
        self.started += 1
        await self.gate.wait()
        self.gate.clear()
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        self.sent += 1


def bell_on(pool: _Pool) -> CommitBell:
    return CommitBell(cast(asyncpg.Pool, pool))


def ringing(bell: CommitBell, conn: _Pool) -> asyncio.Task[None]:
    """A unit of work ringing after its commit on `conn`, as a task of its own."""
    return asyncio.get_running_loop().create_task(bell.ring(cast(Any, conn)))


async def test_a_ring_goes_out_at_once_on_the_committing_connection() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    for expected in (1, 2):
        pool.gate.set()
        await bell.ring(cast(Any, pool))
        assert (pool.sent, pool.acquired) == (expected, 0)  # no pooled connection borrowed
    await bell.quiet()
    assert pool.started == 2


async def test_rings_asked_for_while_one_is_sent_become_one_more_ring_after_it() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    first = ringing(bell, pool)
    await infra.wait_until(lambda: _now(pool.started == 1), what="the first ring to start")
    for _ in range(5):  # commits while the first ring is on its way: none waits for it
        await asyncio.wait_for(bell.ring(cast(Any, pool)), timeout=5)
    pool.gate.set()
    await first
    await infra.wait_until(lambda: _now(pool.started == 2), what="the ring after them")
    assert pool.acquired == 1  # sent by the task, on a pooled connection
    pool.gate.set()
    await bell.quiet()
    assert (pool.started, pool.sent) == (2, 2)
    pool.gate.set()
    await bell.ring(cast(Any, pool))  # and the next commit rings at once again
    assert (pool.sent, pool.acquired) == (3, 1)


async def test_no_ring_after_the_one_being_sent_once_the_pool_is_closing() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    first = ringing(bell, pool)
    await infra.wait_until(lambda: _now(pool.started == 1), what="the first ring to start")
    await bell.ring(cast(Any, pool))
    pool.closing = True
    pool.gate.set()
    await first
    await bell.quiet()
    assert (pool.started, pool.acquired) == (1, 0)


async def test_a_ring_the_database_cannot_take_is_dropped_and_the_bell_works_again() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    pool.fail = ConnectionResetError("connection reset by peer")
    pool.gate.set()
    await bell.ring(cast(Any, pool))  # the commit stands: no error reaches the unit of work
    assert pool.sent == 0
    pool.gate.set()
    await bell.ring(cast(Any, pool))
    assert pool.sent == 1


async def test_a_ring_that_fails_for_another_reason_is_a_bug_and_raised() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    pool.fail = ValueError("not a ring")
    pool.gate.set()
    with pytest.raises(ValueError, match="not a ring"):
        await bell.ring(cast(Any, pool))
    pool.gate.set()
    await bell.ring(cast(Any, pool))  # not left busy
    assert pool.sent == 1


async def test_a_ring_that_gets_no_answer_is_given_up_when_closing() -> None:
    pool = _Pool()
    bell = bell_on(pool)
    first = ringing(bell, pool)
    await infra.wait_until(lambda: _now(pool.started == 1), what="the first ring to start")
    await bell.ring(cast(Any, pool))
    pool.gate.set()
    await first
    # The ring after it gets no answer: a database that stopped answering.
    await infra.wait_until(lambda: _now(pool.started == 2), what="the ring after it")
    await asyncio.wait_for(bell.quiet(grace=0.05), timeout=5)
    assert pool.sent == 1
    pool.gate.set()
    await bell.ring(cast(Any, pool))  # the bell works again afterwards
    assert pool.sent == 2


async def _now(value: bool) -> bool:
    return value
