"""`financing serve`: wire the selected components (bootstrap) and run them (supervisor).

Exit codes: 0 after SIGINT/SIGTERM, 1 when a component crashed, 2 when
start-up failed (a dependency refused the service or stayed unreachable for
`FINANCING_STARTUP_TIMEOUT` seconds, or a port could not be listened on).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from contextlib import AsyncExitStack

from financing.config import Settings
from financing.entrypoints.bootstrap import (
    COMPONENTS,
    NO_OVERRIDES,
    Overrides,
    StartupError,
    bootstrap,
)
from financing.entrypoints.supervisor import supervise
from financing.logging import get_logger

log = get_logger(__name__)


async def serve(
    settings: Settings,
    components: Iterable[str] = COMPONENTS,
    *,
    startup_timeout: float | None = None,
    overrides: Overrides = NO_OVERRIDES,
) -> int:
    """Run the selected components until a signal (exit 0) or a crash (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    budget = settings.startup_timeout if startup_timeout is None else startup_timeout
    try:
        async with AsyncExitStack() as stack:
            service = await bootstrap(
                settings,
                components,
                stack,
                deadline=time.monotonic() + budget,
                overrides=overrides,
            )
            return await supervise(service, stop)
    except StartupError as error:
        log.error("start-up failed", error=str(error))
        return 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
