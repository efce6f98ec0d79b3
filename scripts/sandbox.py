"""A throwaway local deployment for the demo and the benchmark.

Fresh databases and a vhost of their own on the local PostgreSQL and
RabbitMQ, `financing serve` as a child process on free ports, all removed
afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import asyncpg

from financing.config import Database
from tests.support import infra
from tests.support.service import ServiceProcess, free_port

HOW_TO_START = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "RabbitMQ": "rabbitmq-server -detached",
}


@dataclass(frozen=True)
class Sandbox:
    command_db: Database
    query_db: Database
    amqp_url: str
    command_address: tuple[str, int]
    query_address: tuple[str, int]
    service: ServiceProcess


async def preflight() -> None:
    """Fail fast, saying how to start what is missing."""
    problems = []
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
    for name, where, exc in problems:
        print(f"{name} is not reachable at {where}: {exc}", file=sys.stderr)
        print(f"  start it with: {HOW_TO_START[name]}", file=sys.stderr)
    if problems:
        raise SystemExit(1)


@contextlib.asynccontextmanager
async def sandbox(prefix: str, extra_env: dict[str, str] | None = None) -> AsyncIterator[Sandbox]:
    await preflight()
    name = infra.unique_name(prefix)
    command_db = await infra.create_database(f"{name}_events")
    query_db = await infra.create_database(f"{name}_queries")
    amqp_url = infra.create_vhost(name)
    command_address = ("127.0.0.1", free_port())
    query_address = ("127.0.0.1", free_port())
    env = {
        **os.environ,
        "COMMAND_SERVER_ADDRESS": f"{command_address[0]}:{command_address[1]}",
        "QUERY_SERVER_ADDRESS": f"{query_address[0]}:{query_address[1]}",
        "COMMAND_DB_CONNECTION_STRING": command_db.dsn(),
        "QUERY_DB_CONNECTION_STRING": query_db.dsn(),
        "AMQP_ADDRESS": amqp_url,
        "LOGGER_LEVEL": "INFO",
        **(extra_env or {}),
    }
    log_dir = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    service = ServiceProcess(env, log_dir / "service.log")
    try:
        await service.start()
        yield Sandbox(command_db, query_db, amqp_url, command_address, query_address, service)
        code = await service.stop()
        if code != 0:
            raise SystemExit(f"financing serve exited with {code}; log: {service.log_path}")
    finally:
        await service.kill()
        await infra.drop_database(command_db.connect_kwargs["database"])
        await infra.drop_database(query_db.connect_kwargs["database"])
        infra.delete_vhost(name)
