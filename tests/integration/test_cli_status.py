"""`financing status` as a probe: exit code 0 only when the deployment is healthy.

Healthy: both databases and the broker answer, every consumed queue has a
consumer, and no event has waited longer than --max-relay-lag to be relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import aio_pika
import asyncpg
import pytest

from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.outbox import LOCK_LEASE, RELAYER_LOCK
from financing.adapters.postgres.projected_store import claim
from financing.adapters.postgres.schema import migrate
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.dead_letters import READER
from financing.adapters.rabbitmq.queues import queue_depth
from financing.adapters.rabbitmq.topology import DEAD_LETTER_QUEUE, DEFERRALS, declare_deferrals
from financing.application.retry import Outages
from financing.config import Database, parse_database
from financing.entrypoints.cli.status import LOCKED_SAID, consumed_queues
from tests.support import infra, rabbitmq
from tests.support.deployment import local_deployment
from tests.support.relay import Relay
from tests.support.service import CommandLine, free_port, run_cli

CONSUMED = sorted(queue.name for queue in consumed_queues())


def problems(run: CommandLine) -> list[str]:
    lines = run.stdout.splitlines()
    if "UNHEALTHY:" not in lines:
        return []
    return [line.removeprefix("  - ") for line in lines[lines.index("UNHEALTHY:") + 1 :]]


def queue_rows(run: CommandLine) -> dict[str, list[str]]:
    """The queue table: messages ready for delivery and consumers, by queue."""
    lines = run.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["QUEUE"])
    rows = {}
    for line in lines[start + 1 :]:
        if not line:
            break
        name, *counts = line.split()
        rows[name] = counts
    return rows


async def test_a_running_service_is_healthy_and_a_stopped_one_is_not() -> None:
    async with local_deployment("fin_cli_status") as deployment:
        # SIGUSR1 tells every task and where it waits, and the service goes on (the
        # signal killed it on the spot).
        logged = deployment.service.log_size()
        os.kill(deployment.service.pid, signal.SIGUSR1)

        async def told() -> bool:
            return "tasks, and where each waits" in deployment.service.log_tail(since=logged)

        await infra.wait_until(told, what="the tasks told")
        healthy = await run_cli(deployment.env, "status")

        await deployment.service.stop()
        stopped = await run_cli(deployment.env, "status")

    assert healthy.exit_code == 0, healthy.describe()
    assert healthy.stdout.splitlines()[-1] == "healthy"
    # Regression: an operator's command logged its broker connection at INFO, a line on
    # stderr for every run that went well.
    assert "connected to broker" not in healthy.stderr, healthy.describe()
    assert {name: row[1] for name, row in queue_rows(healthy).items()} == dict.fromkeys(
        CONSUMED, "1"
    )
    assert "no event waiting" in healthy.stdout
    # Regression: the broker's count of a queue leaves out the deliveries its consumers
    # hold (the projector's batch), which the status called "waiting": 0 while the
    # projector held 100 it could not project.
    assert "READY: not yet delivered (those delivered and not settled are not counted)" in (
        healthy.stdout
    )
    assert re.search(
        r"projector +0 message\(s\) not yet delivered in \S+ \(and the projector may hold up to"
        r" 100",
        healthy.stdout,
    )
    assert stopped.exit_code == 1, stopped.describe()
    assert problems(stopped) == [f"queue {name} has no consumer" for name in CONSUMED]
    # Regression (a probe): said of a queue no projector reads, which holds nothing.
    assert "may hold" not in stopped.stdout, stopped.describe()


@dataclass(frozen=True)
class Bare:
    """Databases with the service's schemas and a vhost, and no service running."""

    env: dict[str, str]
    events: asyncpg.Pool


