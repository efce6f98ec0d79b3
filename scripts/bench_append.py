"""Appending to the event store: the service's unit of work against what the same
PostgreSQL does with the same statements in C, and against another event store.

Each contender gets a fresh database on the same server, and `writers`
concurrent writers for the same number of seconds:

- ours: `PostgresEventStore.unit_of_work()` as the message pipeline runs a
  command handler in it (`load(Investor)` of a fresh id, `create`, `save`,
  `record`; the commit bell asked to ring after each commit): the service's own
  code, on uvloop as `financing serve` runs it, with a pool of `writers`
  connections;
- pgbench with our statements: one unit of work is run first with asyncpg's
  query logger on its connection, and exactly the statements it sent (until
  the pool's reset on release; the rows of an executemany pipelined as asyncpg
  pipelines them), but for the commit bell's ring, become a pgbench script.
  It is captured as a unit of work commits beside another, as 98-99% of them
  do among 16 writers: its write does not notify (one committing alone
  notifies in it), and it rings the bell after it. Most find a ring on its way
  and ring none of their own (rings coalesce: 0.12-0.13 rings per unit of
  work), so the baseline leaves the ring out and ours pays for the rings it
  sends. The
  script runs prepared (`-M prepared`, as asyncpg prepares them), with a fresh
  aggregate id and message id per transaction;
- asyncpg alone with our statements: the captured statements sent again by
  asyncpg on a pool like the service's, with fresh ids, and no event store code
  around them: what the driver itself costs;
- pgbench's simple one-row insert: one INSERT per transaction (autocommit),
  the cost of a commit on this server;
- the eventsourcing library's PostgreSQL recorders (psycopg 3, synchronous, so
  `writers` threads): `insert_events` of one event per transaction, with the
  application recorder (events in one total order, as ours are: it locks its
  table while inserting) and the aggregate recorder (no order across streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from glob import glob
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg.connection import LoggedQuery

from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.application.ports import Cause, Processed
from financing.config import Database
from financing.domain.aggregates import Investor
from tests.support import infra

CONSUMER = "create_investor"  # the command handler whose unit of work this is
BALANCE = Decimal(100)


def event_store_database(prefix: str) -> contextlib.AbstractAsyncContextManager[Database]:
    """A fresh database holding the service's event store schema, dropped afterwards."""
    return infra.migrated_database(prefix, "commands")


# ---------------------------------------------------------------- ours


async def one_unit(store: PostgresEventStore) -> tuple[uuid.UUID, str]:
    """What the CreateInvestor handler's delivery does, on a fresh investor."""
    investor_id, message_id = uuid.uuid4(), str(uuid.uuid4())
    async with store.unit_of_work(Cause(message_id, message_id)) as uow:
        investor = await uow.load(Investor, investor_id)
        investor.create(BALANCE)
        appended = len(investor.changes)
        await uow.save(investor)
        await uow.record(
            CONSUMER, message_id, Processed("CreateInvestor", "processed", "", appended)
        )
    return investor_id, message_id


async def units_per_second(db: Database, writers: int, seconds: float) -> float:
    """Units of work committed per second by `writers` concurrent writers."""
    pool = await create_pool(Database(db.connect_kwargs, writers), min_size=writers)
    store = PostgresEventStore(pool)
    try:
        return await _rate(lambda: one_unit(store), writers, seconds)
    finally:
        await store.close()
        await pool.close()


async def _rate(unit: Callable[[], Awaitable[object]], writers: int, seconds: float) -> float:
    """How many `unit`s per second `writers` concurrent loops complete, after a warm-up."""
    await asyncio.gather(*(unit() for _ in range(writers)))
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await unit()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return done / (time.perf_counter() - started)


# ---------------------------------------------------------------- our statements, captured


@dataclass(frozen=True)
class Captured:
    statements: list[LoggedQuery]
    fresh: dict[object, str]  # per-unit values (the aggregate id, the message id) -> variable


