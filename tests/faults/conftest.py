"""Fixtures of the fault-injection suite, and the figures it reports.

`FIGURES` is one dict shared by every test of `tests/faults`: a test adds what
it survived or measured (`add_figure`, `set_figure`, or the `fault_figures`
fixture). At the end of the session the figures are printed in pytest's
terminal summary and written to `build/reliability-faults.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults import workload as workloads
from tests.faults.workload import Deployment, Workload, deployment
from tests.support import infra
from tests.support.service import ServiceProcess, financing_command, free_port

FIGURES: dict[str, Any] = {}
FIGURES_FILE = Path("build") / "reliability-faults.json"

Deploy = Callable[..., Awaitable[Deployment]]


def add_figure(name: str, amount: int | float = 1) -> None:
    """Add `amount` to the counter `name` (created at zero)."""
    FIGURES[name] = FIGURES.get(name, 0) + amount


def set_figure(name: str, value: Any) -> None:
    FIGURES[name] = value


def record_workload(workload: Workload) -> None:
    """Count what a workload that ran under faults went through."""
    add_figure("sagas completed under faults", workload.stats.sagas_completed)
    add_figure("client calls retried after failures", sum(workload.stats.failures.values()))
    set_figure("workload seed", workload.seed)


@pytest.fixture(scope="session")
def fault_figures() -> dict[str, Any]:
    return FIGURES


@pytest.fixture
async def deploy() -> AsyncIterator[Deploy]:
    """Start deployments of the service, each on databases and a vhost of its own.

    `await deploy("kill", {"LOGGER_LEVEL": "DEBUG"}, redeliveries=3)` (`own_role=True`:
    the service connects as a role granted only what it needs); every
    deployment is stopped (SIGTERM, exit code 0 expected) and removed after
    the test.
    """
    async with AsyncExitStack() as stack:

        async def start(
            prefix: str,
            extra_env: Mapping[str, str] | None = None,
            *,
            redeliveries: int = 1,
            database_via: tuple[str, int] | None = None,
            own_role: bool = False,
        ) -> Deployment:
            return await stack.enter_async_context(
                deployment(
                    prefix,
                    extra_env,
                    redeliveries=redeliveries,
                    database_via=database_via,
                    own_role=own_role,
                )
            )

        yield start


@dataclass(frozen=True)
class CommandsApi:
    address: tuple[str, int]
    amqp_url: str
    service: ServiceProcess
    metrics_address: str


@pytest.fixture(scope="module")
async def commands_api() -> AsyncIterator[CommandsApi]:
    async with running_commands_api() as api:
        yield api


# Descriptors the service of `few_connections` may open: each gRPC server holds a quarter.
FEW_DESCRIPTORS = 256


@pytest.fixture(scope="module")
async def few_connections() -> AsyncIterator[CommandsApi]:
    """The Commands API of a process that may open FEW_DESCRIPTORS file descriptors."""
    limited = ("prlimit", f"--nofile={FEW_DESCRIPTORS}:{FEW_DESCRIPTORS}", *financing_command())
    async with running_commands_api(limited) as api:
        yield api


@asynccontextmanager
async def running_commands_api(
    command: Sequence[str] | None = None,
) -> AsyncIterator[CommandsApi]:
    name = infra.unique_name("fin_fault_grpc")
    amqp_url = infra.create_vhost(name)
    try:
        port = free_port()
        metrics_address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "COMMAND_SERVER_ADDRESS": f"127.0.0.1:{port}",
            "QUERY_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
            "METRICS_ADDRESS": metrics_address,
            "AMQP_ADDRESS": amqp_url,
            "LOGGER_LEVEL": "INFO",
        }
        # Only the listener runs: nothing consumes, so queue depths show what was enqueued.
        service = ServiceProcess(
            env,
            Path(tempfile.gettempdir()) / f"{name}.service.log",
            args=("serve", "--components", "commands-api"),
            command=command,
        )
        try:
            await service.start()
            yield CommandsApi(("127.0.0.1", port), amqp_url, service, metrics_address)
            assert service.running, f"the service died:\n{service.log_tail()}"
            assert await service.stop() == 0
        finally:
            await service.kill()
    finally:
        infra.delete_vhost(name)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for name, count in workloads.CHECKS.items():
        add_figure(name, count)
    workloads.CHECKS.clear()
    if not FIGURES:
        return
    path = config.rootpath / FIGURES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(FIGURES, indent=2, sort_keys=True, default=str) + "\n")
    terminalreporter.section("fault-injection figures")
    for name, value in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{name}: {value}")
    terminalreporter.write_line(f"(written to {path})")
