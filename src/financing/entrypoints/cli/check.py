"""`financing check`: verify the invariants from the event store, then the read models.

The read models are compared row by row, in order, with a fresh in-memory
projection of the same events: what the live projector built must be exactly
what a replay builds. The events of another relayer (a reference relayer's),
which are in no event store of this service, are replayed after the store's, in
the order the projector kept them (`foreign_events`); the rows they made are
compared in their own order, as the live projector interleaved them with the
store's as they came.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.application.invariants import Checker, Report
from financing.application.read_models import (
    InMemoryReadModels,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    ReadModelStore,
    replay_foreign,
)
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
    # Every event once (the store's ids are unique, and so are the journal's): no record
    # of their ids, which took 165 MB a million events.
    replay = InMemoryReadModels(remember=False)
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
        live = PostgresReadModels(query_pool)
        stores = await _rows(replay)  # the rows the event store makes
        await replay_foreign(live, replay, BATCH)
        result.read_models_compared = True
        result.read_model_differences = await compare(live, replay, stores)
    return result


Row = InvestorRow | InvoiceRow | IssuerRow
Rows = tuple[Sequence[Row], Sequence[Row], Sequence[Row]]
TABLES = ("investors", "invoices", "issuers")


async def _rows(models: ReadModelStore) -> Rows:
    return await models.investors(), await models.invoices(), await models.issuers()


async def compare(live: ReadModelStore, replay: ReadModelStore, stores: Rows) -> list[str]:
    """Row-by-row differences between two read-model stores, in list order: the rows the
    event store's events make (`stores`) in their order, the others (another relayer's)
    in theirs."""
    differences: list[str] = []
    tables = zip(TABLES, await _rows(live), await _rows(replay), stores, strict=True)
    for name, got, want, own in tables:
        if len(got) != len(want):
            differences.append(f"{name}: {len(got)} rows, a replay gives {len(want)}")
        ids = {row.id for row in own}
        for part, of_store in ((name, True), (f"{name} of another relayer", False)):
            mine = [row for row in got if (row.id in ids) is of_store]
            wanted = [row for row in want if (row.id in ids) is of_store]
            for index, (row, expected) in enumerate(zip(mine, wanted, strict=False)):
                if row != expected:
                    differences.append(f"{part}[{index}]: {row} != replay {expected}")
    return differences
