"""The service: one process, all components; a crash stops it, secrets never reach the logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from structlog.testing import capture_logs

from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.adapters.postgres.schema import migrate, sections
from financing.adapters.rabbitmq.connection import CONNECT_TIMEOUT
from financing.application.read_models import InvestorRow
from financing.config import Database, Settings, parse_database
from financing.domain.aggregates import Investor
from financing.entrypoints import bootstrap as bootstrap_module
from financing.entrypoints import service
from financing.entrypoints.bootstrap import COMPONENTS, StartupError, bootstrap
from financing.entrypoints.stopping import STOP_SIGNALS
from financing.entrypoints.supervisor import supervise
from financing.generated import QueriesStub
from tests.support import infra
from tests.support.deployment import service_env
from tests.support.infra import wait_until
from tests.support.metrics import health_code, scrape, value
from tests.support.raw_h2 import EMPTY_MESSAGE, RawConnection
from tests.support.service import ServiceProcess, financing_command, free_port, reap, run_cli


@pytest.fixture
async def databases() -> AsyncIterator[tuple[Database, Database]]:
    name = infra.unique_name("fin_service")
    commands = await infra.create_database(f"{name}_c")
    queries = await infra.create_database(f"{name}_q")
    yield commands, queries
    await infra.drop_database(f"{name}_c")
    await infra.drop_database(f"{name}_q")


def _settings(databases: tuple[Database, Database], amqp_url: str) -> Settings:
    return Settings(
        command_address=("127.0.0.1", free_port()),
        query_address=("127.0.0.1", free_port()),
        command_db=databases[0],
        query_db=databases[1],
        amqp_url=amqp_url,
    )


Worker = Callable[[], Coroutine[Any, Any, None]]


async def test_a_crashed_component_stops_the_whole_service_with_a_failure_code(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    stopped: set[str] = set()

    def watched(name: str, run: Worker) -> Worker:
        async def running() -> None:
            try:
                await run()
            finally:
                stopped.add(name)

        return running

    async with AsyncExitStack() as stack:
        wired = await bootstrap(
            _settings(databases, amqp_url), COMPONENTS, stack, deadline=time.monotonic() + 30
        )
        others = set(wired.workers) - {"relayer"}
        wired.workers = {name: watched(name, run) for name, run in wired.workers.items()}

        async def crashing_relayer() -> None:
            # Once the whole service is up, so that every other component has work to stop.
            await asyncio.gather(*(consuming.wait() for consuming in wired.consuming.values()))
            raise RuntimeError("relayer bug")

        wired.workers["relayer"] = crashing_relayer
        async with asyncio.timeout(30):
            code = await supervise(wired, asyncio.Event())

    assert code == 1
    assert stopped == others


async def test_an_unreachable_broker_fails_start_up_within_its_budget(
    databases: tuple[Database, Database],
) -> None:
    settings = _settings(databases, f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    async with asyncio.timeout(15):
        code = await service.serve(settings, startup_timeout=1.0)
    assert code == 2


async def test_a_broker_that_never_answers_fails_start_up_within_its_budget(
    databases: tuple[Database, Database],
) -> None:
    """Regression: an attempt to connect was bounded by its own 10 s, not by what was left
    of the start-up budget: a budget of 1 s ran for 10."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the connection, never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = _settings(databases, f"amqp://guest:guest@127.0.0.1:{port}/")
        # The connection attempt alone would take 10 s (CONNECT_TIMEOUT).
        async with asyncio.timeout(CONNECT_TIMEOUT / 2):
            code = await service.serve(settings, startup_timeout=1.0)
    finally:
        server.close()
    assert code == 2


async def _signalled_waiting_for_the_broker(
    databases: tuple[Database, Database],
    tmp_path: Path,
    sig: signal.Signals,
    *,
    startup_timeout: int,
    ignoring_hang_ups: bool = False,
) -> tuple[int, str]:
    """Start `financing serve` with no broker to reach, send `sig` once start-up waits for
    it: the exit code, and the log."""
    env = {
        **service_env(
            *databases,
            f"amqp://guest:guest@127.0.0.1:{free_port()}/",  # nothing listens there
            command_address=("127.0.0.1", free_port()),
            query_address=("127.0.0.1", free_port()),
            metrics_address=("127.0.0.1", free_port()),
        ),
        "FINANCING_STARTUP_TIMEOUT": str(startup_timeout),
    }
    log_path = tmp_path / "service.log"
    with log_path.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "financing",
            "serve",
            env=env,
            stderr=log_file,
            # As nohup does.
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
            if ignoring_hang_ups
            else None,
        )
    try:

        async def waiting_for_the_broker() -> bool:
            return "broker unavailable" in log_path.read_text()

        await infra.wait_until(waiting_for_the_broker, what="start-up waiting for the broker")
        process.send_signal(sig)
        async with asyncio.timeout(10):
            code = await process.wait()
    finally:
        await reap(process)
    return code, log_path.read_text()


