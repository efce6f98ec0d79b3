"""The event loop thread's want of a core counts the time it waited for one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

from financing.adapters.rabbitmq.publisher import unconfirmed
from financing.cpu import patient_timeout, wanted
from tests.support.busy import busy

# Pinned to one core beside a process that spins on it, a spinning thread gets about half
# of the core; what it wanted is the whole wall time all the same.
_STARVED = textwrap.dedent(
    """
    import os, sys, time
    from financing.cpu import wanted

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    parent = os.getpid()
    rival = os.fork()
    if rival == 0:  # spins while its parent lives, 30 s at most
        until = time.monotonic() + 30
        while os.getppid() == parent and time.monotonic() < until:
            pass
        os._exit(0)
    try:
        began, ran, want = time.monotonic(), time.thread_time(), wanted()
        while time.monotonic() - began < 0.5:
            pass
        wall = time.monotonic() - began
        print((time.thread_time() - ran) / wall, (wanted() - want) / wall)
    finally:
        os.kill(rival, 9)
        os.waitpid(rival, 0)
    """
)


def test_a_thread_that_spins_wants_a_core_for_the_wall_time_it_spins() -> None:
    began, want = time.monotonic(), wanted()
    while time.monotonic() - began < 0.2:
        pass
    spun, wall = wanted() - want, time.monotonic() - began
    assert 0.9 * wall <= spun <= 1.05 * wall


@pytest.mark.skipif(
    not os.path.exists("/proc/thread-self/schedstat"),
    reason="no /proc/thread-self/schedstat here: only a thread's time on a core is counted",
)
def test_the_time_a_thread_waits_for_a_core_other_processes_hold_counts_as_wanted() -> None:
    """Regression: the health probes of a process starved by other processes on its host
    timed out and counted as its dependencies' outages (the process's own CPU time was
    half the probe's, the other half it waited for a core)."""
    done = subprocess.run(
        [sys.executable, "-c", _STARVED], capture_output=True, text=True, timeout=30, check=True
    )
    ran, wanted_share = map(float, done.stdout.split())
    assert ran < 0.8  # the rival did take the core half of the time
    assert wanted_share > 0.95


async def test_a_deadline_out_in_an_idle_process_is_out() -> None:
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        async with patient_timeout(0.3):
            await asyncio.Event().wait()
    assert time.monotonic() - began < 0.55  # not moved: that would be 0.6 s at least


async def test_a_deadline_out_in_a_busy_process_is_moved_once() -> None:
    """Regression: the relayer's confirm wait ran out while large Queries lists kept the
    event loop busy, the confirms unread: a broker outage was logged that was none."""
    loop = asyncio.get_running_loop()
    answered = asyncio.Event()
    loop.call_later(0.15, answered.set)  # the answer comes after the first deadline
    async with busy(0.01):
        async with patient_timeout(0.1):
            await answered.wait()
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            async with patient_timeout(0.1) as load:
                await asyncio.Event().wait()
    assert 0.2 <= time.monotonic() - began < 0.4
    assert load.busy()  # what a failure it ends in says (below)


def test_a_publish_unconfirmed_in_a_busy_process_says_its_own_load_may_be_why() -> None:
    """Regression (a probe): a process at its core's limit (list replies, sagas) left the
    relayer's confirms unread, and its outage line said "broker unavailable: 256
    event(s): not confirmed within 10.2 s" alone, while the broker confirmed another
    client's publishes within milliseconds."""
    assert unconfirmed("256 event(s)", 10.23, 0.93) == (
        "256 event(s): not confirmed within 10.2 s (this process wanted a core 93% of"
        " that time: its own load may have kept the confirms unread)"
    )
    assert unconfirmed("256 event(s)", 5.0, 0.1) == "256 event(s): not confirmed within 5.0 s"


@pytest.mark.parametrize("ending", ["returns", "raises", "is cancelled"])
async def test_a_deadline_left_early_leaves_no_timer_behind(ending: str) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))

    async def body() -> None:
        async with patient_timeout(0.05):
            if ending == "raises":
                raise ValueError("the body's own error")
            if ending == "is cancelled":
                await asyncio.Event().wait()

    try:
        async with busy(0.01):  # a busy process: the deadline is moved once, if reached
            task = asyncio.create_task(body())
            if ending == "is cancelled":
                loop.call_later(0.07, task.cancel)  # past the first deadline, moved
            done = await asyncio.gather(task, return_exceptions=True)
            # The scenario's length, not a wait for a condition: past any deadline of
            # the body's, a timer left behind would have gone off.
            ended = asyncio.Event()
            loop.call_later(0.2, ended.set)
            await ended.wait()
    finally:
        loop.set_exception_handler(handler)
    expected = {"returns": None, "raises": ValueError, "is cancelled": asyncio.CancelledError}
    assert (type(done[0]) if done[0] is not None else None) is expected[ending]
    assert errors == []


def test_reading_the_threads_schedule_leaves_nothing_to_warn_of_at_exit() -> None:
    """Regression: the schedule's file was kept open for good, and a process run with its
    warnings shown (`-X dev`) wrote a ResourceWarning as it exited: a line, no JSON."""
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", "from financing import cpu; cpu.wanted()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
