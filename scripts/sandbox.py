"""The demo's and the benchmark's deployment: checked dependencies, then a throwaway one.

Fresh databases and a vhost of their own on the local PostgreSQL and
RabbitMQ, `financing serve` as a child process on free ports, all removed
afterwards (tests/support/deployment.py, shared with the test suites).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Mapping

import aio_pika
import asyncpg

from tests.support import infra
from tests.support.deployment import LocalDeployment, local_deployment

HOW_TO_START = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "RabbitMQ": "rabbitmq-server -detached",
}


async def preflight() -> None:
    """Fail fast, saying how to start what is missing."""
    problems: list[tuple[str, str, Exception]] = []
    try:
        conn = await asyncpg.connect(
            host=infra.PG_HOST,
            port=infra.PG_PORT,
            user=infra.PG_USER,
            database="postgres",
            timeout=3,
        )
        await conn.close()
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        problems.append(("PostgreSQL", f"{infra.PG_HOST}:{infra.PG_PORT}", exc))
    try:
        amqp = await aio_pika.connect(infra.amqp_url(""), timeout=3)
        await amqp.close()
    except Exception as exc:
        problems.append(("RabbitMQ", f"{infra.AMQP_HOST}:{infra.AMQP_PORT}", exc))
    for name, where, error in problems:
        print(f"{name} is not reachable at {where}: {error}", file=sys.stderr)
        print(f"  start it with: {HOW_TO_START[name]}", file=sys.stderr)
    if problems:
        raise SystemExit(1)


@contextlib.asynccontextmanager
async def sandbox(
    prefix: str, extra_env: Mapping[str, str] | None = None
) -> AsyncIterator[LocalDeployment]:
    """A deployment of the service on the local PostgreSQL and RabbitMQ, removed afterwards."""
    await preflight()
    async with local_deployment(prefix, extra_env=extra_env) as deployment:
        yield deployment
