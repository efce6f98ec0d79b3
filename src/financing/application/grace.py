"""Letting a step that must not be cut in half finish when its worker is stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from financing.application.errors import Unavailable, summary
from financing.logging import get_logger

log = get_logger(__name__)

SHUTDOWN_GRACE = 5.0


async def finish_on_cancel(
    step: Awaitable[None],
    grace: float = SHUTDOWN_GRACE,
    *,
    may_finish: Callable[[], bool] = lambda: True,
) -> None:
    """Run `step`; if the caller is cancelled meanwhile, give the step up to `grace`
    seconds to finish before the cancellation goes on. A relayed batch is then marked
    relayed (not published again), a projected batch acked (not applied again). A step
    that fails meanwhile, or is cut short, is said (a bug among such failures was silent,
    a bug with its traceback): what it left undone is done again after the stop, and
    deduplicated. A step that `may_finish` no longer allows when the cancellation comes
    (a relayer that lost its lock: another relays) is cancelled with its caller."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not may_finish():
            task.cancel()
        try:
            async with asyncio.timeout(grace):
                await task
        except TimeoutError:
            log.warning("a step being finished as its worker stopped was cut short", grace=grace)
        except asyncio.CancelledError:
            pass  # cancelled once more (the stop does not wait), or not to be finished
        except Unavailable as error:
            log.warning("a step being finished as its worker stopped failed", error=summary(error))
        except Exception as error:  # a bug: said whole
            log.error("a step being finished as its worker stopped failed", exc_info=error)
        raise


def stop_if_asked() -> None:
    """Raise CancelledError where the current task was asked to stop (cancelled) and goes
    on regardless: a loop over many items checks it before each. Python 3.11's
    `asyncio.wait_for` (the AMQP client's waits for a channel) returns its result, the
    cancellation lost, when the two come in the same turn of the loop: a stop signal to
    `financing dead-letters requeue` was lost so, and it requeued every letter there was
    rather than stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