@pytest.fixture
async def bare() -> AsyncIterator[Bare]:
    async with (
        infra.fresh_database("fin_status_commands") as commands,
        infra.fresh_database("fin_status_queries") as queries,
        rabbitmq.private_vhost("fin_status") as vhost,
    ):
        events = await _migrated(commands, "commands")
        await (await _migrated(queries, "queries")).close()
        env = {
            **os.environ,
            "COMMAND_DB_CONNECTION_STRING": commands.dsn(),
            "QUERY_DB_CONNECTION_STRING": queries.dsn(),
            "AMQP_ADDRESS": vhost.url,
            "METRICS_ADDRESS": "",  # no service here to ask
        }
        try:
            yield Bare(env, events)
        finally:
            await events.close()


async def _migrated(db: Database, schema: str) -> asyncpg.Pool:
    pool = await create_pool(db)
    await migrate(pool, schema)
    return pool


async def test_queues_nobody_declared_make_the_deployment_unhealthy(bare: Bare) -> None:
    run = await run_cli(bare.env, "status")

    assert run.exit_code == 1, run.describe()
    # Regression: the two queues nobody consumes were no problem when missing (a policy's
    # `expires` deleted them with what they held), and the deferrals' was shown holding 0.
    assert problems(run) == [
        f"queue {name} does not exist" for name in (DEAD_LETTER_QUEUE, DEFERRALS, *CONSUMED)
    ]
    assert "deferred          queue missing" in run.stdout, run.describe()
    # Regression (a probe): said "queue missing in financing_dead_letters".
    assert "dead letters      queue missing\n" in run.stdout, run.describe()
    assert "relayer           nothing relayed yet; no event waiting" in run.stdout


async def test_deferred_messages_and_dead_letters_being_read_are_said(bare: Bare) -> None:
    """Regression: a bid waiting in `financing_deferred` for its invoice was shown nowhere
    (every queue empty, "healthy"); and letters held by a `dead-letters list` running at
    the same time were left out of the count without a word."""
    broker = Broker([bare.env["AMQP_ADDRESS"]], Outages())
    try:
        channel = await broker.channel()
        deferrals = await declare_deferrals(channel)
        await deferrals.publish(
            aio_pika.Message(b"{}", expiration=600, headers={"name": "BidOnInvoice"}),
            "BidOnInvoice",
        )
        await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)
        # Another command reading the dead letters holds the readers' queue.
        await channel.declare_queue(READER, exclusive=True, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), DEAD_LETTER_QUEUE)

        async def declared() -> bool:
            depth = await queue_depth(broker, DEFERRALS)
            return depth is not None and depth.waiting == 1

        await infra.wait_until(declared, what="the deferred message queued")
        run = await run_cli(bare.env, "status")
    finally:
        await broker.close()

    assert (
        "deferred          1 message(s) waiting for an aggregate in financing_deferred"
        in run.stdout
    ), run.describe()
    assert (
        "dead letters      1 message(s) waiting (and those a command reading them now holds)"
        in run.stdout
    ), run.describe()


async def test_an_event_waiting_longer_than_the_relay_lag_makes_the_deployment_unhealthy(
    bare: Bare,
) -> None:
    await bare.events.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, version, name, body, recorded_at)"
        " VALUES ('Issuer', gen_random_uuid(), 1, 'IssuerCreatedEvent', '{}',"
        " now() - interval '5 minutes')"
    )

    late = await run_cli(bare.env, "status", "--max-relay-lag", "200")
    patient = await run_cli(bare.env, "status", "--max-relay-lag", "600")

    assert re.search(r"1 event\(s\) waiting, the oldest for 3\d\d\.\d s", late.stdout), late.stdout
    [lag] = [p for p in problems(late) if "relayed" in p]
    # With why, as far as the database tells (no service runs here).
    waited = re.fullmatch(
        r"an event has waited (\d+\.\d) s to be relayed \(at most 200 s is healthy\),"
        r" and no session holds the relayer lock: no instance runs the relayer",
        lag,
    )
    assert waited is not None and 300 <= float(waited[1]) < 360, lag
    assert not [p for p in problems(patient) if "relayed" in p], patient.describe()