@pytest.mark.parametrize(
    "stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["sigterm", "ctrl-c", "hang-up"]
)
async def test_a_signal_while_start_up_waits_for_a_dependency_stops_the_service_at_once(
    databases: tuple[Database, Database], tmp_path: Path, stop: signal.Signals
) -> None:
    """Regression: start-up did not look at the signals, so SIGTERM while it waited for
    a broker was ignored until its budget ran out (then exit 2, or a full start). A
    hang-up (the terminal or session it was started from closed) killed it on the spot;
    it stops it as SIGTERM does."""
    code, log = await _signalled_waiting_for_the_broker(
        databases, tmp_path, stop, startup_timeout=120
    )
    assert code == 0, log[-2000:]
    lines = [json.loads(line) for line in log.splitlines()]
    said = [line for line in lines if line["event"] == "stopped while starting"]
    assert [line.get("signal") for line in said] == [stop.name], log[-2000:]


async def test_a_service_started_to_ignore_hang_ups_keeps_ignoring_them(
    databases: tuple[Database, Database], tmp_path: Path
) -> None:
    """Started under `nohup` (SIGHUP ignored), the service outlives the session it was
    started from, as it did before a hang-up stopped it."""
    # Ignoring the hang-up, it waits for the broker until its budget is spent (exit 2);
    # stopped by it, it would exit 0 at once.
    code, log = await _signalled_waiting_for_the_broker(
        databases, tmp_path, signal.SIGHUP, startup_timeout=3, ignoring_hang_ups=True
    )
    assert code == 2, log[-2000:]
    assert "stopped while starting" not in log


async def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "financing", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _rabbitmqctl(*args: str) -> None:
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60
    )


async def test_passwords_never_appear_in_the_logs(
    databases: tuple[Database, Database], tmp_path: Path
) -> None:
    vhost = infra.unique_name("fin_secret")
    amqp_secret = f"amqp-{uuid.uuid4().hex}"
    pg_secret = f"pg-{uuid.uuid4().hex}"
    user = infra.unique_name("fin_user")
    await asyncio.to_thread(infra.create_vhost, vhost)
    await _rabbitmqctl("add_user", user, amqp_secret)
    await _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    commands, queries = databases
    # Trust authentication ignores the password, so the service starts with it set.
    env = {
        "PATH": "/usr/bin:/bin",
        "COMMAND_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
        "QUERY_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
        "COMMAND_DB_CONNECTION_STRING": (
            f"user=postgres password='{pg_secret}' host={infra.PG_HOST} port={infra.PG_PORT} "
            f"dbname={commands.connect_kwargs['database']} pool_max_conns=4"
        ),
        "QUERY_DB_CONNECTION_STRING": (
            f"postgresql://postgres:{pg_secret}@{infra.PG_HOST}:{infra.PG_PORT}/"
            f"{queries.connect_kwargs['database']}"
        ),
        "AMQP_ADDRESS": f"amqp://{user}:{amqp_secret}@{infra.AMQP_HOST}:{infra.AMQP_PORT}/{vhost}",
        "LOGGER_LEVEL": "DEBUG",
    }
    try:
        running = ServiceProcess(env, tmp_path / "service.log")
        await running.start()
        assert await running.stop() == 0
        # A wrong broker password must not be echoed by the start-up failure either.
        refused = await _run_cli(
            {
                **env,
                "AMQP_ADDRESS": env["AMQP_ADDRESS"].replace(amqp_secret, amqp_secret + "x"),
                "FINANCING_STARTUP_TIMEOUT": "1",
            },
            "serve",
        )
    finally:
        await _rabbitmqctl("delete_user", user)
        await asyncio.to_thread(infra.delete_vhost, vhost)
    logs = running.log_tail(0, max_lines=100_000) + refused.stdout + refused.stderr
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "start-up failed" in refused.stderr
    assert amqp_secret not in logs
    assert pg_secret not in logs


