"""`financing status`: is the deployment healthy, and how far behind is each part?

Reported: whether each database and the broker answer, the relayer's
checkpoint and the events waiting behind it, the projector's backlog, the
depth and consumers of every queue of the topology, the dead letters waiting,
and the messages deferred to wait for an aggregate.
The exit code says whether the deployment is healthy (HEALTHY), so the
command serves as a probe. Each inquiry is bounded by a timeout: a probe that
hangs is no probe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import (
    COMMAND_DATABASE,
    QUERY_DATABASE,
    SERVICE_APPLICATION,
    acquired,
    close_connection,
    connect,
    tables_locked,
)
from financing.adapters.postgres.event_store import IDS_AHEAD_DETAIL
from financing.adapters.postgres.outbox import (
    ANOTHER_DEPLOYMENT,
    PostgresOutbox,
    RelayBacklog,
    left_holding,
)
from financing.adapters.postgres.projected_store import projected, store_of
from financing.adapters.postgres.rebuild import holds_history, read_models_empty
from financing.adapters.postgres.schema import (
    DATABASES,
    NEEDED_TABLES,
    SchemaAhead,
    SchemaBehind,
    SchemaElsewhere,
    indexes_lacking,
    said_lacking,
)
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import (
    UNVERIFIED,
    VHOST_REFUSED,
    connected,
    describe_url,
    unverified,
)
from financing.adapters.rabbitmq.dead_letters import being_read
from financing.adapters.rabbitmq.queues import queue_depth
from financing.application.errors import AwaitingOperator, Refused, Unavailable, summary
from financing.application.moments import moment
from financing.config import Database, Settings
from financing.entrypoints.cli.console import database, table, write_lines
from financing.entrypoints.cli.health_check import health_answer, reachable
from financing.workers.projector import BATCH_SIZE

HEALTHY = """\
Healthy (exit code 0; otherwise 1) means:
  - the command database, the query database and the broker answer, and each
    database holds this release's schema and takes the service's writes;
  - the query database holds the read models of this deployment's event store
    (or of none yet), and they hold something where the event store does;
  - every queue the service consumes exists and has at least one consumer;
  - no event has waited longer than --max-relay-lag seconds to be relayed;
  - no table of the service's is locked against its reads or writes (LOCK
    TABLE, REINDEX, CLUSTER) by a transaction open 5 s or more;
  - no index the service relies on is dropped or invalid;
  - the service on this host, where its metrics endpoint (METRICS_ADDRESS)
    answers, says it is healthy (/health): it knows of outages that answering
    alone does not show (a disk full, its writes refused).
