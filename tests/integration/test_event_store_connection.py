"""Losing the database shows as an infrastructure error (retried), and the store recovers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from decimal import Decimal
from uuid import uuid4

import pytest

from financing.adapters.postgres.connection import INFRASTRUCTURE_ERRORS, connect, create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.schema import migrate
from financing.config import Database
from financing.domain.aggregates import Investor
from tests.support import infra


@pytest.fixture(scope="module")
async def database() -> AsyncIterator[Database]:
    name = infra.unique_name("fin_conn")
    db = await infra.create_database(name)
    conn = await connect(db)
    try:
        await migrate(conn, "commands")
    finally:
        await conn.close()
    yield db
    await infra.drop_database(name)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_database_is_an_infrastructure_error() -> None:
    nowhere = Database({**infra.database("postgres").connect_kwargs, "port": unused_port()})

    with pytest.raises(INFRASTRUCTURE_ERRORS):
        await connect(nowhere)


async def test_a_killed_connection_fails_as_infrastructure_and_the_store_recovers(
    database: Database,
) -> None:
    pool = await create_pool(Database(database.connect_kwargs, pool_max_size=1))
    admin = await connect(database)
    try:
        store = PostgresEventStore(pool)
        investor_id = uuid4()

        with pytest.raises(INFRASTRUCTURE_ERRORS):
            async with store.unit_of_work() as uow:
                investor = await uow.load(Investor, investor_id)
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                investor.create(Decimal("10"))
                await uow.save(investor)

        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, investor_id)
            assert not investor.exists  # nothing of the failed unit of work was committed
            investor.create(Decimal("10"))
            await uow.save(investor)
        assert [e.version for e in await store.stream(investor_id)] == [1, 2]
    finally:
        await admin.close()
        await pool.close()