async def capture(db: Database) -> Captured:
    """The statements one unit of work sends, as asyncpg's query logger sees them."""
    records: list[LoggedQuery] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(records.append)

    pool = await asyncpg.create_pool(**db.connect_kwargs, min_size=1, max_size=1, init=init)
    assert pool is not None
    try:
        store = PostgresEventStore(pool)
        await one_unit(store)  # the first one may also introspect types
        await asyncio.sleep(0.05)  # the logger is called soon after each statement
        records.clear()
        # Captured as a unit of work among many commits, beside another one on its way:
        # its write does not notify (only one committing alone does), and a ring
        # follows, which `_transaction` leaves out.
        store._bell.committing()
        try:
            investor_id, message_id = await one_unit(store)
        finally:
            store._bell.committed()
        await asyncio.sleep(0.05)
        await store.close()
    finally:
        await pool.close()
    return Captured(_transaction(records), {investor_id: "aggregate_id", message_id: "message_id"})


def _transaction(records: list[LoggedQuery]) -> list[LoggedQuery]:
    """The unit of work's own statements: the pool's reset query on release is left
    out (it is one multi-statement query, which pgbench cannot send prepared), and so
    is the commit bell's ring (most units of work among many send none)."""
    for index, record in enumerate(records):
        if "RESET ALL" in record.query.upper():
            records = records[:index]
            break
    kept = [record for record in records if "pg_notify(" not in record.query]
    if len(kept) != 2:  # the load, then the write that does not notify
        raise AssertionError(f"expected a unit of work's two statements, got {records!r}")
    return kept


async def replayed_per_second(
    db: Database, captured: Captured, writers: int, seconds: float
) -> float:
    """Units per second when asyncpg alone sends the captured statements, with fresh ids
    each time, on a pool like the service's: the driver's share without the event store's."""
    pool = await create_pool(Database(db.connect_kwargs, writers), min_size=writers)

    def renewed(args: Sequence[object], new: dict[object, object]) -> list[object]:
        return [
            renewed(value, new) if isinstance(value, list) else new.get(value, value)
            for value in args
        ]

    async def unit() -> None:
        new: dict[object, object] = {}
        for old in captured.fresh:
            fresh = uuid.uuid4()
            new[old] = fresh if isinstance(old, uuid.UUID) else str(fresh)
        async with pool.acquire() as conn:
            for record in captured.statements:
                args: Any = record.args
                if isinstance(args, list):
                    await conn.executemany(record.query, [renewed(row, new) for row in args])
                else:
                    await conn.execute(record.query, *renewed(args or (), new))

    try:
        return await _rate(unit, writers, seconds)
    finally:
        await pool.close()


_PARAMETER = re.compile(r"\$(\d+)")
_MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True)
class PgbenchScript:
    text: str
    constants: dict[str, str]  # -D name=value
    statements: int  # per transaction

    def describe(self) -> str:
        return self.text + "".join(f"\n-- {k} = {v}" for k, v in self.constants.items())


def pgbench_script(captured: Captured) -> PgbenchScript:
    """A pgbench script sending `captured`'s statements, with fresh per-unit values.

    Every argument stays a parameter: per-unit ids become expressions of a random
    bigint drawn per transaction (md5 -> uuid), the rest pgbench variables (-D).
    """
    constants: dict[str, str] = {}
    lines = [f"\\set {name} random(1, {_MAX_BIGINT})" for name in captured.fresh.values()]
    statements = 0

    def argument(value: object) -> str:
        if value is None:
            return "NULL"
        if isinstance(value, uuid.UUID | str) and value in captured.fresh:
            variable = captured.fresh[value]
            expression = f"md5(:{variable}::text)::uuid"
            return expression if isinstance(value, uuid.UUID) else f"({expression}::text)"
        if isinstance(value, list) and any(
            isinstance(v, uuid.UUID | str) and v in captured.fresh for v in value
        ):
            # An array holding a per-unit value: built element by element.
            return "ARRAY[" + ", ".join(argument(v) for v in value) + "]"
        name = f"c{len(constants) + 1}"
        constants[name] = _text(value)
        return f":{name}"

    def render(query: str, args: Sequence[object]) -> str:
        sql = " ".join(query.split()).rstrip(";")
        return _PARAMETER.sub(lambda m: argument(args[int(m.group(1)) - 1]), sql) + ";"

    for record in captured.statements:
        args: Any = record.args
        if isinstance(args, list):  # executemany: one row each, pipelined as asyncpg does
            lines.append("\\startpipeline")
            lines.extend(render(record.query, row) for row in args)
            lines.append("\\endpipeline")
            statements += len(args)
        else:
            lines.append(render(record.query, args or ()))
            statements += 1
    return PgbenchScript("\n".join(lines) + "\n", constants, statements)