async def test_read_models_that_hold_nothing_while_the_store_holds_events_are_a_problem(
    bare: Bare,
) -> None:
    """Regression (a probe): a Queries-only or projector-only process on a query database
    made anew served its empty read models, and `status` said the deployment healthy."""
    await bare.events.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, version, name, body)"
        " VALUES ('Issuer', gen_random_uuid(), 1, 'IssuerCreatedEvent', '{}')"
    )
    empty = await run_cli(bare.env, "status")

    [line] = [line for line in empty.stdout.splitlines() if "HOLD NOTHING" in line]
    assert line.startswith("read models "), line
    assert "HOLD NOTHING while the event store holds events" in line, line
    assert "`financing projections rebuild` builds them" in line, line
    assert "the read models hold nothing while the event store holds events" in problems(empty)

    queries = parse_database(bare.env["QUERY_DB_CONNECTION_STRING"])
    conn = await asyncpg.connect(**queries.connect_kwargs)
    try:
        await conn.execute("INSERT INTO read_models.issuers (id) VALUES (gen_random_uuid())")
    finally:
        await conn.close()
    projected = await run_cli(bare.env, "status")
    assert "HOLD NOTHING" not in projected.stdout, projected.describe()
    assert not [p for p in problems(projected) if "hold nothing" in p], projected.describe()


async def test_a_session_left_holding_the_relayer_lock_is_named_with_what_ends_it(
    bare: Bare,
) -> None:
    """Regression: a relayer lock left on a pooler's server session (an instance behind
    PgBouncer in transaction mode) held every relayer off for 10 minutes, and `status`
    said only that an event waited, with no reason."""
    await bare.events.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, version, name, body, recorded_at)"
        " VALUES ('Issuer', gen_random_uuid(), 1, 'IssuerCreatedEvent', '{}',"
        " now() - interval '5 minutes')"
    )
    left = await asyncpg.connect(
        bare.env["COMMAND_DB_CONNECTION_STRING"], server_settings={"application_name": "financing"}
    )
    try:
        await left.fetchval("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
        pid = left.get_server_pid()

        async def idle_past_the_lease() -> bool:
            idle: bool = await bare.events.fetchval(
                "SELECT state_change < now() - make_interval(secs => $2)"
                " FROM pg_stat_activity WHERE pid = $1 AND state = 'idle'",
                pid,
                LOCK_LEASE + 0.5,
            )
            return bool(idle)

        await infra.wait_until(
            idle_past_the_lease, timeout=15, what="the holder idle past the lease"
        )
        run = await run_cli(bare.env, "status", "--max-relay-lag", "200")
    finally:
        await left.close()
    [lag] = [p for p in problems(run) if "relayed" in p]
    assert f"session {pid} (user " in lag, lag
    assert "a session left holding it, no relayer" in lag, lag
    assert f"SELECT pg_terminate_backend({pid}) ends it" in lag, lag


async def test_an_event_store_restored_from_another_server_is_unhealthy_and_unchecked(
    bare: Bare,
) -> None:
    """Regression (a probe following "Moving the command database" without its
    pg_resetwal step): `status` said no event waited and `check` "events checked: 0 ...
    OK" of a store of events none of which could be relayed."""
    await bare.events.execute(
        "INSERT INTO events (aggregate_type, aggregate_id, version, name, body, transaction_id)"
        " VALUES ('Issuer', gen_random_uuid(), 1, 'IssuerCreatedEvent', '{}',"
        " (pg_snapshot_xmax(pg_current_snapshot())::text::numeric + 4294967296 * 3)::text::xid8)"
    )

    status = await run_cli(bare.env, "status")
    check = await run_cli(bare.env, "check", "--skip-read-models")

    assert status.exit_code == 1, status.describe()
    assert "relayer           NOT READY: the event store's transaction ids are ahead" in (
        status.stdout
    ), status.describe()
    assert [p for p in problems(status) if "pg_resetwal -e" in p], status.describe()
    assert check.exit_code == 1, check.describe()
    assert "transaction ids are ahead of this server's" in check.stderr, check.describe()


@pytest.mark.parametrize("which", ["command", "query"])
async def test_a_database_without_the_schema_is_reported_as_not_ready(
    bare: Bare, which: str
) -> None:
    """Regression: an empty command database was reported as a failure to inquire
    (UndefinedTableError), and an empty query database as reachable and healthy: a
    connection string naming the wrong database passed the probe."""
    async with infra.fresh_database("fin_status_empty") as empty:
        env = {**bare.env, f"{which.upper()}_DB_CONNECTION_STRING": empty.dsn()}
        run = await run_cli(env, "status")

    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith(f"{which} database ")]
    schema = {"command": "commands", "query": "queries"}[which]
    assert " NOT READY: " in line and f"has no {schema} schema yet" in line, line
    # The line's column of what is said lines up with a reachable database's.
    part = f"{which} database"
    assert line.startswith(f"{part:<17} {empty.describe()}: NOT READY: "), line
    assert (
        problems(run)[0] == f"{which} database {empty.describe()}: its schema is not this release's"
    )
    assert "Traceback" not in run.stderr


