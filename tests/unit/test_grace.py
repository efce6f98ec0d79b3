"""A step finished as its worker stops: given its grace, and said when it fails."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from financing.application.grace import finish_on_cancel, stop_if_asked


async def _stopped_while(step_fails: bool) -> tuple[list[str], list[str]]:
    """Cancel a worker running a step, then let the step end (failing or not); what the
    step did, and the warnings said."""
    done: list[str] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def step() -> None:
        started.set()
        await release.wait()
        if step_fails:
            raise ValueError("a bug in the step")
        done.append("finished")

    worker = asyncio.create_task(finish_on_cancel(step(), grace=5))
    await asyncio.wait_for(started.wait(), 5)
    with capture_logs() as logs:
        worker.cancel()
        release.set()
        results = await asyncio.gather(worker, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    return done, [
        f"{line['log_level']}: {line['event']}{' (traceback)' if 'exc_info' in line else ''}"
        for line in logs
        if line["log_level"] in ("warning", "error")
    ]


async def test_a_step_cancelled_with_its_worker_finishes_within_its_grace() -> None:
    assert await _stopped_while(step_fails=False) == (["finished"], [])


async def test_a_step_that_fails_within_its_grace_is_said() -> None:
    """Regression: every failure of the step within the grace, bugs included, was silent."""
    assert await _stopped_while(step_fails=True) == (
        [],
        ["error: a step being finished as its worker stopped failed (traceback)"],
    )


async def test_a_step_cut_short_by_its_grace_is_said() -> None:
    started = asyncio.Event()

    async def step() -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes

    worker = asyncio.create_task(finish_on_cancel(step(), grace=0.05))
    await asyncio.wait_for(started.wait(), 5)
    with capture_logs() as logs:
        worker.cancel()
        results = await asyncio.gather(worker, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert [line["event"] for line in logs] == [
        "a step being finished as its worker stopped was cut short"
    ]


async def test_a_loop_asked_to_stop_stops_though_a_wait_lost_the_cancellation() -> None:
    """Regression (a probe): a stop signal to `financing dead-letters requeue` cancelled
    its task while the AMQP client's `asyncio.wait_for` was finishing a wait: Python 3.11
    returns the result then, the cancellation lost, and the command requeued every
    letter there was. Each turn of such a loop now looks whether it was asked to stop."""
    turns = 0
    asked = asyncio.Event()

    async def loop_over_letters() -> None:
        nonlocal turns
        while True:
            stop_if_asked()
            turns += 1
            try:
                asked.set()
                await asyncio.Event().wait()  # a wait only a cancellation ends
            except asyncio.CancelledError:
                pass  # as wait_for in 3.11 does when its wait ends in the same turn

    task = asyncio.create_task(loop_over_letters())
    await asked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert turns == 1
