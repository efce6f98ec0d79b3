"""The bench's watch of the read model: every interval, and back to back once due."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import asyncpg

from scripts.bench_saga import ReadModelWatch
from tests.support import infra

INVOICE = "6f1c2d4e-0000-4000-8000-000000000001"


class _ReadModel:
    """Answers the watch's query with the invoice LISTED until `financed_from` polls."""

    def __init__(self, financed_from: int) -> None:
        self.polls = 0
        self.financed_from = financed_from

    async def fetch(self, _query: str, ids: list[str]) -> list[dict[str, str]]:
        self.polls += 1
        status = "FINANCED" if self.polls >= self.financed_from else "LISTED"
        return [{"id": i, "status": status} for i in ids if i == INVOICE]


@contextlib.asynccontextmanager
async def watching(read_model: _ReadModel, interval: float) -> Any:
    watch = ReadModelWatch(cast(asyncpg.Connection, read_model), interval)
    task = asyncio.get_running_loop().create_task(watch.run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_invoice_due_is_polled_back_to_back_until_seen_financed() -> None:
    read_model = _ReadModel(financed_from=5)
    async with watching(read_model, interval=3600) as watch:
        financed = watch.financed(INVOICE)
        await infra.wait_until(lambda: _now(read_model.polls == 1), what="the first poll")
        watch.due(INVOICE)  # with an interval of an hour, only polling back to back finds it
        await asyncio.wait_for(financed, timeout=5)
        assert read_model.polls == 5
        assert not watch.hurried  # and then it waits for the interval again


async def _now(value: bool) -> bool:
    return value
