"""A pool's capacity: units of work wait their turn for the sessions a connection limit
leaves the pool until the hold ends."""

from __future__ import annotations

import asyncio

import pytest

from financing.adapters.postgres import capacity as capacity_module
from financing.adapters.postgres.capacity import Capacity
from tests.support.infra import holds, wait_until


def opened() -> int:
    return 1


async def test_a_held_pool_hands_out_only_the_sessions_it_has_until_the_hold_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(capacity_module, "HELD_FOR", 60.0)
    pool = Capacity(3, "command database")
    pool.hold_to(1, "too many connections for role")
    await pool.take(opened)
    second = asyncio.ensure_future(pool.take(opened))
    third = asyncio.ensure_future(pool.take(opened))
    await wait_until(lambda: holds(pool.queued == 2), what="both in line")
    assert not second.done() and not third.done()
    monkeypatch.setattr(capacity_module, "HELD_FOR", 0.01)
    pool.hold_to(1, "too many connections for role")  # refused again: held a moment more
    await asyncio.wait_for(asyncio.gather(second, third), 5)  # the hold ended
    assert pool.taken == 3 and pool.limit == 3
