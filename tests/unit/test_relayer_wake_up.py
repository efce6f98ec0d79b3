"""The relayer's pauses: a commit ends a pause the relayer takes after a wake-up that found
nothing relayable yet (the commit horizon held back), as it ends its wait for a poll."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from financing.application.ports import Envelope, StoredEvent
from financing.application.retry import Outages
from financing.workers import relayer as relayer_module
from financing.workers.relayer import Relayer

DEADLINE = 5.0


class NothingPending:
    """An outbox with nothing relayable, noting each look."""

    def __init__(self) -> None:
        self.looks = 0
        self.looked = asyncio.Event()

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        self.looks += 1
        self.looked.set()
        return []

    async def lag(self) -> tuple[int, float]:
        return 0, 0.0

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        raise AssertionError("nothing was relayed")


class Unused:
    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        raise AssertionError("nothing is pending")


class HeldLock:
    async def acquire(self, answered: Callable[[str], None] = lambda _: None) -> None:
        return None

    async def lost(self) -> None:
        await asyncio.Event().wait()

    async def release(self) -> None:
        return None


class Bell:
    """A wake-up rung by the test, as the commit listener is by a NOTIFY."""

    def __init__(self) -> None:
        self._rung = asyncio.Event()

    def ring(self) -> None:
        self._rung.set()

    def clear(self) -> None:
        self._rung.clear()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a poll interval
        try:
            async with asyncio.timeout(timeout):
                await self._rung.wait()
        except TimeoutError:
            return False
        return True


async def looked(outbox: NothingPending) -> None:
    outbox.looked.clear()
    async with asyncio.timeout(DEADLINE):
        await outbox.looked.wait()


async def test_a_commit_during_the_pause_after_an_empty_wake_up_is_looked_at_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A first pause far longer than the deadline: only the ring can end it in time.
    monkeypatch.setattr(relayer_module, "RECHECK_FIRST", 60.0)
    outbox, bell = NothingPending(), Bell()
    relaying = Relayer(outbox, Unused(), HeldLock(), bell, Outages(), poll_interval=600.0)
    running = asyncio.create_task(relaying.run())
    try:
        await looked(outbox)  # the first look: nothing; it waits for a ring or its poll
        bell.ring()
        await looked(outbox)  # woken: nothing relayable yet; it pauses for 60 s
        bell.ring()  # a commit during the pause
        await looked(outbox)
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert outbox.looks == 3
