"""Support for the hostile-input, concurrency and dead-letter tests.

A `Deployment` is one `financing serve` child process on databases and a vhost
of its own. `Observer` watches that vhost: every event on `events` (through a
queue bound before the service starts) and every dead letter (taken from
`financing_dead_letters` and acked, so the test vhost's queue stays short).
`FIGURES` counts what the tests tried, for the suite's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from financing.application.messages import COMMAND_TYPES
from financing.application.processing import INTEGRATION_HANDLERS, POLICIES, event_queue
from financing.application.read_models import PROJECTED_EVENTS
from financing.config import Database
from financing.entrypoints.projector import PROJECTOR_QUEUE
from tests.acceptance.bus import Broker, EventLog, MessageLog
from tests.acceptance.driver import Financing, financing_for
from tests.acceptance.system import Address, System
from tests.support import infra
from tests.support.rabbitmq import list_queues
from tests.support.service import ServiceProcess, free_port

DEAD_LETTER_QUEUE = "financing_dead_letters"
COMMAND_QUEUES: tuple[str, ...] = tuple(command.name() for command in COMMAND_TYPES)
# The queue of each consumer of `events` other than the projector, by the name it handles.
HANDLER_QUEUES: dict[str, str] = {
    name: event_queue(name) for name in (*POLICIES, *INTEGRATION_HANDLERS)
}
EVENT_QUEUES: tuple[str, ...] = (*HANDLER_QUEUES.values(), PROJECTOR_QUEUE)
CONSUMED_QUEUES: tuple[str, ...] = (*COMMAND_QUEUES, *EVENT_QUEUES)

# A hostile message carries this string header so that its dead letters can be found
# even when its own message id is missing or mangled.
CASE_HEADER = "x-hostile-case"

# What the hostile-input tests tried, for the suite's summary (see report_figures).
FIGURES: Counter[str] = Counter()


def event_consumers_of(name: str) -> frozenset[str]:
    """The queues whose consumers handle (and so must decode) an event of this name."""
    queues = set()
    if name in HANDLER_QUEUES:
        queues.add(HANDLER_QUEUES[name])
    if name in PROJECTED_EVENTS:
        queues.add(PROJECTOR_QUEUE)
    return frozenset(queues)


@dataclass
class Deployment:
    """A running service and everything needed to reach it."""

    name: str
    amqp_url: str
    command_db: Database
    query_db: Database
    command_address: Address
    query_address: Address
    env: dict[str, str]
    service: ServiceProcess

    @property
    def vhost(self) -> str:
        return self.name


@contextlib.asynccontextmanager
async def deployment(
    prefix: str = "fin_hostile",
    *,
    extra_env: Mapping[str, str] | None = None,
    before_start: Iterable[Any] = (),
    prepare: Any = None,
) -> AsyncIterator[Deployment]:
    """Fresh databases and vhost, and `financing serve` on them until the block ends.

    `prepare(amqp_url)` (a coroutine function) runs on the empty vhost before
    the service starts. On exit the service must stop with exit code 0, which
    also proves that it was still running: a crash shows as another code.
    """
    del before_start
    name = infra.unique_name(prefix)
    command_name, query_name = f"{name}_commands", f"{name}_queries"
    async with contextlib.AsyncExitStack() as cleanup:
        command_db = await infra.create_database(command_name)
        cleanup.push_async_callback(infra.drop_database, command_name)
        query_db = await infra.create_database(query_name)
        cleanup.push_async_callback(infra.drop_database, query_name)
        amqp_url = await asyncio.to_thread(infra.create_vhost, name)
        cleanup.push_async_callback(asyncio.to_thread, infra.delete_vhost, name)
        if prepare is not None:
            await prepare(amqp_url)

        command_address = Address("127.0.0.1", free_port())
        query_address = Address("127.0.0.1", free_port())
        env = {
            **os.environ,
            "COMMAND_SERVER_ADDRESS": str(command_address),
            "QUERY_SERVER_ADDRESS": str(query_address),
            "COMMAND_DB_CONNECTION_STRING": command_db.dsn(),
            "QUERY_DB_CONNECTION_STRING": query_db.dsn(),
            "AMQP_ADDRESS": amqp_url,
            "LOGGER_LEVEL": "INFO",
            "FINANCING_SNAPSHOT_INTERVAL": "3",
            **(extra_env or {}),
        }
        service = ServiceProcess(env, Path(tempfile.gettempdir()) / f"{name}.service.log")
        cleanup.push_async_callback(service.kill)  # only if the orderly stop never ran
        await service.start()
        yield Deployment(
            name=name,
            amqp_url=amqp_url,
            command_db=command_db,
            query_db=query_db,
            command_address=command_address,
            query_address=query_address,
            env=env,
            service=service,
        )
        assert service.running, f"the service died:\n{service.log_tail()}"
        code = await service.stop()
        assert code == 0, f"financing serve exited with {code}; log:\n{service.log_tail()}"


@dataclass
class Observer:
    """What a test sees of a deployment's broker."""

    broker: Broker
    events: EventLog
    dead_letters: MessageLog

    def system(self, running: Deployment) -> System:
        return System(
            command_address=running.command_address,
            query_address=running.query_address,
            amqp_url=running.amqp_url,
            broker=self.broker,
            events=self.events,
            dead_letters=self.dead_letters,
            service=None,
            env=running.env,
        )