async def test_the_log_says_what_start_up_migrated_and_which_signal_stopped_the_service(
    databases: tuple[Database, Database], tmp_path: Path
) -> None:
    """Regression (a probe): fresh databases were created and migrated without a word (an
    operator upgrading could not tell whether, or how far), and `shutting down` did not
    say what stopped the service."""
    vhost = infra.unique_name("fin_lifecycle")
    url = await asyncio.to_thread(infra.create_vhost, vhost)
    addresses = [("127.0.0.1", free_port()) for _ in range(3)]
    running = ServiceProcess(service_env(*databases, url, *addresses), tmp_path / "service.log")
    try:
        await running.start()
        assert await running.stop() == 0
    finally:
        await running.kill()
        await asyncio.to_thread(infra.delete_vhost, vhost)
    lines = running.log_lines()
    migrated = [
        (line["schema"], line["from_version"], line["to_version"])
        for line in lines
        if line["event"] == "schema migrated"
    ]
    newest = {name: sections(name)[-1][0] for name in ("commands", "queries")}
    assert sorted(migrated) == [(name, 0, version) for name, version in sorted(newest.items())]
    stopping = [line for line in lines if line["event"] == "shutting down"]
    assert [(line["signal"], line["exit_code"]) for line in stopping] == [("SIGTERM", 0)]


async def test_a_missing_database_fails_start_up_at_once(amqp_url: str) -> None:
    missing = infra.database(infra.unique_name("fin_missing"))
    settings = _settings((missing, missing), amqp_url)
    async with asyncio.timeout(10):
        # Far below the 30 s budget: waiting cannot create a database.
        code = await service.serve(settings, startup_timeout=30.0)
    assert code == 2


async def test_at_logger_level_fatal_a_failed_start_up_still_says_why(amqp_url: str) -> None:
    """Regression: with LOGGER_LEVEL=FATAL (the reference's level of what stops it), a
    start-up that failed exited 2 without a word: its line was an error's."""
    missing = infra.database(infra.unique_name("fin_missing")).dsn()
    env = {
        **os.environ,
        "LOGGER_LEVEL": "FATAL",
        "COMMAND_DB_CONNECTION_STRING": missing,
        "QUERY_DB_CONNECTION_STRING": missing,
        "AMQP_ADDRESS": amqp_url,
        "COMMAND_SERVER_ADDRESS": "127.0.0.1:0",
        "QUERY_SERVER_ADDRESS": "127.0.0.1:0",
        "METRICS_ADDRESS": "",
    }
    run = await run_cli(env, "serve")
    assert run.exit_code == 2, run.describe()
    [line] = [json.loads(line) for line in run.stderr.splitlines()]
    assert (line["event"], line["level"]) == ("start-up failed", "critical"), line
    assert "does not exist" in line["error"]


