"""What the relayer says while a transaction holds relaying back, and once it no longer
does: a prepared transaction is named as one, and the end is a warning too."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from structlog.testing import capture_logs

from financing.application.ports import Holder, PreparedTransaction, StoredEvent
from financing.application.retry import Outages
from financing.workers.relayer import Relayer
from tests.support.infra import holds, wait_until
from tests.unit.test_relayer_wake_up import Bell, HeldLock


class Outbox:
    """No event to relay, one that has waited 20 s, and what holds it back (`holder`)."""

    def __init__(self, holder: Holder | None) -> None:
        self.holder = holder

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        return []

    async def lag(self) -> tuple[int, float]:
        return 1, 20.0

    async def held_back_by(self, waited: float) -> Holder | None:
        return self.holder

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        return None


class Broker:
    async def publish_events(self, envelopes: Sequence[object]) -> None:
        return None


async def test_a_prepared_transaction_holding_relaying_back_is_named_and_its_end_said() -> None:
    prepared = PreparedTransaction("payments-42", "billing", 20.4)
    outbox = Outbox(prepared)
    relaying = Relayer(outbox, Broker(), HeldLock(), Bell(), Outages())
    tasks = [asyncio.create_task(relaying.run()), asyncio.create_task(relaying.report_lag(0.01))]
    try:
        with capture_logs() as logs:

            def said(start: str) -> list[dict[str, object]]:
                return [line for line in logs if str(line["event"]).startswith(start)]

            await wait_until(lambda: holds(bool(said("relaying waits"))), what="the wait said")
            outbox.holder = None
            await wait_until(lambda: holds(bool(said("relaying no longer"))), what="its end")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    [waits] = said("relaying waits")
    assert str(waits["event"]).startswith("relaying waits for a prepared transaction")
    assert waits["holder"] == (
        "prepared transaction 'payments-42' (owner 'billing', prepared 20 s ago:"
        " COMMIT PREPARED or ROLLBACK PREPARED 'payments-42' ends it)"
    )
    [over] = said("relaying no longer waits")
    assert over["log_level"] == "warning"
    assert over["holder"] == "prepared transaction 'payments-42'"
    assert isinstance(over["waited_seconds"], float) and over["waited_seconds"] >= 20.0
