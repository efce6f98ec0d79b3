"""The inspection of a database: what only an operator gives back (grants, tables, the
unique indexes the writes rely on), looked at in the pool's line as any statement, and
read by the database's check."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest

from financing.adapters.postgres.connection import (
    _CAPACITIES,
    COMMAND_DATABASE,
    acquired,
    create_pool,
)
from financing.adapters.postgres.inspection import Inspection
from financing.adapters.postgres.schema import migrate
from financing.application.errors import AwaitingOperator, Unavailable
from financing.config import Database
from financing.entrypoints import bootstrap
from tests.support import infra


@pytest.fixture
async def empty_database() -> AsyncIterator[Database]:
    name = infra.unique_name("fin_inspect")
    yield await infra.create_database(name)
    await infra.drop_database(name)


@contextlib.asynccontextmanager
async def role_of_its_own(
    owner: asyncpg.Pool, database: Database, schemas: tuple[str, ...]
) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A role given every privilege on the tables and sequences of `schemas` (USAGE on
    them too), and a pool of its sessions; dropped afterwards."""
    role = infra.unique_name("fin_inspect_role")
    await owner.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        for schema in schemas:
            await owner.execute(f'GRANT USAGE ON SCHEMA {schema} TO "{role}"')
            await owner.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO "{role}"')
            await owner.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO "{role}"')
        pool = await create_pool(Database({**database.connect_kwargs, "user": role}))
        try:
            yield role, pool
        finally:
            await pool.close()
    finally:
        await owner.execute(f'DROP OWNED BY "{role}"')
        await owner.execute(f'DROP ROLE "{role}"')


async def test_a_database_whose_every_session_serves_the_service_is_looked_at_all_the_same(
    empty_database: Database,
) -> None:
    """Regression: the check looked at grants, tables and indexes only when a session of
    the pool was free, and passed otherwise: a unique index dropped while the pool's every
    session served units of work went unseen for as long as the load lasted. The
    inspection's worker waits for a session in the line, and the check gives its verdict."""
    pool = await create_pool(dataclasses.replace(empty_database, pool_max_size=1))
    inspecting: asyncio.Task[None] | None = None
    try:
        await migrate(pool, "commands")
        inspection = Inspection(pool, "commands", writes=True)
        check = bootstrap._answering(pool, inspection)
        await check()
        async with acquired(pool, COMMAND_DATABASE) as serving:  # the pool's one session
            await serving.execute("ALTER TABLE events DROP CONSTRAINT events_stream_version")
            inspecting = asyncio.create_task(inspection.run())  # its look is due at once
            capacity = _CAPACITIES[pool]
            await infra.wait_until(
                lambda: infra.holds(capacity.queued), what="the look in the pool's line"
            )

        def found_lacking() -> bool:
            try:
                inspection.verdict()
            except AwaitingOperator:
                return True
            return False

        await infra.wait_until(
            lambda: infra.holds(found_lacking()), what="the index found lacking", timeout=10
        )
        with pytest.raises(AwaitingOperator, match="unique index events_stream_version"):
            inspection.verdict()  # what the check answers while the pool is busy

        await pool.execute(
            "ALTER TABLE events ADD CONSTRAINT events_stream_version UNIQUE (aggregate_id, version)"
        )
        await check()  # a session free: the check looks itself
        inspection.verdict()  # nothing lacking any more
    finally:
        if inspecting is not None:
            inspecting.cancel()
        await pool.close()


