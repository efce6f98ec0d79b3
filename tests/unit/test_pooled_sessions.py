"""Start-up refuses a database whose connections a pooler hands out per transaction
(PgBouncer's transaction mode), and takes one whose sessions are its own: against a
model of each, the one thing told apart being which server backend runs a statement."""

from __future__ import annotations

from typing import Any

import pytest

from financing.adapters.postgres import connection as connection_module
from financing.adapters.postgres.connection import refuse_pooled_sessions
from financing.application.errors import Refused
from financing.config import Database


class TransactionPooler:
    """Server backends handed to a client for each transaction, or each statement outside
    one; the one given back last is lent first (PgBouncer's default)."""

    def __init__(self, *backends: int) -> None:
        self.idle = list(backends)

    def take(self) -> int:
        return self.idle.pop()

    def give(self, backend: int) -> None:
        self.idle.append(backend)


class Client:
    """A connection through `pooler`, or, without one, to a session of its own."""

    def __init__(self, pooler: TransactionPooler | None, own: int) -> None:
        self.pooler, self.own = pooler, own
        self.pinned: int | None = None

    async def execute(self, statement: str) -> None:
        if self.pooler is None:
            return
        if statement == "BEGIN":
            self.pinned = self.pooler.take()
        elif statement == "COMMIT" and self.pinned is not None:
            self.pooler.give(self.pinned)
            self.pinned = None

    async def fetchval(self, statement: str) -> int:
        assert statement == "SELECT pg_backend_pid()"
        if self.pooler is None:
            return self.own
        if self.pinned is not None:
            return self.pinned
        backend = self.pooler.take()
        self.pooler.give(backend)
        return backend

    async def close(self) -> None:
        pass


def connecting(pooler: TransactionPooler | None, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = iter(range(1, 100))

    async def connect(db: Database, dependency: str, **_: Any) -> Client:
        return Client(pooler, next(opened))

    monkeypatch.setattr(connection_module, "connect", connect)


DB = Database({"host": "127.0.0.1", "database": "financing"})


async def test_sessions_of_their_own_are_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    connecting(None, monkeypatch)
    await refuse_pooled_sessions(DB, "command database")


@pytest.mark.parametrize("backends", [(101, 102), (101, 102, 103)])
async def test_connections_handed_out_per_transaction_are_refused(
    monkeypatch: pytest.MonkeyPatch, backends: tuple[int, ...]
) -> None:
    """Regression: behind PgBouncer in transaction mode the service started, ran two
    relayers and sent every event twice; a statement it had prepared ran on a session
    where its name was another statement's."""
    connecting(TransactionPooler(*backends), monkeypatch)
    with pytest.raises(Refused, match="PgBouncer's transaction or statement mode"):
        await refuse_pooled_sessions(DB, "command database")
