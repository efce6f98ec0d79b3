"""The bench's reading of the servers' CPU finds the servers' processes, and not its own."""

from __future__ import annotations

import os

import asyncpg

from financing.config import Database
from scripts.bench_common import servers_cpu_seconds


async def test_a_connections_backend_is_read_as_postgresql_beside_the_brokers_processes(
    command_database: Database,
) -> None:
    conn = await asyncpg.connect(**command_database.connect_kwargs)
    try:
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        found = servers_cpu_seconds()
    finally:
        await conn.close()

    assert found[backend][0] == "PostgreSQL"
    assert found[backend][1] >= 0.0
    assert "RabbitMQ" in {server for server, _ in found.values()}
    assert os.getpid() not in found
