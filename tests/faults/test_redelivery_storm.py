"""A redelivery storm changes nothing: every message processed 2 or 3 times gives one effect.

The service runs under `tests.support.storm`, which makes every consumer
(command handlers, saga policies, integration handlers, the projector)
process each message N times, concurrently, as a broker redelivering under
failures would. The same seeded workload runs against a normal deployment and
against storms; the events stored, the read models and the checker's verdict
must be the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID, uuid4

import asyncpg
import pytest

from financing.adapters.postgres.event_store import PostgresEventStore
from financing.application import policies
from financing.application.pipeline import OutcomeKind, exactly_once
from financing.application.ports import (
    PROCESSED,
    A,
    B,
    Cause,
    Processed,
    RelayedEvent,
    UnitOfWork,
)
from financing.domain.aggregates import Aggregate, Investor, Invoice
from financing.domain.events import Bid
from tests.faults.conftest import Deploy, add_figure
from tests.faults.workload import (
    Deployment,
    Outcome,
    Workload,
    deployment,
    differences,
    events_by_name,
    messages_processed,
    settle,
    suite_seed,
    verify_effects,
)
from tests.support import infra
from tests.support.deliveries import decoded

SAGAS = 30


@dataclass(frozen=True)
class Run:
    outcome: Outcome
    events: Counter[str]
    processed: int  # messages whose effect was recorded: commands, saga steps, projections
    integration_events: int  # processed too, by handlers that record nothing


async def run_workload(target: Deployment) -> Run:
    workload = Workload(target, seed=suite_seed(), concurrency=SAGAS)
    await workload.run(sagas=SAGAS)
    await settle(target)
    outcome = await verify_effects(target, workload)
    assert not outcome.unknown_invoices, "no call failed, yet unknown invoices exist"
    return Run(
        outcome,
        await events_by_name(target),
        await messages_processed(target),
        workload.stats.integration_events,
    )


@pytest.fixture(scope="module")
async def normal_run() -> Run:
    async with deployment("normal") as target:
        return await run_workload(target)


@pytest.mark.parametrize("times", [2, 3])
async def test_redelivery_storm_ends_in_the_same_state_as_a_normal_run(
    times: int, normal_run: Run, deploy: Deploy
) -> None:
    target = await deploy(f"storm{times}", redeliveries=times)
    storm = await run_workload(target)

    assert differences(storm.outcome, normal_run.outcome) == []
    assert storm.events == normal_run.events, "the storm stored other events"
    assert storm.processed == normal_run.processed
    # Every message was processed `times` times: all but one are redeliveries.
    add_figure(
        "messages redelivered (storms)", (storm.processed + storm.integration_events) * (times - 1)
    )


# -- the race behind a storm's spurious dead letters ------------------------------------------


class _PausedBeforeLoad:
    """A unit of work that, before its first load, says so (`started`) and waits for `resume`."""

    def __init__(self, uow: UnitOfWork, started: asyncio.Event, resume: asyncio.Event) -> None:
        self._uow, self._started, self._resume = uow, started, resume

    async def recorded(self, consumer: str, message_id: str) -> Processed | None:
        return await self._uow.recorded(consumer, message_id)

    async def _first_load(self) -> None:
        if not self._started.is_set():
            self._started.set()
            await self._resume.wait()

    async def load(self, cls: type[A], aggregate_id: UUID) -> A:
        await self._first_load()
        return await self._uow.load(cls, aggregate_id)

    async def load_both(
        self, first: type[A], first_id: UUID, second: type[B], second_id: UUID
    ) -> tuple[A, B]:
        await self._first_load()
        return await self._uow.load_both(first, first_id, second, second_id)

    async def save(self, aggregate: Aggregate) -> None:
        await self._uow.save(aggregate)

    async def record(self, consumer: str, message_id: str, what: Processed = PROCESSED) -> None:
        await self._uow.record(consumer, message_id, what)

    async def acting_on(self, event: RelayedEvent) -> None:
        await self._uow.acting_on(event)


class _PausingStore(PostgresEventStore):
    def __init__(self, pool: asyncpg.Pool, started: asyncio.Event, resume: asyncio.Event) -> None:
        super().__init__(pool)
        self._started, self._resume = started, resume

    @contextlib.asynccontextmanager
    async def unit_of_work(  # type: ignore[override]
        self, cause: Cause | None = None
    ) -> AsyncIterator[_PausedBeforeLoad]:
        async with super().unit_of_work(cause) as uow:
            yield _PausedBeforeLoad(uow, self._started, self._resume)


@pytest.fixture
async def event_store_pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_fault_race", "commands") as pool:
        yield pool


async def test_a_copy_processed_while_another_copy_commits_is_absorbed_not_dead_lettered(
    event_store_pool: asyncpg.Pool,
) -> None:
    """Regression: a copy that started before the other copy committed, then read the
    aggregate after it, broke a domain rule (releasing funds already released) and was
    dead-lettered. A broker redelivering a message whose first delivery is still being
    processed (after a connection cut) does this; so did every redelivery storm."""
    store = PostgresEventStore(event_store_pool)
    investor, invoice = Investor(uuid4()), Invoice(uuid4())
    investor.create(Decimal(100))
    investor.place_bid(invoice.id, Decimal(40))
    invoice.create(uuid4(), Decimal(40))
    invoice.bid(Bid(investor.id, Decimal(40)))
    invoice.reverse()  # its third event, which the policy releases the funds for
    async with store.unit_of_work() as uow:
        await uow.save(investor)
        await uow.save(invoice)
    [reversal] = (await store.stream(invoice.id))[2:]
    message = decoded(reversal.event, version=3)  # as the relayer publishes it
    consumer = "reversal_releases_funds"

    started, resume = asyncio.Event(), asyncio.Event()
    late_copy = exactly_once(
        _PausingStore(event_store_pool, started, resume),
        consumer,
        policies.reversal_releases_funds,
    )

    late = asyncio.create_task(late_copy(message))
    await asyncio.wait_for(started.wait(), 10)
    # Meanwhile another copy of the same message is processed and committed.
    first = await exactly_once(store, consumer, policies.reversal_releases_funds)(message)
    resume.set()
    assert first.kind is OutcomeKind.PROCESSED
    assert (await asyncio.wait_for(late, 10)).kind is OutcomeKind.DUPLICATE
    again = await exactly_once(store, consumer, policies.reversal_releases_funds)(message)
    assert again.kind is OutcomeKind.DUPLICATE

    names = [stored.name for stored in await store.stream(investor.id)]
    assert names.count("InvestorFundsReleasedEvent") == 1, names