async def test_a_connection_option_the_driver_refuses_fails_start_up_at_once(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    """Regression: `sslmode=bogus` was taken for an outage and retried for the whole
    start-up budget, then reported as an unreachable database. (The connection string's
    parsing refuses that value now; an option only the driver refuses is passed here.)"""
    commands, queries = databases
    bogus = replace(commands, connect_kwargs={**commands.connect_kwargs, "ssl": "bogus"})
    settings = _settings((bogus, queries), amqp_url)
    async with asyncio.timeout(10):
        code = await service.serve(settings, startup_timeout=30.0)
    assert code == 2


@pytest.mark.parametrize("setting", ["nosuch=1", "statement_timeout=abc"])
async def test_a_setting_of_options_the_server_refuses_fails_start_up_at_once(
    databases: tuple[Database, Database], amqp_url: str, setting: str
) -> None:
    """Regression: a setting the server does not have, or whose value it refuses, given by
    the connection string's `options`, was taken for an outage and retried for the whole
    start-up budget: waiting cannot cure it."""
    commands, queries = databases
    refused = parse_database(f"{commands.dsn()}?options=-c{setting}")
    settings = _settings((refused, queries), amqp_url)
    with capture_logs() as logs:
        async with asyncio.timeout(10):
            code = await service.serve(settings, startup_timeout=30.0)
    assert code == 2
    [failed] = [line for line in logs if line["event"] == "start-up failed"]
    assert "refused the service" in failed["error"], failed


async def test_a_database_a_newer_release_migrated_fails_start_up_at_once(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    commands, _ = databases
    conn = await asyncpg.connect(**commands.connect_kwargs)
    try:
        await migrate(conn, "commands")
        await conn.execute(
            "INSERT INTO schema_migrations (name, version) VALUES ('commands', $1)",
            sections("commands")[-1][0] + 1,
        )
    finally:
        await conn.close()
    async with asyncio.timeout(10):
        code = await service.serve(_settings(databases, amqp_url), startup_timeout=30.0)
    assert code == 2


async def test_a_query_database_of_another_deployment_fails_start_up_at_once_naming_it(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    """Regression: two deployments given one query database mixed their read models
    silently, and a rebuild by one dropped the other's rows."""
    _, queries = databases
    other = await infra.create_database(infra.unique_name("fin_service_other"))
    try:
        async with AsyncExitStack() as stack:  # the first deployment records its store
            await bootstrap(
                _settings(databases, amqp_url),
                ("relayer", "projector"),
                stack,
                deadline=time.monotonic() + 10,
            )
        with capture_logs() as logs:
            async with asyncio.timeout(10):
                code = await service.serve(
                    _settings((other, queries), amqp_url), startup_timeout=30.0
                )
    finally:
        await infra.drop_database(other.connect_kwargs["database"])
    assert code == 2
    [said] = [line for line in logs if line["event"] == "start-up failed"]
    assert "holds the read models of event store" in said["error"]
    assert "give each deployment a query database of its own" in said["error"]


async def test_a_rebuild_on_read_models_a_newer_release_migrated_is_refused_in_one_line(
    databases: tuple[Database, Database],
) -> None:
    commands, queries = databases
    for database, name in ((commands, "commands"), (queries, "queries")):
        conn = await asyncpg.connect(**database.connect_kwargs)
        try:
            await migrate(conn, name)
        finally:
            await conn.close()
    conn = await asyncpg.connect(**queries.connect_kwargs)
    try:
        newer = sections("queries")[-1][0] + 1
        await conn.execute(
            "INSERT INTO schema_migrations (name, version) VALUES ('queries', $1)", newer
        )
    finally:
        await conn.close()
    env = {
        **os.environ,
        "COMMAND_DB_CONNECTION_STRING": commands.dsn(),
        "QUERY_DB_CONNECTION_STRING": queries.dsn(),
    }

    run = await run_cli(env, "projections", "rebuild")

    assert run.exit_code == 1, run.describe()
    said = [line for line in run.stderr.splitlines() if line.startswith("financing ")]
    assert said == [
        "financing projections rebuild: query database refused the service: its queries schema"
        f" is at version {newer}, newer than this release knows ({newer - 1}): a newer release"
        " migrated it; run that release, or a newer one"
    ], run.describe()


@pytest.mark.parametrize(
    ("components", "prunes"),
    [
        (COMPONENTS, True),
        (("commands",), True),
        (("policies",), True),
        (("projector",), True),
        (("queries-api",), False),  # it writes nothing
        (("relayer",), False),  # it records no processed message
        (("commands-api",), False),  # it has no database
    ],
)
async def test_only_a_process_that_records_processed_messages_prunes_them(
    databases: tuple[Database, Database], amqp_url: str, components: tuple[str, ...], prunes: bool
) -> None:
    async with AsyncExitStack() as stack:
        wired = await bootstrap(
            _settings(databases, amqp_url), components, stack, deadline=time.monotonic() + 30
        )
    assert ("retention" in wired.workers) is prunes


@asynccontextmanager
async def _as_limited_role(
    databases: tuple[Database, Database], role_limit: int, queries_limit: int | None = None
) -> AsyncIterator[tuple[str, tuple[Database, Database]]]:
    """A role of the service allowed `role_limit` sessions (and the query database
    `queries_limit`), and the databases as it connects to them; the databases and the
    role dropped after."""
    role = infra.unique_name("fin_limited")
    await infra.create_role(role)
    try:
        for database, schema in zip(databases, ("commands", "queries"), strict=True):
            await infra.grant_service_role(database, schema, role)
        admin = await asyncpg.connect(**databases[0].connect_kwargs)
        try:
            await admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT {role_limit}')
            if queries_limit is not None:
                queries = databases[1].connect_kwargs["database"]
                await admin.execute(f'ALTER DATABASE "{queries}" CONNECTION LIMIT {queries_limit}')
        finally:
            await admin.close()
        commands, queries_db = (
            replace(db, connect_kwargs={**db.connect_kwargs, "user": role}) for db in databases
        )
        yield role, (commands, queries_db)
    finally:
        for database in databases:  # its grants go with the databases, then the role
            await infra.drop_database(database.connect_kwargs["database"])
        await infra.drop_role(role)


async def test_a_role_allowed_fewer_sessions_than_the_process_opens_is_said_as_it_starts(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    """Regression (a probe): with the service's role limited to fewer sessions than both
    pools need (`CONNECTION LIMIT`), the command database's outage began and ended
    about every second as its pool tried to grow, and the query database was left with
    no session at all; nothing said why."""
    async with _as_limited_role(databases, 6, queries_limit=4) as (role, as_role):
        with capture_logs() as logs:
            async with AsyncExitStack() as stack:
                await bootstrap(
                    _settings(as_role, amqp_url),
                    ("relayer", "projector"),
                    stack,
                    deadline=time.monotonic() + 30,
                )
    said = [
        line["why"]
        for line in logs
        if line["event"] == "fewer database sessions allowed than the process opens"
    ]
    queries = databases[1].connect_kwargs["database"]
    assert said == [
        f"the role {role} may open 6 session(s) on the server, and this process alone"
        f" opens up to 22 as {role} (each pool's pool_max_conns, and a relayer's 2):"
        f" ALTER ROLE {role} CONNECTION LIMIT higher, or lower pool_max_conns",
        f"the database {queries} takes 4 session(s), and this process alone opens up to 10"
        f" there: ALTER DATABASE {queries} CONNECTION LIMIT higher, or lower pool_max_conns",
    ], said
    # The pools share what the relayer's two sessions leave of the role's six.
    held = [
        (line["dependency"], line["sessions"], line["pool_max_conns"])
        for line in logs
        if line["event"] == "database pool held to the sessions the limits leave it"
    ]
    assert held == [("command database", 2, 10), ("query database", 2, 10)], held


@pytest.mark.parametrize(
    ("role_limit", "queries_limit", "refused"),
    [
        # Said as the command database's pool opens, with what the whole process needs
        # (regression, a probe: it said 3, the command database's alone, then 4 once the
        # limit was raised to 3): a session each pool, and a relayer's two.
        (
            2,
            None,
            "command database: too few sessions allowed: the role {role} may open 2"
            " session(s) on the server, and this process needs at least 4",
        ),
        # So with 3: found as the command database's pool opens, not the query one's.
        (
            3,
            None,
            "command database: too few sessions allowed: the role {role} may open 3"
            " session(s) on the server, and this process needs at least 4",
        ),
        # The query database's own limit: its pool's session, and the two that check it.
        (
            100,
            2,
            "query database: too few sessions allowed: the database {queries} takes 2"
            " session(s), and this process needs at least 3 there",
        ),
    ],
)
async def test_a_role_allowed_fewer_sessions_than_the_process_needs_at_all_stops_start_up_at_once(
    databases: tuple[Database, Database],
    amqp_url: str,
    role_limit: int,
    queries_limit: int | None,
    refused: str,
) -> None:
    """Regression (a probe): a role allowed fewer than 4 sessions had start-up retry for
    its whole budget, then end on "too many connections for role", the limit unnamed."""
    async with _as_limited_role(databases, role_limit, queries_limit) as (role, as_role):
        with pytest.raises(StartupError) as refusal:
            async with AsyncExitStack() as stack:
                await bootstrap(
                    _settings(as_role, amqp_url),
                    ("relayer", "projector", "queries-api"),
                    stack,
                    deadline=time.monotonic() + 10,
                )
    queries = databases[1].connect_kwargs["database"]
    said = str(refusal.value)
    assert said.startswith(refused.format(role=role, queries=queries)), said
    assert "CONNECTION LIMIT higher" in said, said


@pytest.mark.parametrize(("limit", "held"), [(5, 2), (4, 1)])
async def test_sessions_held_elsewhere_as_the_role_are_said_and_start_up_waits_for_them(
    databases: tuple[Database, Database], amqp_url: str, limit: int, held: int
) -> None:
    """Regression (a probe): with the role's limit high enough but part of it held by
    other sessions, start-up ended its budget on "too many connections for role", how
    many were held unsaid. It says it once as the role's first pool opens (it was said
    again for the query database's, where that one opened), and starts once they end."""
    async with _as_limited_role(databases, limit) as (role, as_role):
        elsewhere = [await asyncpg.connect(**as_role[0].connect_kwargs) for _ in range(held)]
        try:
            with capture_logs() as logs:
                async with AsyncExitStack() as stack:
                    starting = asyncio.ensure_future(
                        bootstrap(
                            _settings(as_role, amqp_url),
                            ("relayer", "projector"),
                            stack,
                            deadline=time.monotonic() + 30,
                        )
                    )

                    async def said() -> list[dict[str, Any]]:
                        return [
                            line
                            for line in logs
                            if line["event"]
                            == "sessions held elsewhere as the role leave the process too few"
                        ]

                    warned = await infra.wait_until(said, what="the sessions held said")
                    # Where it waits for them: the query database's pool opened too.
                    await infra.wait_until(
                        lambda: infra.holds(
                            any(line.get("dependency") == "query database" for line in logs)
                            or held == 2
                        ),
                        what="the query database's pool reached",
                    )
                    assert not starting.done()
                    for session in elsewhere:
                        await session.close()
                    await asyncio.wait_for(starting, 30)
        finally:
            for session in elsewhere:
                await session.close()
    warned = [
        line
        for line in logs
        if line["event"] == "sessions held elsewhere as the role leave the process too few"
    ]
    assert [(line["role"], line["role_limit"], line["held_elsewhere"]) for line in warned] == [
        (role, limit, held)
    ], warned
    assert warned[0]["needs_at_least"] == 4, warned


async def test_a_queries_api_starts_on_a_read_only_copy_of_a_migrated_query_database(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    _, queries = databases
    pool = await create_pool(queries)
    try:
        await migrate(pool, "queries")  # on the primary, by its projector
    finally:
        await pool.close()
    await infra.set_read_only(queries.connect_kwargs["database"], True)
    try:
        settings = _settings(databases, amqp_url)
        async with AsyncExitStack() as stack:
            wired = await bootstrap(
                settings, ("queries-api",), stack, deadline=time.monotonic() + 10
            )
            [listener] = [each for each in wired.listeners if each.name == "queries-api"]
            await listener.server.start(*listener.address)
            channel = Channel(*listener.address)
            try:
                answer = await QueriesStub(channel).all_investors(Empty(), timeout=5)
            finally:
                channel.close()
                listener.server.close()
                await listener.server.wait_closed()
    finally:
        await infra.set_read_only(queries.connect_kwargs["database"], False)
    assert answer.investors == []


async def test_a_query_database_whose_read_models_are_gone_is_down_until_they_are_back(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    """Regression: a query database dropped and created again under a running service
    answered `SELECT 1`, so its outage was logged as over and Queries stayed SERVING,
    while every call failed on the missing tables."""
    _, queries = databases
    async with AsyncExitStack() as stack:
        wired = await bootstrap(
            _settings(databases, amqp_url), ("queries-api",), stack, deadline=time.monotonic() + 10
        )
        assert wired.health is not None
        [listener] = [each for each in wired.listeners if each.name == "queries-api"]
        await listener.server.start(*listener.address)
        stack.callback(listener.server.close)
        channel = Channel(*listener.address)
        stack.callback(channel.close)

        async def serving() -> bool:
            assert wired.health is not None
            await wired.health.probe_once()
            answer = await HealthStub(channel).Check(
                HealthCheckRequest(service="Queries"), timeout=5
            )
            return bool(answer.status == HealthCheckResponse.SERVING)

        assert await serving()
        conn = await asyncpg.connect(**queries.connect_kwargs)
        stack.push_async_callback(conn.close)
        await conn.execute("DROP SCHEMA read_models CASCADE")
        with capture_logs() as logs:
            assert not await serving()
            assert not await serving()  # and still not: its outage is not over
        [down] = [line for line in logs if line["event"] == "query database unavailable"]
        assert "read_models.investors" in down["error"], down
        assert "financing projections rebuild" in down["error"], down
        assert not [line for line in logs if line["event"] == "query database recovered"]

        await conn.execute("SELECT public.financing_create_read_models('read_models')")
        assert await serving()


async def test_a_query_database_made_anew_under_a_store_with_history_is_rebuilt_not_served_empty(
    databases: tuple[Database, Database], amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (a probe): a query database lost and made again empty, then a start-up
    (an instance's restart) migrated it: every instance, the ones running too, served the
    empty read models until an operator rebuilt them, and the projector applied later
    events to rows they lacked. The start-up now drops them before anything serves them
    and rebuilds them from the event store."""
    commands, queries = databases
    investor = uuid.uuid4()
    events_pool = await create_pool(commands)
    try:
        await migrate(events_pool, "commands")
        async with PostgresEventStore(events_pool).unit_of_work() as uow:
            created = await uow.load(Investor, investor)
            created.create(Decimal("100"))
            await uow.save(created)
    finally:
        await events_pool.close()
    components = ("policies", "projector", "queries-api")
    # What any instance could read once the migration committed: made, then dropped, the
    # empty read models were served in between (0 investors, a probe).
    committed_with: list[bool] = []
    looked_at = bootstrap_module.made_empty

    async def made_empty(events: asyncpg.Pool, queries_pool: asyncpg.Pool) -> bool:
        async with queries_pool.acquire() as conn:
            present = "SELECT to_regnamespace('read_models') IS NOT NULL"
            committed_with.append(bool(await conn.fetchval(present)))
        return await looked_at(events, queries_pool)

    monkeypatch.setattr(bootstrap_module, "made_empty", made_empty)
    async with AsyncExitStack() as stack:
        with capture_logs() as logs:
            wired = await bootstrap(
                _settings(databases, amqp_url), components, stack, deadline=time.monotonic() + 10
            )
        assert any(line["event"].startswith("the read models hold nothing") for line in logs)
        assert committed_with == [False]
        conn = await asyncpg.connect(**queries.connect_kwargs)
        stack.push_async_callback(conn.close)
        # Nothing to serve, by any instance, until the rebuild's swap.
        assert await conn.fetchval("SELECT to_regnamespace('read_models') IS NULL")
        rebuilding = asyncio.create_task(wired.workers["read-models-rebuild"]())
        try:
            pool = await create_pool(queries)
            stack.push_async_callback(pool.close)
            read_models = PostgresReadModels(pool)

            async def rebuilt() -> bool:
                return bool(
                    await conn.fetchval("SELECT to_regnamespace('read_models') IS NOT NULL")
                )

            await wait_until(rebuilt, what="the read models rebuilt")
            assert await read_models.investors() == [
                InvestorRow(investor, Decimal(100), Decimal(0), Decimal(0))
            ]
            assert not rebuilding.done()  # a worker that ended would stop the service
        finally:
            rebuilding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rebuilding

    # Read models that hold the store's history are left as they are.
    async with AsyncExitStack() as stack:
        wired = await bootstrap(
            _settings(databases, amqp_url), components, stack, deadline=time.monotonic() + 10
        )
        assert "read-models-rebuild" not in wired.workers


async def test_read_models_gone_while_the_query_database_was_out_are_said_once_it_answers(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    """Regression: a query database dropped after the service found it unreachable, then
    made again empty, was said only not to exist (or not to answer): the line naming the
    missing tables and what builds them again was never written."""
    _, queries = databases
    async with AsyncExitStack() as stack:
        wired = await bootstrap(
            _settings(databases, amqp_url), ("queries-api",), stack, deadline=time.monotonic() + 10
        )
        health = wired.health
        assert health is not None
        with capture_logs() as logs:
            async with infra.refusing_connections(queries):
                await health.probe_once()
            conn = await asyncpg.connect(**queries.connect_kwargs)
            stack.push_async_callback(conn.close)
            await conn.execute("DROP SCHEMA read_models CASCADE")
            for _ in range(3):
                await health.probe_once()
        said = [line for line in logs if line["event"].startswith("query database")]
        assert [line["event"] for line in said] == [
            "query database unavailable",
            "query database still unavailable",
        ], said
        assert "read_models.investors" not in said[0]["error"], said
        assert "financing projections rebuild" in said[1]["error"], said
        await conn.execute("SELECT public.financing_create_read_models('read_models')")


async def test_a_read_only_query_database_without_the_current_schema_fails_start_up(
    databases: tuple[Database, Database], amqp_url: str
) -> None:
    _, queries = databases
    await infra.set_read_only(queries.connect_kwargs["database"], True)
    try:
        async with AsyncExitStack() as stack:
            with pytest.raises(StartupError, match="takes no writes, and its queries schema"):
                await bootstrap(
                    _settings(databases, amqp_url),
                    ("queries-api",),
                    stack,
                    # The reason is said whether the deadline ends a pause between
                    # attempts or cuts an attempt (then as the attempt before's).
                    deadline=time.monotonic() + 2,
                )
    finally:
        await infra.set_read_only(queries.connect_kwargs["database"], False)


async def test_under_a_small_descriptor_limit_callers_leave_the_service_what_it_needs(
    databases: tuple[Database, Database], amqp_url: str, tmp_path: Path
) -> None:
    """Regression: each gRPC server held at least 16 connections, the metrics endpoint 4,
    whatever the process's limit: under `ulimit -n 64`, callers' connections took the
    descriptors the service needed, and `/health` failed."""
    limit = 64
    command, query, metrics = (("127.0.0.1", free_port()) for _ in range(3))
    env = service_env(*databases, amqp_url, command, query, metrics)
    service = ServiceProcess(
        env,
        tmp_path / "service.log",
        command=("prlimit", f"--nofile={limit}:{limit}", *financing_command()),
    )
    await service.start()
    try:
        async with AsyncExitStack() as stack:
            for address in (command, query):
                for _ in range(40):  # each with a call open: none is idle, to be closed
                    caller = await stack.enter_async_context(RawConnection.open(address))
                    caller.call(b"/grpc.health.v1.Health/Watch", EMPTY_MESSAGE)
            answers = [await asyncio.to_thread(health_code, metrics) for _ in range(20)]
            descriptors = len(os.listdir(f"/proc/{service.pid}/fd"))
            samples = await asyncio.to_thread(scrape, f"{metrics[0]}:{metrics[1]}")
        said = [line for line in service.log_lines() if line.get("level") != "info"]
        assert answers == [200] * 20, (answers, said)
        # And room left for the sessions the pools have yet to open.
        sessions = value(samples, "financing_pool_connections", state="open")
        most = value(samples, "financing_pool_connections", state="max")
        assert descriptors + (most - sessions) < limit, (descriptors, sessions, most)
        assert '"level": "error"' not in service.log_tail(), service.log_tail()
    finally:
        assert await service.stop() == 0


@pytest.mark.parametrize(
    ("components", "database"),
    [(("projector",), "query database"), (("commands", "integration"), "command database")],
)
async def test_a_process_serving_no_api_probes_its_databases_while_idle(
    databases: tuple[Database, Database],
    amqp_url: str,
    components: tuple[str, ...],
    database: str,
) -> None:
    """Regression (a probe): only a process serving a gRPC API probed its dependencies, so
    an idle projector's or command handler's told a lost database only once an operation
    failed on it: `/health` 200 and `financing_dependency_up` 1 meanwhile."""
    refused = databases[1] if database == "query database" else databases[0]
    async with AsyncExitStack() as stack:
        wired = await bootstrap(
            _settings(databases, amqp_url), components, stack, deadline=time.monotonic() + 10
        )
        assert "health" in wired.workers
        health = wired.health
        assert health is not None
        with capture_logs() as logs:
            async with infra.refusing_connections(refused):
                await health.probe_once()
            await health.probe_once()
        said = [line["event"] for line in logs if line["event"].startswith(database)]
        assert said == [f"{database} unavailable"], logs


# A process that ends as `financing serve` ends, sent SIGTERM by an object its end
# destroys: after the interpreter put signals with handlers of Python's back to their
# default.
SIGNALLED_AT_ITS_END = """
import asyncio, os, signal, sys
from financing.config import Settings
from financing.entrypoints import service

class SignalledAtTheEnd:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)

at_the_end = SignalledAtTheEnd()
settings = Settings.from_env(dict(os.environ))
sys.exit(asyncio.run(service.serve(settings, startup_timeout=1.0, last=True)))
"""


async def test_a_stop_signal_as_the_interpreter_ends_leaves_the_exit_code_said(
    databases: tuple[Database, Database],
) -> None:
    """Regression (a probe): a second SIGTERM in the last moments of the process, once
    the interpreter had put the stop signals back to their default, killed it (143, 3 of
    19 double stops) after its last line had said 0."""
    commands, queries = databases
    unreachable = f"amqp://guest:guest@127.0.0.1:{free_port()}/"  # start-up fails: 2
    env = service_env(commands, queries, unreachable, *(("127.0.0.1", 0),) * 3)
    ended = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIGNALLED_AT_ITS_END,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    async with asyncio.timeout(30):
        assert await ended.wait() == 2


async def test_a_stop_signal_once_serve_returned_ends_the_process_with_its_code(
    databases: tuple[Database, Database],
) -> None:
    """Regression (a probe): a second SIGTERM in the moments the process took to exit,
    after the signal handlers were removed, killed it (143) after its last line had said
    it stopped with 0. `financing serve` ends with `serve` (`last`): a stop signal then
    ends the process at once with the code `serve` returned (ignored, a hang past that
    point could not be stopped but by SIGKILL)."""
    settings = _settings(databases, f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        async with asyncio.timeout(15):
            code = await service.serve(settings, startup_timeout=1.0, last=True)
        assert code == 2
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        exits: list[int] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(service.os, "_exit", exits.append)
            handler(signal.SIGTERM, None)
        assert exits == [2]
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)
