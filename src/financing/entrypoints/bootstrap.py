"""The composition root: from settings to named, wired components.

Opens the shared resources (one asyncpg pool per database, one broker
connection, one confirming publisher), declares the broker topology, and wires
each handler to its queue through the delivery pipeline. What it returns is
run by the supervisor. Tests replace parts through `Overrides`, as fakes are
injected into a bootstrap function.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, NoReturn, Protocol, TypeVar
from uuid import UUID

import asyncpg
from aio_pika.abc import AbstractConnection

from financing import metrics, release
from financing.adapters.postgres.clock import DatabaseClock
from financing.adapters.postgres.connection import (
    CHECK_SESSIONS,
    COMMAND_DATABASE,
    QUERY_DATABASE,
    SessionLimits,
    close_pool,
    create_pool,
    has_room,
    hold_pool,
    ping,
    pooled_sessions,
    refuse_pooled_sessions,
    role_sessions,
    session_limits,
    too_few_sessions,
    translated,
    writable,
)
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.inspection import Inspection
from financing.adapters.postgres.outbox import CommitListener, PostgresOutbox, PostgresRelayerLock
from financing.adapters.postgres.projected_store import RecordedStore, claim, store_of
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.adapters.postgres.rebuild import (
    LIVE_DROPPED,
    drop_made_empty,
    holds_history,
    made_empty,
    rebuild,
)
from financing.adapters.postgres.retention import deduplication_records
from financing.adapters.postgres.schema import (
    DATABASES,
    latest,
    migrate,
    missing,
    require_indexes,
)
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import BROKER, Broker
from financing.adapters.rabbitmq.consumer import (
    Deliveries,
    LastProcessed,
    QueueConsumer,
    consume,
)
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.depth_watch import DepthWatch
from financing.adapters.rabbitmq.publisher import AmqpCommandSender, Publisher
from financing.adapters.rabbitmq.topology_watch import TopologyWatch
from financing.application import routes
from financing.application.errors import AwaitingOperator, Fault, Unavailable, classify
from financing.application.pace import RelayPace
from financing.application.pipeline import (
    Handler,
    HandlerPart,
    SendingHandler,
    Step,
    StoreHandler,
    exactly_once,
    retried,
    sending,
)
from financing.application.ports import CommandSender, EventStore, ProjectedStore
from financing.application.read_models import ReadModelStore
from financing.application.retry import (
    DELIVERIES,
    NO_BUG_RETRIES,
    OUTAGE_CHECK_INTERVAL,
    GaveUp,
    Outages,
    RetryPolicy,
    retry,
    retry_or_raise,
)
from financing.config import COMPONENTS, Database, Settings
from financing.entrypoints.connections import descriptors_needed
from financing.entrypoints.garbage import collect_in_full
from financing.entrypoints.grpc.calls import CallsInFlight
from financing.entrypoints.grpc.codec import FramingChecked, RequestCodec
from financing.entrypoints.grpc.commands import CommandsService, correlate
from financing.entrypoints.grpc.edge import GrpcServer, connection_limit
from financing.entrypoints.grpc.health import HealthWatch, Probe, Readiness, health_service
from financing.entrypoints.grpc.queries import QueriesService
from financing.entrypoints.grpc.reflection import with_reflection
from financing.entrypoints.grpc.tls_watch import ServerTls
from financing.entrypoints.observability import (
    Metered,
    MetricsEndpoint,
    observe_grpc,
    observe_pool,
    observe_replies,
    observe_turns,
    watch_event_loop,
)
from financing.logging import get_logger
from financing.tls_files import UnusableFiles
from financing.workers.projector import Projector
from financing.workers.relayer import Relayer
from financing.workers.retention import Retention

log = get_logger(__name__)

T = TypeVar("T")

NEEDS_COMMAND_DB = frozenset({"commands", "policies", "relayer"})
NEEDS_QUERY_DB = frozenset({"queries-api", "projector"})
# Who records processed message ids, in the command database and in the query database:
# the processes that prune them (a process serving queries alone writes nothing).
RECORDS_COMMANDS = frozenset({"commands", "policies"})
RECORDS_PROJECTIONS = frozenset({"projector"})
NEEDS_BROKER = frozenset(COMPONENTS) - {"queries-api"}
CONSUMES_EVENTS = frozenset({"integration", "policies", "projector"})
CONSUMES = CONSUMES_EVENTS | {"commands"}
APPENDS = frozenset({"commands", "policies"})
GRPC_COMPONENTS = frozenset({"commands-api", "queries-api"})

# Deliveries a command or policy consumer works on at once.
PREFETCH = 32


class StartupError(Exception):
    """A dependency refused the service, or stayed unreachable for the whole start-up budget."""


@dataclass(frozen=True)
class Overrides:
    """What tests change in the wiring: parts around every handler, a read-model wrapper."""

    handler_parts: Sequence[HandlerPart] = ()
    read_models: Callable[[ReadModelStore], ReadModelStore] = lambda store: store


NO_OVERRIDES = Overrides()


class Listening(Protocol):
    """A server on a port: the gRPC servers, the metrics endpoint."""

    async def start(self, host: str, port: int) -> None: ...

    def go_away(self) -> None:
        """Shutting down begins: tell clients to take new calls elsewhere."""

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


@dataclass(frozen=True)
class Listener:
    name: str
    server: Listening
    address: tuple[str, int]


@dataclass
class Service:
    """The wired components, ready to be run by the supervisor."""

    components: frozenset[str]
    workers: dict[str, Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)
    # Set by each consumer once the broker delivers to it, by queue: the service is ready
    # when all are.
    consuming: dict[str, asyncio.Event] = field(default_factory=dict)
    # The calls each gRPC service is answering: shutting down lets them finish first.
    calls: list[CallsInFlight] = field(default_factory=list)
    health: HealthWatch | None = None


async def bootstrap(
    settings: Settings,
    components: Iterable[str],
    stack: AsyncExitStack,
    *,
    deadline: float,
    overrides: Overrides = NO_OVERRIDES,
) -> Service:
    """Open what the selected components need (retrying until `deadline`) and wire them."""
    service = Service(frozenset(components))
    unknown = service.components - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components: {', '.join(sorted(unknown))}")
    selected = service.components
    tls = _grpc_tls(settings, service)
    outages = Outages()
    opened = await _databases(settings, selected, stack, outages, deadline)
    for schema, inspection in opened.inspections.items():
        service.workers[f"inspection-{schema}"] = inspection.run
    await _rebuilt_if_made_empty(service, opened, outages, deadline)
    service.workers["outages"] = outages.watch
    # Every process probes the dependencies it uses, whether or not it serves an API.
    _health(service, outages)
    service.workers["event-loop"] = watch_event_loop
    service.workers["garbage"] = collect_in_full
    if selected & NEEDS_BROKER:
        await _broker_components(
            settings, service, stack, outages, deadline, overrides, opened, tls
        )
    query_pool = opened.query_pool
    if query_pool is not None and "queries-api" in selected:
        queries = QueriesService(PostgresReadModels(query_pool), outages)
        # The API only reads: the projector's writes lacking keep it serving. One look a
        # second answers both (two, each of its own, said two lists of the privileges
        # lacking, one the other's part).
        inspection = opened.inspections["queries"]
        checks = outages.checks()
        probe = Probe(
            QUERY_DATABASE,
            _reading(query_pool, inspection) if inspection.writes else checks[QUERY_DATABASE],
        )
        server = _grpc_server(service, outages, queries, "Queries", probe, opened.own, tls)
        observe_replies(queries)
        service.listeners.append(Listener("queries-api", server, settings.query_address))
    _housekeeping(settings, service, outages, opened)
    return service


@dataclass(frozen=True)
class _Opened:
    """What `_databases` opened: a pool per database the components need (None: not
    needed), and the event store's name (None without the command database)."""

    command_pool: asyncpg.Pool | None
    query_pool: asyncpg.Pool | None
    store_name: str | None
    # The look at each database opened (by schema) for what only an operator gives back,
    # which its check reads: a worker of the service each.
    inspections: dict[str, Inspection]

    @property
    def own(self) -> int:
        """The file descriptors the process needs itself, left to it by its servers'
        callers."""
        pools = (self.command_pool, self.query_pool)
        return descriptors_needed(*(pool.get_max_size() for pool in pools if pool is not None))


