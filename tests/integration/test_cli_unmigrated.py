"""Operator commands on databases no `financing serve` of this release has migrated."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest

from financing.adapters.postgres.schema import migrate
from financing.config import Database
from tests.support import infra
from tests.support.service import CommandLine, run_cli

COMMANDS = [
    ("check",),
    ("check", "--skip-read-models"),
    ("projections", "rebuild"),
    ("trace", "some-correlation"),
    ("events", str(uuid4())),
    ("relay", "rewind", "--since", "1h"),
]


@pytest.fixture
async def empty_databases() -> AsyncIterator[tuple[Database, Database]]:
    async with (
        infra.fresh_database("fin_cli_bare_cmd") as commands,
        infra.fresh_database("fin_cli_bare_qry") as queries,
    ):
        yield commands, queries


async def run_on(commands: Database, queries: Database, *words: str) -> CommandLine:
    env = {
        **os.environ,
        "COMMAND_DB_CONNECTION_STRING": commands.dsn(),
        "QUERY_DB_CONNECTION_STRING": queries.dsn(),
    }
    return await run_cli(env, *words)


def refusal(command: str, database: str, schema: str) -> list[str]:
    return [
        f"financing {command}: {database} refused the service: it has no {schema} schema"
        " yet: start `financing serve` of this release on it once, which creates or"
        " migrates it"
    ]


async def tables_of(db: Database) -> int:
    conn = await asyncpg.connect(**db.connect_kwargs)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        return count
    finally:
        await conn.close()


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
async def test_a_command_on_an_event_store_without_its_schema_says_so_in_one_line(
    empty_databases: tuple[Database, Database], words: tuple[str, ...]
) -> None:
    """Regression: each failed with a traceback (`relation "events" does not exist`), and
    `projections rebuild` created the read models' schema first."""
    commands, queries = empty_databases
    run = await run_on(commands, queries, *words)
    assert run.exit_code == 1, run.describe()
    assert run.stderr.splitlines() == refusal(words[0], "command database", "commands"), (
        run.describe()
    )
    assert await tables_of(commands) == 0
    assert await tables_of(queries) == 0


async def test_check_on_read_models_without_their_schema_says_so_in_one_line(
    empty_databases: tuple[Database, Database],
) -> None:
    commands, queries = empty_databases
    conn = await asyncpg.connect(**commands.connect_kwargs)
    try:
        await migrate(conn, "commands")
    finally:
        await conn.close()
    run = await run_on(commands, queries, "check")
    assert run.exit_code == 1, run.describe()
    assert run.stderr.splitlines() == refusal("check", "query database", "queries"), run.describe()
