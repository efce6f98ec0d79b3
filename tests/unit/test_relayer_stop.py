"""The relayer as it stops: what it relayed is marked, and a failure to mark is said as
what it is (an outage, or a broken invariant, whole)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import uuid4

import pytest
from structlog.testing import capture_logs

from financing.application.errors import Unavailable
from financing.application.ports import Envelope, StoredEvent
from financing.application.retry import Outages
from financing.workers.relayer import Relayer
from tests.unit.test_relayer_wake_up import Bell, HeldLock

EVENT = StoredEvent(1, "Issuer", uuid4(), 1, "IssuerCreatedEvent", "{}")


class OneEvent:
    """An outbox holding one event, whose marking fails with `failure`."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        return [] if after is not None else [EVENT]

    async def lag(self) -> tuple[int, float]:
        return 0, 0.0

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        raise self.failure


class Confirming:
    def __init__(self) -> None:
        self.published = asyncio.Event()

    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        self.published.set()


async def _said_on_stop(failure: Exception) -> list[tuple[str, str, bool]]:
    """(level, event, with a traceback) of each line the relayer wrote as it stopped
    after relaying one event whose marking failed with `failure`."""
    publisher = Confirming()
    relaying = Relayer(OneEvent(failure), publisher, HeldLock(), Bell(), Outages())
    running = asyncio.create_task(relaying.run())
    await asyncio.wait_for(publisher.published.wait(), 5)
    with capture_logs() as logs:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    return [
        (line["log_level"], line["event"], "exc_info" in line)
        for line in logs
        if line["log_level"] in ("warning", "error")
    ]


async def test_marking_refused_by_an_outage_on_stop_is_a_warning() -> None:
    assert await _said_on_stop(Unavailable("PostgreSQL", "connection refused")) == [
        ("warning", "relayer could not mark what it relayed; it will be relayed again", False)
    ]


async def test_marking_refused_by_a_broken_invariant_on_stop_is_an_error_with_its_traceback() -> (
    None
):
    """Regression: the outbox refusing to skip an event, which stops the service while it
    relays, was one warning line without its traceback when the relayer stopped."""
    assert await _said_on_stop(ValueError("refusing to skip position 1")) == [
        ("error", "relayer could not mark what it relayed; it will be relayed again", True)
    ]
