"""`financing check`: verify the invariants from the event store, then the read models.

The read models are compared row by row, in order, with a fresh in-memory
projection of the same events: what the live projector built must be exactly
what a replay builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.application.invariants import Checker, Report
from financing.application.read_models import InMemoryReadModels, ReadModelStore
from financing.domain.events import DomainEvent


@dataclass
class CheckResult:
    invariants: Report
    read_model_differences: list[str] = field(default_factory=list)
    read_models_compared: bool = False

    @property
    def ok(self) -> bool:
        return self.invariants.ok and not self.read_model_differences

    def lines(self) -> list[str]:
        out = self.invariants.lines()
        if self.read_models_compared:
            out.append(f"read-model differences from a replay: {len(self.read_model_differences)}")
            out += [f"  DIFFERENT {line}" for line in self.read_model_differences]
        out.append("OK" if self.ok else "FAILED")
        return out


# Events checked and replayed together: the store is read in batches, never held whole.
BATCH = 1_000


async def run_check(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool | None = None
) -> CheckResult:
    store = PostgresEventStore(event_store_pool)
    checker = Checker()
    replay = InMemoryReadModels()
    batch: list[tuple[str, DomainEvent]] = []
    async for stored in store.read_all():
        checker.add(stored.event)
        batch.append((stored.message_id, stored.event))
        if len(batch) == BATCH:
            await replay.apply(batch)
            batch = []
    await replay.apply(batch)
    result = CheckResult(invariants=checker.report())
    if query_pool is not None:
        result.read_models_compared = True
        result.read_model_differences = await compare(PostgresReadModels(query_pool), replay)
    return result


async def compare(live: ReadModelStore, replay: ReadModelStore) -> list[str]:
    """Row-by-row differences between two read-model stores, in list order."""
    differences: list[str] = []
    for name, got, want in (
        ("investors", await live.investors(), await replay.investors()),
        ("invoices", await live.invoices(), await replay.invoices()),
        ("issuers", await live.issuers(), await replay.issuers()),
    ):
        if len(got) != len(want):
            differences.append(f"{name}: {len(got)} rows, a replay gives {len(want)}")
        for index, (row, expected) in enumerate(zip(got, want, strict=False)):
            if row != expected:
                differences.append(f"{name}[{index}]: {row} != replay {expected}")
    return differences
