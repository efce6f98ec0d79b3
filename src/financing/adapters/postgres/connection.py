"""Connections to PostgreSQL, and which of its errors mean "the database is unreachable"."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from financing.config import Database

# A connection that statements can run on: a dedicated one or one borrowed from a pool.
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy

# Errors that say nothing about the message being processed, only that the
# database cannot be reached right now (down, restarting, connection cut,
# too busy). Consumers retry these forever, with backoff, and never ack.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; includes ConnectionError
    TimeoutError,  # connect or command timeout (asyncio.TimeoutError is the same class)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, ConnectionDoesNotExistError
    asyncpg.InterfaceError,  # "connection is closed" and similar client-side states
    asyncpg.exceptions.AdminShutdownError,  # server shutting down or backend terminated
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,  # server starting up or in recovery
    asyncpg.exceptions.TooManyConnectionsError,
    # The first use of a pooled session the server ended while it sat idle
    # often fails with "cannot switch to state N; another operation (2) is in
    # progress" before the pool notices the session is gone.
    asyncpg.exceptions.InternalClientError,
)


async def create_pool(db: Database, *, min_size: int = 1) -> asyncpg.Pool:
    """A pool of at most `db.pool_max_size` connections, `min_size` opened up front."""
    pool = await asyncpg.create_pool(
        **db.connect_kwargs,
        min_size=min(min_size, db.pool_max_size),
        max_size=db.pool_max_size,
    )
    assert pool is not None  # only None when created without awaiting
    return pool


async def connect(db: Database) -> asyncpg.Connection:
    """One dedicated connection, outside any pool (locks, LISTEN)."""
    return await asyncpg.connect(**db.connect_kwargs)
