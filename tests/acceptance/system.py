"""The system under test: a `financing serve` process this suite starts, or a running deployment.

`local_system()` gives the service databases and a vhost of its own, binds the
suite's event listener to `events` *before* the service starts (so no event is
missed), starts the service and waits for its "service ready" log line.
`external_system()` drives whatever the contract's environment variables point
at and starts nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractChannel

from tests.acceptance.bus import Broker, EventLog, MessageLog
from tests.support import infra
from tests.support.service import (
    ServiceProcess,
    free_port,
)

TARGET_VARIABLE = "FINANCING_ACCEPTANCE_TARGET"

# A small interval makes ordinary scenarios load aggregates from snapshots too.
SNAPSHOT_INTERVAL = "3"

Prepare = Callable[[AbstractChannel], Awaitable[None]]


def external_target() -> bool:
    return os.environ.get(TARGET_VARIABLE, "").lower() == "external"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        # A listen address on every interface is reached through loopback.
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


# Every service this run started, so a failing test can show their logs.
SERVICES: list[ServiceProcess] = []


@dataclass
class System:
    """What the tests drive: the gRPC addresses, the broker and what it observed."""

    command_address: Address
    query_address: Address
    amqp_url: str
    broker: Broker
    events: EventLog
    dead_letters: MessageLog
    service: ServiceProcess | None = None  # None against an external deployment
    env: dict[str, str] = field(default_factory=dict)


async def _listen(broker: Broker) -> EventLog:
    await broker.declare_events_exchange()
    return await broker.listen_to_events(infra.unique_name("acceptance_events"))


@contextlib.asynccontextmanager
async def external_system() -> AsyncIterator[System]:
    env = os.environ
    amqp_url = env.get("AMQP_ADDRESS") or "amqp://guest:guest@localhost:5672/"
    broker = await Broker.connect(amqp_url)
    try:
        events = await _listen(broker)
        dead_letters = await broker.watch_dead_letters()
        yield System(
            command_address=Address.parse(env.get("COMMAND_SERVER_ADDRESS") or "127.0.0.1:8080"),
            query_address=Address.parse(env.get("QUERY_SERVER_ADDRESS") or "127.0.0.1:8081"),
            amqp_url=amqp_url,
            broker=broker,
            events=events,
            dead_letters=dead_letters,
        )
    finally:
        await broker.close()


@contextlib.asynccontextmanager
async def local_system(
    name: str | None = None, *, prepare: Prepare | None = None
) -> AsyncIterator[System]:
    """A service of its own: fresh databases and vhost, started and, on exit, stopped.

    `prepare` runs on the fresh vhost before the service starts. On exit the
    service must leave with exit code 0 within a few seconds of SIGTERM.
    """
    name = name or infra.unique_name("fin_acc")
    command_db, query_db = f"{name}_commands", f"{name}_queries"
    cleanup = contextlib.AsyncExitStack()
    async with cleanup:
        await infra.create_database(command_db)
        cleanup.push_async_callback(infra.drop_database, command_db)
        await infra.create_database(query_db)
        cleanup.push_async_callback(infra.drop_database, query_db)
        amqp_url = infra.create_vhost(name)
        cleanup.callback(infra.delete_vhost, name)

        broker = await Broker.connect(amqp_url)
        cleanup.push_async_callback(broker.close)
        events = await _listen(broker)
        if prepare is not None:
            await prepare(broker.channel)

        command_address = Address("127.0.0.1", free_port())
        query_address = Address("127.0.0.1", free_port())
        env = {
            **os.environ,
            "COMMAND_SERVER_ADDRESS": str(command_address),
            "QUERY_SERVER_ADDRESS": str(query_address),
            # The event store in libpq keyword form, the read models as a URL:
            # the contract accepts both.
            "COMMAND_DB_CONNECTION_STRING": (
                f"host={infra.PG_HOST} port={infra.PG_PORT} user={infra.PG_USER}"
                f" dbname={command_db} pool_max_conns=8"
            ),
            "QUERY_DB_CONNECTION_STRING": (
                f"postgresql://{infra.PG_USER}@{infra.PG_HOST}:{infra.PG_PORT}/{query_db}"
            ),
            "AMQP_ADDRESS": amqp_url,
            "LOGGER_LEVEL": os.environ.get("FINANCING_ACCEPTANCE_LOG_LEVEL", "INFO"),
            "FINANCING_SNAPSHOT_INTERVAL": SNAPSHOT_INTERVAL,
        }
        log_path = Path(tempfile.gettempdir()) / f"{name}.service.log"
        service = ServiceProcess(env, log_path)
        SERVICES.append(service)
        cleanup.callback(SERVICES.remove, service)
        cleanup.push_async_callback(service.kill)  # acts only if the orderly stop never ran
        await service.start()

        dead_letters = await broker.watch_dead_letters()
        yield System(
            command_address=command_address,
            query_address=query_address,
            amqp_url=amqp_url,
            broker=broker,
            events=events,
            dead_letters=dead_letters,
            service=service,
            env=env,
        )
        # A component that crashed earlier shows here as a non-zero exit code.
        code = await service.stop()
        assert code == 0, (
            f"financing serve exited with {code} after SIGTERM; log:\n{service.log_tail()}"
        )


__all__ = [
    "Address",
    "ServiceProcess",
    "System",
    "external_system",
    "external_target",
    "local_system",
]