async def _databases(
    settings: Settings,
    selected: frozenset[str],
    stack: AsyncExitStack,
    outages: Outages,
    deadline: float,
) -> _Opened:
    """The pools of the command and query databases the components need, each watched
    for its outages, and the event store's name, the query database's record of it
    checked where both are opened."""
    command_pool = query_pool = None
    limited: list[tuple[asyncpg.Pool, _Limited]] = []
    relayer = RELAYER_SESSIONS if "relayer" in selected else 0
    command = _Pooled(settings.command_db, COMMAND_DATABASE, "commands", relayer)
    projected = _Pooled(settings.query_db, QUERY_DATABASE, "queries", 0)
    wanted = bool(selected & NEEDS_COMMAND_DB), bool(selected & NEEDS_QUERY_DB)
    later = [projected] if wanted[1] else []
    if wanted[0]:
        command_pool = await _pool(stack, command, (limited, later), outages, deadline)
    if_new = None
    if command_pool is not None and wanted[1] and "projector" in selected:
        # A query database made anew under a store with a history: its empty read models
        # are dropped as they are made, and rebuilt (`_rebuilt_if_made_empty`).
        events = command_pool
        looking = "looking for the event store's history"
        if await started(looking, lambda: holds_history(events), outages, deadline):
            if_new = LIVE_DROPPED
    if wanted[1]:
        query_pool = await _pool(stack, projected, (limited, []), outages, deadline, if_new=if_new)
    # An outage of a database this process writes ends when it takes writes again; of one
    # it only reads, when it answers. Every component on the command database writes.
    inspections: dict[str, Inspection] = {}
    for pool, db, schema, writes in (
        (command_pool, settings.command_db, "commands", True),
        (query_pool, settings.query_db, "queries", bool(selected & RECORDS_PROJECTIONS)),
    ):
        if pool is not None:
            # A statement fails at FINANCING_DB_TIMEOUT at the latest (and the watch
            # looks once a period).
            within = db.answer_timeout + OUTAGE_CHECK_INTERVAL
            inspection = Inspection(pool, schema, writes=writes)
            inspections[schema] = inspection
            outages.check_with(
                DATABASES[schema],
                _answering(pool, inspection),
                attempts_within=within,
                answers_within=db.answer_timeout,
            )
        if pool is not None and writes:
            indexed = partial(require_indexes, pool, schema)
            await started(f"the {DATABASES[schema]}'s unique indexes", indexed, outages, deadline)
    store: UUID | None = None
    if command_pool is not None:
        commands = command_pool
        store = await started(
            "naming the event store", lambda: store_of(commands), outages, deadline
        )
    if store is not None and query_pool is not None:
        named, queries = store, query_pool
        await started(
            "the event store the query database projects",
            lambda: claim(queries, named),
            outages,
            deadline,
        )
    _hold_to_session_limits(limited)
    name = None if store is None else str(store)
    return _Opened(command_pool, query_pool, name, inspections)


