"""Text from the bus reaches SQL only as parameters.

Reference defect 9: its outbox built SQL by string concatenation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest

from financing.adapters.postgres.event_store import PostgresEventStore
from financing.application.errors import Unavailable
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


@pytest.mark.parametrize(
    ("lacking", "made_again"),
    [
        (
            "ALTER TABLE events DROP CONSTRAINT events_stream_version",
            "ALTER TABLE events ADD CONSTRAINT events_stream_version"
            " UNIQUE (aggregate_id, version)",
        ),
        (
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'processed_messages_pkey'::regclass",
            "UPDATE pg_index SET indisvalid = true"
            " WHERE indexrelid = 'processed_messages_pkey'::regclass",
        ),
    ],
    ids=["the stream's versions", "the records, left invalid"],
)
async def test_a_unit_of_work_fails_while_a_unique_key_its_writes_rely_on_is_lacking(
    pool: asyncpg.Pool, lacking: str, made_again: str
) -> None:
    """Regression (a DBA's probe): under load, the writes went on for 10 s after a unique key
    was dropped, until the database's inspection looked and held them: a stream forked
    (two events of one version) and copies of 24 messages were applied twice. The writing
    statement itself fails (an outage of the database) as soon as the key is lacking, its
    prepared plan made again."""
    store = PostgresEventStore(pool)

    async def created() -> None:
        issuer = uuid4()
        async with store.unit_of_work() as uow:
            aggregate = await uow.load(Issuer, issuer)
            aggregate.create()
            await uow.save(aggregate)
            await uow.record("create_issuer", str(issuer), Processed("CreateIssuer"))

    await created()  # the statement prepared on the pool's session
    await pool.execute(lacking)
    try:
        with pytest.raises(Unavailable, match="ON CONFLICT"):
            await created()
    finally:
        await pool.execute(made_again)
    await created()
    assert await pool.fetchval("SELECT count(*) FROM events") == 2