Dead letters, deferred messages, the projector's backlog, a broker whose
certificate is not verified, and a virtual host that refuses this command's
connection while the service here says it is healthy (a connection limit its
own connections reach) are reported, not judged."""
MAX_RELAY_LAG = 10.0
TIMEOUT = 5.0


@dataclass
class Findings:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # The event store the database is, or whose read models it holds (projected_store).
    store: UUID | None = None
    # The service on this host said it is healthy; the broker's virtual host refused this
    # command's connection (a limit, its permissions, or none such).
    healthy: bool = False
    vhost_refused: bool = False
    # The database the inquiry reached (it answered and holds the schema): a timeout after
    # is a statement that waited, not a server that does not answer.
    reached: tuple[Database, str] | None = None  # and its schema
    # The database the inquiry asks (and its schema), reached or not: a timeout before it
    # was reached may be a statement waiting on a lock (of `schema_migrations`).
    asked: tuple[Database, str] | None = None
    # The event store holds events; the read models hold none (made anew, or dropped).
    history: bool = False
    empty: bool = False

    def report(self, part: str, state: str) -> None:
        self.lines.append(f"{part:<17} {state}")


def consumed_queues() -> list[topology.QueueSpec]:
    """Every queue a component of the service consumes."""
    return list(topology.CONSUMED_QUEUES)


async def run_status(
    settings: Settings, *, max_relay_lag: float = MAX_RELAY_LAG, answer_within: float = TIMEOUT
) -> int:
    """Print the status; exit code 0 when healthy, 1 otherwise. The three inquiries run
    side by side, so that a probe of silent dependencies answers within one timeout."""
    event_store, read_models, broker, service = Findings(), Findings(), Findings(), Findings()
    brokers = ", ".join(describe_url(url) for url in settings.amqp_urls)
    await asyncio.gather(
        _inquire(
            event_store,
            ("command database", settings.command_db.describe()),
            lambda: _event_store(settings, event_store, max_relay_lag),
            answer_within,
        ),
        _inquire(
            read_models,
            ("query database", settings.query_db.describe()),
            lambda: _read_models(settings, read_models),
            answer_within,
        ),
        _inquire(broker, ("broker", brokers), lambda: _broker(settings, broker), answer_within),
        _local_service(settings, service),
    )
    if (
        None not in (event_store.store, read_models.store)
        and event_store.store != read_models.store
    ):
        read_models.report(
            "read models",
            f"of event store {read_models.store}, NOT this deployment's"
            f" ({event_store.store}): the service refuses to start on them",
        )
        read_models.problems.append(
            "the query database holds the read models of another event store"
        )
    if event_store.history and read_models.empty:
        # What a Queries-only or projector-only process serves on a query database made
        # anew: a process that runs the projector with the command database rebuilds it
        # as it starts.
        read_models.report(
            "read models",
            "HOLD NOTHING while the event store holds events (a query database made anew,"
            " or its read models dropped): `financing projections rebuild` builds them; a"
            " process that runs the projector with the command database does so as it"
            " starts",
        )
        read_models.problems.append(
            "the read models hold nothing while the event store holds events"
        )
    if broker.vhost_refused and service.healthy:
        # The service, on the same virtual host with the same user, holds its connections:
        # a connection limit they reach leaves none for this command, which is no outage.
        broker = Findings()
        broker.report(
            "broker",
            f"{brokers}: NOT LOOKED AT: its virtual host refused this command's connection"
            " while the service here says it is healthy: a connection limit its own"
            " connections reach leaves none for another (rabbitmqctl list_vhost_limits,"
            " list_user_limits), or the user's permissions on it were taken away since the"
            " service connected (rabbitmqctl list_permissions -p VHOST), which its next"
            " publish meets; the queues are the service's /health's to judge",
        )
    for url in unverified(settings.amqp_urls):
        broker.report("broker TLS", f"{describe_url(url)}: {UNVERIFIED}")
    findings = Findings(
        [*event_store.lines, *read_models.lines, *service.lines, *broker.lines],
        [*event_store.problems, *read_models.problems, *service.problems, *broker.problems],
    )
    write_lines(findings.lines)
    if findings.problems:
        write_lines(["UNHEALTHY:", *(f"  - {problem}" for problem in findings.problems)])
        return 1
    print("healthy")
    return 0


async def _inquire(
    findings: Findings,
    named: tuple[str, str],
    inquiry: Callable[[], Awaitable[None]],
    within: float,
) -> None:
    """`inquiry` of the part `named` (its name, and where it is), within `within` s: what
    it cannot tell is said on the part's line, in the column of what it tells."""
    part, where = named
    what = f"{part} {where}"
    try:
        async with asyncio.timeout(within):
            await inquiry()
    except (SchemaBehind, SchemaAhead) as error:
        findings.report(part, f"{where}: NOT READY: {error}")
        findings.problems.append(f"{what}: its schema is not this release's")
    except SchemaElsewhere as error:
        findings.report(part, f"{where}: NOT READY: {error}")
        findings.problems.append(f"{what}: the service would not start on it (search_path)")
    except AwaitingOperator as error:
        findings.report(part, f"{where}: NOT READY: {error.detail}")
        # What is wrong, without what ends it (the part's line says that): its tables
        # gone, or their rows hidden, or its sessions not its own.
        findings.problems.append(f"{what}: {error.detail.split(': ', 1)[0]}")
    except (Unavailable, Refused) as error:
        findings.report(part, f"{where}: UNREACHABLE: {error}")
        findings.problems.append(f"{what} is unreachable")
    except TimeoutError:
        # Said UNREACHABLE, a table locked by a DBA (LOCK TABLE, REINDEX, CLUSTER) sent
        # the operator looking at the network: before the schema was read too (a lock of
        # `schema_migrations`), and the summary named neither table nor holder.
        asked = findings.reached or findings.asked
        locks = await _lock_holders(*asked, part) if asked is not None else []
        if findings.reached is None and not locks:
            findings.report(part, f"{where}: UNREACHABLE: no answer within {within:g} s")
            findings.problems.append(f"{what} is unreachable")
            return
        waited = f"it answers, but a statement waited more than {within:g} s"
        on = f" on {'; '.join(locks)}" if locks else ""
        findings.report(
            part,
            f"{where}: NOT READY: {waited}"
            + (on or " (on a lock another session holds, or that slow)"),
        )
        findings.problems.append(f"{what}: {waited}{on}")
    except Exception as error:  # a probe reports what it cannot tell rather than crash
        findings.report(part, f"{where}: FAILED: {summary(error)}")
        findings.problems.append(f"{what} could not be inquired into")