async def _rebuilt_if_made_empty(
    service: Service, opened: _Opened, outages: Outages, deadline: float
) -> None:
    """Where the process projects and holds both databases: read models that hold nothing
    while the event store holds events (a query database lost and made again empty) are
    dropped before anything is served, and rebuilt from the event store by a worker. Made
    anew by a start-up's migration, they were served empty, by every instance, until an
    operator ran `financing projections rebuild`, and the projector applied later events
    to rows they lacked."""
    events, queries = opened.command_pool, opened.query_pool
    if events is None or queries is None or "projector" not in service.components:
        return
    looking = "looking for read models made empty under the event store's history"
    if not await started(looking, lambda: made_empty(events, queries), outages, deadline):
        return
    await started(looking, lambda: drop_made_empty(queries), outages, deadline)

    async def rebuilt() -> None:
        await retry_or_raise(
            lambda: rebuild(events, queries),
            policy=NO_BUG_RETRIES,
            outages=outages,
            what="rebuilding the read models",
        )
        # Done; a worker that returns stops the service, so this one waits for the stop.
        await asyncio.Event().wait()

    service.workers["read-models-rebuild"] = rebuilt


# The sessions a relayer opens beside its pool: the lock's and the commit listener's.
RELAYER_SESSIONS = 2


@dataclass(frozen=True)
class _Limited:
    """The limits of a pool's server on its sessions, read as it was opened."""

    dependency: str
    server: str  # its address
    limits: SessionLimits
    beside: int  # the sessions the process opens beside the pool (a relayer's)


# The pools opened so far with the limits on their sessions, and those still to open.
_Pools = tuple[list[tuple[asyncpg.Pool, "_Limited"]], Sequence["_Pooled"]]