async def test_read_models_of_another_event_store_make_the_deployment_unhealthy(
    bare: Bare,
) -> None:
    """What `serve` refuses (another deployment's query database) was not said."""
    run = await run_cli(bare.env, "status")
    assert "read models       of no event store yet" in run.stdout, run.describe()

    queries = parse_database(bare.env["QUERY_DB_CONNECTION_STRING"])
    pool = await create_pool(queries)
    try:
        await claim(pool, uuid4())  # another deployment's event store
    finally:
        await pool.close()
    run = await run_cli(bare.env, "status")

    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith("read models ")]
    assert ", NOT this deployment's (" in line, line
    assert "the query database holds the read models of another event store" in problems(run)


async def test_a_database_the_service_would_not_start_on_is_reported_as_not_ready(
    bare: Bare,
) -> None:
    """Regression: a schema named after the service's role, made after its tables (a
    DBA's per-user schema, which a default search_path puts first), stops `serve` (it
    would create a new event store there), while `status` said both databases were
    reachable and gave no cause."""
    await bare.events.execute(f'CREATE SCHEMA "{infra.PG_USER}"')

    run = await run_cli(bare.env, "status")

    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith("command database ")]
    assert ": NOT READY: " in line and "search_path" in line, line
    assert "the service would not start on it (search_path)" in problems(run)[0]


async def test_a_broker_that_never_answers_makes_the_deployment_unhealthy_within_the_timeout(
    bare: Bare,
) -> None:
    proxy = rabbitmq.BrokerProxy()
    await proxy.start()
    await proxy.cut()  # connections are accepted and never answered
    try:
        # The command line's own start-up takes about a second; without the timeout the
        # probe would wait on the broker for as long as `within` lets it.
        run = await run_cli(
            {**bare.env, "AMQP_ADDRESS": proxy.url("")}, "status", "--timeout", "2", within=10
        )
    finally:
        await proxy.close()

    assert run.exit_code == 1, run.describe()
    [broker] = [line for line in run.stdout.splitlines() if line.startswith("broker ")]
    assert "UNREACHABLE" in broker, broker
    assert problems(run)[-1].endswith("is unreachable")


async def test_a_broker_refusing_connections_makes_the_deployment_unhealthy(
    bare: Bare,
) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/"

    run = await run_cli({**bare.env, "AMQP_ADDRESS": nowhere}, "status", "--timeout", "2")

    assert run.exit_code == 1, run.describe()
    [broker] = [line for line in run.stdout.splitlines() if line.startswith("broker ")]
    assert "UNREACHABLE" in broker
    assert problems(run)[-1].startswith("broker amqp://127.0.0.1:")
    assert problems(run)[-1].endswith("is unreachable")


