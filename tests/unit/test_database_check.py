"""The check of a database (its health probe, and what ends its outage) asks only on a
session of its own: behind the service's statements, it does not queue. What only an
operator gives back (grants, tables, indexes) it takes from the database's inspection."""

from __future__ import annotations

from typing import Any

import pytest

from financing.adapters.postgres import connection as connection_module
from financing.adapters.postgres.capacity import Capacity
from financing.adapters.postgres.connection import COMMAND_DATABASE
from financing.adapters.postgres.inspection import Inspection
from financing.application.errors import AwaitingOperator
from financing.entrypoints import bootstrap


@pytest.mark.parametrize("writes", [True, False])
@pytest.mark.parametrize("found", [True, False], ids=["a grant lacking", "nothing lacking"])
async def test_a_check_behind_the_services_statements_asks_nothing_more_and_keeps_the_verdict(
    monkeypatch: pytest.MonkeyPatch, writes: bool, found: bool
) -> None:
    """Regression (a probe): with the command database 200 ms away each way and the pool's
    every session serving units of work, the probe found the pool answering, then waited
    in its line to read the grants and tables, ran out of time, and the database was
    said down (`/health` 503) while every command was handled. Regression: asking
    nothing more there, the check passed, so an outage awaiting a grant revoked from
    pruning was said over under load, and begun again at pruning's next run."""

    async def behind_the_service(pool: Any, dependency: str) -> bool:
        return False  # the pool's sessions answered the service's statements

    for probe in ("writable", "ping"):
        monkeypatch.setattr(bootstrap, probe, behind_the_service)
    inspection = Inspection(object(), "commands", writes=writes)  # type: ignore[arg-type]
    if found:
        inspection._found = AwaitingOperator(COMMAND_DATABASE, "its role lacks privileges")

    async def queued(self: Inspection) -> None:
        raise AssertionError("asked in the pool's line")

    monkeypatch.setattr(Inspection, "look", queued)
    check = bootstrap._answering(object(), inspection)  # type: ignore[arg-type]
    if not found:
        await check()
        return
    with pytest.raises(AwaitingOperator, match="lacks privileges"):
        await check()


class GrowingPool:
    """A pool's sizes as asyncpg tells them: `opened` sessions of `most`, none idle."""

    def __init__(self, opened: int, most: int) -> None:
        self.opened, self.most = opened, most

    def get_idle_size(self) -> int:
        return 0

    def get_size(self) -> int:
        return self.opened

    def get_max_size(self) -> int:
        return self.most


async def test_a_pool_still_growing_for_units_of_work_in_line_has_no_room_for_a_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): with the command database 200 ms away each way, the pool's
    sessions were slow to open, every one it may hold was taken by units of work (some
    still opening), and the probe, finding the pool below its size, queued behind them
    past its time: the database was said down for 7 s now and then, under load."""
    pool = GrowingPool(opened=3, most=10)
    capacity = Capacity(10, COMMAND_DATABASE)
    monkeypatch.setitem(connection_module._CAPACITIES, pool, capacity)  # type: ignore[arg-type]
    assert connection_module.has_room(pool)  # type: ignore[arg-type]
    for _ in range(10):  # every session it may hold taken, 7 of them being opened
        await capacity.take(pool.get_size)
    assert not connection_module.has_room(pool)  # type: ignore[arg-type]
    capacity.give_back(pool.get_size)
    assert connection_module.has_room(pool)  # type: ignore[arg-type]