async def _read_session_limits(pool: asyncpg.Pool, pooled: _Pooled, pools: _Pools) -> None:
    """Read, once as the pool is opened, the limits on the sessions of its role: start-up
    is refused at once where they leave fewer sessions than it needs to start or to run
    at all (a session for each pool, `refuse_pooled_sessions`' two, and a relayer's two),
    naming the limit and what the whole process needs (a pool still to open as the same
    role on the same server counted: said for the first pool alone, the need grew once
    the limit was raised to it); without this, it retried its whole budget and ended on
    "too many connections for role"."""
    limited, later = pools
    dependency, beside = pooled.dependency, pooled.beside
    try:
        limits = await session_limits(pool, dependency)
    except Unavailable:  # the outage says it; the limits are looked at once only
        return
    server = pooled.server
    # A pool still to open as the same role there: its database's own limit is not known.
    alike = [
        (
            other,
            replace(
                limits, database=str(other.db.connect_kwargs.get("database")), database_limit=None
            ),
        )
        for other in later
        if other.server == server and other.user == pooled.user
    ]
    opened = [(had.server, had.limits, 1) for _, had in limited]
    starting = [*opened, (server, limits, 1 + CHECK_SESSIONS)]
    last_starting = [*opened, (server, limits, 1)]
    last_starting += [(server, their, 1) for _, their in alike[:-1]]
    last_starting += [(server, their, 1 + CHECK_SESSIONS) for _, their in alike[-1:]]
    running = [(had.server, had.limits, 1 + had.beside) for _, had in limited]
    running.append((server, limits, 1 + beside))
    running += [(server, their, 1 + other.beside) for other, their in alike]
    never = (
        too_few_sessions(running, least=True)
        or too_few_sessions(last_starting, least=True)
        or too_few_sessions(starting, least=True)
    )
    if never:
        raise StartupError(f"{dependency}: too few sessions allowed: {'; '.join(never)}")
    had = _Limited(dependency, server, limits, beside)
    said_for_role = any(
        (their.server, their.limits.role) == (server, limits.role) for _, their in limited
    )
    limited.append((pool, had))
    # Said once for the role: the first of its pools counts what the others will need.
    if limits.role_limit is not None and not said_for_role:
        needs = sum(n for at, their, n in running if (at, their.role) == (server, limits.role))
        await _say_sessions_held_elsewhere(pool, had, limited, needs)


async def _say_sessions_held_elsewhere(
    pool: asyncpg.Pool,
    had: _Limited,
    limited: Sequence[tuple[asyncpg.Pool, _Limited]],
    needs: int,
) -> None:
    """Say once, as the pool opens, where the sessions other processes hold as its role
    (another instance, an operator's psql) leave fewer of the role's limit than the
    process needs to run at all: start-up then waits for them to end, and would
    otherwise end its budget on "too many connections for role", the count unsaid."""
    try:
        held = await role_sessions(pool, had.dependency)
    except Unavailable:  # the outage says it
        return
    ours = sum(
        opened.get_size()
        for opened, their in limited
        if (their.server, their.limits.role) == (had.server, had.limits.role)
    )
    elsewhere = held - ours
    if elsewhere > 0 and (had.limits.role_limit or 0) - elsewhere < needs:
        log.warning(
            "sessions held elsewhere as the role leave the process too few",
            dependency=had.dependency,
            role=had.limits.role,
            role_limit=had.limits.role_limit,
            held_elsewhere=elsewhere,
            needs_at_least=needs,
        )


def _hold_to_session_limits(limited: Sequence[tuple[asyncpg.Pool, _Limited]]) -> None:
    """Say once, as the process starts, which limit of the servers lets it open fewer
    sessions than its pools (and the sessions each opens beside its pool) may: an outage
    of the database begins each time a pool tries to grow beyond it, and ends at the next
    check. The pools are held to what the limits leave them."""
    needs = [(had.server, had.limits, pool.get_max_size(), had.beside) for pool, had in limited]
    opened = [(server, limits, size + beside) for server, limits, size, beside in needs]
    for why in too_few_sessions(opened):
        log.warning("fewer database sessions allowed than the process opens", why=why)
    for (pool, had), sessions in zip(limited, pooled_sessions(needs), strict=True):
        if sessions < pool.get_max_size():
            hold_pool(pool, sessions)
            log.warning(
                "database pool held to the sessions the limits leave it",
                dependency=had.dependency,
                sessions=sessions,
                pool_max_conns=pool.get_max_size(),
            )


