"""Operator commands on databases no `financing serve` of this release has migrated."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from financing.adapters.postgres.schema import apply, migrate, require_current, sections
from financing.config import Database
from financing.entrypoints.cli import COMMAND_GROUPS
from tests.support import infra
from tests.support.service import CommandLine, run_cli

COMMANDS = [
    ("check",),
    ("check", "--skip-read-models"),
    ("projections", "rebuild"),
    ("trace", "some-correlation"),
    # The same id in every process that collects the tests (`make test` runs two).
    ("events", "22f7727e-340d-4d45-bdb6-cd86d8a4c7dc"),
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


MADE = {
    "commands": "restore it if it held events, or start `financing serve` of this release"
    " on it once to start an empty event store",
    "queries": "`financing projections rebuild` builds it from the event store;"
    " `financing serve` of this release creates it empty, which only a deployment without"
    " events yet wants",
}


def refusal(words: tuple[str, ...], database: str, schema: str) -> list[str]:
    """The line of `financing WORDS` refused for a database without its schema (the
    command named whole: its options and arguments left out)."""
    command = " ".join(words[: 2 if words[0] in COMMAND_GROUPS else 1])
    return [
        f"financing {command}: {database} refused the service: it has no {schema} schema"
        f" yet: {MADE[schema]}"
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
    assert run.stderr.splitlines() == refusal(words, "command database", "commands"), run.describe()
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
    assert run.stderr.splitlines() == refusal(("check",), "query database", "queries"), (
        run.describe()
    )


async def test_check_on_a_query_database_migrated_without_its_read_models_names_the_rebuild(
    empty_databases: tuple[Database, Database],
) -> None:
    """Regression (a probe): a rebuild refused (the store's transaction ids ahead of the
    server's) after migrating a query database made anew left it without read models;
    `check` then said an UndefinedTableError and blamed the search_path."""
    commands, queries = empty_databases
    for db, schema in ((commands, "commands"), (queries, "queries")):
        conn = await asyncpg.connect(**db.connect_kwargs)
        try:
            await migrate(conn, schema)
            if schema == "queries":
                await conn.execute("DROP SCHEMA read_models CASCADE")
        finally:
            await conn.close()
    run = await run_on(commands, queries, "check")
    assert run.exit_code == 1, run.describe()
    [line] = run.stderr.splitlines()
    assert line.startswith("financing check: query database unavailable: its table(s) "), line
    assert line.endswith(
        "where they are gone, `financing projections rebuild` builds them again from the"
        " event store, without a restart"
    ), line
    assert "UndefinedTableError" not in line


@pytest.mark.parametrize(
    "words",
    [("projections", "rebuild"), ("relay", "rewind", "--since", "1h")],
    ids=" ".join,
)
async def test_the_commands_of_a_restore_migrate_an_event_store_restored_from_an_older_release(
    empty_databases: tuple[Database, Database], words: tuple[str, ...]
) -> None:
    """Regression: restored from a backup an older release took, the event store was
    refused ("start `financing serve` of this release on it once"), where the restore's
    steps rewind and rebuild before any instance starts."""
    commands, queries = empty_databases
    conn = await asyncpg.connect(**commands.connect_kwargs)
    try:
        await apply(conn, "commands", sections("commands")[:-1])  # an older release's
    finally:
        await conn.close()
    run = await run_on(commands, queries, *words)
    assert run.exit_code == 0, run.describe()
    conn = await asyncpg.connect(**commands.connect_kwargs)
    try:
        await require_current(conn, "commands")
    finally:
        await conn.close()