async def test_a_broker_whose_certificate_is_not_verified_is_said(bare: Bare) -> None:
    """Regression (a review): `serve` warns of `verify=verify_none` as it starts, and
    `status`, an operator's look at the deployment, said nothing of it."""
    port = free_port()
    unverified = f"amqps://guest:guest@127.0.0.1:{port}/?verify=verify_none"
    verified = f"amqps://guest:guest@localhost:{port}/"

    run = await run_cli(
        {**bare.env, "AMQP_ADDRESS": f"{unverified},{verified}"}, "status", "--timeout", "2"
    )

    told = [line for line in run.stdout.splitlines() if line.startswith("broker TLS ")]
    assert told == [
        f"broker TLS        amqps://127.0.0.1:{port}/: the broker's certificate is not verified"
        " (verify=verify_none or no_verify_ssl=1): whoever stands between the service and"
        " the broker can read and change what they say"
    ], run.describe()
    assert "guest" not in run.stdout


async def test_silent_dependencies_are_inquired_into_side_by_side(bare: Bare) -> None:
    """Regression: the databases and the broker were inquired into one after another, so
    a probe of three silent dependencies took three timeouts (16 s with --timeout 5)."""
    relays = [Relay(infra.PG_HOST, infra.PG_PORT) for _ in range(2)]
    broker = rabbitmq.BrokerProxy()
    for relay in [*relays, broker]:
        await relay.start()
        await relay.cut()  # connections are accepted and never answered
    commands, queries = (f"postgresql://postgres@127.0.0.1:{r.port}/postgres" for r in relays)
    env = {
        **bare.env,
        "COMMAND_DB_CONNECTION_STRING": commands,
        "QUERY_DB_CONNECTION_STRING": queries,
        "AMQP_ADDRESS": broker.url(""),
    }
    try:
        # One after another, the three 4 s timeouts alone would outlast `within`.
        run = await run_cli(env, "status", "--timeout", "4", within=10)
    finally:
        for relay in [*relays, broker]:
            await relay.close()

    assert run.exit_code == 1, run.describe()
    reported = [line.split()[0] for line in run.stdout.splitlines()[:3]]
    assert reported == ["command", "query", "broker"], run.stdout
    assert len(problems(run)) == 3 and all(p.endswith("is unreachable") for p in problems(run))


@pytest.mark.parametrize(
    ("which", "table"),
    [
        ("command", "events"),
        ("query", "projected_event_store"),
        ("command", "schema_migrations"),
        ("query", "schema_migrations"),
    ],
)
async def test_a_database_whose_table_is_locked_answers_and_the_lock_holder_is_named(
    bare: Bare, which: str, table: str
) -> None:
    """Regression (a probe): a table a DBA held locked (LOCK TABLE, REINDEX, CLUSTER) made
    status's statement wait out its timeout, said UNREACHABLE, "no answer within 5 s",
    while the server answered: a DBA looks at the network, not at pg_locks. So did one
    of `schema_migrations`, read before the others (a probe of the fix), and the problem
    named neither the table nor its holder."""
    db = parse_database(bare.env[f"{which.upper()}_DB_CONNECTION_STRING"])
    holder = await asyncpg.connect(**db.connect_kwargs, server_settings={"application_name": "dba"})
    try:
        await holder.execute(f"BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        run = await run_cli(bare.env, "status", "--timeout", "2", within=20)
    finally:
        await holder.close()

    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith(f"{which} database ")]
    assert "UNREACHABLE" not in line, line
    locked = f"table {table} locked by session {holder.get_server_pid()} (user 'postgres',"
    assert f": NOT READY: it answers, but a statement waited more than 2 s on {locked}" in line
    assert "application 'dba'," in line, line
    [problem] = [p for p in problems(run) if p.startswith(f"{which} database {db.describe()}")]
    assert f": it answers, but a statement waited more than 2 s on {locked}" in problem, problem