async def _broker_components(
    settings: Settings,
    service: Service,
    stack: AsyncExitStack,
    outages: Outages,
    deadline: float,
    overrides: Overrides,
    opened: _Opened,
    tls: ServerTls | None,
) -> None:
    """The broker's connection and publisher, the consumers, the relayer (naming the
    event store on each event) and the Commands API, as far as they are selected; the
    topology declared."""
    selected = service.components
    command_pool, query_pool = opened.command_pool, opened.query_pool
    broker = Broker(settings.amqp_urls, outages, queue_type=settings.queue_type)
    stack.push_async_callback(broker.close)
    await started(BROKER, broker.connection, outages, deadline)
    publisher = Publisher(broker)
    stack.push_async_callback(publisher.close)
    # An outage ends when the broker takes a declaration again, not merely a connection
    # (one whose permissions were taken away still connects).
    outages.check_with(BROKER, publisher.probe_events, answers_within=publisher.confirm_timeout)
    deliveries = replace(DELIVERIES, aggregate_wait=settings.aggregate_wait)
    wiring = _Wiring(broker, publisher, outages, deliveries, overrides, service)
    # Whether Registering's events were consumed before: the consumers of the commands
    # they become keep the records (their own queues keep none).
    registered: Callable[[], Awaitable[bool]] | None = None
    if command_pool is not None:
        store = PostgresEventStore(command_pool, snapshot_interval=settings.snapshot_interval)
        stack.push_async_callback(store.close)
        registered = partial(store.processed_any, routes.REGISTRATION_CONSUMERS)
        outbox = PostgresOutbox(command_pool)
        pace = RelayPace(outbox.lag, relayer=outbox.relayer)
        if selected & APPENDS:
            service.workers["relay-pace"] = pace.run
        if "commands" in selected:
            wiring.store_routes(routes.COMMANDS, store, pace, consumed=store.processed_any)
        if "policies" in selected:
            wiring.store_routes(
                routes.POLICIES, store, pace, last_processed=store.last_processed_recorded_at
            )
        if "relayer" in selected:
            # A connection of its own: on the one the Commands API publishes on, a flood
            # of commands held the relayed events' confirms unread past their timeout,
            # and the broker was logged as down while it confirmed in milliseconds.
            relaying = Broker(
                settings.amqp_urls,
                outages,
                queue_type=settings.queue_type,
                announced=False,
                name="financing relayer",
                gauged=False,
            )
            stack.push_async_callback(relaying.close)
            wiring.relayer(command_pool, settings.command_db, stack, opened.store_name, relaying)
    if "integration" in selected:
        wiring.sending_routes(
            routes.INTEGRATION, AmqpCommandSender(publisher), consumed_before=registered
        )
    if query_pool is not None and "projector" in selected:
        clock = DatabaseClock(query_pool, QUERY_DATABASE)
        service.workers["database-clock"] = clock.run
        read_models = PostgresReadModels(query_pool)
        wiring.projector(
            read_models,
            clock.now,
            RecordedStore(query_pool),
            last_projected=read_models.last_projected_recorded_at,
        )
    watch: TopologyWatch | None = None
    if selected & CONSUMES:
        # Where queues are consumed, the topology is kept as declared.
        watch = TopologyWatch(publisher, broker)
        service.workers["topology"] = watch.run
        service.workers["queue-depths"] = DepthWatch(publisher).run
        if selected & CONSUMES_EVENTS:
            wiring.unrouted(watch)
    reference_queue = await started(
        "declaring the broker topology", wiring.declare, outages, deadline
    )
    if watch is not None:
        watch.started(reference_queue)
    if "commands-api" in selected:
        commands = CommandsService(AmqpCommandSender(publisher), outages)
        server = _grpc_server(
            service,
            outages,
            commands,
            "Commands",
            Probe(BROKER, publisher.probe),
            opened.own,
            tls,
        )
        correlate(server)
        service.listeners.append(Listener("commands-api", server, settings.command_address))


def _housekeeping(
    settings: Settings,
    service: Service,
    outages: Outages,
    opened: _Opened,
) -> None:
    """The pruning of deduplication records and the metrics endpoint."""
    selected = service.components
    records = deduplication_records(
        opened.command_pool if selected & RECORDS_COMMANDS else None,
        opened.query_pool if selected & RECORDS_PROJECTIONS else None,
    )
    if records:
        retention = Retention(records, outages, keep=settings.dedup_retention)
        service.workers["retention"] = retention.run
    if settings.metrics_address is not None:
        # Which release each instance runs: every earlier one must be stopped before the
        # first of a release that migrates a schema starts (docs/deployment.md).
        metrics.BUILD_INFO.labels(release(), str(latest("commands")), str(latest("queries"))).set(1)
        endpoint = MetricsEndpoint(lambda: _unhealthy(service, outages), own=opened.own)
        service.listeners.append(Listener("metrics", endpoint, settings.metrics_address))


def _answering(pool: asyncpg.Pool, inspection: Inspection) -> Callable[[], Awaitable[None]]:
    """The check of the database `inspection` looks at: it answers (and takes writes, where
    the process writes), and it lacks nothing only an operator gives back (grants, tables,
    unique indexes). The health watch runs it every second. It asks on a session of its
    own, never behind the service's statements (with the database 200 ms away each way,
    a probe in the pool's line ran out of time, and the database was said down): while
    the pool's sessions all serve units of work, the inspection's last look answers."""
    dependency = DATABASES[inspection.schema]
    probe = writable if inspection.writes else ping

    async def answering() -> None:
        if await probe(pool, dependency) and has_room(pool):
            await inspection.look()
        else:
            inspection.verdict()

    return answering


def _reading(pool: asyncpg.Pool, inspection: Inspection) -> Callable[[], Awaitable[None]]:
    """The Queries API's check of a database the process also writes: it answers, and
    the last look of its own check (`_answering`, each second) found nothing its reads
    lack."""
    dependency = DATABASES[inspection.schema]

    async def reading() -> None:
        await ping(pool, dependency)
        inspection.verdict(reads=True)

    return reading


