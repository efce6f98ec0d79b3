"""Acceptance fixtures: one running service per session, driven over gRPC and AMQP.

By default the session starts `financing serve` on databases and a vhost of
its own. With FINANCING_ACCEPTANCE_TARGET=external it drives the deployment
that COMMAND_SERVER_ADDRESS, QUERY_SERVER_ADDRESS and AMQP_ADDRESS point at,
starts nothing, and only looks at events of aggregates its tests created;
tests marked own_service (restarts, a second service) are skipped there.

    pytest -m acceptance                                        # a service of its own
    FINANCING_ACCEPTANCE_TARGET=external pytest -m acceptance   # a running deployment
    FINANCING_ACCEPTANCE_TARGET=split pytest -m acceptance      # every component twice,
                                                                # each in a process of its own

Other knobs: FINANCING_ACCEPTANCE_START_TIMEOUT (seconds to "service ready",
default 40), FINANCING_ACCEPTANCE_LOG_LEVEL (the service's LOGGER_LEVEL),
FINANCING_ACCEPTANCE_REDELIVERIES=N (every delivery handled N times at once: a
redelivery storm, tests.support.storm), and any FINANCING_* variable of the
service itself, which is passed through.
A failing test shows the service log written while it ran.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator

import pytest

from tests.acceptance.driver import Financing, financing_for
from tests.acceptance.system import (
    SERVICES,
    TARGET_VARIABLE,
    ServiceProcess,
    System,
    external_system,
    external_target,
    local_system,
    split_target,
)

OWN_SERVICE_MARKER = "own_service"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{OWN_SERVICE_MARKER}: restarts or starts the service itself (not possible against"
        f" {TARGET_VARIABLE}=external)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if external_target():
        reason = (
            f"{TARGET_VARIABLE}=external: this test stops, restarts or starts a service itself,"
            " which an already running deployment does not allow"
        )
    elif split_target():
        reason = (
            f"{TARGET_VARIABLE}=split: this test stops, restarts or starts a service itself;"
            " the split deployment is ten processes, not one service"
        )
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker(OWN_SERVICE_MARKER):
            item.add_marker(skip)


@pytest.fixture(scope="session")
async def system() -> AsyncIterator[System]:
    context = external_system() if external_target() else local_system(split=split_target())
    async with context as running:
        yield running


@pytest.fixture(scope="session")
async def financing(system: System) -> AsyncIterator[Financing]:
    async with financing_for(system) as driver:
        yield driver


@pytest.fixture
def service(system: System) -> ServiceProcess:
    """The service process of this session (tests that use it are marked own_service)."""
    assert system.service is not None, "no service process against an external deployment"
    return system.service


@pytest.fixture(autouse=True)
def _service_log_offsets(request: pytest.FixtureRequest) -> Iterator[None]:
    # Where each service log stood when the test began: a failure shows what followed.
    request.node.stash[_LOG_OFFSETS] = {id(s): s.log_size() for s in SERVICES}
    yield


_LOG_OFFSETS = pytest.StashKey[dict[int, int]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when in ("setup", "call", "teardown"):
        offsets = item.stash.get(_LOG_OFFSETS, {})
        for service in SERVICES:
            since = offsets.get(id(service), 0)
            report.sections.append(
                (
                    f"financing serve log ({service.log_path})",
                    f"service {service.state()}\n{service.log_tail(since)}",
                )
            )
    return report
