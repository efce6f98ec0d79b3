"""Rebuilding the read models from a PostgreSQL event store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID, uuid4

import asyncpg
import pytest
from structlog.testing import capture_logs

from financing.adapters.postgres import rebuild as rebuild_module
from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_models import PostgresReadModels, create_tables
from financing.adapters.postgres.rebuild import RebuildReport, rebuild
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker, close_channel
from financing.adapters.rabbitmq.consumer import QueueConsumer
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application.errors import AwaitingOperator
from financing.application.pipeline import event_digest
from financing.application.ports import StoredEvent
from financing.application.read_models import InMemoryReadModels, IssuerRow, ReadModelStore
from financing.application.retry import DELIVERIES, Outages
from financing.domain.aggregates import Aggregate, Investor, Invoice, Issuer
from financing.domain.events import Bid, DomainEvent, InvestorFundsAddedEvent, IssuerCreatedEvent
from financing.entrypoints.cli.check import run_check
from financing.workers.projector import Projector
from tests.support import infra
from tests.support.rabbitmq import private_vhost

D = Decimal
A = TypeVar("A", bound=Aggregate)

Snapshot = tuple[list[object], list[object], list[object]]


async def change(
    store: PostgresEventStore, cls: type[A], aggregate_id: UUID, act: Callable[[A], object]
) -> None:
    async with store.unit_of_work() as uow:
        aggregate = await uow.load(cls, aggregate_id)
        act(aggregate)
        await uow.save(aggregate)


async def append_scenarios(store: PostgresEventStore) -> None:
    """Financed then approved, rejected, and financed then reversed, as the handlers would."""
    issuer, rich, poor = uuid4(), uuid4(), uuid4()
    approved, rejected, reversed_ = uuid4(), uuid4(), uuid4()
    await change(store, Issuer, issuer, lambda i: i.create())
    await change(store, Investor, rich, lambda i: i.create(D("100.10")))
    await change(store, Investor, poor, lambda i: i.create(D(5)))
    for invoice in (approved, rejected, reversed_):
        await change(store, Invoice, invoice, lambda i: i.create(issuer, D(10)))

    await change(store, Investor, rich, lambda i: i.place_bid(approved, D(20)))
    await change(store, Invoice, approved, lambda i: i.bid(Bid(rich, D(20))))
    await change(store, Investor, rich, lambda i: i.release_funds(D(10)))
    await change(store, Invoice, approved, lambda i: i.approve())
    await change(store, Investor, rich, lambda i: i.commit_funds(D(10)))

    await change(store, Investor, poor, lambda i: i.place_bid(rejected, D(5)))
    await change(store, Invoice, rejected, lambda i: i.bid(Bid(poor, D(5))))
    await change(store, Investor, poor, lambda i: i.release_funds(D(5)))

    await change(store, Investor, rich, lambda i: i.place_bid(reversed_, D("10.1")))
    await change(store, Invoice, reversed_, lambda i: i.bid(Bid(rich, D("10.1"))))
    await change(store, Investor, rich, lambda i: i.release_funds(D("0.1")))
    await change(store, Invoice, reversed_, lambda i: i.reverse())
    await change(store, Investor, rich, lambda i: i.release_funds(D(10)))


async def all_events(store: PostgresEventStore) -> list[StoredEvent]:
    return [stored async for stored in store.read_all()]


def relayed(events: list[StoredEvent]) -> list[tuple[str, DomainEvent]]:
    """The events as the projector receives them: under their relayed message ids."""
    return [(str(stored.message_id), stored.event) for stored in events]


async def snapshot(read_models: ReadModelStore) -> Snapshot:
    return (
        list(await read_models.investors()),
        list(await read_models.invoices()),
        list(await read_models.issuers()),
    )


async def expected(events: list[StoredEvent]) -> Snapshot:
    reference = InMemoryReadModels()
    await reference.apply(relayed(events))
    return await snapshot(reference)


async def read_model_schemas(pool: asyncpg.Pool) -> list[str]:
    """The schemas of read models in the query database: the live one, and any a rebuild
    left."""
    rows = await pool.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'read_models%' ORDER BY nspname"
    )
    return [row["nspname"] for row in rows]


@pytest.fixture(scope="module")
async def event_store_pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_rebuild_events", "commands") as pool:
        await append_scenarios(PostgresEventStore(pool))
        yield pool


@pytest.fixture
async def query_pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_rebuild_queries", "queries") as pool:
        yield pool


async def test_rebuild_yields_exactly_what_the_live_projector_built(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    events = await all_events(PostgresEventStore(event_store_pool))
    live = PostgresReadModels(query_pool)
    async with private_vhost("fin_rebuild") as vhost:
        outages = Outages()
        broker = Broker([vhost.url], outages)
        publisher = Publisher(broker)
        try:
            channel = await broker.channel()
            try:
                await topology.PROJECTOR.queue.declare(channel)
            finally:
                await close_channel(channel)
            await publisher.publish_events([stored.envelope() for stored in events])
            projector = Projector(live, outages)
            consumer = QueueConsumer(
                broker,
                topology.PROJECTOR.queue,
                DeadLetters(publisher, outages, DELIVERIES),
                outages,
                projector.receive,
                prefetch=projector.batch_size,
            )
            running = [asyncio.create_task(consumer.run()), asyncio.create_task(projector.run())]
            try:

                async def all_projected() -> bool:
                    count = await query_pool.fetchval(
                        "SELECT count(*) FROM read_models.processed_messages"
                    )
                    return bool(count == len(events))

                await infra.wait_until(all_projected, what="every event projected")
            finally:
                for task in running:
                    task.cancel()
                for task in running:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await consumer.close()
        finally:
            await publisher.close()
            await broker.close()
    built_live = await snapshot(live)
    assert built_live == await expected(events)

    report = await rebuild(event_store_pool, query_pool)

    assert await snapshot(live) == built_live
    assert report == RebuildReport(events=len(events), investors=2, invoices=3, issuers=1)


async def test_rebuild_repairs_read_models_that_diverged(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    events = await all_events(PostgresEventStore(event_store_pool))
    read_models = PostgresReadModels(query_pool)
    await read_models.apply(relayed(events))
    # What the reference's projector does: a redelivery under a new id counted twice.
    funds_added = next(s.event for s in events if s.name == "InvestorFundsAddedEvent")
    await read_models.apply([(str(uuid4()), funds_added)])
    assert await snapshot(read_models) != await expected(events)

    await rebuild(event_store_pool, query_pool)

    # The same object, whose connections cached statements on the replaced tables.
    assert await snapshot(read_models) == await expected(events)


async def test_relayed_events_seen_again_after_a_rebuild_change_nothing(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    events = await all_events(PostgresEventStore(event_store_pool))
    await rebuild(event_store_pool, query_pool)
    read_models = PostgresReadModels(query_pool)
    await read_models.apply(relayed(events))
    assert await snapshot(read_models) == await expected(events)
    # Each kept with when it was recorded, so that its copies are told as copies.
    recorded = await read_models.recorded_at([event.message_id for event in events])
    assert recorded == {event.message_id: event.recorded_at for event in events}


async def test_rebuild_leaves_only_the_live_schema_behind(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    await rebuild(event_store_pool, query_pool)
    await rebuild(event_store_pool, query_pool)
    assert await read_model_schemas(query_pool) == ["read_models"]


async def test_rebuild_drops_the_schema_a_killed_rebuild_left_not_one_being_built(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    """Regression: a rebuild killed (SIGKILL, out of memory) left its schema, a full copy
    of the read models, for good: nothing reported or removed it."""
    killed, building = "read_models_rebuild_00000000dead", "read_models_rebuild_0000000b0114"
    async with query_pool.acquire() as conn:
        await create_tables(conn, killed)
        await create_tables(conn, building)
    async with query_pool.acquire() as other:  # a rebuild under way holds its lock
        await other.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", building)
        try:
            await rebuild(event_store_pool, query_pool)
        finally:
            await other.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", building)
    assert await read_model_schemas(query_pool) == ["read_models", building]
    async with query_pool.acquire() as conn:
        await conn.execute(f'DROP SCHEMA "{building}" CASCADE')


async def test_rebuild_of_an_empty_event_store_empties_the_read_models(
    query_pool: asyncpg.Pool,
) -> None:
    async with infra.migrated_pool("fin_rebuild_empty", "commands") as empty:
        read_models = PostgresReadModels(query_pool)
        await read_models.apply([(str(uuid4()), IssuerCreatedEvent(uuid4()))])
        report = await rebuild(empty, query_pool)
    assert report == RebuildReport(events=0, investors=0, invoices=0, issuers=0)
    assert await snapshot(read_models) == ([], [], [])


async def test_events_projected_live_during_a_rebuild_are_kept(query_pool: asyncpg.Pool) -> None:
    async with infra.migrated_pool("fin_rebuild_busy", "commands") as pool:
        store = PostgresEventStore(pool)
        await append_scenarios(store)
        live = PostgresReadModels(query_pool)
        await live.apply(relayed(await all_events(store)))
        rebuilding = asyncio.create_task(rebuild(pool, query_pool, batch_size=5))
        # Meanwhile new investors are recorded and projected live, one by one.
        projected_after = 0
        while not rebuilding.done() or projected_after < 3:
            investor = uuid4()
            await change(store, Investor, investor, lambda i: i.create(D(1)))
            await live.apply(relayed(await store.stream(investor)))
            projected_after += rebuilding.done()
        await rebuilding
        assert await snapshot(live) == await expected(await all_events(store))


async def test_the_events_of_another_relayer_projected_live_survive_a_rebuild_and_check(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    """Regression: the projector projects a reference relayer's events (docs/contract.md),
    which are in no event store of this service: `check` then failed for good ("issuers:
    11 rows, a replay gives 9"), and a rebuild dropped their rows without a word. They are
    kept as projected and replayed after the store's; `check` compares the rows each kind
    of event made in its own order, as they came interleaved live."""
    events = await all_events(PostgresEventStore(event_store_pool))
    live = PostgresReadModels(query_pool)
    foreign = [(str(uuid4()), IssuerCreatedEvent(uuid4())) for _ in range(3)]
    digests = {message_id: f"digest-{message_id}" for message_id, _ in foreign}
    # Interleaved: one before the store's events, one among them, one after.
    middle = len(events) // 2
    await live.apply(foreign[:1], digests)
    await live.apply(relayed(events[:middle]))
    await live.apply(foreign[1:2], digests)
    await live.apply(relayed(events[middle:]))
    await live.apply(foreign[2:], digests)
    await live.apply(foreign[1:2], digests)  # a copy: kept once
    before = await snapshot(live)
    checked = await run_check(event_store_pool, query_pool)
    assert checked.read_model_differences == [] and checked.foreign_on_store == []

    report = await rebuild(event_store_pool, query_pool)

    assert report.foreign == 3
    after = await snapshot(live)
    assert [sorted(map(repr, rows)) for rows in after] == [
        sorted(map(repr, rows)) for rows in before
    ]
    # The store's rows in the store's order, then the others in the order projected.
    issuers = [event.issuer_id for _, event in foreign]
    assert after[2][-3:] == [IssuerRow(issuer) for issuer in issuers]
    assert [kept.message_id for kept in await live.foreign_events()] == [
        message_id for message_id, _ in foreign
    ]
    assert (await run_check(event_store_pool, query_pool)).read_model_differences == []


async def test_check_names_an_event_of_another_relayer_on_an_aggregate_of_this_store(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    """Regression (a probe): a copy of one of the store's events published again with
    watermill's three headers alone and a new message id (an investor's funds added)
    was projected as another relayer's event, the balance doubled, and `check` said OK:
    its replay applied the copy too."""
    events = await all_events(PostgresEventStore(event_store_pool))
    live = PostgresReadModels(query_pool)
    await live.apply(relayed(events))
    added = next(s.event for s in events if isinstance(s.event, InvestorFundsAddedEvent))
    copy = str(uuid4())
    await live.apply([(copy, added)], {copy: f"digest-{copy}"})

    checked = await run_check(event_store_pool, query_pool)

    assert not checked.ok
    [said] = checked.foreign_on_store
    assert said.startswith(f"InvestorFundsAddedEvent {copy} (kept at 1) is of aggregate"), said
    assert f"  FOREIGN {said}" in checked.lines()


async def test_check_names_another_relayers_event_kept_under_the_id_of_a_store_event(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    """Regression (a probe): an event published with watermill's three headers under the
    id the store derives for an investor's next version was projected; the store's event
    of that version, relayed after, was then dropped as its copy (reserved 0 where a
    replay gives 10), and `check` showed a difference without naming its cause."""
    events = await all_events(PostgresEventStore(event_store_pool))
    added = next(s for s in events if isinstance(s.event, InvestorFundsAddedEvent))
    forged = InvestorFundsAddedEvent(added.aggregate_id, D(1))
    live = PostgresReadModels(query_pool)
    await live.apply([(added.message_id, forged)], {added.message_id: event_digest(forged)})
    await live.apply(relayed(events))  # the store's, under the same id: taken for a copy

    checked = await run_check(event_store_pool, query_pool)

    assert not checked.ok
    [said] = checked.foreign_on_store
    assert said.startswith(
        f"InvestorFundsAddedEvent {added.message_id} (kept at 1) is under the message id of"
        f" this store's InvestorFundsAddedEvent at version {added.version} of aggregate"
    ), said
    assert "`financing projections rebuild` applies the store's" in said, said

    # The remedy it names: the store's event applied, the rows agree, nothing said.
    await rebuild(event_store_pool, query_pool)
    again = await run_check(event_store_pool, query_pool)
    assert again.ok, again.lines()


async def test_check_takes_a_copy_of_a_store_event_kept_under_its_id_for_the_same_event(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    """The same event under its own id, its relayer's headers stripped, is a copy: one
    event applied once, nothing to name."""
    events = await all_events(PostgresEventStore(event_store_pool))
    added = next(s for s in events if isinstance(s.event, InvestorFundsAddedEvent))
    live = PostgresReadModels(query_pool)
    await live.apply(
        [(added.message_id, added.event)], {added.message_id: event_digest(added.event)}
    )
    await live.apply(relayed(events))

    checked = await run_check(event_store_pool, query_pool)

    assert checked.ok, checked.lines()


async def test_a_session_reading_the_read_models_holds_neither_the_swap_nor_other_readers(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    """Regression: the swap's transaction dropped the replaced read models, which waited
    for a session reading them in a transaction (a report, a `pg_dump`), and every new
    statement on the read models queued behind the drop: the Queries API and the
    projector stood still until the reader ended."""
    async with query_pool.acquire() as reader:
        reading = reader.transaction()
        await reading.start()
        await reader.fetchval("SELECT count(*) FROM read_models.issuers")
        with capture_logs() as logs:
            async with asyncio.timeout(20):  # the reader stays for as long as the test wants
                await rebuild(event_store_pool, query_pool)
        async with asyncio.timeout(5):  # a new reader meanwhile reads the fresh read models
            assert await query_pool.fetchval("SELECT count(*) FROM read_models.issuers") > 0
        await reading.rollback()
    [left] = [line for line in logs if "still read by another session" in line["event"]]
    assert left["schema"].startswith("read_models_retired_")
    await rebuild(event_store_pool, query_pool)  # the next one drops them
    assert await read_model_schemas(query_pool) == ["read_models"]


@pytest.mark.parametrize("dropped", ["SCHEMA read_models", "TABLE read_models.investors"])
async def test_rebuild_builds_the_read_models_again_where_they_are_gone(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool, dropped: str
) -> None:
    """Regression: where the read models' schema or a table of it was dropped, the
    service's outage line said that a rebuild builds them again, and the rebuild failed
    (`schema "read_models" does not exist`, `relation ... does not exist`)."""
    events = await all_events(PostgresEventStore(event_store_pool))
    await query_pool.execute(f"DROP {dropped} CASCADE")

    report = await rebuild(event_store_pool, query_pool)

    assert report.events == len(events)
    assert await snapshot(PostgresReadModels(query_pool)) == await expected(events)
    assert await read_model_schemas(query_pool) == ["read_models"]


async def test_a_rebuild_into_a_database_made_again_empty_leaves_no_empty_read_models_meanwhile(
    event_store_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (a probe): a rebuild into a query database dropped and made again empty
    migrated it first, making empty read models, which the running service took for the
    read models back: it said the database recovered and its Queries answered empty lists
    for the whole replay (18 s for 150,000 events). Nothing of the live read models
    exists until the swap puts the rebuilt ones there."""
    events = await all_events(PostgresEventStore(event_store_pool))
    real_replay = rebuild_module.replay
    seen_live: list[bool] = []

    async with infra.fresh_database("fin_rebuild_empty") as db:
        pool = await create_pool(db)
        try:

            async def replay(*args: Any, **kwargs: Any) -> Any:
                seen_live.append(
                    await pool.fetchval("SELECT to_regclass('read_models.investors') IS NOT NULL")
                )
                return await real_replay(*args, **kwargs)

            monkeypatch.setattr(rebuild_module, "replay", replay)
            report = await rebuild(event_store_pool, pool)

            assert seen_live == [False]
            assert report.events == len(events)
            assert await snapshot(PostgresReadModels(pool)) == await expected(events)
            assert await read_model_schemas(pool) == ["read_models"]
        finally:
            await pool.close()