def _unhealthy(service: Service, outages: Outages) -> list[str]:
    """What keeps the metrics endpoint's /health from being healthy: a dependency down, a
    queue not consumed; nothing when every consumer consumes and every dependency is up."""
    down = sorted(outages.down())
    return [f"{dependency} unavailable" for dependency in down] + [
        f"queue {queue} not consumed"
        for queue, consuming in service.consuming.items()
        if not consuming.is_set() and f"queue {queue}" not in down  # said once
    ]


def _health(service: Service, outages: Outages) -> HealthWatch:
    """The service's health watch, made and run the first time it is asked for."""
    if service.health is None:
        service.health = HealthWatch(outages)
        service.workers["health"] = service.health.run
    return service.health


def _grpc_tls(settings: Settings, service: Service) -> ServerTls | None:
    """The TLS of the gRPC ports this process serves, its files read before anything is
    opened (and watched for changes); None: none served, or plaintext."""
    if settings.grpc_tls is None or not service.components & GRPC_COMPONENTS:
        return None
    try:
        tls = ServerTls(settings.grpc_tls)
    except UnusableFiles as error:
        raise StartupError(str(error)) from None
    service.workers["grpc-tls"] = tls.watch
    return tls


def _grpc_server(
    service: Service,
    outages: Outages,
    api: CommandsService | QueriesService,
    name: str,
    probe: Probe,
    own: int,
    tls: ServerTls | None,
) -> GrpcServer:
    """A gRPC server for `api`, with health checking and reflection beside it; its calls
    in flight are let finish when the service shuts down. `own`: the file descriptors
    the process needs itself, which its callers' connections leave it; `tls`: what its
    connections are served with (None: plaintext)."""
    service.calls.append(api.calls)
    observe_turns(name, api.calls)
    readiness = Readiness(name)
    _health(service, outages).watch(readiness, [probe])
    # The API's calls are drained at shutdown; health's and reflection's are not waited for.
    handlers = [
        Metered(FramingChecked(servable, calls=api.calls if servable is api else None))
        for servable in with_reflection([api, health_service(api, readiness)])
    ]
    server = GrpcServer(
        handlers,
        codec=RequestCodec(),
        connections=connection_limit(own),
        busy=api.busy,
        tls=None if tls is None else tls.current,
    )
    if tls is not None:
        tls.when_trust_changes(server.renew_trust)
    observe_grpc(server, handlers)
    return server


