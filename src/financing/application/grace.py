"""Letting a step that must not be cut in half finish when its worker is stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from financing.application.errors import summary
from financing.logging import get_logger

log = get_logger(__name__)

SHUTDOWN_GRACE = 5.0


async def finish_on_cancel(step: Awaitable[None], grace: float = SHUTDOWN_GRACE) -> None:
    """Run `step`; if the caller is cancelled meanwhile, give the step up to `grace`
    seconds to finish before the cancellation goes on. A relayed batch is then marked
    relayed (not published again), a projected batch acked (not applied again). A step
    that fails meanwhile is said (a bug among such failures was silent): what it left
    undone is done again after the stop, and deduplicated."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            async with asyncio.timeout(grace):
                await task
        except (TimeoutError, asyncio.CancelledError):
            pass  # cut short: done again after the stop
        except Exception as error:
            log.warning("a step being finished as its worker stopped failed", error=summary(error))
        raise
