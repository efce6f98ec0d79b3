"""Fixtures shared by every test: one set of databases and one vhost per run."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog

from financing.config import Database
from financing.entrypoints.grpc import commands, edge, queries
from tests.support import infra


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    infra.delete_vhosts_left()


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """The logging configuration each test found, given back after it. A test that has the
    command line configure the service's logging in-process (a configuration error of
    `serve`) left structlog filtering below INFO and caching its loggers for every later
    test of the run: `capture_logs` then missed the DEBUG lines a later test waited for."""
    structlog_config = {
        key: list(value) if isinstance(value, list) else value
        for key, value in structlog.get_config().items()
    }
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**structlog_config)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def no_count_of_warnings_left_for_later(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The warnings a test's servers left out are counted on a line of their own when
    their interval ends, 10 s on: written during a later test, that line broke its
    assertions on what was logged. Those a test left out are forgotten as it ends, and
    again as the next begins, the process's and those of the `Warnings` a test made
    itself (one put in place of the process's for the test was left counting)."""
    every = [edge._SENT_AWAY, commands._BUSY, commands._REFUSED, queries._BUSY, queries._SLOW]
    made = edge.Warnings.__init__

    def kept(self: edge.Warnings, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        every.append(self)

    monkeypatch.setattr(edge.Warnings, "__init__", kept)
    for warnings in every:
        warnings._left_out.clear()
    yield
    for warnings in every:
        warnings._left_out.clear()


@pytest.fixture(scope="session")
def run_name() -> str:
    return infra.unique_name("fin_test")


@pytest.fixture(scope="session")
async def command_database(run_name: str) -> AsyncIterator[Database]:
    name = f"{run_name}_commands"
    yield await infra.create_database(name)
    await infra.drop_database(name)


@pytest.fixture(scope="session")
async def query_database(run_name: str) -> AsyncIterator[Database]:
    name = f"{run_name}_queries"
    yield await infra.create_database(name)
    await infra.drop_database(name)


@pytest.fixture(scope="session")
def amqp_url(run_name: str) -> Iterator[str]:
    url = infra.create_vhost(run_name)
    yield url
    infra.delete_vhost(run_name)