async def test_read_models_replaced_are_dropped_though_the_first_drop_meets_a_deadlock(
    query_pool: asyncpg.Pool,
) -> None:
    """Regression (a probe): 1 rebuild in 10 under load met a deadlock dropping the read
    models it replaced (a projector's write begun on them before the swap), and left
    them until the next rebuild."""
    retired = f"read_models_retired_{uuid4().hex[:12]}"
    met: list[str] = []

    class DeadlockedOnce:
        """A session whose first DROP SCHEMA is chosen as a deadlock's victim."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def transaction(self) -> Any:
            return self._conn.transaction()

        async def execute(self, statement: str, *args: Any) -> Any:
            if statement.startswith("DROP SCHEMA") and not met:
                met.append(statement)
                raise asyncpg.DeadlockDetectedError("deadlock detected")
            return await self._conn.execute(statement, *args)

    async with query_pool.acquire() as conn:
        await create_tables(conn, retired)
        with capture_logs() as logs:
            await rebuild_module._drop_retired(DeadlockedOnce(conn), retired)  # type: ignore[arg-type]
    assert met, "the first drop met no deadlock"
    assert retired not in await read_model_schemas(query_pool)
    assert not [line for line in logs if line["log_level"] == "warning"], logs


async def test_rebuild_where_a_table_outside_the_read_models_is_gone_says_what_brings_it_back(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool
) -> None:
    """A rebuild makes the read models' schema, not the query database's own tables
    (`foreign_events`, made by its migrations): it said the driver's `relation ... does
    not exist`, after the outage line had sent the operator to it."""
    read_models = PostgresReadModels(query_pool)
    await read_models.apply([(str(uuid4()), IssuerCreatedEvent(uuid4()))])
    before = await snapshot(read_models)
    await query_pool.execute("DROP TABLE foreign_events")

    with pytest.raises(AwaitingOperator) as gone:
        await rebuild(event_store_pool, query_pool)

    assert "its table(s) foreign_events do not exist" in str(gone.value)
    assert "drop it, create it again empty and run `financing projections rebuild`" in str(
        gone.value
    )
    assert await snapshot(read_models) == before  # nothing replaced
