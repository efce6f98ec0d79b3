"""The system under test: a `financing serve` process this suite starts, or a running deployment.

`local_system()` gives the service databases and a vhost of its own, binds the
suite's event listener to `events` *before* the service starts (so no event is
missed), starts the service and waits for its "service ready" log line.
`external_system()` drives whatever the contract's environment variables point
at and starts nothing. `split_system()` runs every component twice, each in a
process of its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aio_pika.abc import AbstractChannel

from tests.acceptance.bus import Broker, EventLog, MessageLog
from tests.support import infra
from tests.support.deployment import LocalDeployment, local_deployment
from tests.support.service import ServiceProcess, another_service

TARGET_VARIABLE = "FINANCING_ACCEPTANCE_TARGET"
# An external deployment's other instances' metrics addresses, comma-separated.
MORE_METRICS_VARIABLE = "FINANCING_ACCEPTANCE_MORE_METRICS"

# A small interval makes ordinary scenarios load aggregates from snapshots too.
SNAPSHOT_INTERVAL = "3"

Prepare = Callable[[AbstractChannel], Awaitable[None]]


def external_target() -> bool:
    return os.environ.get(TARGET_VARIABLE, "").lower() == "external"


def split_target() -> bool:
    return os.environ.get(TARGET_VARIABLE, "").lower() == "split"


# A split deployment: each group of components in two processes of its own.
SPLIT = (
    ("commands-api",),
    ("queries-api",),
    ("commands", "integration", "policies"),
    ("relayer",),
    ("projector",),
)


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
    metrics_address: Address
    amqp_url: str
    broker: Broker
    events: EventLog
    dead_letters: MessageLog
    service: ServiceProcess | None = None  # None against an external deployment
    env: dict[str, str] = field(default_factory=dict)
    # The metrics endpoints of a split deployment's other processes.
    more_metrics_addresses: tuple[Address, ...] = ()

    @property
    def metrics_addresses(self) -> tuple[Address, ...]:
        """Every process's metrics endpoint, the first process's first."""
        return (self.metrics_address, *self.more_metrics_addresses)


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
            metrics_address=Address.parse(env.get("METRICS_ADDRESS") or "127.0.0.1:8082"),
            amqp_url=amqp_url,
            broker=broker,
            events=events,
            dead_letters=dead_letters,
            # The other instances of a deployment scaled out, whose metrics count what their
            # consumers took from the queues they share.
            more_metrics_addresses=tuple(
                Address.parse(address)
                for address in env.get(MORE_METRICS_VARIABLE, "").split(",")
                if address.strip()
            ),
        )
    finally:
        await broker.close()


@contextlib.asynccontextmanager
async def local_system(
    name: str | None = None,
    *,
    prepare: Prepare | None = None,
    env: Mapping[str, str] | None = None,
    split: bool = False,
) -> AsyncIterator[System]:
    """A service of its own: fresh databases and vhost, started and, on exit, stopped.

    The suite's listening queue is bound to `events` before the service
    starts, so no event is missed; `prepare` runs on the fresh vhost before
    the service starts; `env` adds to the service's environment. On exit the
    service must leave with exit code 0. `split` runs each group of SPLIT in
    two processes instead of one process running everything (the system then
    has no one service to restart).
    """
    opened: list[tuple[Broker, EventLog]] = []

    async def before_start(deployment: LocalDeployment) -> None:
        broker = await Broker.connect(deployment.amqp_url)
        opened.append((broker, await _listen(broker)))
        if prepare is not None:
            await prepare(broker.channel)

    extra_env = {
        "LOGGER_LEVEL": os.environ.get("FINANCING_ACCEPTANCE_LOG_LEVEL", "INFO"),
        "FINANCING_SNAPSHOT_INTERVAL": SNAPSHOT_INTERVAL,
        **(env or {}),
    }
    groups = [group for group in SPLIT for _ in range(2)] if split else []
    if groups:
        extra_env["FINANCING_COMPONENTS"] = ",".join(groups[0])
    try:
        async with local_deployment(
            "fin_acc",
            name=name,
            extra_env=extra_env,
            before_start=before_start,
            redeliveries=int(os.environ.get("FINANCING_ACCEPTANCE_REDELIVERIES", "1")),
        ) as deployment:
            [(broker, events)] = opened
            services = [deployment.service]
            SERVICES.append(deployment.service)
            try:
                for number, group in enumerate(groups[1:], start=2):
                    process = _another_process(deployment, number, group)
                    services.append(process)
                    SERVICES.append(process)
                    await process.start()
                queries = (
                    next(
                        (s for s, g in zip(services, groups, strict=True) if "queries-api" in g),
                        deployment.service,
                    )
                    if split
                    else deployment.service
                )
                yield System(
                    command_address=Address(*deployment.command_address),
                    query_address=Address.parse(queries.env["QUERY_SERVER_ADDRESS"]),
                    metrics_address=Address(*deployment.metrics_address),
                    amqp_url=deployment.amqp_url,
                    broker=broker,
                    events=events,
                    dead_letters=await broker.watch_dead_letters(),
                    service=None if split else deployment.service,
                    env=deployment.env,
                    more_metrics_addresses=tuple(
                        Address.parse(process.env["METRICS_ADDRESS"]) for process in services[1:]
                    ),
                )
                for process in services[1:]:
                    code = await process.stop()
                    assert code == 0, f"exit code {code} on SIGTERM:\n{process.log_tail()}"
                    process.log_path.unlink(missing_ok=True)
            finally:
                for process in services[1:]:
                    await process.kill()  # acts only when the orderly stop did not run
                for process in services:
                    SERVICES.remove(process)
                opened.clear()
                await broker.close()  # before the vhost goes
    finally:
        for broker, _ in opened:  # only when the service never started
            await broker.close()


def _another_process(
    deployment: LocalDeployment, number: int, components: tuple[str, ...]
) -> ServiceProcess:
    """One more `financing serve` of the deployment running `components`, ports of its own."""
    log_path = deployment.service.log_path.with_suffix(f".{number}.log")
    return another_service(deployment.env, log_path, {"FINANCING_COMPONENTS": ",".join(components)})


__all__ = [
    "Address",
    "ServiceProcess",
    "System",
    "external_system",
    "external_target",
    "local_system",
    "split_target",
]