async def test_a_table_locked_that_the_inquiry_does_not_read_is_said_with_its_holder(
    bare: Bare,
) -> None:
    """Regression (a probe): a read model's table a DBA held locked for 3 minutes, every
    list of it waiting, was said nowhere by `status` (its inquiry reads other tables): the
    database "reachable", the deployment healthy. A lock of another schema's table that
    statements wait on too (the reference's tables beside the service's) is not the
    service's (a probe of the first fix). Judged by the statements waiting, it came and
    went as each gave up (its deadline): held while none waits, it is said all the same
    (a probe of the second)."""
    db = parse_database(bare.env["QUERY_DB_CONNECTION_STRING"])
    named = {"server_settings": {"application_name": "dba"}}
    holder = await asyncpg.connect(**db.connect_kwargs, **named)
    elsewhere = await asyncpg.connect(**db.connect_kwargs)
    waiting: list[asyncio.Task[Any]] = []
    try:
        await holder.execute(
            "CREATE SCHEMA reference; CREATE TABLE reference.events (x int);"
            " BEGIN; LOCK TABLE read_models.investors IN ACCESS EXCLUSIVE MODE;"
            " LOCK TABLE reference.events IN ACCESS EXCLUSIVE MODE"
        )
        # None waits on the service's table now (the last Queries call gave up).
        waiting.append(asyncio.create_task(elsewhere.fetch("SELECT * FROM reference.events")))
        said: list[CommandLine] = []

        async def locked_said() -> bool:
            said.append(await run_cli(bare.env, "status"))
            return any(line.startswith("table locked") for line in said[-1].stdout.splitlines())

        await infra.wait_until(locked_said, timeout=LOCKED_SAID + 20, what="the locked table said")
    finally:
        await holder.close()
        await asyncio.gather(*waiting, return_exceptions=True)
        await elsewhere.close()

    run = said[-1]
    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith("table locked")]
    assert line.split(None, 2)[2].startswith(
        f"read_models.investors by session {holder.get_server_pid()} (user 'postgres',"
        " application 'dba',"
    ), line
    assert any(
        p.startswith("query database: table read_models.investors is locked by session")
        for p in problems(run)
    ), problems(run)


async def test_indexes_a_dba_dropped_are_each_a_problem_saying_what_makes_them_again(
    bare: Bare,
) -> None:
    """Regression (a DBA's probe): an index no scan had used yet (`events_correlation`,
    until a `trace`) dropped went unnoticed, `trace` then reading the whole store; and a
    unique one, on which the service's writes rely, as well."""
    commands = parse_database(bare.env["COMMAND_DB_CONNECTION_STRING"])
    queries = parse_database(bare.env["QUERY_DB_CONNECTION_STRING"])
    for db, dropping in (
        (commands, "DROP INDEX events_correlation"),
        (queries, "ALTER TABLE read_models.investors DROP CONSTRAINT investors_pkey"),
    ):
        conn = await asyncpg.connect(**db.connect_kwargs)
        try:
            await conn.execute(dropping)
        finally:
            await conn.close()

    run = await run_cli(bare.env, "status")

    assert run.exit_code == 1, run.describe()
    lacking = [line for line in run.stdout.splitlines() if line.startswith("index lacking")]
    assert lacking == [
        "index lacking     index events_correlation of events (`financing trace`): CREATE INDEX"
        " CONCURRENTLY events_correlation ON events (correlation_id) WHERE correlation_id IS"
        " NOT NULL",
        "index lacking     unique index investors_pkey of read_models.investors (one row per"
        " investor): ALTER TABLE read_models.investors ADD PRIMARY KEY (id)",
    ], run.describe()
    assert [p for p in problems(run) if " lacks the " in p] == [
        "command database: lacks the " + lacking[0].split(None, 2)[2],
        "query database: lacks the " + lacking[1].split(None, 2)[2],
    ]