def _text(value: object) -> str:
    """A parameter's value in PostgreSQL's text form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "{" + ",".join(_element(v) for v in value) + "}"
    if "\n" in str(value):
        raise ValueError(f"a pgbench variable cannot hold a newline: {value!r}")
    return str(value)


def _element(value: object) -> str:
    if value is None:
        return "NULL"
    text = _text(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


SIMPLE_INSERT = PgbenchScript(
    "INSERT INTO bench_one_row (body) VALUES (:body);\n", {"body": '{"Amount":100}'}, 1
)


# ---------------------------------------------------------------- pgbench


def pgbench_binary() -> str:
    found = sorted(glob("/usr/lib/postgresql/*/bin/pgbench"))
    if not found:
        raise FileNotFoundError("pgbench not found under /usr/lib/postgresql/*/bin")
    return found[-1]


@dataclass(frozen=True)
class PgbenchRun:
    tps: float
    failed: int


def pgbench(db: Database, script: PgbenchScript, clients: int, seconds: float) -> PgbenchRun:
    """Transactions per second of `script` with `clients` clients (prepared statements)."""
    kw = db.connect_kwargs
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as file:
        file.write(script.text)
    try:
        command = [
            pgbench_binary(),
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={clients}",
            f"--jobs={min(clients, 2)}",
            f"--file={file.name}",
            f"--host={kw['host']}",
            f"--port={kw['port']}",
            f"--username={kw['user']}",
        ]
        command += [f"--define={name}={value}" for name, value in script.constants.items()]
        # One transaction first: a script the server refuses fails here, loudly.
        _run([*command, "--transactions=1", kw["database"]])
        out = _run([*command, f"--time={max(1, round(seconds))}", kw["database"]])
    finally:
        Path(file.name).unlink()
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if tps is None:
        raise RuntimeError(f"no tps in pgbench's output:\n{out}")
    return PgbenchRun(float(tps.group(1)), int(failed.group(1)) if failed else 0)


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or "ERROR" in done.stderr:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}\n{done.stdout}")
    return done.stdout


async def prepare_simple_insert(db: Database) -> None:
    conn = await asyncpg.connect(**db.connect_kwargs)
    try:
        await conn.execute(
            "CREATE TABLE bench_one_row (id bigserial PRIMARY KEY, body text NOT NULL)"
        )
    finally:
        await conn.close()


# ---------------------------------------------------------------- eventsourcing


def eventsourcing_inserts_per_second(
    db: Database, writers: int, seconds: float, *, application: bool
) -> float:
    """`insert_events` of one event per transaction, `writers` threads, per second."""
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.postgres import (
        PostgresAggregateRecorder,
        PostgresApplicationRecorder,
        PostgresDatastore,
    )

    kw = db.connect_kwargs
    datastore = PostgresDatastore(
        kw["database"], kw["host"], kw["port"], kw["user"], "", pool_size=writers
    )
    recorder_class = PostgresApplicationRecorder if application else PostgresAggregateRecorder
    recorder = recorder_class(datastore, events_table_name="stored_events")
    recorder.create_table()

    def insert() -> None:
        investor = uuid.uuid4()
        recorder.insert_events(
            [
                StoredEvent(
                    originator_id=investor,
                    originator_version=1,
                    topic="financing.domain.events:InvestorCreatedEvent",
                    state=f'{{"InvestorID":"{investor}"}}'.encode(),
                )
            ]
        )

    try:
        return _threads(insert, writers, seconds)
    finally:
        datastore.close()


def _threads(work: Callable[[], None], threads: int, seconds: float) -> float:
    for _ in range(threads):
        work()  # opens the pool's connections, prepares
    done = [0] * threads
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        try:
            while time.perf_counter() < deadline:
                work()
                done[index] += 1
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(done) / (time.perf_counter() - started)