# Seconds a lock of one of the service's tables may be held before status says who
# holds it (a migration's or a rebuild's swap holds one for moments).
LOCKED_SAID = 5.0


async def _tables_locked(pool: asyncpg.Pool, schema: str) -> list[tuple[str, str]]:
    """(table, holder) of each of the service's tables of `schema` locked against its
    writes or reads by a transaction open LOCKED_SAID seconds or more (a DBA's LOCK
    TABLE, REINDEX, CLUSTER): the service's statements on it wait, its `/health` soon
    503. A lock on another schema's table is none of the service's."""
    async with acquired(pool, DATABASES[schema]) as conn:
        locks = await tables_locked(conn, NEEDED_TABLES[schema], LOCKED_SAID)
    return [(locked, holder.describe()) for locked, holder in locks]


def _said_locked(findings: Findings, part: str, locked: list[tuple[str, str]]) -> None:
    for locked_table, holder in locked:
        findings.report("table locked", f"{locked_table} by {holder}")
        findings.problems.append(
            f"{part}: table {locked_table} is locked by {holder}: the service's statements on"
            " it wait"
        )


async def _indexes_lacking(pool: asyncpg.Pool, schema: str) -> list[str]:
    """What each index the service relies on, and the database lacks or holds invalid,
    keeps right or fast, and what makes it again."""
    async with acquired(pool, DATABASES[schema]) as conn:
        return [said_lacking(index) for index in await indexes_lacking(conn, schema)]


def _said_lacking(findings: Findings, part: str, lacking: list[str]) -> None:
    for said in lacking:
        findings.report("index lacking", said)
        findings.problems.append(f"{part}: lacks the {said}")


async def _lock_holders(db: Database, schema: str, part: str) -> list[str]:
    """Each session holding a lock on one of the service's tables of `db` (its schema's
    record of migrations too) that stops reads or writes, with the tables it holds so:
    what a statement that waited may wait for; none where they cannot be told within a
    second."""
    try:
        async with asyncio.timeout(1.0):
            conn = await connect(db, part, application_name="financing status")
            try:
                locks = await tables_locked(conn, (*NEEDED_TABLES[schema], "schema_migrations"))
            finally:
                await close_connection(conn)
    except (TimeoutError, Unavailable, Refused):
        return []
    held: dict[int, tuple[list[str], str]] = {}  # by holder, each once
    for locked, holder in locks:
        held.setdefault(holder.pid, ([], holder.describe()))[0].append(locked)
    return [f"table {', '.join(tables)} locked by {holder}" for tables, holder in held.values()]


