"""How much the event loop's thread wanted a core, and deadlines that allow for it.

What the thread wanted is the time it ran on a core and, where Linux tells it
(`/proc/thread-self/schedstat`), the time it waited for one, runnable. A deadline
that ran out while the thread ran or waited to run for BUSY_SHARE of it or more says
more about this process and its host than about what it waited for: the answer may
have been there, unread (a storm of calls on two cores, other processes holding the
cores). Elsewhere only the time on a core is counted.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

BUSY_SHARE = 0.5

_SCHEDSTAT = "/proc/thread-self/schedstat"


class _Schedstat:
    """The calling thread's schedstat, kept open as a bare descriptor, closed with the
    thread's state: kept as a file object, it was never closed, and a process run with
    warnings shown (`-X dev`, PYTHONWARNINGS) wrote a ResourceWarning, no JSON, as it
    exited."""

    def __init__(self) -> None:
        self.fd = os.open(_SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        os.close(self.fd)


_opened = threading.local()  # the schedstat of each thread that reads its own


def _scheduled() -> float:
    stat = getattr(_opened, "stat", None)
    if stat is None:
        stat = _opened.stat = _Schedstat()
    ran, waited = os.pread(stat.fd, 128, 0).split()[:2]
    return (int(ran) + int(waited)) / 1e9


def _clock() -> Callable[[], float]:
    try:
        _scheduled()
    except (OSError, ValueError):
        return time.thread_time
    return _scheduled


# Seconds the calling thread has run on a core or waited, runnable, for one since it
# started; only differences between two readings in the same thread mean anything.
wanted: Callable[[], float] = _clock()


class Since:
    """From now on: the share of the wall time the event loop's thread wanted a core."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._began, self._wanted = self._loop.time(), wanted()

    def share(self) -> float:
        return (wanted() - self._wanted) / max(self._loop.time() - self._began, 1e-3)

    def busy(self) -> bool:
        return self.share() >= BUSY_SHARE


@asynccontextmanager
async def patient_timeout(seconds: float) -> AsyncIterator[Since]:
    """`asyncio.timeout(seconds)`, moved once by `seconds` more when it runs out while
    the process was busy (`Since.busy`): what is awaited may be there, unread. Yields
    how busy the process has been since it began (to say so if it runs out all the
    same)."""
    loop = asyncio.get_running_loop()
    since = Since()
    async with asyncio.timeout(None) as timeout:
        handles: list[asyncio.TimerHandle] = []

        def expire(moved: bool) -> None:
            if moved or not since.busy():
                timeout.reschedule(loop.time())
            else:
                handles.append(loop.call_at(loop.time() + seconds, expire, True))

        handles.append(loop.call_at(loop.time() + seconds, expire, False))
        try:
            yield since
        finally:
            handles[-1].cancel()
