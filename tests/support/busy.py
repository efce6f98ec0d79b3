"""An event loop kept busy, as a storm of calls keeps the service's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def busy(turn: float) -> AsyncIterator[None]:
    """The event loop kept busy by the work of other calls: every turn takes `turn` of
    the CPU, until the block ends."""

    loop = asyncio.get_running_loop()

    def work() -> None:  # a callback of each turn, scheduled again for the next
        nonlocal handle
        end = time.monotonic() + turn
        while time.monotonic() < end:
            pass
        handle = loop.call_soon(work)

    handle = loop.call_soon(work)
    try:
        yield
    finally:
        handle.cancel()