async def _local_service(settings: Settings, findings: Findings) -> None:
    """What the service on this host says of itself (its /health), where one answers; a
    host where none answers (the command run from elsewhere), or where another program
    answers, is not judged."""
    if settings.metrics_address is None:
        return
    host, port = reachable(settings.metrics_address)
    where = f"http://{host}:{port}/health"
    answer = await health_answer(settings.metrics_address)
    if answer.status is None:
        findings.report("service", f"{where}: no answer here ({answer.said}), not judged")
    elif not answer.ours:  # another program listens there
        findings.report("service", f"{where}: not the service's answer ({answer.said}), not judged")
    elif answer.status == 200:
        findings.report("service", f"{where}: healthy")
        findings.healthy = True
    else:
        findings.report("service", f"{where}: NOT HEALTHY: {answer.said}")
        findings.problems.append(f"the service at {where} says: {answer.said}")


async def _event_store(settings: Settings, findings: Findings, max_relay_lag: float) -> None:
    findings.asked = settings.command_db, "commands"
    async with database(
        settings.command_db, COMMAND_DATABASE, "status", schema="commands", writes=True
    ) as pool:
        findings.reached = settings.command_db, "commands"
        backlog = await PostgresOutbox(pool).backlog(held_back_after=max_relay_lag)
        findings.store = await store_of(pool)
        findings.history = await holds_history(pool)
        locked = await _tables_locked(pool, "commands")
        lacking = await _indexes_lacking(pool, "commands")
    findings.report("command database", f"{settings.command_db.describe()}: reachable")
    _said_locked(findings, "command database", locked)
    _said_lacking(findings, "command database", lacking)
    findings.report("relayer", _relaying(backlog))
    if backlog.ids_ahead:
        findings.problems.append(IDS_AHEAD_DETAIL)
    elif backlog.waiting and backlog.oldest_age > max_relay_lag:
        findings.problems.append(
            f"an event has waited {backlog.oldest_age:.1f} s to be relayed"
            f" (at most {max_relay_lag:g} s is healthy){_why_waiting(backlog)}"
        )


def _why_waiting(backlog: RelayBacklog) -> str:
    """What an unhealthy relay lag waits for, as far as the database tells."""
    if backlog.held_back_by is not None:
        return f", behind {backlog.held_back_by.behind()}"
    if backlog.relayer is None:
        return ", and no session holds the relayer lock: no instance runs the relayer"
    if backlog.relayer_elsewhere:
        return f": {ANOTHER_DEPLOYMENT} ({backlog.relayer.describe()})"
    if backlog.relayer.application != SERVICE_APPLICATION:
        return f", and the relayer lock is held by {backlog.relayer.describe()}, no relayer"
    if left := left_holding(backlog.relayer):
        return f", and the relayer lock is held by {backlog.relayer.describe()}: {left}"
    return ""


def _relaying(backlog: RelayBacklog) -> str:
    if backlog.ids_ahead:
        # The lag compares the store's ids with the server's: it says nothing here.
        return "NOT READY: the event store's transaction ids are ahead of this server's"
    if backlog.checkpoint is None:
        checkpoint = "nothing relayed yet"
    else:
        checkpoint = f"relayed up to position {backlog.checkpoint} at {moment(backlog.moved_at)}"
    if not backlog.waiting:
        return f"{checkpoint}; no event waiting"
    return (
        f"{checkpoint}; {backlog.waiting} event(s) waiting,"
        f" the oldest for {backlog.oldest_age:.1f} s"
    )


