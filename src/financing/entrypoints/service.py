"""`financing serve`: wire the selected components (bootstrap) and run them (supervisor).

SIGUSR1 logs every task and where it waits, and the service goes on.

Exit codes: 0 after SIGINT/SIGTERM/SIGHUP (also while starting: start-up is abandoned,
what it opened closed), 1 when a component crashed, 2 when
start-up failed (a dependency refused the service or stayed unreachable for
`FINANCING_STARTUP_TIMEOUT` seconds, or a port could not be listened on).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from types import FrameType

from financing.config import Settings
from financing.entrypoints.bootstrap import (
    COMPONENTS,
    NO_OVERRIDES,
    Overrides,
    Service,
    StartupError,
    bootstrap,
)
from financing.entrypoints.stopping import early_signal, stop_signals
from financing.entrypoints.supervisor import supervise
from financing.logging import get_logger

log = get_logger(__name__)


async def serve(
    settings: Settings,
    components: Iterable[str] = COMPONENTS,
    *,
    startup_timeout: float | None = None,
    overrides: Overrides = NO_OVERRIDES,
    last: bool = False,
) -> int:
    """Run the selected components until a signal (exit 0) or a crash (exit 1). `last`:
    the process ends with it (`financing serve`), and a stop signal once it has returned
    ends the process at once with the exit code it returned: a second SIGTERM in the
    moments the process takes to exit killed it (143) after its last line had said 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopped_by: list[signal.Signals] = []  # the signals received, the first one said

    def stopping(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        stop.set()

    stopping_on = stop_signals()
    for sig in stopping_on:
        loop.add_signal_handler(sig, stopping, sig)
    if (early := early_signal()) is not None:  # before these handlers took the signals
        stopping(early)
    loop.add_signal_handler(signal.SIGUSR1, tell_tasks)
    budget = settings.startup_timeout if startup_timeout is None else startup_timeout
    code = 1  # a crash's, if what follows raises
    try:
        async with AsyncExitStack() as stack:
            starting = asyncio.create_task(
                bootstrap(
                    settings,
                    components,
                    stack,
                    deadline=time.monotonic() + budget,
                    overrides=overrides,
                )
            )
            if not await _started_unless_stopped(starting, stop):
                # What start-up opened is closed as the stack unwinds.
                log.info("stopped while starting", signal=stopped_by[0].name)
                code = 0
                return code
            code = await supervise(starting.result(), stop, stopped_by)
            return code
    except StartupError as error:
        log.critical("start-up failed", error=str(error))  # it stops the service
        code = 2
        return code
    finally:
        for sig in (*stopping_on, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
            if last and sig in stopping_on:
                signal.signal(sig, _exiting_with(code))
        if last:
            # Registered last, run first: the interpreter's end puts every signal with a
            # handler of Python's back to its default before it exits, and a SIGTERM in
            # those moments killed the process (143, 3 of 19 double stops) after its
            # last line had said 0. An ignored signal stays ignored; until then (threads
            # joined, which may hang) the handler above ends the process with its code.
            atexit.register(_ignore, stopping_on)


def _ignore(signals: Iterable[signal.Signals]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _exiting_with(code: int) -> Callable[[int, FrameType | None], None]:
    """A handler that ends the process at once with `code`: what is left to do once
    `serve` returned (the event loop's end, threads joined) may hang, and a signal still
    ends it, with the exit code said."""

    def exiting(signum: int, frame: FrameType | None) -> None:
        os._exit(code)

    return exiting


# Frames of each task's chain of awaits that SIGUSR1's line names, the innermost last.
TOLD_FRAMES = 12


def tell_tasks() -> None:
    """SIGUSR1: one line naming every task of the process and where each waits, the
    innermost await last; the process goes on (by default the signal killed it on the
    spot, as a log rotation's SIGUSR1 would)."""
    tasks = sorted(asyncio.all_tasks(), key=lambda task: task.get_name())
    log.info(
        "tasks, and where each waits",
        tasks=[{"task": task.get_name(), "waits": _awaits(task)} for task in tasks],
    )


def _awaits(task: asyncio.Task[object]) -> list[str]:
    """Where `task` is, as `file:line function`, through its chain of awaits."""
    places: list[str] = []
    awaited: object = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        frame = frame or getattr(awaited, "ag_frame", None)
        if frame is None:
            break
        code = frame.f_code
        places.append(f"{code.co_filename}:{frame.f_lineno} {code.co_name}")
        awaited = (
            getattr(awaited, "cr_await", None)
            or getattr(awaited, "gi_yieldfrom", None)
            or getattr(awaited, "ag_await", None)
        )
    return places[-TOLD_FRAMES:]


async def _started_unless_stopped(starting: asyncio.Task[Service], stop: asyncio.Event) -> bool:
    """Wait for start-up to end; a signal meanwhile cancels it (start-up may be waiting
    for a dependency for its whole budget). Whether it ended, successfully or not."""
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        starting.cancel()
        raise
    finally:
        stopping.cancel()
    if starting.done():
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError, StartupError):
        await starting
    return False
