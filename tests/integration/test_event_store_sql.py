"""Text from the bus reaches SQL only as parameters.

Reference defect 9: its outbox built SQL by string concatenation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest

from financing.adapters.postgres.event_store import PostgresEventStore
from financing.application.ports import Cause, Processed
from financing.domain.aggregates import Issuer
from tests.support import infra

HOSTILE = [
    "x'); DROP TABLE events; --",
    "'; UPDATE relay_checkpoints SET position = 1000000; --",
    "$1 $2 \\' \" ; -- /* */",
    "ünïcødé ☃ " + "'" * 50,
]


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_sql", "commands") as pool:
        yield pool


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_hostile_message_ids_consumer_names_and_correlation_ids_are_stored_verbatim(
    pool: asyncpg.Pool, hostile: str
) -> None:
    store = PostgresEventStore(pool)
    issuer_id = uuid4()
    async with store.unit_of_work(Cause(correlation_id=hostile, causation_id=hostile)) as uow:
        assert not await uow.recorded(hostile, hostile)
        issuer = await uow.load(Issuer, issuer_id)
        issuer.create()
        await uow.save(issuer)
        await uow.record(hostile, hostile, Processed(hostile, "unchanged", hostile))

    async with store.unit_of_work() as uow:
        assert await uow.recorded(hostile, hostile)
    stored = await store.stream(issuer_id)
    assert [(e.name, e.correlation_id, e.causation_id) for e in stored] == [
        ("IssuerCreatedEvent", hostile, hostile)
    ]
    record = await pool.fetchrow(
        "SELECT name, correlation_id, detail FROM processed_messages WHERE message_id = $1",
        hostile,
    )
    assert record is not None and tuple(record.values()) == (hostile, hostile, hostile)
    tables = {
        row["tablename"]
        for row in await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert {"events", "processed_messages", "relay_checkpoints"} <= tables
    assert await pool.fetchval("SELECT count(*) FROM relay_checkpoints") == 0
