"""A query database holds the read models of one event store: recorded by the first
process that opens both, by every rebuild, refused to another, told by `check`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import asyncpg
import pytest

from financing.adapters.postgres import projected_store as projected_store_module
from financing.adapters.postgres.projected_store import (
    HoldsAnotherStore,
    ProjectsAnotherStore,
    RecordedStore,
    Unnamed,
    claim,
    projected,
    store_of,
)
from financing.adapters.postgres.rebuild import rebuild
from financing.adapters.postgres.schema import apply, migrate, sections
from financing.application.errors import AwaitingOperator
from financing.entrypoints.cli.check import run_check
from tests.support import infra


@pytest.fixture
async def stores() -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool]]:
    """Two event stores, each of a deployment of its own."""
    async with (
        infra.migrated_pool("fin_store_a", "commands") as first,
        infra.migrated_pool("fin_store_b", "commands") as second,
    ):
        yield first, second


@pytest.fixture
async def query_pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_store_queries", "queries") as pool:
        yield pool


async def projected_store(query_pool: asyncpg.Pool) -> object:
    async with query_pool.acquire() as conn:
        found = await projected(conn)
    return None if found is None else found.store


async def test_the_first_store_to_claim_a_query_database_keeps_it_and_another_is_refused(
    stores: tuple[asyncpg.Pool, asyncpg.Pool], query_pool: asyncpg.Pool
) -> None:
    first, second = [await store_of(pool) for pool in stores]
    assert first != second
    assert await projected_store(query_pool) is None
    await claim(query_pool, first)
    await claim(query_pool, first)  # its own again: nothing to say
    with pytest.raises(ProjectsAnotherStore) as refused:
        await claim(query_pool, second)
    assert f"read models of event store {first}" in str(refused.value)
    assert f"this deployment's event store {second}" in str(refused.value)
    assert await projected_store(query_pool) == first


async def test_a_rebuild_adopts_read_models_of_another_store_only_when_told_and_check_tells(
    stores: tuple[asyncpg.Pool, asyncpg.Pool], query_pool: asyncpg.Pool
) -> None:
    first, second = stores
    await claim(query_pool, await store_of(first))
    told = await run_check(second, query_pool)
    assert not told.ok
    assert any(line.startswith("read models of another event store:") for line in told.lines())

    with pytest.raises(ProjectsAnotherStore, match="--adopt"):
        await rebuild(second, query_pool)  # another deployment's, by mistake
    assert await projected_store(query_pool) == await store_of(first)

    await rebuild(second, query_pool, adopt=True)

    assert await projected_store(query_pool) == await store_of(second)
    assert (await run_check(second, query_pool)).ok
    await claim(query_pool, await store_of(second))


async def test_a_store_with_events_is_named_after_its_first_so_a_dump_migrated_later_matches() -> (
    None
):
    """A dump taken before the store had a name, restored and migrated, is the same
    store: named as the live one, migrated from the same events, was."""
    issuer = uuid4()
    named = []
    for _ in range(2):
        async with infra.fresh_database("fin_store_named") as db:
            conn = await asyncpg.connect(**db.connect_kwargs)
            try:
                await apply(conn, "commands", [s for s in sections("commands") if s[0] < 5])
                await conn.execute(
                    "INSERT INTO events (aggregate_type, aggregate_id, version, name, body)"
                    " VALUES ('Issuer', $1, 1, 'IssuerCreatedEvent', $2)",
                    issuer,
                    f'{{"IssuerID": "{issuer}"}}',
                )
                await migrate(conn, "commands")
                named.append(await conn.fetchval("SELECT id FROM event_store_identity"))
            finally:
                await conn.close()
    assert named[0] == named[1]


async def test_an_event_store_without_its_name_is_refused_in_one_line_not_a_traceback(
    stores: tuple[asyncpg.Pool, asyncpg.Pool], query_pool: asyncpg.Pool
) -> None:
    """Regression: an emptied `event_store_identity` (restored without its row) crashed
    start-up and `projections rebuild` with a NotNullViolationError, and `check` said
    "event store None"."""
    first, _ = stores
    await first.execute("DELETE FROM event_store_identity")
    with pytest.raises(Unnamed, match="event_store_identity is empty"):
        await store_of(first)
    with pytest.raises(Unnamed):
        await run_check(first, query_pool)
    with pytest.raises(Unnamed):
        await rebuild(first, query_pool)
    assert await projected_store(query_pool) is None


async def test_an_event_store_has_one_name() -> None:
    async with infra.migrated_pool("fin_store_one", "commands") as pool:
        with pytest.raises(asyncpg.UniqueViolationError):
            await pool.execute("INSERT INTO event_store_identity (id) VALUES (gen_random_uuid())")


async def test_a_projector_records_the_store_of_the_events_it_projects_and_waits_on_another(
    stores: tuple[asyncpg.Pool, asyncpg.Pool], query_pool: asyncpg.Pool
) -> None:
    """A split deployment, none of whose processes opens both databases, records its
    store as its projector meets its events; another store's events wait (an outage)."""
    first, second = [str(await store_of(pool)) for pool in stores]
    recorded = RecordedStore(query_pool)
    await recorded.require(first)  # none recorded yet: this one is
    assert str(await projected_store(query_pool)) == first
    await recorded.require(first)
    await recorded.require("not a name")  # not one this service's relayer writes
    with pytest.raises(HoldsAnotherStore, match="wait in their queue") as waiting:
        await RecordedStore(query_pool).require(second)
    assert isinstance(waiting.value, AwaitingOperator)
    with pytest.raises(ProjectsAnotherStore):  # a full process of the other is refused
        await claim(query_pool, UUID(second))


async def test_a_projector_stops_within_its_recheck_once_a_rebuild_adopted_its_read_models(
    stores: tuple[asyncpg.Pool, asyncpg.Pool],
    query_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = stores
    recorded = RecordedStore(query_pool)
    await recorded.require(str(await store_of(first)))
    await rebuild(second, query_pool, adopt=True)  # the read models are the second's now
    monkeypatch.setattr(projected_store_module, "RECHECK", 0.0)
    with pytest.raises(HoldsAnotherStore):
        await recorded.require(str(await store_of(first)))
