"""`financing serve`: every component in one event loop, under one supervisor.

This module is the composition root: it opens the shared resources (one
asyncpg pool per database, one robust AMQP connection, one confirming
publisher), declares the topology, wires the handlers to their queues and
runs the components as tasks. A component that crashes stops the whole
process with a non-zero exit code rather than leaving it half alive;
SIGINT/SIGTERM stop it cleanly with exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import aio_pika
import aiormq
import asyncpg
from grpclib.server import Server

from financing.adapters.postgres.connection import INFRASTRUCTURE_ERRORS, create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.adapters.postgres.schema import migrate
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.consumer import run_subscription
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.publisher import AmqpCommandSender, Publisher
from financing.application.messages import COMMAND_TYPES
from financing.application.processing import (
    Subscription,
    command_subscriptions,
    integration_subscriptions,
    policy_subscriptions,
)
from financing.config import Database, Settings
from financing.entrypoints.commands_api import CommandsService
from financing.entrypoints.grpc_codec import RequestCodec
from financing.entrypoints.projector import PROJECTOR_QUEUE, QUEUE_ARGUMENTS, run_projector
from financing.entrypoints.queries_api import QueriesService
from financing.entrypoints.relayer import run_relayer
from financing.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

COMPONENTS = (
    "commands-api",
    "queries-api",
    "commands",
    "integration",
    "policies",
    "relayer",
    "projector",
)
NEEDS_COMMAND_DB = frozenset({"commands", "policies", "relayer"})
NEEDS_QUERY_DB = frozenset({"queries-api", "projector"})
NEEDS_BROKER = frozenset(COMPONENTS) - {"queries-api"}

SHUTDOWN_GRACE = 5.0


class StartupError(Exception):
    """A dependency stayed unreachable for the whole start-up budget."""


# Start-up errors that waiting cannot cure: refused credentials, a missing
# database. They fail start-up at once instead of after the whole budget.
HOPELESS_STARTUP_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    aiormq.exceptions.ProbableAuthenticationError,
)


async def _with_retries(what: str, attempt: Callable[[], Awaitable[T]], deadline: float) -> T:
    delay = 0.2
    while True:
        try:
            return await attempt()
        except HOPELESS_STARTUP_ERRORS as exc:
            raise StartupError(f"{what} refused the service: {exc}") from exc
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise StartupError(f"{what} is unreachable: {exc}") from exc
            log.warning("waiting for dependency", dependency=what, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def declare_topology(
    connection: aio_pika.abc.AbstractRobustConnection,
    subscriptions: Iterable[Subscription],
    with_projector: bool,
) -> None:
    """Declare every exchange and queue before anything is published or consumed,
    so no message published after start-up can fall on an unbound exchange."""
    async with connection.channel() as channel:
        await topology.declare_events_exchange(channel)
        await topology.declare_dead_letter_queue(channel)
        for command in COMMAND_TYPES:
            await topology.declare_command_queue(channel, command.name())
        for subscription in subscriptions:
            if subscription.from_events:
                await topology.declare_event_queue(channel, subscription.queue)
        if with_projector:
            await topology.declare_event_queue(channel, PROJECTOR_QUEUE, arguments=QUEUE_ARGUMENTS)


async def serve(
    settings: Settings,
    components: Iterable[str] = COMPONENTS,
    *,
    startup_timeout: float | None = None,
) -> int:
    """Run the selected components until a signal (exit 0) or a crash (exit 1)."""
    selected = frozenset(components)
    unknown = selected - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components: {', '.join(sorted(unknown))}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with AsyncExitStack() as stack:
            budget = settings.startup_timeout if startup_timeout is None else startup_timeout
            return await _run(settings, selected, stack, stop, time.monotonic() + budget)
    except StartupError as exc:
        log.error("start-up failed", error=str(exc))
        return 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(
    settings: Settings,
    selected: frozenset[str],
    stack: AsyncExitStack,
    stop: asyncio.Event,
    deadline: float,
) -> int:
    command_pool: asyncpg.Pool | None = None
    query_pool: asyncpg.Pool | None = None
    if selected & NEEDS_COMMAND_DB:
        command_pool = await _open_pool(stack, "command", settings.command_db, "commands", deadline)
    if selected & NEEDS_QUERY_DB:
        query_pool = await _open_pool(stack, "query", settings.query_db, "queries", deadline)

    workers: dict[str, Coroutine[Any, Any, None]] = {}
    # Set by each consumer once the broker delivers to it: "service ready" waits for all.
    consuming: list[asyncio.Event] = []

    def started() -> asyncio.Event:
        consuming.append(asyncio.Event())
        return consuming[-1]

    servers: list[tuple[str, Server, tuple[str, int]]] = []
    commands_service: CommandsService | None = None

    if selected & NEEDS_BROKER:
        connection = await _with_retries(
            "broker", lambda: topology.connect(settings.amqp_url), deadline
        )
        stack.push_async_callback(connection.close)
        publisher = await Publisher.open(connection)
        stack.push_async_callback(publisher.close)
        dead_letters = DeadLetters(publisher)

        subscriptions: list[Subscription] = []
        if command_pool is not None:
            store = PostgresEventStore(command_pool, snapshot_interval=settings.snapshot_interval)
            if "commands" in selected:
                subscriptions += command_subscriptions(store)
            if "policies" in selected:
                subscriptions += policy_subscriptions(store)
        if "integration" in selected:
            subscriptions += integration_subscriptions(AmqpCommandSender(publisher))
        await declare_topology(connection, subscriptions, "projector" in selected)

        for subscription in subscriptions:
            workers[f"consumer:{subscription.queue}"] = run_subscription(
                connection,
                subscription,
                dead_letters,
                redeliver_times=settings.redeliver_times,
                infrastructure_errors=INFRASTRUCTURE_ERRORS,
                consuming=started(),
            )
        if "relayer" in selected and command_pool is not None:
            workers["relayer"] = run_relayer(settings.command_db, command_pool, publisher)
        if "projector" in selected and query_pool is not None:
            workers["projector"] = run_projector(
                connection,
                PostgresReadModels(query_pool),
                dead_letters,
                redeliver_times=settings.redeliver_times,
                infrastructure_errors=INFRASTRUCTURE_ERRORS,
                consuming=started(),
            )
        if "commands-api" in selected:
            commands_service = CommandsService(AmqpCommandSender(publisher))
            server = Server([commands_service], codec=RequestCodec())
            servers.append(("commands-api", server, settings.command_address))

    if "queries-api" in selected and query_pool is not None:
        queries = QueriesService(PostgresReadModels(query_pool))
        servers.append(
            ("queries-api", Server([queries], codec=RequestCodec()), settings.query_address)
        )

    for name, server, (host, port) in servers:
        try:
            await server.start(host, port)
        except OSError as exc:
            raise StartupError(f"{name} cannot listen on {host}:{port}: {exc}") from exc
        stack.callback(server.close)

    tasks = {asyncio.create_task(coro, name=name) for name, coro in workers.items()}
    stopping = asyncio.create_task(stop.wait(), name="signal")
    # Ready once every consumer consumes; a crash or a signal ends the wait first.
    all_consuming = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in consuming)))
    first: set[asyncio.Future[Any]] = {*tasks, stopping, all_consuming}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not all_consuming.done():
        all_consuming.cancel()
    else:
        log.info(
            "service ready",
            components=sorted(selected),
            command_address=f"{settings.command_address[0]}:{settings.command_address[1]}",
            query_address=f"{settings.query_address[0]}:{settings.query_address[1]}",
        )
    done, _ = await asyncio.wait(tasks | {stopping}, return_when=asyncio.FIRST_COMPLETED)

    exit_code = 0
    for task in done - {stopping}:
        exit_code = 1
        error = task.exception() if not task.cancelled() else None
        log.error(
            "component stopped, shutting the service down",
            component=task.get_name(),
            error=repr(error),
            exc_info=error,
        )
    log.info("shutting down", exit_code=exit_code)

    # Stop taking RPCs first, then let consumers finish what they hold.
    if commands_service is not None:
        await commands_service.drain(SHUTDOWN_GRACE)
    for _, server, _ in servers:
        server.close()
    stopping.cancel()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(SHUTDOWN_GRACE * 2):
            await asyncio.gather(*tasks, stopping, return_exceptions=True)
            for _, server, _ in servers:
                await server.wait_closed()
    log.info("service stopped", exit_code=exit_code)
    return exit_code


async def _open_pool(
    stack: AsyncExitStack, role: str, db: Database, schema: str, deadline: float
) -> asyncpg.Pool:
    pool = await _with_retries(
        f"{role} database {db.describe()}", lambda: create_pool(db), deadline
    )
    stack.push_async_callback(pool.close)
    await migrate(pool, schema)
    return pool
