"""The relayer: publishes committed events from the event store to `events`.

In commit order, with publisher confirms, advancing its checkpoint only past
events the broker confirmed (never past an unpublished one). It wakes on the
NOTIFY sent at commit and polls as a fallback. Only the holder of the relayer
advisory lock relays, so one relayer runs per database however many
instances are started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import asyncpg

from financing.adapters.postgres.connection import INFRASTRUCTURE_ERRORS
from financing.adapters.postgres.outbox import Outbox, RelayerLock, listen
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application.ports import StoredEvent
from financing.config import Database
from financing.logging import get_logger

log = get_logger(__name__)

POLL_INTERVAL = 0.1
BATCH_SIZE = 256
MAX_BACKOFF = 5.0
SHUTDOWN_GRACE = 5.0


async def run_relayer(
    db: Database,
    pool: asyncpg.Pool,
    publisher: Publisher,
    *,
    batch_size: int = BATCH_SIZE,
    poll_interval: float = POLL_INTERVAL,
) -> None:
    """Relay until cancelled; re-elects itself when the lock connection is lost."""
    while True:
        lock = RelayerLock(db)
        try:
            await lock.acquire()
        except INFRASTRUCTURE_ERRORS as exc:
            log.warning("relayer cannot take its lock, retrying", error=repr(exc))
            await asyncio.sleep(1.0)
            continue
        log.info("relayer elected")
        relaying = asyncio.create_task(_relay(db, pool, publisher, batch_size, poll_interval))
        lost = asyncio.create_task(lock.lost())
        try:
            done, _ = await asyncio.wait({relaying, lost}, return_when=asyncio.FIRST_COMPLETED)
            if relaying in done:
                relaying.result()  # an unexpected crash propagates to the supervisor
            log.warning("relayer lost its lock, standing for election again")
        finally:
            for task in (relaying, lost):
                task.cancel()
            await asyncio.gather(relaying, lost, return_exceptions=True)
            with contextlib.suppress(*INFRASTRUCTURE_ERRORS):
                await lock.release()


async def _relay(
    db: Database,
    pool: asyncpg.Pool,
    publisher: Publisher,
    batch_size: int,
    poll_interval: float,
) -> None:
    outbox = Outbox(pool)
    wake = asyncio.Event()
    listener: asyncpg.Connection | None = None
    backoff = 0.05
    try:
        while True:
            if listener is None or listener.is_closed():
                listener = await _listen(db, wake)
            wake.clear()
            try:
                events = await outbox.pending(batch_size)
                if events:
                    await _finish_on_cancel(_relay_batch(outbox, publisher, events))
                    backoff = 0.05
                    continue
            except Exception as exc:
                # Broker or database trouble: nothing was marked, so nothing is skipped;
                # the same events are published again (same message ids) once it clears.
                log.warning("relaying failed, retrying", error=repr(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):
                    await wake.wait()
    finally:
        if listener is not None and not listener.is_closed():
            with contextlib.suppress(*INFRASTRUCTURE_ERRORS):
                await listener.close()


async def _relay_batch(outbox: Outbox, publisher: Publisher, events: list[StoredEvent]) -> None:
    await publisher.publish_events([event.envelope() for event in events])
    await outbox.mark_relayed(events)
    log.debug("relayed", count=len(events), last_position=events[-1].position)


async def _finish_on_cancel(step: Coroutine[Any, Any, None]) -> None:
    """Let a publish-and-mark step finish when the relayer is stopped mid-way, so
    a clean shutdown does not leave confirmed events to be published again."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(SHUTDOWN_GRACE):
                await task
        raise


async def _listen(db: Database, wake: asyncio.Event) -> asyncpg.Connection | None:
    try:
        return await listen(db, wake.set)
    except INFRASTRUCTURE_ERRORS as exc:
        # Polling still relays; LISTEN is only a latency optimisation.
        log.warning("relayer cannot LISTEN, polling only", error=repr(exc))
        return None