class _Wiring:
    """Builds the broker-fed components of one service."""

    def __init__(
        self,
        broker: Broker,
        publisher: Publisher,
        outages: Outages,
        policy: RetryPolicy,
        overrides: Overrides,
        service: Service,
    ) -> None:
        self._broker = broker
        self._publisher = publisher
        self._outages = outages
        self._policy = policy  # of every delivery
        self._overrides = overrides
        self._service = service
        self._dead_letters = DeadLetters(publisher, outages, policy)
        self._consumers: list[QueueConsumer] = []
        # The queues the broker did not have as the topology was declared.
        self._missing: set[str] = set()

    def store_routes(
        self,
        table: Iterable[routes.Route[StoreHandler]],
        store: EventStore,
        pace: RelayPace,
        *,
        last_processed: Callable[[str, datetime], Awaitable[datetime | None]] | None = None,
        consumed: Callable[[Sequence[str]], Awaitable[bool]] | None = None,
    ) -> None:
        """Consumers that append, each handling a delivery only while appending keeps to
        the relayer's pace; `last_processed`: when the event a consumer (by its name)
        processed last was recorded, to date what a queue deleted under it held;
        `consumed`: whether consumers (by their names) processed anything yet, to tell a
        queue deleted from a new one."""
        for route in table:
            self._consumer(
                route.message_name,
                exactly_once(store, route.consumer, route.handler),
                parts=(pace.paced,),
                last_processed=None
                if last_processed is None
                else partial(last_processed, route.consumer),
                consumed_before=None if consumed is None else partial(consumed, [route.consumer]),
            )

    def sending_routes(
        self,
        table: Iterable[routes.Route[SendingHandler]],
        sender: CommandSender,
        *,
        consumed_before: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Consumers that send commands; `consumed_before`: whether what they send was
        processed yet (their queues keep no record of their own)."""
        for route in table:
            self._consumer(
                route.message_name,
                sending(sender, route.handler),
                consumed_before=consumed_before,
            )

    def unrouted(self, watch: TopologyWatch) -> None:
        """The consumer of what `financing_events` routes to no other consumer."""
        step = retried(self._policy, self._outages)(topology.unrouted(watch.declare_soon))
        self._deliveries(topology.UNROUTED_QUEUE, step)

    def _consumer(
        self,
        message_name: str,
        handler: Handler,
        parts: Sequence[HandlerPart] = (),
        last_processed: LastProcessed | None = None,
        consumed_before: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        subscription = topology.subscription(message_name)
        step = subscription.step(
            handler,
            policy=self._policy,
            outages=self._outages,
            handler_parts=(*self._overrides.handler_parts, *parts),
        )
        self._deliveries(subscription.queue, step, last_processed, consumed_before)

    def _deliveries(
        self,
        queue: topology.QueueSpec,
        step: Step,
        last_processed: LastProcessed | None = None,
        consumed_before: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        deliveries = Deliveries(step)
        consumer = QueueConsumer(
            self._broker,
            queue,
            self._dead_letters,
            self._outages,
            deliveries.receive,
            prefetch=PREFETCH,
            last_processed=last_processed,
            consumed_before=consumed_before,
        )
        self._add(f"consumer:{queue.name}", lambda: consume(consumer, deliveries), consumer)

    def projector(
        self,
        read_models: ReadModelStore,
        clock: Callable[[], datetime],
        store: ProjectedStore,
        *,
        last_projected: LastProcessed | None = None,
    ) -> None:
        projector = Projector(
            self._overrides.read_models(read_models), self._outages, clock=clock, store=store
        )
        consumer = QueueConsumer(
            self._broker,
            topology.PROJECTOR.queue,
            self._dead_letters,
            self._outages,
            projector.receive,
            prefetch=projector.batch_size,  # the broker delivers at most one batch ahead
            last_processed=last_projected,
        )

        async def run() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(consumer.run())
                    group.create_task(projector.run())
            finally:
                await consumer.close()

        self._add("projector", run, consumer)

    def relayer(
        self,
        pool: asyncpg.Pool,
        db: Database,
        stack: AsyncExitStack,
        store: str | None,
        broker: Broker,
    ) -> None:
        """The relayer, publishing on `broker`'s connection."""
        wake_up = CommitListener(db)
        stack.push_async_callback(wake_up.close)
        publisher = Publisher(broker)
        stack.push_async_callback(publisher.close)
        relayer = Relayer(
            PostgresOutbox(pool),
            publisher,
            PostgresRelayerLock(db),
            wake_up,
            self._outages,
            store=store,
            stand_by=broker.let_go,  # the relayer's own connection
        )
        self._service.workers["relayer"] = relayer.run
        self._service.workers["relayer-lag"] = relayer.report_lag

    def _add(
        self, name: str, run: Callable[[], Coroutine[Any, Any, None]], consumer: QueueConsumer
    ) -> None:
        self._service.workers[name] = run
        self._service.consuming[consumer.spec.name] = consumer.consuming
        self._consumers.append(consumer)

    async def declare(self) -> topology.ReferenceQueue:
        """The topology declared; what became of the reference's projector queue. Each
        consumer whose queue was missing (in any attempt: one cut short may have declared
        it) is told."""
        connection = await self._broker.connection()
        retired = await topology.declare_on(self._broker, self._missing)
        if self._broker.current is connection:  # not declared on a connection lost since
            self._publisher.declared_on(connection)
        for consumer in self._consumers:
            if consumer.spec.name in self._missing:
                consumer.found_missing()
        # A queue nobody consumes missing before the declaration, where the consumers'
        # records say the deployment ran before: deleted while no instance ran, with the
        # dead letters or the deferred commands it held, and declared again with nothing
        # said (a new deployment's, or one that takes over a reference's broker, is not).
        lost = sorted(self._missing & self._publisher.unconsumed().keys())
        if lost and any(
            await asyncio.gather(*(consumer.consumed_before() for consumer in self._consumers))
        ):
            for name in lost:
                topology.said_restored(name)
        self._broker.on_reopened(self._missing_on)
        return retired

    async def _missing_on(self, connection: AbstractConnection) -> None:
        """Each consumer whose queue a connection opened again finds missing is told, before
        anything declares it again: deleted while the connection was down, a queue was
        declared again by the first channel on it with nothing said. A queue nobody
        consumes (the dead letters, the deferrals) found missing is declared again there
        and said, as the topology's watch says one deleted under the service: deleted
        while the connection was down, the dead letters and deferred commands it held
        were lost with nothing said."""
        consumers = {consumer.spec.name: consumer for consumer in self._consumers}
        unconsumed = self._publisher.unconsumed()
        for name in await topology.queues_missing(connection, [*consumers, *unconsumed]):
            if name in consumers:
                consumers[name].found_missing(reopened=True)
            else:
                await topology.restored_on(connection, name, unconsumed[name])


async def started(
    what: str, operation: Callable[[], Awaitable[T]], outages: Outages, deadline: float
) -> T:
    """`operation`, retried while its dependency is unavailable, until `deadline`: an
    attempt still waiting on a dependency that does not answer is given up there too."""
    failed: Exception | None = None  # the last attempt's error
    trying = False  # an attempt is under way (still so once the deadline cuts it)

    async def attempt() -> T:
        nonlocal failed, trying
        trying = True
        try:
            result = await operation()
        except Exception as error:
            failed, trying = error, False
            raise
        trying = False
        return result

    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            return await retry(
                attempt, policy=NO_BUG_RETRIES, outages=outages, what=what, deadline=deadline
            )
    except TimeoutError:
        if failed is not None and not trying:  # the deadline came in a pause between attempts
            _give_up(what, failed, classify(failed))
        # Not "unreachable": the attempt may be waiting on another instance (a
        # migration's lock, which `migrate` names in a line of its own). The attempt
        # before it, if any, says why start-up had to wait at all: cut, "takes no
        # writes, and its queries schema lacks version(s) 1-5" was said only as a
        # warning, and the error named nothing but the timeout.
        said = f"{what}: still waiting for an answer when FINANCING_STARTUP_TIMEOUT ran out"
        if failed is not None:
            said += f"; the attempt before: {failed}{_stopped(failed)}"
        raise StartupError(said) from None
    except GaveUp as gave_up:
        _give_up(what, gave_up.error, gave_up.fault)


def _give_up(what: str, error: Exception, fault: Fault) -> NoReturn:
    """Start-up stops: `what` failed with `error` until it was no longer retried."""
    if fault is Fault.UNAVAILABLE:
        # `what` names a dependency or a step of start-up ("migrating the query
        # database"): the error names the dependency.
        raise StartupError(
            f"{what}: gave up when FINANCING_STARTUP_TIMEOUT ran out: {error}{_stopped(error)}"
        ) from error
    if fault is Fault.PERMANENT:
        raise StartupError(str(error)) from error
    raise error from None  # a bug: the supervisor reports it with its traceback


def _stopped(error: Exception) -> str:
    """What start-up given up adds to an outage only an operator ends: its text says the
    service goes on by itself once that is done, which the instances running do, and
    the one starting did until it gave up."""
    if not isinstance(error, AwaitingOperator):
        return ""
    return " (this instance stopped instead: start it again once that is done)"


async def _migrated(
    pool: asyncpg.Pool, schema: str, dependency: str, deadline: float, if_new: str | None = None
) -> None:
    try:
        # Bounded by what is left of start-up's budget, not by a statement's.
        left = max(deadline - time.monotonic(), 1.0)
        await migrate(pool, schema, statement_timeout=left, if_new=if_new)
    except asyncpg.ReadOnlySQLTransactionError:
        # A server that takes no writes (a replica of the query database for the Queries
        # API, a standby): it carries its primary's schema, which must be current; a
        # replica that lags behind a migration is waited for.
        lacking = await missing(pool, schema)
        if lacking:
            raise Unavailable(
                dependency,
                f"takes no writes, and its {schema} schema lacks version(s)"
                f" {', '.join(map(str, lacking))}",
            ) from None


@dataclass(frozen=True)
class _Pooled:
    """A database a pool is opened on."""

    db: Database
    dependency: str
    schema: str
    beside: int  # the sessions the process opens beside the pool (a relayer's)

    @property
    def server(self) -> str:
        return f"{self.db.connect_kwargs.get('host')}:{self.db.connect_kwargs.get('port')}"

    @property
    def user(self) -> object:
        return self.db.connect_kwargs.get("user")


async def _pool(
    stack: AsyncExitStack,
    pooled: _Pooled,
    pools: _Pools,
    outages: Outages,
    deadline: float,
    *,
    if_new: str | None = None,
) -> asyncpg.Pool:
    """A pool on `db`, its schema migrated, its limits read into those opened (`pools`)."""
    db, dependency, schema = pooled.db, pooled.dependency, pooled.schema
    pool = await started(
        f"{dependency} {db.describe()}", lambda: create_pool(db, dependency), outages, deadline
    )
    stack.push_async_callback(close_pool, pool)
    await _read_session_limits(pool, pooled, pools)
    # Before anything is written through a pooler that does not keep sessions.
    sessions = partial(refuse_pooled_sessions, db, dependency)
    await started(f"{dependency}'s sessions", sessions, outages, deadline)
    observe_pool(pool, dependency)

    async def migrated() -> None:
        with translated(dependency):
            await _migrated(pool, schema, dependency, deadline, if_new)

    await started(f"migrating the {dependency}", migrated, outages, deadline)
    return pool


__all__ = ["COMPONENTS", "Listener", "Overrides", "Service", "StartupError", "bootstrap"]
