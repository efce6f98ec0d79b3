"""Per-run PostgreSQL databases and RabbitMQ vhosts, and waiting with a deadline."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.schema import WRITES, migrate
from financing.config import Database

T = TypeVar("T")

PG_HOST = os.environ.get("FINANCING_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("FINANCING_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("FINANCING_TEST_PG_USER", "postgres")
AMQP_HOST = os.environ.get("FINANCING_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("FINANCING_TEST_AMQP_PORT", "5672"))


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def database(name: str) -> Database:
    return Database({"host": PG_HOST, "port": PG_PORT, "user": PG_USER, "database": name}, 10)


async def _admin() -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")


async def create_database(name: str) -> Database:
    conn = await _admin()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database(name)


async def set_read_only(name: str, read_only: bool) -> None:
    """New sessions of database `name` take no writes, as a standby's or a streaming
    replica's take none (every write refused with 25006), or take them again."""
    await alter_database(
        name, "SET default_transaction_read_only = on" if read_only else "RESET ALL"
    )


async def alter_database(name: str, change: str) -> None:
    """`ALTER DATABASE name CHANGE` (`SET statement_timeout = '1ms'`, `RESET ALL`): what
    sessions that start from then on take."""
    conn = await _admin()
    try:
        await conn.execute(f'ALTER DATABASE "{name}" {change}')
    finally:
        await conn.close()


async def create_role(name: str) -> None:
    """A login role with no privileges of its own (no superuser, no CREATE)."""
    conn = await _admin()
    try:
        await conn.execute(f'CREATE ROLE "{name}" LOGIN')
    finally:
        await conn.close()


async def drop_role(name: str) -> None:
    """Drop role `name`, once the databases where it was granted anything are dropped."""
    conn = await _admin()
    try:
        await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await conn.close()


async def grant_service_role(db: Database, schema: str, role: str) -> None:
    """Migrate `db`'s `schema` as its owner, and grant `role` what running the service on
    it needs and no more: reading its tables, and the writes of `WRITES`."""
    pool = await create_pool(db)
    try:
        await migrate(pool, schema)
        schemas = ", ".join(
            {"public", *(table.split(".")[0] for table in WRITES[schema] if "." in table)}
        )
        await pool.execute(f'GRANT USAGE ON SCHEMA {schemas} TO "{role}"')
        await pool.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA {schemas} TO "{role}"')
        for table, privileges in WRITES[schema].items():
            kind = "SEQUENCE" if table.endswith("_seq") else "TABLE"
            await pool.execute(f'GRANT {privileges} ON {kind} {table} TO "{role}"')
    finally:
        await pool.close()


async def drop_database(name: str) -> None:
    conn = await _admin()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def terminate_sessions(db: Database, *, sparing: int | None = None) -> None:
    """End every session on `db` (but the backend `sparing`), waiting until each has ended."""
    conn = await _admin()
    try:
        await _terminate(conn, db.connect_kwargs["database"], sparing)
    finally:
        await conn.close()


async def _terminate(conn: asyncpg.Connection, name: str, sparing: int | None) -> None:
    ended = await conn.fetch(
        "SELECT pg_terminate_backend(pid, 10000) AS ended FROM pg_stat_activity"
        " WHERE datname = $1 AND pid <> pg_backend_pid() AND pid IS DISTINCT FROM $2",
        name,
        sparing,
    )
    assert all(row["ended"] for row in ended), f"sessions on {name} still running"


@contextlib.asynccontextmanager
async def refusing_connections(db: Database) -> AsyncIterator[None]:
    """Inside the block `db` accepts no connection and its sessions are ended; it
    accepts connections again afterwards, however the block ends."""
    name = db.connect_kwargs["database"]
    conn = await _admin()
    try:
        await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await _terminate(conn, name, None)
            yield
        finally:
            await conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    finally:
        await conn.close()


