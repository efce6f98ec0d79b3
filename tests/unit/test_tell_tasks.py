"""SIGUSR1: every task of the process, and where each waits."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from financing.entrypoints.service import tell_tasks


async def _innermost(answered: asyncio.Event) -> None:
    await answered.wait()


async def _outer(started: asyncio.Event, answered: asyncio.Event) -> None:
    started.set()  # and on to its await, before the test runs again
    await _innermost(answered)


async def test_each_task_is_named_with_its_chain_of_awaits_innermost_last() -> None:
    started, answered = asyncio.Event(), asyncio.Event()
    waiting = asyncio.create_task(_outer(started, answered), name="a waiting task")
    await started.wait()
    try:
        with capture_logs() as logs:
            tell_tasks()
    finally:
        answered.set()
        await waiting
    [line] = logs
    assert line["event"] == "tasks, and where each waits"
    told = {entry["task"]: entry["waits"] for entry in line["tasks"]}
    waits = told["a waiting task"]
    assert [place.split()[-1] for place in waits[:2]] == ["_outer", "_innermost"]
    assert waits[-1].endswith(" wait")  # asyncio.Event.wait, where it is suspended
    assert all(":" in place for place in waits)
