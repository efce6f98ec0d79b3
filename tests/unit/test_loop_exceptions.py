"""The service's event loop writes a transport library's own task, failed as its connection
closed and never awaited by the library, at DEBUG, as the library's other records."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Coroutine
from typing import Any

import pytest
from aiormq.tools import Countdown

from financing.entrypoints.event_loop import new_event_loop


def never_retrieved(failing: Coroutine[Any, Any, object]) -> list[logging.LogRecord]:
    """What the loop says of a task of `failing` whose failure no one retrieved."""
    loop = new_event_loop()
    said: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record)

    keep = Keep(logging.DEBUG)
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.addHandler(keep)
    asyncio_log.setLevel(logging.DEBUG)
    try:
        task = loop.create_task(failing)
        loop.run_until_complete(asyncio.wait([task]))
        del task
        gc.collect()  # the task's finalizer tells the loop of its failure
    finally:
        asyncio_log.removeHandler(keep)
        asyncio_log.setLevel(level)
        loop.close()
    return [record for record in said if "never retrieved" in record.getMessage()]


def test_a_transport_librarys_task_failing_as_its_connection_closes_is_said_at_debug() -> None:
    """Regression (a probe): aiormq's channel reader, closing a channel on a connection
    gone after a SIGSTOP, timed out, and asyncio logged "Task exception was never
    retrieved" at ERROR with three tracebacks."""
    # aiormq's own code, timing out a wait that never ends.
    [said] = never_retrieved(Countdown(0.01)(asyncio.Event().wait()))
    assert said.levelno == logging.DEBUG
    assert isinstance(said.exc_info and said.exc_info[1], TimeoutError)


async def own_failure(error: BaseException) -> None:
    raise error


@pytest.mark.parametrize(
    "failing",
    [
        lambda: own_failure(TimeoutError()),  # the service's own task: a bug of its own
        lambda: Countdown(0.01)(own_failure(ValueError("broken"))),  # not a closing
    ],
)
def test_any_other_task_failure_never_retrieved_is_an_error(failing: Any) -> None:
    [said] = never_retrieved(failing())
    assert said.levelno == logging.ERROR
