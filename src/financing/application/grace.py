"""Letting a step that must not be cut in half finish when its worker is stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

SHUTDOWN_GRACE = 5.0


async def finish_on_cancel(step: Awaitable[None], grace: float = SHUTDOWN_GRACE) -> None:
    """Run `step`; if the caller is cancelled meanwhile, give the step up to `grace`
    seconds to finish before the cancellation goes on. A relayed batch is then marked
    relayed (not published again), a projected batch acked (not applied again)."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(grace):
                await task
        raise