@pytest.mark.parametrize(
    ("which", "dropped"),
    [("command", "TABLE relay_checkpoints"), ("query", "SCHEMA read_models CASCADE")],
)
async def test_a_database_whose_tables_are_gone_is_reported_as_not_ready(
    bare: Bare, which: str, dropped: str
) -> None:
    """Regression: with the read models' schema dropped, `/health` answered 503 and
    `health-check` and `check` failed, and `status` said the query database reachable
    and the deployment healthy."""
    connection_string = bare.env[f"{which.upper()}_DB_CONNECTION_STRING"]
    db = parse_database(connection_string)
    conn = await asyncpg.connect(**db.connect_kwargs)
    try:
        await conn.execute(f"DROP {dropped}")
    finally:
        await conn.close()

    run = await run_cli(bare.env, "status")

    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith(f"{which} database ")]
    assert " NOT READY: its table(s) " in line and " do not exist" in line, line
    [problem] = [p for p in problems(run) if p.startswith(f"{which} database {db.describe()}: ")]
    assert " do not exist, or not in its sessions' search_path" in problem, problem
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("which", "revoked", "lacking"),
    [
        ("command", "INSERT ON events", "events (INSERT)"),
        ("command", "USAGE ON SEQUENCE events_position_seq", "events_position_seq (USAGE)"),
        ("command", "SELECT ON snapshots", "snapshots (SELECT)"),
        ("query", "UPDATE ON read_models.invoices", "read_models.invoices (UPDATE)"),
        ("query", "USAGE ON SCHEMA read_models", "schema read_models (USAGE)"),
        # Regression (a probe): the tables out of the role's reach, said gone, with a
        # remedy that starts an empty event store, or drops the query database.
        ("command", "USAGE ON SCHEMA public", "schema public (USAGE)"),
        ("query", "USAGE ON SCHEMA public", "schema public (USAGE)"),
        # Regression (a probe): the reads' privileges alone were named, the writes' only
        # once those were granted.
        (
            "query",
            "SELECT, UPDATE ON read_models.invoices",
            "read_models.invoices (SELECT), read_models.invoices (UPDATE)",
        ),
    ],
)
async def test_a_database_refusing_the_services_writes_is_reported_as_not_ready(
    bare: Bare, which: str, revoked: str, lacking: str
) -> None:
    """Regression (a probe): with the service's role allowed to read its tables and not
    to write them, the projector's writes were refused and `/health` said so, while
    `status` said both databases reachable and the deployment healthy."""
    db = parse_database(bare.env[f"{which.upper()}_DB_CONNECTION_STRING"])
    role = infra.unique_name("fin_status_reader")
    admin = await asyncpg.connect(**db.connect_kwargs)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        for schema in ("public", "read_models") if which == "query" else ("public",):
            await admin.execute(f'GRANT USAGE ON SCHEMA {schema} TO "{role}"')
            await admin.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO "{role}"')
            await admin.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO "{role}"')
        reader = Database({**db.connect_kwargs, "user": role})
        env = {**bare.env, f"{which.upper()}_DB_CONNECTION_STRING": reader.dsn()}
        allowed = await run_cli(env, "status")
        await admin.execute(f'REVOKE {revoked} FROM "{role}"')
        if revoked.endswith("SCHEMA public"):  # every role may use it by default
            await admin.execute(f"REVOKE {revoked} FROM PUBLIC")
        refused = await run_cli(env, "status")
    finally:
        await admin.execute(f'DROP OWNED BY "{role}"')
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()

    # Its sessions' role writes everything it needs: nothing said of the database.
    assert not [p for p in problems(allowed) if p.startswith(f"{which} database")], (
        allowed.describe()
    )
    assert refused.exit_code == 1, refused.describe()
    [line] = [line for line in refused.stdout.splitlines() if line.startswith(f"{which} database ")]
    assert f"NOT READY: its role lacks privileges the service needs: {lacking}; GRANT" in line, line
    needs = "its role lacks privileges the service needs"
    assert f"{which} database {reader.describe()}: {needs}" in problems(refused)


@pytest.mark.parametrize("which", ["command", "query"])
async def test_a_database_taking_no_writes_is_reported_as_not_ready(bare: Bare, which: str) -> None:
    """Regression (a probe): a database read-only by default answered `status`'s reads,
    which said it reachable and the deployment healthy, while the service's writes were
    refused."""
    db = parse_database(bare.env[f"{which.upper()}_DB_CONNECTION_STRING"])
    await infra.set_read_only(db.connect_kwargs["database"], True)
    run = await run_cli(bare.env, "status")

    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith(f"{which} database ")]
    assert "NOT READY: it takes no writes: its transactions are read-only" in line, line
    assert f"{which} database {db.describe()}: it takes no writes" in problems(run)