async def test_a_database_down_leaves_the_verdict_as_the_last_look_found_it(
    empty_database: Database,
) -> None:
    """A look that cannot ask (the database refuses sessions) neither ends nor begins
    what an operator must give back: the check says the database's outage itself."""
    pool = await create_pool(dataclasses.replace(empty_database, pool_max_size=1))
    try:
        await migrate(pool, "commands")
        inspection = Inspection(pool, "commands", writes=None)
        await pool.execute("DROP TABLE snapshots")
        with pytest.raises(AwaitingOperator, match="snapshots"):
            await inspection.look()
        async with infra.refusing_connections(empty_database):
            await pool.expire_connections()
            with pytest.raises(Unavailable) as down:
                await inspection.look()
            assert not isinstance(down.value, AwaitingOperator)
        with pytest.raises(AwaitingOperator, match="snapshots"):
            inspection.verdict()
    finally:
        await pool.close()


async def test_a_schema_the_role_may_not_use_is_named_not_its_tables_said_gone(
    empty_database: Database,
) -> None:
    """Regression (a probe): with `USAGE ON SCHEMA public` revoked, the search_path passed
    over the schema and the look said the tables gone, with the remedy for tables gone
    (restore a backup, where a restart would start an empty event store). A schema out of
    the search_path that holds a table of the same name is none of the service's."""
    owner = await create_pool(empty_database)
    try:
        await migrate(owner, "commands")
        async with role_of_its_own(owner, empty_database, ("public",)) as (role, pool):
            await owner.execute("CREATE SCHEMA elsewhere CREATE TABLE events (id int)")
            await owner.execute(f'REVOKE USAGE ON SCHEMA public FROM PUBLIC, "{role}"')
            inspection = Inspection(pool, "commands", writes=True)
            with pytest.raises(AwaitingOperator) as lacking:
                await inspection.look()
            assert lacking.value.detail == (
                "its role lacks privileges the service needs: schema public (USAGE); GRANT"
                " them, the service goes on by itself"
            )
            await owner.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
            await inspection.look()
    finally:
        await owner.close()


async def test_one_look_answers_the_writes_and_the_reads_of_a_database_with_one_list(
    empty_database: Database,
) -> None:
    """Regression (a probe): where the process both projects and serves queries, the query
    database was looked at twice a second, once for the projector's writes and once for
    the Queries API's reads, and a revoke was said twice, once with every privilege
    lacking and once with those of the reads alone, in either order: granting what the
    last line said left the database down. One look answers both; what the writes alone
    lack leaves the reads be."""
    owner = await create_pool(empty_database)
    try:
        await migrate(owner, "queries")
        schemas = ("public", "read_models")
        async with role_of_its_own(owner, empty_database, schemas) as (role, pool):
            inspection = Inspection(pool, "queries", writes=True)
            writes = bootstrap._answering(pool, inspection)  # the database's own check
            reads = bootstrap._reading(pool, inspection)  # the Queries API's
            await writes()
            await reads()

            await owner.execute(f'REVOKE INSERT ON read_models.issuers FROM "{role}"')
            with pytest.raises(AwaitingOperator, match=r"read_models.issuers \(INSERT\)"):
                await writes()
            await reads()  # the reads lack nothing

            await owner.execute(f'REVOKE SELECT ON read_models.investors FROM "{role}"')
            with pytest.raises(AwaitingOperator) as for_writes:
                await writes()
            with pytest.raises(AwaitingOperator) as for_reads:
                await reads()
            assert for_reads.value.detail == for_writes.value.detail
            assert "read_models.investors (SELECT)" in for_reads.value.detail
            assert "read_models.issuers (INSERT)" in for_reads.value.detail

            # Regression (a probe): what the projector alone reads (another relayer's
            # events, in `public`) lacking said the Queries API NOT_SERVING while every
            # list answered; so did `public` out of the role's reach.
            await owner.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA read_models TO "{role}"')
            for revoke in (
                f'REVOKE SELECT ON foreign_events FROM "{role}"',
                f'REVOKE USAGE ON SCHEMA public FROM PUBLIC, "{role}"',
            ):
                await owner.execute(revoke)
                with pytest.raises(AwaitingOperator):
                    await writes()
                await reads()
                await Inspection(pool, "queries", writes=False).look()  # a Queries-only process's
    finally:
        await owner.close()