async def bind_observer(amqp_url: str) -> Observer:
    """Listen to `events` and take every dead letter; call it before the service starts."""
    broker = await Broker.connect(amqp_url)
    await broker.declare_events_exchange()
    events = await broker.listen_to_events(infra.unique_name("observed_events"))
    dead_letters = MessageLog("dead letters")
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)

    async def on_dead_letter(message: AbstractIncomingMessage) -> None:
        dead_letters.record(message, DEAD_LETTER_QUEUE)
        await message.ack()

    await queue.consume(on_dead_letter)
    return Observer(broker, events, dead_letters)


@contextlib.asynccontextmanager
async def observed_deployment(
    prefix: str, *, extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[tuple[Deployment, Observer]]:
    observers: list[Observer] = []

    async def prepare(amqp_url: str) -> None:
        observers.append(await bind_observer(amqp_url))

    async with deployment(prefix, extra_env=extra_env, prepare=prepare) as running:
        [observer] = observers
        try:
            yield running, observer
        finally:
            await observer.broker.close()


@contextlib.asynccontextmanager
async def driver(running: Deployment, observer: Observer) -> AsyncIterator[Financing]:
    """The acceptance suite's scenario driver, on this deployment."""
    async with financing_for(observer.system(running)) as financing:
        yield financing


async def publish_raw(
    broker: Broker,
    *,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, Any],
) -> None:
    """Exactly these headers, of any AMQP type, confirmed by the broker."""
    await broker.publish(exchange, routing_key, body, headers)


async def queues_settled(vhost: str, queues: Iterable[str]) -> bool:
    """Whether every one of `queues` holds no message, ready or unacknowledged."""
    state = await list_queues(vhost)
    return all(
        state[q]["messages_ready"] == 0 and state[q]["messages_unacknowledged"] == 0
        for q in queues
    )


def case_id() -> str:
    return str(uuid.uuid4())


def report_figures(figures: Mapping[str, int]) -> None:
    """Add this module's counts to a shared figures mapping (the suite's summary)."""
    target: Any = figures
    for key, value in FIGURES.items():
        target[key] = target.get(key, 0) + value


__all__ = [
    "CASE_HEADER",
    "COMMAND_QUEUES",
    "CONSUMED_QUEUES",
    "DEAD_LETTER_QUEUE",
    "EVENT_QUEUES",
    "FIGURES",
    "HANDLER_QUEUES",
    "Deployment",
    "Observer",
    "aio_pika",
    "bind_observer",
    "case_id",
    "deployment",
    "driver",
    "event_consumers_of",
    "observed_deployment",
    "publish_raw",
    "queues_settled",
    "report_figures",
]
