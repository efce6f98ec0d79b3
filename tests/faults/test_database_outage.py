"""The service's database sessions are cut under load: it survives and loses nothing.

Every session the service holds on its two databases (pool connections, the
relayer's LISTEN connection and its advisory-lock connection) is terminated
with pg_terminate_backend, several times at seeded random moments while
concurrent sagas run. Sessions of other databases and the suite's own
observers are left alone. The service must reconnect by itself, without a
restart, and end in the state the sagas planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.adapters.postgres.schema import INDEXES, migrate
from financing.application import codec
from financing.application.errors import Unavailable
from financing.application.messages import InvestorRegistered, IssuerRegistered
from financing.application.ports import Envelope
from financing.domain.aggregates import InvoiceStatus
from financing.generated import (
    BidOnInvoiceCommand,
    CommandsStub,
    Money,
    QueriesStub,
    SellInvoiceCommand,
    Uuid,
)
from tests.faults.conftest import Deploy, add_figure, record_workload, set_figure
from tests.faults.workload import (
    OBSERVER_APPLICATION,
    Deployment,
    IntegrationPublisher,
    Workload,
    assert_outages_logged_once,
    settle,
    suite_seed,
    verify_effects,
)
from tests.support import infra
from tests.support.deployment import service_role
from tests.support.metrics import scrape, value
from tests.support.relay import Relay

ROUNDS = 4
ROUNDS_OF_IDLE_CUTS = 25
# A SIGTERM's shutdown: the calls' drain, the components' grace, the pools' close, the broker's.
STOPS_WITHIN = 30.0


async def terminate_sessions(databases: list[str], *, wait: bool = False) -> int:
    """Terminate every session on `databases` but the suite's observers; how many there were.

    With `wait`, return only once those server processes are gone, so that the
    client side finds its sessions dead when it next uses them.
    """
    conn = await asyncpg.connect(
        host=infra.PG_HOST, port=infra.PG_PORT, user=infra.PG_USER, database="postgres"
    )
    try:
        # The aggregate's FILTER runs only on rows the WHERE clause kept.
        pids: list[int] = (
            await conn.fetchval(
                "SELECT array_agg(pid) FILTER (WHERE pg_terminate_backend(pid))"
                " FROM pg_stat_activity"
                " WHERE datname = ANY($1::text[]) AND backend_type = 'client backend'"
                " AND pid <> pg_backend_pid() AND coalesce(application_name, '') <> $2",
                databases,
                OBSERVER_APPLICATION,
            )
            or []
        )
        if wait:

            async def gone() -> bool:
                left: int = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
                )
                return left == 0

            await infra.wait_until(gone, timeout=10, what=f"sessions {pids} to end")
    finally:
        await conn.close()
    return len(pids)


async def terminate_service_sessions(target: Deployment, *, wait: bool = False) -> int:
    return await terminate_sessions(list(target.databases), wait=wait)


@pytest.fixture
async def scratch_databases() -> AsyncIterator[tuple[str, str]]:
    """An event store and a read-model database, migrated, with nothing running on them."""
    names = (
        infra.unique_name("fin_fault_idle_commands"),
        infra.unique_name("fin_fault_idle_queries"),
    )
    for name, schema in zip(names, ("commands", "queries"), strict=True):
        db = await infra.create_database(name)
        pool = await create_pool(db)
        try:
            await migrate(pool, schema)
        finally:
            await pool.close()
    yield names
    for name in names:
        await infra.drop_database(name)


async def test_a_pooled_session_terminated_while_idle_counts_as_the_database_being_unavailable(
    scratch_databases: tuple[str, str],
) -> None:
    """Regression: the first use of such a session often fails with asyncpg's
    InternalClientError ("cannot switch to state 15"), which the service took for a bug:
    consumers counted it towards dead-lettering the message being processed, the
    projector logged it as unexpected and the Queries API answered UNKNOWN."""
    commands, queries = scratch_databases
    command_pool = await create_pool(infra.database(commands))
    query_pool = await create_pool(infra.database(queries))
    store = PostgresEventStore(command_pool)
    read_models = PostgresReadModels(query_pool)
    try:
        # The pool notices some dead sessions in time and some not: try often enough. Each
        # use answers or raises Unavailable; any other error fails the test.
        for _ in range(ROUNDS_OF_IDLE_CUTS):
            await read_models.investors()  # each pool now holds an idle session
            async with store.unit_of_work() as uow:
                await uow.recorded("consumer", "message")
            await terminate_sessions([commands, queries], wait=True)
            with contextlib.suppress(Unavailable):
                await read_models.investors()
            with contextlib.suppress(Unavailable):
                async with store.unit_of_work() as uow:
                    await uow.recorded("consumer", "message")
        # Any other error has failed the test above. The pools now hold live sessions again.
        assert await read_models.investors() == []
        async with store.unit_of_work() as uow:
            assert await uow.recorded("consumer", "message") is None
    finally:
        await command_pool.close()
        await query_pool.close()


async def test_queries_api_answers_unavailable_never_unknown_when_its_sessions_are_cut(
    deploy: Deploy,
) -> None:
    target = await deploy("queries_cut")
    channel = Channel(*target.query_address)
    queries = QueriesStub(channel)
    statuses: Counter[str] = Counter()
    try:
        for _ in range(ROUNDS_OF_IDLE_CUTS):
            await queries.all_investors(Empty(), timeout=5)  # the pool holds an idle session
            await terminate_service_sessions(target, wait=True)
            try:
                await queries.all_investors(Empty(), timeout=5)
                statuses["OK"] += 1
            except GRPCError as exc:
                statuses[exc.status.name] += 1
    finally:
        channel.close()
    assert set(statuses) <= {"OK", Status.UNAVAILABLE.name}, statuses
    assert target.service.running, target.log_tail()


async def test_service_survives_its_database_sessions_being_terminated(deploy: Deploy) -> None:
    seed = suite_seed()
    schedule = random.Random(f"database/{seed}")
    target = await deploy("database")
    workload = Workload(target, seed=seed, concurrency=12)
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))
    terminated: list[int] = []
    try:
        for _ in range(ROUNDS):
            await asyncio.sleep(schedule.uniform(0.3, 1.2))
            assert not running.done(), running.result()
            terminated.append(await terminate_service_sessions(target))
        enough.set()
        await running
    finally:
        running.cancel()
    assert all(terminated), f"some rounds found no session of the service: {terminated}"
    assert target.service.running and target.starts() == 1, (
        f"the service did not survive on its own:\n{target.log_tail()}"
    )

    await settle(target)
    await verify_effects(target, workload)
    for database in ("command database", "query database"):
        # A pool may replace a terminated session before using it: no outage then.
        await assert_outages_logged_once(
            target,
            database,
            [f"{database} unavailable", f"{database} recovered"],
            required=False,
        )
    add_figure("database connection cuts survived", len(terminated))
    add_figure("database sessions terminated", sum(terminated))
    record_workload(workload)


async def set_connections_allowed(database: str, allowed: bool) -> None:
    conn = await asyncpg.connect(
        host=infra.PG_HOST, port=infra.PG_PORT, user=infra.PG_USER, database="postgres"
    )
    try:
        await conn.execute(
            f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {"true" if allowed else "false"}'
        )
    finally:
        await conn.close()


async def test_the_query_database_refusing_connections_is_unavailable_then_heals(
    deploy: Deploy,
) -> None:
    """Regression: a database that refuses new connections (ALLOW_CONNECTIONS false) fails
    with an error the service did not count as an outage: Queries answered UNKNOWN."""
    target = await deploy("queries_refused")
    _, queries_db = target.databases
    channel = Channel(*target.query_address)
    queries = QueriesStub(channel)
    workload = Workload(target, seed=suite_seed(), concurrency=4)
    try:
        await queries.all_investors(Empty(), timeout=5)
        await set_connections_allowed(queries_db, False)
        try:
            await terminate_sessions([queries_db], wait=True)
            with pytest.raises(GRPCError) as refused:
                await queries.all_investors(Empty(), timeout=5)
            # Meanwhile sagas go on; their events wait to be projected.
            await workload.run(sagas=4)
        finally:
            await set_connections_allowed(queries_db, True)

        async def answered() -> bool:
            try:
                await queries.all_investors(Empty(), timeout=5)
            except GRPCError:
                return False
            return True

        await infra.wait_until(answered, timeout=10, what="the Queries API to answer again")
    finally:
        channel.close()
    assert refused.value.status is Status.UNAVAILABLE, refused.value
    assert "query database" in (refused.value.message or ""), refused.value.message
    await target.query_pool.expire_connections()
    await settle(target)
    await verify_effects(target, workload)
    await assert_outages_logged_once(
        target, "query database", ["query database unavailable", "query database recovered"]
    )
    add_figure("query database refusals survived", 1)


async def test_a_command_database_that_takes_no_writes_is_one_outage_until_it_takes_them(
    deploy: Deploy,
) -> None:
    """Regression: the outage's end was checked with a `SELECT 1`, which a database that
    refuses every write (25006) still answers: "command database recovered" was logged
    about every second, each time followed by "unavailable" again at the next write."""
    target = await deploy("commands_read_only")
    commands_db, _ = target.databases
    address = "{}:{}".format(*target.metrics_address)
    retried = {"queue": "CreateIssuer", "outcome": "retried"}
    workload = Workload(target, seed=suite_seed(), concurrency=1)
    await infra.set_read_only(commands_db, True)
    try:
        await terminate_sessions([commands_db], wait=True)  # they come back read-only
        running = asyncio.create_task(workload.run(sagas=1))

        # The saga's CreateIssuer is refused and retried. Six retries take at least 2.5 s
        # of backoff, in which the outage's end was checked at least twice.
        async def retried_six_times() -> bool:
            samples = await asyncio.to_thread(scrape, address)
            return value(samples, "financing_messages_total", **retried) >= 6

        await infra.wait_until(retried_six_times, timeout=30, what="six retries")

        # Regression (a probe): the outage's cause, when it began with its sessions ended
        # ("terminating connection"), was never said.
        def lines() -> list[str]:
            return [event for _, event in target.outage_lines("command database")]

        async def said_why() -> bool:
            return "command database still unavailable" in lines()

        # A check each second, each behind the retries for a session on a loaded machine.
        await infra.wait_until(said_why, timeout=30, what="the outage said to await writes")
        assert lines() == ["command database unavailable", "command database still unavailable"]
        [why] = [
            line["error"]
            for line in target.json_log()
            if line["event"] == "command database still unavailable"
        ]
        assert why.startswith("it takes no writes: its transactions are read-only"), why
        assert not running.done()
    finally:
        await infra.set_read_only(commands_db, False)
    await terminate_sessions([commands_db], wait=True)  # they come back writable
    await running
    await settle(target)
    await verify_effects(target, workload)
    await assert_outages_logged_once(
        target,
        "command database",
        [
            "command database unavailable",
            "command database still unavailable",
            "command database recovered",
        ],
    )
    assert target.service.running and target.starts() == 1


async def test_a_role_granted_only_what_the_service_needs_runs_it_without_an_outage(
    deploy: Deploy,
) -> None:
    """Regression (a probe): with its tables migrated by their owner and its role granted
    the privileges docs/deployment.md lists, the service did not start (it asked for
    CREATE on the schema to make a table that was there), and its pruning of
    deduplication records, which locks the rows it deletes, began an outage at every run
    for want of UPDATE."""
    target = await deploy("own_role", own_role=True)
    workload = Workload(target, seed=suite_seed(), concurrency=4)
    await workload.run(sagas=12)
    await settle(target)
    await verify_effects(target, workload)
    for dependency in DATABASES:
        assert target.outage_lines(dependency) == [], target.log_tail()


async def test_a_privilege_revoked_from_pruning_is_one_outage_until_it_is_granted(
    deploy: Deploy,
) -> None:
    """Regression: a privilege that only an occasional statement needs (pruning the
    deduplication records at start-up and every 5 minutes) began an outage at each run
    and ended it at the next check, which asked only whether the database takes writes:
    `/health` said healthy between runs, while the records were never pruned."""
    target = await deploy("revoked_pruning", own_role=True)
    role = service_role(target.name)
    grant = "UPDATE ON processed_messages"
    await target.event_pool.execute(f'REVOKE {grant} FROM "{role}"')
    assert await target.service.stop() == 0
    await target.service.start()  # pruning runs as it starts

    def lines() -> list[str]:
        return [event for _, event in target.outage_lines("command database")]

    lacking = "lacks privileges the service needs: processed_messages (UPDATE)"

    async def told() -> bool:
        # Said as the outage begins (the health probe found it first) or once it is
        # under way (pruning's refused statement began it).
        return any(
            lacking in line.get("error", "")
            for line in target.json_log()
            if line["event"].startswith("command database")
        )

    await infra.wait_until(told, timeout=30, what="the outage said to await a grant")
    workload = Workload(target, seed=suite_seed(), concurrency=2)
    await workload.run(sagas=4)  # the service works on meanwhile, and the outage stays
    assert "command database recovered" not in lines(), lines()

    await target.event_pool.execute(f'GRANT {grant} TO "{role}"')

    async def recovered() -> bool:
        return "command database recovered" in lines()

    await infra.wait_until(recovered, timeout=30, what="the outage over once granted")
    assert lines() in (
        ["command database unavailable", "command database recovered"],
        [
            "command database unavailable",
            "command database still unavailable",
            "command database recovered",
        ],
    )
    await settle(target)
    await verify_effects(target, workload)


async def test_a_unique_index_dropped_under_the_service_is_one_outage_until_it_is_made_again(
    deploy: Deploy,
) -> None:
    """Regression (a DBA's probe): indexes a DBA dropped went unnoticed. Without the unique
    key of a stream's versions two writers can both append one version, and no statement
    fails: the service's health watch looks every second, says the outage once with what
    makes the index again, holds the database's writes meanwhile, and ends it once it is
    back."""
    target = await deploy("dropped_index")
    address = "{}:{}".format(*target.metrics_address)
    [stream_version] = [i for i in INDEXES["commands"] if i.name == "events_stream_version"]
    await target.event_pool.execute("ALTER TABLE events DROP CONSTRAINT events_stream_version")

    def lines() -> list[str]:
        return [event for _, event in target.outage_lines("command database")]

    async def told() -> bool:
        return "command database unavailable" in lines()

    await infra.wait_until(told, what="the dropped index said")
    [said] = [line for line in target.json_log() if line["event"] == "command database unavailable"]
    assert "unique index events_stream_version of events" in said["error"], said
    assert stream_version.remedy in said["error"], said

    # A registration meanwhile is tried, and written only once the index is back.
    issuer = uuid.uuid4()
    registering = IntegrationPublisher(target.amqp_url)
    try:
        event = IssuerRegistered(id=issuer, name_="held")
        await registering.publish(
            Envelope(message_id=str(uuid.uuid4()), name=event.name(), body=codec.encode(event))
        )
    finally:
        await registering.close()

    async def held() -> bool:
        retried = value(scrape(address), "financing_messages_total", outcome="retried")
        return retried >= 2

    await infra.wait_until(held, what="the registration tried and held")
    store = PostgresEventStore(target.event_pool)
    assert await store.stream(issuer) == []
    restored_at = await target.event_pool.fetchval("SELECT now()")
    await target.event_pool.execute(stream_version.remedy)

    async def recovered() -> bool:
        return "command database recovered" in lines()

    await infra.wait_until(recovered, timeout=30, what="the outage over once the index is back")
    assert lines() == ["command database unavailable", "command database recovered"]

    async def created() -> bool:
        return bool(await store.stream(issuer))

    await infra.wait_until(created, what="the registration written once the index is back")
    [written] = await store.stream(issuer)
    assert written.recorded_at >= restored_at, (written.recorded_at, restored_at)
    workload = Workload(target, seed=suite_seed(), concurrency=2)
    await workload.run(sagas=4)
    await settle(target)
    await verify_effects(target, workload)


async def test_a_bid_whose_sale_an_outage_held_up_waits_for_it_past_its_wait(
    deploy: Deploy,
) -> None:
    """Regression (a probe): the command database's disk full for 100 s, its reads
    answered and its writes refused: a bid sent right after its invoice's sale was
    deferred while the sale could not be written, then dead-lettered once its wait ran
    out (880 bids in one run), the invoice there a moment later and never financed; and
    `financing check` said OK. A dependency out during the wait gives it a wait more."""
    target = await deploy("held_up_sale")  # FINANCING_AGGREGATE_WAIT=2
    commands_db, _ = target.databases
    address = "{}:{}".format(*target.metrics_address)
    read_models = PostgresReadModels(target.query_pool)
    issuer, investor = uuid.uuid4(), uuid.uuid4()
    registering = IntegrationPublisher(target.amqp_url)
    try:
        for event in (
            IssuerRegistered(id=issuer, name_="held up"),
            InvestorRegistered(id=investor, name_="held up", balance=Decimal(100)),
        ):
            await registering.publish(
                Envelope(message_id=str(uuid.uuid4()), name=event.name(), body=codec.encode(event))
            )
    finally:
        await registering.close()

    async def registered() -> bool:
        return bool(await read_models.issuers()) and bool(await read_models.investors())

    await infra.wait_until(registered, what="the issuer and the investor")

    def counted(outcome: str) -> float:
        samples = scrape(address)
        return value(samples, "financing_messages_total", queue="BidOnInvoice", outcome=outcome)

    await infra.set_read_only(commands_db, True)  # as a full disk: reads answered, no write
    try:
        await terminate_sessions([commands_db], wait=True)
        channel = Channel(*target.command_address)
        try:
            commands = CommandsStub(channel)
            sold = await commands.sell_invoice(
                SellInvoiceCommand(issuer_id=Uuid(str(issuer)), asking_price=Money(10.0))
            )
            await commands.bid_on_invoice(
                BidOnInvoiceCommand(
                    investor_id=Uuid(str(investor)), invoice_id=sold, bid=Money(20.0)
                )
            )
        finally:
            channel.close()

        async def past_its_wait() -> bool:  # deferrals of at most 0.5 s: more than 2 s
            return counted("deferred") >= 10 or counted("dead_lettered") > 0

        await infra.wait_until(past_its_wait, timeout=30, what="the bid past its wait")
    finally:
        await infra.set_read_only(commands_db, False)
    await terminate_sessions([commands_db], wait=True)

    async def financed() -> bool:
        return any(
            row.id == uuid.UUID(sold.value) and row.status is InvoiceStatus.FINANCED
            for row in await read_models.invoices()
        )

    await infra.wait_until(financed, timeout=30, what="the invoice financed by the bid")
    assert counted("dead_lettered") == 0
    await settle(target)


# How long the service waits for PostgreSQL in the silent-server tests (FINANCING_DB_TIMEOUT).
ANSWER_TIMEOUT = 2.0
# What a loaded machine adds to it before a call is answered.
ANSWER_MARGIN = 5.0
DATABASES = ("command database", "query database")


@pytest.fixture
async def postgres_relay() -> AsyncIterator[Relay]:
    """A relay to PostgreSQL the test can silence; asked for before `deploy`, it outlives
    the deployment, which then stops with its databases in reach."""
    relay = Relay(infra.PG_HOST, infra.PG_PORT)
    await relay.start()
    yield relay
    await relay.close()


async def deploy_behind(relay: Relay, deploy: Deploy, prefix: str) -> Deployment:
    return await deploy(
        prefix,
        {"FINANCING_DB_TIMEOUT": str(int(ANSWER_TIMEOUT))},
        database_via=("127.0.0.1", relay.port),
    )


async def test_a_database_that_stops_answering_is_one_outage_that_ends_when_it_answers(
    postgres_relay: Relay, deploy: Deploy
) -> None:
    """Regression: a PostgreSQL that stops answering without closing its sockets (a frozen
    server, a partition that drops packets) held every statement sent to it without end.
    No outage was seen, Queries calls ran into their callers' deadlines, and nothing
    would have healed on a connection the server had lost."""
    relay = postgres_relay
    target = await deploy_behind(relay, deploy, "silent_database")
    workload = Workload(target, seed=suite_seed(), concurrency=4)
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))
    channel = Channel(*target.query_address)
    try:

        async def two_sagas_done() -> bool:
            return workload.stats.sagas_completed >= 2

        await infra.wait_until(two_sagas_done, timeout=60, what="two sagas")
        relay.silence()
        started = time.monotonic()
        with pytest.raises(GRPCError) as silent:
            await QueriesStub(channel).all_investors(Empty(), timeout=60)
        answered_in = time.monotonic() - started

        async def both_out() -> bool:
            events = target.log_events()
            return all(f"{db} unavailable" in events for db in DATABASES)

        await infra.wait_until(both_out, timeout=30, what="both databases' outages logged")
        assert not running.done(), running
        relay.restore()
        enough.set()
        await running
    finally:
        relay.restore()
        running.cancel()
        channel.close()
    await settle(target)
    await verify_effects(target, workload)
    assert silent.value.status is Status.UNAVAILABLE, silent.value
    assert "query database" in (silent.value.message or ""), silent.value.message
    assert answered_in < ANSWER_TIMEOUT + ANSWER_MARGIN, answered_in
    for database in DATABASES:
        await assert_outages_logged_once(
            target, database, [f"{database} unavailable", f"{database} recovered"]
        )
    assert target.service.running and target.starts() == 1
    record_workload(workload)
    add_figure("silent database outages survived", 1)
    set_figure("silent database: seconds until Queries answered UNAVAILABLE", round(answered_in, 1))


async def test_the_service_stops_on_sigterm_while_its_database_is_silent(
    postgres_relay: Relay, deploy: Deploy
) -> None:
    """Regression: closing its pools waited for a server that no longer answered, so a
    SIGTERM never ended the process."""
    relay = postgres_relay
    target = await deploy_behind(relay, deploy, "silent_database_stop")
    workload = Workload(target, seed=suite_seed(), concurrency=2)
    await workload.run(sagas=2)
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))  # statements in flight
    try:
        relay.silence()

        async def commands_out() -> bool:
            return "command database unavailable" in target.log_events()

        await infra.wait_until(
            commands_out, timeout=30, what="the command database's outage logged"
        )
        started = time.monotonic()
        code = await target.service.stop(within=STOPS_WITHIN)
        stopped_in = time.monotonic() - started
    finally:
        enough.set()
        running.cancel()
        relay.restore()
    await asyncio.gather(running, return_exceptions=True)
    assert code == 0, target.log_tail()
    assert "service stopped" in target.log_events(), target.log_tail()
    set_figure("silent database: seconds from SIGTERM to exit", round(stopped_in, 1))