@contextlib.asynccontextmanager
async def health_endpoint(answer: bytes) -> AsyncIterator[int]:
    """A metrics endpoint of a service on this host whose /health answers `answer`."""

    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answering, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_what_the_service_on_this_host_says_of_itself_is_judged(bare: Bare) -> None:
    """Regression (a probe): with the command database's disk full, its reads answered and
    its writes refused, `status` said every part reachable and the deployment healthy,
    exit 0, while the service's `/health` and `health-check` said the command database
    was unavailable."""
    unhealthy = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n"
        b"not healthy: command database unavailable\n"
    )
    async with health_endpoint(unhealthy) as port:
        run = await run_cli({**bare.env, "METRICS_ADDRESS": f"0.0.0.0:{port}"}, "status")
    where = f"http://127.0.0.1:{port}/health"
    assert run.exit_code == 1, run.describe()
    [line] = [line for line in run.stdout.splitlines() if line.startswith("service ")]
    assert line == (
        f"service           {where}: NOT HEALTHY: HTTP/1.1 503 Service Unavailable:"
        " command database unavailable"
    ), line
    assert [p for p in problems(run) if p.startswith("the service")] == [
        f"the service at {where} says: HTTP/1.1 503 Service Unavailable:"
        " command database unavailable"
    ], run.describe()

    healthy = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhealthy\n"
    async with health_endpoint(healthy) as port:
        run = await run_cli({**bare.env, "METRICS_ADDRESS": f"127.0.0.1:{port}"}, "status")
    assert f"service           http://127.0.0.1:{port}/health: healthy" in run.stdout
    assert not [p for p in problems(run) if p.startswith("the service")], run.describe()

    foreign = b"HTTP/1.0 404 File not found\r\nContent-Type: text/html\r\n\r\n<html></html>\n"
    async with health_endpoint(foreign) as port:  # another program on the port
        run = await run_cli({**bare.env, "METRICS_ADDRESS": f"127.0.0.1:{port}"}, "status")
    [line] = [line for line in run.stdout.splitlines() if line.startswith("service ")]
    assert line.endswith(
        "/health: not the service's answer (HTTP/1.0 404 File not found), not judged"
    ), line
    assert not [p for p in problems(run) if p.startswith("the service")], run.describe()

    nowhere = free_port()  # the command run where no service is: said, not judged
    run = await run_cli({**bare.env, "METRICS_ADDRESS": f"127.0.0.1:{nowhere}"}, "status")
    [line] = [line for line in run.stdout.splitlines() if line.startswith("service ")]
    assert line.endswith(", not judged") and "no answer here (" in line, line
    assert not [p for p in problems(run) if p.startswith("the service")], run.describe()


async def test_a_connection_limit_the_healthy_service_reaches_is_said_not_judged(
    bare: Bare,
) -> None:
    """Regression (a probe): with the virtual host's `max-connections` exactly what the
    service holds, `status` said the broker UNREACHABLE and the deployment unhealthy,
    exit 1, under a line saying the service healthy (its /health 200)."""
    vhost = bare.env["AMQP_ADDRESS"].rsplit("/", 1)[1]
    await rabbitmq.rabbitmqctl("set_vhost_limits", "-p", vhost, '{"max-connections": 0}')
    healthy = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhealthy\n"
    async with health_endpoint(healthy) as port:
        run = await run_cli({**bare.env, "METRICS_ADDRESS": f"127.0.0.1:{port}"}, "status")
    [broker] = [line for line in run.stdout.splitlines() if line.startswith("broker ")]
    assert "NOT LOOKED AT: its virtual host refused this command's connection" in broker, broker
    assert not [p for p in problems(run) if p.startswith("broker")], run.describe()
    assert run.exit_code == 0, run.describe()

    # Where no service says it is healthy, the refusal is an unreachable broker.
    run = await run_cli(bare.env, "status", "--timeout", "2")
    assert run.exit_code == 1, run.describe()
    assert problems(run)[-1].endswith("is unreachable"), run.describe()
