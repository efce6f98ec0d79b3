"""An operator's command stopped by SIGTERM or SIGINT, as a terminal, systemd or Kubernetes
stops it: what it started is undone, and it says so in one line."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from financing.config import Database
from financing.entrypoints.cli.populate import BATCH
from tests.support import rabbitmq
from tests.support.infra import migrated_database, wait_until
from tests.support.service import financing_command, reap


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
    ("stop", "code"),
    # Regression (a review): a SIGHUP (a closed terminal) raised in whatever code ran.
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
    ids=["sigterm", "ctrl-c", "hang-up"],
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
                " AND application_name = 'financing projections rebuild'"
                " AND wait_event_type = 'Lock'",
                command_db.connect_kwargs["database"],
            )
            return bool(waiting) and bool(await rebuild_schemas(queries))

        await wait_until(waiting_on_the_lock, what="the rebuild waiting on the events table")
        rebuild.send_signal(stop)
        async with asyncio.timeout(15):
            _, stderr = await rebuild.communicate()

        assert rebuild.returncode == code, stderr.decode()[-2000:]
        said = [line for line in stderr.decode().splitlines() if "stopped by" in line]
        assert said == [f"financing projections rebuild: stopped by {stop.name}"], stderr.decode()
        assert await rebuild_schemas(queries) == []
    finally:
        if rebuild is not None:
            await reap(rebuild)
        await holder.close()
        await queries.close()


async def test_populate_stopped_by_a_signal_says_how_many_it_published() -> None:
    """Regression: stopped part way, it said only that it was stopped: the registrations
    of the batch being published when the signal came reached the broker, their ids
    printed nowhere (261 investors more than ids printed, each with its balance, in five
    runs)."""
    async with rabbitmq.private_vhost("fin_signal_populate") as vhost:
        populate = await asyncio.create_subprocess_exec(
            *financing_command(),
            "populate",
            "--issuers",
            "0",
            "--investors",
            "1000000",
            env={**os.environ, "AMQP_ADDRESS": vhost.url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert populate.stdout is not None
            async with asyncio.timeout(30):
                first = await populate.stdout.readline()  # a first batch confirmed
            assert first.startswith(b"investor"), first
            populate.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                rest, stderr = await populate.communicate()
        finally:
            await reap(populate)
    printed = len([first, *rest.splitlines()])
    said = stderr.decode().splitlines()
    assert populate.returncode == 143, said
    assert said == [
        f"financing populate: {printed} of 1000000 registration(s) confirmed (printed above),"
        f" then stopped; up to {BATCH} more, of the batch not confirmed, may have been"
        " published too",
        "financing populate: stopped by SIGTERM",
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_after_a_commands_work_is_done_changes_nothing(
    signum: signal.Signals,
) -> None:
    """Regression: a signal that came right after an operator's command had done its work
    and said so (a rebuild's line printed, its swap committed) ended the process by its
    default action, exit 143 or 130 without a word, which says the work was undone."""
    script = (
        "import asyncio, os, signal\n"
        "from financing.entrypoints.cli.console import cancelled_by_signals\n"
        "async def main() -> int:\n"
        "    async def work() -> int:\n"
        "        print('done', flush=True)\n"
        "        return 0\n"
        "    task = asyncio.create_task(work())\n"
        "    with cancelled_by_signals(task) as signalled:\n"
        "        code = await task\n"
        f"    os.kill(os.getpid(), {int(signum)})\n"
        "    print('signalled', signalled, flush=True)\n"
        "    return code\n"
        "raise SystemExit(asyncio.run(main()))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    assert process.returncode == 0
    assert out.decode().splitlines() == ["done", "signalled []"]