async def advisory_lock_holders(pool: asyncpg.Pool) -> list[int]:
    """The sessions holding advisory locks of the pool's database (a relayer holds two:
    the relayer lock and its schema's), each once."""
    rows = await pool.fetch(
        "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return [row["pid"] for row in rows]


@contextlib.asynccontextmanager
async def fresh_database(prefix: str) -> AsyncIterator[Database]:
    """A database of its own, dropped afterwards."""
    name = unique_name(prefix)
    db = await create_database(name)
    try:
        yield db
    finally:
        await drop_database(name)


@contextlib.asynccontextmanager
async def migrated_database(prefix: str, schema: str) -> AsyncIterator[Database]:
    """A fresh database holding the service's `schema` ("commands" or "queries")."""
    async with fresh_database(prefix) as db:
        pool = await create_pool(db)
        try:
            await migrate(pool, schema)
        finally:
            await pool.close()
        yield db


@contextlib.asynccontextmanager
async def migrated_pool(prefix: str, schema: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh database holding the service's `schema`."""
    async with migrated_database(prefix, schema) as db:
        pool = await create_pool(db)
        try:
            yield pool
        finally:
            await pool.close()


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


# Each rabbitmqctl call starts an Erlang VM: a third of a second of CPU. Three calls a
# vhost (add, permissions, delete) took a quarter of the suite's time; a vhost is made
# in one call now, those whose name does not matter DELETED_AT_ONCE at a time
# (`made_vhost`), and the deleted ones are deleted DELETED_AT_ONCE at a time (the rest,
# and those made and not taken, at the end of the run: `delete_vhosts_left`).
DELETED_AT_ONCE = 8
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_deleting: list[str] = []
_made: list[str] = []  # made and not yet taken (`made_vhost`)
_vhosts_lock = threading.Lock()


def create_vhost(name: str) -> str:
    """Create a vhost for guest and return its AMQP URL."""
    _create_vhosts([name])
    return amqp_url(name)


def made_vhost(prefix: str) -> str:
    """The name of a new vhost for guest, one of DELETED_AT_ONCE made at once (named
    after the prefix of the call that made them)."""
    with _vhosts_lock:
        if not _made:
            names = [unique_name(prefix) for _ in range(DELETED_AT_ONCE)]
            try:
                _create_vhosts(names)
            except BaseException:
                _deleting.extend(names)  # those made before the failure: at the end
                raise
            _made.extend(names)
        return _made.pop()


def _create_vhosts(names: list[str]) -> None:
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(f"a vhost name of letters, digits, '_', '.' and '-': {name!r}")
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    definitions = {
        "vhosts": [{"name": name} for name in names],
        "permissions": [{"user": "guest", "vhost": name, **everything} for name in names],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(definitions, file)
        file.flush()
        os.chmod(file.name, 0o644)  # the broker's own user reads it
        _rabbitmqctl("import_definitions", file.name)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"


def delete_vhost(name: str) -> None:
    """Delete the vhost `name`, now or with the next ones (DELETED_AT_ONCE)."""
    with _vhosts_lock:
        _deleting.append(name)
        if len(_deleting) < DELETED_AT_ONCE:
            return
        names = _deleting[:]
        _deleting.clear()
    _delete_vhosts(names)


@atexit.register  # also for the scripts that make vhosts, and a run interrupted
def delete_vhosts_left() -> None:
    """Delete the vhosts `delete_vhost` has not deleted yet, and those made untaken."""
    with _vhosts_lock:
        names = _deleting + _made
        _deleting.clear()
        _made.clear()
    if names:
        _delete_vhosts(names)


def _delete_vhosts(names: list[str]) -> None:
    """Delete `names` in one call; one by one where the broker has not the functions
    the call uses, or did not delete them all."""
    listed = ", ".join(f'<<"{name}">>' for name in names)
    deleting = (
        f"Vs = [{listed}], "
        '[catch rabbit_vhost:delete(V, <<"tests">>) || V <- Vs], '
        "[V || V <- Vs, rabbit_vhost:exists(V)]."
    )
    done = subprocess.run(
        ["rabbitmqctl", "-q", "eval", deleting], capture_output=True, text=True, timeout=60
    )
    if done.returncode == 0 and done.stdout.strip() == "[]":
        return
    try:
        listed_now = subprocess.run(
            ["rabbitmqctl", "-q", "list_vhosts", "name"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        for name in set(names) & set(listed_now):
            _rabbitmqctl("delete_vhost", name)
    except BaseException:
        with _vhosts_lock:
            _deleting.extend(names)  # tried again with the next ones, or at the end
        raise


async def holds(value: T) -> T:
    """`value` as a `wait_until` probe, for a condition read without I/O."""
    return value


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float = 15.0,  # noqa: ASYNC109 - a deadline for the whole poll, not one call
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last value: {last!r}"
            )
        await asyncio.sleep(interval)


class OneConnectionPool:
    """A pool of one connection, lent to code under test so that a test sees every
    statement it sends on it (asyncpg's query logger on that connection)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def acquire(self) -> Any:
        return self._conn

    async def release(self, conn: Any) -> None:
        pass
