"""Fixtures shared by every test: one set of databases and one vhost per run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from financing.config import Database
from tests.support import infra


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    infra.delete_vhosts_left()


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
