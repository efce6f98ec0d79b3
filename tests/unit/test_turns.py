"""Turns on aggregates: one holder at a time per aggregate, nothing kept once let go."""

from __future__ import annotations

import asyncio

import pytest

from financing.application.turns import AggregateTurns
from tests.support.infra import holds, wait_until


async def test_turns_of_one_aggregate_are_taken_one_at_a_time_in_order() -> None:
    turns = AggregateTurns()
    order: list[str] = []
    first_in = asyncio.Event()
    let_go = asyncio.Event()

    async def take(name: str, ids: list[str]) -> None:
        async with turns.taken(ids):
            order.append(name)
            if name == "first":
                first_in.set()
                await let_go.wait()

    first = asyncio.create_task(take("first", ["a"]))
    await first_in.wait()
    second = asyncio.create_task(take("second", ["b", "a"]))  # waits for "a"
    other = asyncio.create_task(take("other", ["c"]))  # another aggregate: at once
    await other
    assert order == ["first", "other"]
    let_go.set()
    await asyncio.gather(first, second)
    assert order == ["first", "other", "second"]
    assert len(turns) == 0


async def test_a_taker_cancelled_while_it_waits_leaves_nothing_behind() -> None:
    turns = AggregateTurns()
    let_go = asyncio.Event()

    async def hold() -> None:
        async with turns.taken(["a"]):
            await let_go.wait()

    holder = asyncio.create_task(hold())
    await wait_until(lambda: holds(len(turns) == 1), what="the turn taken")
    waiter = asyncio.create_task(hold())
    await wait_until(lambda: holds(turns._users["a"] == 2), what="the waiter in line")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    let_go.set()
    await holder
    assert len(turns) == 0
