"""The system under test: a `financing serve` process this suite starts, or a running deployment.

`local_system()` gives the service databases and a vhost of its own, binds the
suite's event listener to `events` *before* the service starts (so no event is
missed), starts the service and waits for its "service ready" log line.
`external_system()` drives whatever the contract's environment variables point
at and starts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractChannel

from tests.acceptance.bus import Broker, EventLog, MessageLog
from tests.support import infra

TARGET_VARIABLE = "FINANCING_ACCEPTANCE_TARGET"
READY_EVENT = "service ready"
START_TIMEOUT = float(os.environ.get("FINANCING_ACCEPTANCE_START_TIMEOUT", "40"))
STOP_TIMEOUT = 10.0

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_command() -> list[str]:
    """The venv's console script when installed, else the module."""
    script = Path(sys.executable).with_name("financing")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "financing", "serve"]


class ServiceProcess:
    """One `financing serve` child process; every start appends to the same log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._log_offset = 0
        self._stopped_by_suite = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, within: float = START_TIMEOUT) -> None:
        """Start and wait (at most `within` seconds) for its "service ready" log line."""
        assert not self.running, "the service is already running"
        self._stopped_by_suite = False
        self._log_offset = self.log_size()
        with self.log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *service_command(),
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own session: a Ctrl-C in the terminal reaches pytest, whose
                # teardown then stops the service the orderly way.
                start_new_session=True,
            )
        self._process = process

        async def ready() -> bool:
            if process.returncode is not None:
                raise AssertionError(
                    f"financing serve exited with {process.returncode} before it was ready"
                )
            return any(line.get("event") == READY_EVENT for line in self.log_lines())

        try:
            await infra.wait_until(ready, timeout=within, interval=0.1, what="'service ready'")
        except AssertionError as exc:
            await self.kill()
            raise AssertionError(
                f"{exc}\nservice log:\n{self.log_tail(self._log_offset)}"
            ) from None

    async def stop(self, within: float = STOP_TIMEOUT) -> int:
        """SIGTERM; the exit code, or AssertionError when it does not exit within the deadline."""
        process = self._process
        assert process is not None, "the service was never started"
        if process.returncode is None:
            self._stopped_by_suite = True
            process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), within)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"financing serve did not exit within {within}s of SIGTERM;"
                f" log:\n{self.log_tail(self._log_offset)}"
            ) from None

    def state(self) -> str:
        process = self._process
        if process is None:
            return "never started"
        if process.returncode is None:
            return f"running (pid {process.pid})"
        if self._stopped_by_suite:
            return f"stopped by the suite, exit code {process.returncode}"
        return (
            f"exited with code {process.returncode} on its own: it crashed, or a signal"
            " from outside this suite stopped it"
        )

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    def log_lines(self) -> list[dict[str, object]]:
        """The JSON log lines written since the last start."""
        lines: list[dict[str, object]] = []
        for raw in self._read_log(self._log_offset).splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    lines.append(line)
        return lines

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, since: int = 0, max_lines: int = 200) -> str:
        lines = self._read_log(since).splitlines()
        skipped = len(lines) - max_lines
        text = "\n".join(lines[-max_lines:])
        return f"[{skipped} earlier lines in {self.log_path}]\n{text}" if skipped > 0 else text

    def _read_log(self, offset: int) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")


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
