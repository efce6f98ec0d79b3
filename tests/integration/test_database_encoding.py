"""A database whose encoding cannot hold every character (LATIN1): text it cannot hold,
which the service receives from others (message ids, correlation ids, foreign events'
bodies), makes what carries it poison, not a bug retried with tracebacks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from financing.adapters.postgres.connection import COMMAND_DATABASE, acquired, create_pool
from financing.adapters.postgres.correlation import correlated
from financing.adapters.postgres.schema import migrate
from financing.application.errors import Fault, PoisonMessage, classify
from tests.support import infra


@pytest.fixture
async def latin1() -> AsyncIterator[asyncpg.Pool]:
    name = infra.unique_name("fin_latin1")
    admin = await asyncpg.connect(
        host=infra.PG_HOST, port=infra.PG_PORT, user=infra.PG_USER, database="postgres"
    )
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
            " TEMPLATE template0"
        )
    finally:
        await admin.close()
    pool = await create_pool(infra.database(name), COMMAND_DATABASE)
    try:
        await migrate(pool, "commands")
        yield pool
    finally:
        await pool.close()
        await infra.drop_database(name)


async def test_text_the_encoding_cannot_hold_is_poison(latin1: asyncpg.Pool) -> None:
    """Regression: a command whose message id held a `€`, and a foreign event whose body
    did, were retried 3 times with a traceback each, then dead-lettered as a bug."""
    with pytest.raises(PoisonMessage, match="cannot hold a character") as raised:
        async with acquired(latin1, COMMAND_DATABASE) as conn:
            await conn.fetchval("SELECT $1::text", "cmd-€-😀")
    assert classify(raised.value) is Fault.PERMANENT
    async with acquired(latin1, COMMAND_DATABASE) as conn:  # Latin-1 itself is held
        assert await conn.fetchval("SELECT $1::text", "Zürich") == "Zürich"


async def test_a_correlation_the_encoding_cannot_hold_is_carried_by_nothing_stored(
    latin1: asyncpg.Pool,
) -> None:
    """Regression: `financing trace` on such a correlation id (one a dead letter shows)
    crashed with an uncaught UntranslatableCharacterError."""
    assert await correlated(latin1, "korr-€😀") == ([], [])
