"""An operator's command stopped by SIGTERM or SIGINT, as a terminal, systemd or Kubernetes
stops it: what it started is undone, and it says so in one line."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import asyncpg
import pytest

from financing.config import Database
from tests.support.infra import migrated_database, wait_until
from tests.support.service import financing_command


@pytest.fixture
async def databases() -> AsyncIterator[tuple[Database, Database]]:
    async with (
        migrated_database("fin_signal_cmd", "commands") as commands,
        migrated_database("fin_signal_q", "queries") as queries,
    ):
        yield commands, queries


async def rebuild_schemas(queries: asyncpg.Connection) -> list[str]:
    rows = await queries.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE '%\\_rebuild\\_%'"
    )
    return [row["nspname"] for row in rows]


@pytest.mark.parametrize(
    ("stop", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"]
)
async def test_a_rebuild_stopped_by_a_signal_drops_its_schema_and_says_so(
    databases: tuple[Database, Database], stop: signal.Signals, code: int
) -> None:
    """Regression: a SIGTERM killed `financing projections rebuild` without a word (exit
    -15) and left its unfinished schema in the query database; only Ctrl-C cleaned up."""
    command_db, query_db = databases
    holder = await asyncpg.connect(**command_db.connect_kwargs)
    queries = await asyncpg.connect(**query_db.connect_kwargs)
    rebuild = None
    try:
        # The rebuild waits on the event store's table, its fresh schema made.
        await holder.execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        rebuild = await asyncio.create_subprocess_exec(
            *financing_command(),
            "projections",
            "rebuild",
            env={
                **os.environ,
                "COMMAND_DB_CONNECTION_STRING": command_db.dsn(),
                "QUERY_DB_CONNECTION_STRING": query_db.dsn(),
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

        async def waiting_on_the_lock() -> bool:
            # Asked outside the lock's transaction, which sees one snapshot of the activity.
            waiting = await queries.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND application_name = 'financing projections' AND wait_event_type = 'Lock'",
                command_db.connect_kwargs["database"],
            )
            return bool(waiting) and bool(await rebuild_schemas(queries))

        await wait_until(waiting_on_the_lock, what="the rebuild waiting on the events table")
        rebuild.send_signal(stop)
        async with asyncio.timeout(15):
            _, stderr = await rebuild.communicate()

        assert rebuild.returncode == code, stderr.decode()[-2000:]
        said = [line for line in stderr.decode().splitlines() if "stopped by" in line]
        assert said == [f"financing projections: stopped by {stop.name}"], stderr.decode()
        assert await rebuild_schemas(queries) == []
    finally:
        if rebuild is not None and rebuild.returncode is None:
            rebuild.kill()
            await rebuild.wait()
        await holder.close()
        await queries.close()