async def _read_models(settings: Settings, findings: Findings) -> None:
    findings.asked = settings.query_db, "queries"
    async with (
        database(
            settings.query_db, QUERY_DATABASE, "status", schema="queries", writes=True
        ) as pool,
    ):
        findings.reached = settings.query_db, "queries"
        async with acquired(pool, QUERY_DATABASE) as conn:
            found = await projected(conn)
        locked = await _tables_locked(pool, "queries")
        if not locked:  # a read of a locked read model would wait on it
            findings.empty = await read_models_empty(pool)
        lacking = await _indexes_lacking(pool, "queries")
    findings.report("query database", f"{settings.query_db.describe()}: reachable")
    _said_locked(findings, "query database", locked)
    _said_lacking(findings, "query database", lacking)
    if found is None:
        findings.report("read models", "of no event store yet (recorded as the service starts)")
    else:
        findings.store = found.store


async def _broker(settings: Settings, findings: Findings) -> None:
    try:
        async with connected(settings.amqp_urls, "status") as broker:
            consumed = {
                spec.name: await queue_depth(broker, spec.name) for spec in consumed_queues()
            }
            dead = await queue_depth(broker, topology.DEAD_LETTER_QUEUE)
            read = await being_read(broker)
            deferred = await queue_depth(broker, topology.DEFERRALS)
            reference = await queue_depth(broker, topology.REFERENCE_PROJECTOR_QUEUE)
    except Unavailable as error:
        findings.vhost_refused = VHOST_REFUSED in error.detail
        raise
    brokers = ", ".join(describe_url(url) for url in settings.amqp_urls)
    findings.report("broker", f"{brokers}: reachable")
    projector = consumed[topology.PROJECTOR_QUEUE]
    findings.report(
        "projector",
        "queue missing"
        if projector is None
        else f"{projector.waiting} message(s) not yet delivered in {topology.PROJECTOR_QUEUE}"
        # The broker counts none of those its consumer holds: up to a batch, said while
        # one reads (an idle deployment's projector holds none, but the broker cannot
        # tell).
        + (
            f" (and the projector may hold up to {BATCH_SIZE} delivered, not yet projected)"
            if projector.consumers
            else ""
        ),
    )
    reading = " (and those a command reading them now holds)" if read and dead else ""
    findings.report(
        "dead letters",
        "queue missing"
        if dead is None
        else f"{dead.waiting} message(s) waiting{reading} in {topology.DEAD_LETTER_QUEUE}",
    )
    # Waiting for an aggregate another message creates, to be delivered again.
    findings.report(
        "deferred",
        "queue missing"
        if deferred is None
        else f"{deferred.waiting} message(s) waiting for an aggregate in {topology.DEFERRALS}",
    )
    if reference is not None:  # left by the reference on a broker it used
        findings.report(
            "reference queue",
            f"{reference.waiting} message(s) waiting in {topology.REFERENCE_PROJECTOR_QUEUE},"
            f" the reference projector's, read by {reference.consumers} consumer(s)"
            + (
                ""
                if reference.consumers
                else " (read by no one: a running service unbinds it from `events` once it"
                " found it so twice, 30 s apart; delete it once what it holds is of no use)"
            ),
        )
    rows = [
        (name, "missing", "-") if depth is None else (name, depth.waiting, depth.consumers)
        for name, depth in sorted(consumed.items())
    ]
    findings.lines += ["", *table(("QUEUE", "READY", "CONSUMERS"), rows), ""]
    # The broker tells a client only the messages ready for delivery: those its consumers
    # hold unsettled (a prefetch window each, the projector's batch) are not among them.
    findings.lines += [
        "READY: not yet delivered (those delivered and not settled are not counted)",
        "",
    ]
    # The queues nobody consumes are declared at start-up and again while the service runs
    # (a queue missing before its first start, or deleted under it: an `expires` policy).
    for name, depth in ((topology.DEAD_LETTER_QUEUE, dead), (topology.DEFERRALS, deferred)):
        if depth is None:
            findings.problems.append(f"queue {name} does not exist")
    for name, depth in sorted(consumed.items()):
        if depth is None:
            findings.problems.append(f"queue {name} does not exist")
        elif not depth.consumers:
            findings.problems.append(f"queue {name} has no consumer")
