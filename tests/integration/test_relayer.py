"""The relayer publishes committed events in commit order and never skips one.

Against the real PostgreSQL and RabbitMQ: events are appended through the
event store, the relayer runs as it does in the service, and a queue of the
test's own bound to `events` shows what went out. An outage is waited out; a
broken invariant stops the relayer loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractQueue
from structlog.testing import capture_logs

from financing.adapters.postgres import outbox as outbox_module
from financing.adapters.postgres.connection import (
    COMMAND_DATABASE,
    PooledSessions,
    connect,
    create_pool,
)
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.outbox import (
    RELAYER_LOCK,
    CommitListener,
    PostgresOutbox,
    PostgresRelayerLock,
)
from financing.adapters.postgres.schema import migrate
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker, close_channel
from financing.adapters.rabbitmq.publisher import Publisher, PublishFailed
from financing.application.errors import Unavailable
from financing.application.ports import (
    Cause,
    Envelope,
    EventPublisher,
    Outbox,
    StoredEvent,
    event_message_id,
)
from financing.application.retry import Outages
from financing.config import Database
from financing.domain.aggregates import Investor
from financing.workers import relayer as relayer_module
from financing.workers.relayer import Relayer
from tests.support import infra
from tests.support.infra import holds, wait_until
from tests.support.service import run_cli


@pytest.fixture
async def database() -> AsyncIterator[Database]:
    async with infra.fresh_database("fin_relayer") as db:
        yield db


@pytest.fixture
async def pool(database: Database) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database, COMMAND_DATABASE)
    await migrate(pool, "commands")
    yield pool
    await pool.close()


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    broker = Broker([amqp_url], Outages())
    await broker.connection()
    yield broker
    await broker.close()


@pytest.fixture
async def observed(broker: Broker) -> AsyncIterator[AbstractQueue]:
    """A queue of the test's own, bound to `events` before anything is relayed."""
    channel = await broker.channel()
    events = await topology.declare_events_exchange(channel)
    queue = await channel.declare_queue(infra.unique_name("relayed"), exclusive=True)
    await queue.bind(events)
    yield queue
    await close_channel(channel)


@pytest.fixture
async def publisher(broker: Broker) -> AsyncIterator[Publisher]:
    publisher = Publisher(broker)
    yield publisher
    await publisher.close()


class HalfwayPublisher:
    """Publishes `succeed` envelopes for real, then fails once: a broker lost mid-batch."""

    def __init__(self, real: Publisher, succeed: int) -> None:
        self.real = real
        self.succeed = succeed
        self.failures = 0

    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        if self.failures or self.succeed >= len(envelopes):
            await self.real.publish_events(envelopes)
            self.succeed -= len(envelopes)
            return
        await self.real.publish_events(envelopes[: self.succeed])
        self.succeed = 0
        self.failures += 1
        raise PublishFailed("broker went away half way through the batch")


async def append_investor_story(store: PostgresEventStore, investor_id: UUID) -> None:
    """Four events on one stream, each in its own transaction."""
    async with store.unit_of_work() as uow:
        investor = await uow.load(Investor, investor_id)
        investor.create(Decimal(100))
        await uow.save(investor)
    for amount in ("10", "5"):
        async with store.unit_of_work() as uow:
            investor = await uow.load(Investor, investor_id)
            investor.place_bid(uuid4(), Decimal(amount))
            await uow.save(investor)


async def receive(
    queue: AbstractQueue, count: int, within: float = 10.0
) -> list[tuple[str, str, int]]:
    """(message id, aggregate id, version) of the next `count` messages."""
    got: list[tuple[str, str, int]] = []
    async with asyncio.timeout(within), queue.iterator() as messages:
        async for message in messages:
            headers = message.headers
            assert all(isinstance(value, str) for value in headers.values()), headers
            got.append(
                (
                    str(headers["_watermill_message_uuid"]),
                    str(headers["aggregateID"]),
                    int(str(headers["aggregateVersion"])),
                )
            )
            await message.ack()
            if len(got) == count:
                break
    return got


def relayer(
    database: Database,
    outbox: Outbox,
    publisher: EventPublisher,
    poll_interval: float = 0.1,
    **marking: Any,
) -> tuple[Relayer, CommitListener]:
    """A relayer wired as the service wires it, and its commit listener (to close)."""
    wake_up = CommitListener(database)
    lock = PostgresRelayerLock(database)
    return Relayer(
        outbox, publisher, lock, wake_up, Outages(), poll_interval=poll_interval, **marking
    ), wake_up


@contextlib.asynccontextmanager
async def relaying(
    database: Database,
    pool: asyncpg.Pool,
    publisher: EventPublisher,
    poll_interval: float = 0.1,
    outbox: Outbox | None = None,
    **marking: Any,
) -> AsyncIterator[asyncio.Task[None]]:
    """A relayer running until the block ends. `marking`: when it moves its checkpoint
    (`mark_every`, `mark_after`)."""
    outbox = PostgresOutbox(pool) if outbox is None else outbox
    running, wake_up = relayer(database, outbox, publisher, poll_interval, **marking)
    task = asyncio.create_task(running.run())
    try:
        yield task
    finally:
        task.cancel()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await task  # anything but the cancellation fails the test
        finally:
            await wake_up.close()


async def test_events_are_published_in_commit_order_with_deterministic_ids(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    store = PostgresEventStore(pool)
    first, second = uuid4(), uuid4()
    await append_investor_story(store, first)
    await append_investor_story(store, second)

    async with relaying(database, pool, publisher):
        got = await receive(observed, 8)

    expected = [
        (
            str(event_message_id(stored.aggregate_id, stored.version)),
            str(stored.aggregate_id),
            stored.version,
        )
        async for stored in store.read_all()
    ]
    assert got == expected
    assert [version for _, aggregate, version in got if aggregate == str(first)] == [1, 2, 3, 4]


async def receive_headers(
    queue: AbstractQueue, count: int, within: float = 10.0
) -> list[dict[str, object]]:
    """The headers of the next `count` messages, exactly as they arrived."""
    got: list[dict[str, object]] = []
    async with asyncio.timeout(within), queue.iterator() as messages:
        async for message in messages:
            got.append(dict(message.headers))
            await message.ack()
            if len(got) == count:
                break
    return got


async def test_events_are_relayed_with_correlation_causation_and_recording_time_as_string_headers(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    store = PostgresEventStore(pool)
    correlated, uncorrelated = uuid4(), uuid4()
    async with store.unit_of_work(Cause(correlation_id="saga-5", causation_id="message-5")) as uow:
        investor = await uow.load(Investor, correlated)
        investor.create(Decimal(100))
        await uow.save(investor)
    async with store.unit_of_work() as uow:  # appended by no message (e.g. a tool)
        investor = await uow.load(Investor, uncorrelated)
        investor.create(Decimal(0))
        await uow.save(investor)
    stored = [event async for event in store.read_all()]

    async with relaying(database, pool, publisher):
        got = await receive_headers(observed, len(stored))

    assert all(isinstance(value, str) for headers in got for value in headers.values()), got
    assert [headers["_watermill_message_uuid"] for headers in got] == [
        str(event.message_id) for event in stored
    ]
    assert [
        (headers["aggregateID"], headers.get("correlation_id"), headers.get("causation_id"))
        for headers in got
    ] == [
        (str(correlated), "saga-5", "message-5"),
        (str(correlated), "saga-5", "message-5"),
        (str(uncorrelated), None, None),
        (str(uncorrelated), None, None),
    ]
    recorded = [datetime.fromisoformat(str(headers["recorded_at"])) for headers in got]
    assert recorded == [event.recorded_at for event in stored]
    assert all(at is not None and at.utcoffset() is not None for at in recorded)


async def test_an_event_whose_publish_failed_is_published_again_never_skipped(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    # Reference defect 2: its relayer marked every fetched event published even
    # when publishing stopped half way, losing the rest.
    store = PostgresEventStore(pool)
    investor_id = uuid4()
    await append_investor_story(store, investor_id)
    halfway = HalfwayPublisher(publisher, succeed=2)

    async with relaying(database, pool, halfway):
        got = await receive(observed, 6)

    assert halfway.failures >= 1
    versions = [version for _, _, version in got]
    # The two published before the failure may come again (same ids); none is missing.
    assert sorted(set(versions)) == [1, 2, 3, 4]
    assert versions[-2:] == [3, 4]
    assert len({message_id for message_id, _, _ in got}) == 4
    assert await PostgresOutbox(pool).pending(10) == []


class WatchedOutbox:
    """The real outbox, noting when the relayer looked for events and how many it found."""

    def __init__(self, real: PostgresOutbox) -> None:
        self.real = real
        self.looks: list[tuple[float, int]] = []
        self.marks: list[list[int]] = []  # the positions of each move of the checkpoint

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        started = time.monotonic()
        events = await self.real.pending(limit, after)
        self.looks.append((started, len(events)))
        return events

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        await self.real.mark_relayed(events)
        self.marks.append([event.position for event in events])


async def test_a_commit_wakes_the_relayer_without_waiting_for_its_poll(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    store = PostgresEventStore(pool)
    outbox = WatchedOutbox(PostgresOutbox(pool))
    async with relaying(database, pool, publisher, poll_interval=30.0, outbox=outbox):

        async def idle() -> bool:
            # Its first look, and the one it makes once it listens, found nothing:
            # from now on it waits for a commit, or for its poll 30 s later. (Woken
            # once it listens, it looks again after pauses that double towards the
            # poll interval, for a horizon held back; a commit ends each pause.)
            return len(outbox.looks) >= 2 and outbox.looks[-1][1] == 0

        await wait_until(idle, what="the relayer idle")
        # Taken before the commits: woken by the first of them, the relayer may have
        # looked, and relayed everything, before the story's last commit returns.
        appending = time.monotonic()
        await append_investor_story(store, uuid4())

        async def looked_again() -> bool:
            return any(started > appending for started, _ in outbox.looks)

        # Far below the 30 s poll: only the NOTIFY sent at commit can explain it.
        await wait_until(looked_again, timeout=5.0, what="the relayer woken by the commit")
        # What a transaction elsewhere on the server still held behind the commit
        # horizon then would come with the next poll (pending_count in test_outbox.py).
        got = await receive(observed, 4, within=40.0)
    assert [version for _, _, version in got] == [1, 2, 3, 4]


async def test_events_held_behind_an_earlier_transaction_are_relayed_as_soon_as_it_ends(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    """The commit wakes the relayer while another transaction writing to the event store
    (begun earlier, still running) holds the commit horizon back: nothing is relayable
    yet. Regression: the relayer then waited for its next poll (here 30 s); it now looks
    again within milliseconds."""
    store = PostgresEventStore(pool)
    outbox = WatchedOutbox(PostgresOutbox(pool))
    elsewhere = await asyncpg.connect(**database.connect_kwargs)
    try:
        async with relaying(database, pool, publisher, poll_interval=30.0, outbox=outbox):

            async def idle() -> bool:
                return len(outbox.looks) >= 2 and outbox.looks[-1][1] == 0

            await wait_until(idle, what="the relayer idle")
            holding = elsewhere.transaction()
            await holding.start()
            await elsewhere.fetchval("SELECT pg_current_xact_id()")  # holds the horizon
            appending = time.monotonic()  # before the commits, which wake it at once
            await append_investor_story(store, uuid4())

            async def woken_and_found_nothing() -> bool:
                return any(at > appending and found == 0 for at, found in outbox.looks)

            await wait_until(woken_and_found_nothing, timeout=5.0, what="a look in vain")
            await holding.rollback()
            got = await receive(observed, 4, within=5.0)
    finally:
        await elsewhere.close()
    assert [version for _, _, version in got] == [1, 2, 3, 4]


async def test_a_transaction_left_open_that_holds_relaying_back_is_named_and_its_end_said(
    database: Database,
    pool: asyncpg.Pool,
    publisher: Publisher,
    observed: AbstractQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: any session of the database left in a transaction that writes (a
    psql, a foreign application, one without a right on the service's tables) held every
    event back for as long as it stayed open, and not a line said so: `/health` 200,
    every gauge but the lag's unchanged, `status` saying only how long events waited."""
    monkeypatch.setattr(relayer_module, "HELD_BACK_SAID", 0.5)
    store = PostgresEventStore(pool)
    elsewhere = await asyncpg.connect(
        **database.connect_kwargs, server_settings={"application_name": "reporting tool"}
    )
    running, wake_up = relayer(database, PostgresOutbox(pool), publisher)
    tasks = [asyncio.create_task(running.run()), asyncio.create_task(running.report_lag(0.1))]
    try:
        with capture_logs() as logs:
            holding = elsewhere.transaction()
            await holding.start()
            await elsewhere.fetchval("SELECT pg_current_xact_id()")  # holds the horizon
            await append_investor_story(store, uuid4())

            def said(event: str) -> list[dict[str, Any]]:
                return [line for line in logs if line["event"].startswith(event)]

            async def named() -> bool:
                return bool(said("relaying waits for the transaction of another session"))

            await wait_until(named, timeout=10, what="the holding transaction named")
            backlog = await PostgresOutbox(pool).backlog(held_back_after=0.5)
            await holding.rollback()
            got = await receive(observed, 4, within=10.0)

            async def over() -> bool:
                return bool(said("relaying no longer waits"))

            await wait_until(over, timeout=10, what="its end said")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wake_up.close()
        await elsewhere.close()
    [warning] = said("relaying waits for the transaction of another session")
    pid = elsewhere.get_server_pid()
    assert warning["log_level"] == "warning"
    assert f"session {pid} (user 'postgres', application 'reporting tool'" in warning["holder"]
    assert "idle in transaction" in warning["holder"]
    assert backlog.held_back_by is not None and backlog.held_back_by.pid == pid
    [over_line] = said("relaying no longer waits")
    # At the warning's level (a log kept at WARNING saw the wait and never its end),
    # with how long relaying waited.
    assert over_line["log_level"] == "warning" and over_line["waited_seconds"] >= 0.5
    assert len(got) == 4


async def session_of(database: Database, application: str) -> asyncpg.Connection:
    """A session of `database` named as `application`'s, to hold the relayer lock with."""
    return await asyncpg.connect(
        **database.connect_kwargs, server_settings={"application_name": application}
    )


@contextlib.asynccontextmanager
async def standing_by(
    database: Database,
) -> AsyncIterator[tuple[list[dict[str, Any]], asyncio.Task[None]]]:
    """A relayer lock standing for election while the block runs, with what is logged
    meanwhile; given up at the end."""
    lock = PostgresRelayerLock(database, poll_interval=0.05)
    try:
        with capture_logs() as logs:
            yield logs, asyncio.create_task(lock.acquire())
    finally:
        await lock.release()


async def test_a_standby_says_who_holds_the_relayer_lock_and_each_new_holder(
    database: Database, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a session that is no relayer (an operator's, a foreign application's
    with the same key) holding the lock kept every event from being relayed, and the
    service said nothing: not even that no relayer was elected; and a standby that had
    said once that another instance relays said nothing when a foreign session took the
    lock after it."""
    monkeypatch.setattr(outbox_module, "STANDBY_SAID", 0.2)
    leader = await session_of(database, "financing")
    thief = await session_of(database, "someone else")
    try:
        await leader.fetchval("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
        async with standing_by(database) as (logs, acquiring):

            def said() -> list[dict[str, Any]]:
                return [line for line in logs if "relayer standing by" in line["event"]]

            async def told(count: int) -> bool:
                return len(said()) == count

            await wait_until(lambda: told(1), timeout=10, what="the leader told")
            # The thief waits for the lock first: it gets it as the leader lets go. It holds
            # another advisory lock too: no relayer of another deployment for all that.
            await thief.fetchval("SELECT pg_advisory_lock(42)")
            stealing = asyncio.create_task(
                thief.fetchval("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
            )
            await wait_until(lambda: lock_waiters(pool, 1), what="the thief waiting")
            await leader.fetchval("SELECT pg_advisory_unlock($1)", RELAYER_LOCK)
            await stealing
            await wait_until(lambda: told(2), timeout=10, what="the thief told")
            await thief.fetchval("SELECT pg_advisory_unlock($1)", RELAYER_LOCK)
            await asyncio.wait_for(acquiring, 10)
    finally:
        await leader.close()
        await thief.close()
    first, second = said()
    assert first["log_level"] == "info", first
    assert first["holder"].startswith(f"session {leader.get_server_pid()} (user 'postgres',")
    assert second["log_level"] == "warning", second
    assert second["holder"].startswith(
        f"session {thief.get_server_pid()} (user 'postgres', application 'someone else'"
    )


async def test_a_standby_says_when_the_session_holding_the_lock_is_left_over(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a relayer lock left on a pooler's server session (by an instance
    behind PgBouncer in transaction mode) held every relayer off for the pooler's
    `server_idle_timeout` (10 min), while each standby said at INFO that another
    instance relays."""
    monkeypatch.setattr(outbox_module, "STANDBY_SAID", 0.1)
    monkeypatch.setattr(outbox_module, "LOCK_LEASE", 0.5)
    left = await session_of(database, "financing")
    try:
        await left.fetchval("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
        async with standing_by(database) as (logs, acquiring):

            def said() -> list[dict[str, Any]]:
                return [line for line in logs if "a session left holding it" in line["event"]]

            await wait_until(lambda: holds(bool(said())), timeout=10, what="it said so")
            await left.close()  # the pooler's session ended: the lock is free
            await asyncio.wait_for(acquiring, 10)
    finally:
        await left.close()
    [warning] = said()
    assert warning["log_level"] == "warning"
    assert f"pg_terminate_backend({left.get_server_pid()})" in warning["event"]


async def lock_waiters(pool: asyncpg.Pool, count: int) -> bool:
    waiting = await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return bool(waiting == count)


async def pending_exactly(pool: asyncpg.Pool, count: int) -> bool:
    """Whether exactly `count` events are after the relayer's checkpoint."""
    return len(await PostgresOutbox(pool).pending(100)) == count


async def test_the_checkpoint_moves_once_for_many_relayed_batches_and_when_the_relayer_stops(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    store = PostgresEventStore(pool)
    outbox = WatchedOutbox(PostgresOutbox(pool))
    async with relaying(database, pool, publisher, outbox=outbox, mark_after=60.0):
        got = []
        for _ in range(3):
            # Three transactions each, relayed before the next story: a batch each.
            await append_investor_story(store, uuid4())
            got += await receive(observed, 4)
        assert len([found for _, found in outbox.looks if found]) >= 3  # several batches
        assert outbox.marks == []
        # Still behind the checkpoint, yet each went out once: the relayer reads on from
        # the last event it relayed, not from the checkpoint.
        await wait_until(lambda: pending_exactly(pool, 12), what="12 unmarked")
    assert len(outbox.marks) == 1 and len(outbox.marks[0]) == 12  # moved as it stopped
    assert await PostgresOutbox(pool).pending(100) == []
    assert len({message_id for message_id, _, _ in got}) == 12


async def test_the_checkpoint_follows_the_relayed_events_within_a_time_or_a_count(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    store = PostgresEventStore(pool)
    by_time = WatchedOutbox(PostgresOutbox(pool))
    async with relaying(database, pool, publisher, outbox=by_time, mark_after=0.2):
        await append_investor_story(store, uuid4())
        await receive(observed, 4)
        await wait_until(lambda: pending_exactly(pool, 0), what="the checkpoint moved")
        assert by_time.marks  # while it ran, with nothing more to relay

    by_count = WatchedOutbox(PostgresOutbox(pool))
    async with relaying(database, pool, publisher, outbox=by_count, mark_after=60.0, mark_every=4):
        await append_investor_story(store, uuid4())
        await receive(observed, 4)
        await append_investor_story(store, uuid4())  # the next batch finds four unmarked
        await receive(observed, 4)
        await wait_until(lambda: infra.holds(bool(by_count.marks)), what="the checkpoint moved")
        assert len(by_count.marks[0]) >= 4


class UnmarkableOutbox(WatchedOutbox):
    """The real outbox, but the checkpoint cannot be moved: a database lost at that moment."""

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        raise Unavailable(COMMAND_DATABASE, "connection lost")


async def test_events_relayed_but_never_marked_are_relayed_again_by_the_next_relayer(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    await append_investor_story(PostgresEventStore(pool), uuid4())
    unmarkable = UnmarkableOutbox(PostgresOutbox(pool))
    async with relaying(database, pool, publisher, outbox=unmarkable, mark_after=60.0):
        got = await receive(observed, 4)
    # It stopped without moving the checkpoint: the next relayer sends them again, under
    # the same message ids, which consumers recognise as copies. None is lost.
    async with relaying(database, pool, publisher):
        again = await receive(observed, 4)
        await wait_until(lambda: pending_exactly(pool, 0), what="the checkpoint moved")
    assert again == got


async def relayed_by(
    running: Relayer, observed: AbstractQueue, count: int
) -> list[tuple[str, str, int]]:
    """The next `count` events `running` relays, which then stops as a process would."""
    task = asyncio.create_task(running.run())
    try:
        return await receive(observed, count)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_relayer_elected_again_stops_where_the_store_lost_events_it_relayed(
    database: Database,
    pool: asyncpg.Pool,
    broker: Broker,
    publisher: Publisher,
    observed: AbstractQueue,
) -> None:
    """Regression: a command database failed over to a standby that was behind (the
    query database's records lost with it on the same server) lost the events committed
    last, after they were relayed; the relayer elected again on it relayed the new
    events under the lost ones' message ids, which consumers dropped as copies, and
    nothing said so."""
    investor = uuid4()
    store = PostgresEventStore(pool)
    await append_investor_story(store, investor)
    running, wake_up = relayer(database, PostgresOutbox(pool), publisher)
    try:
        got = await relayed_by(running, observed, 4)
        # What the standby had not received: the two bids, and the checkpoint's move.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM events WHERE aggregate_id = $1 AND version > 2", investor
            )
            await conn.execute(
                "UPDATE relay_checkpoints SET (transaction_id, position) ="
                " (SELECT transaction_id, position FROM events"
                "  WHERE aggregate_id = $1 AND version = 2)",
                investor,
            )
        async with store.unit_of_work() as uow:  # a new bid takes the lost one's version
            bidder = await uow.load(Investor, investor)
            bidder.place_bid(uuid4(), Decimal("1"))
            await uow.save(bidder)

        async with asyncio.timeout(10):  # not retried: it stops at once
            with pytest.raises(relayer_module.LostHistory) as lost:
                await running.run()
    finally:
        await wake_up.close()

    assert [event.version for event in lost.value.lost] == [3, 4]
    assert [event.message_id for event in lost.value.lost] == [got[2][0], got[3][0]]
    assert "Restoring a database" in str(lost.value)
    channel = await broker.channel()
    try:  # the new bid did not go out under the lost one's id
        declared = await channel.declare_queue(observed.name, passive=True)
        assert declared.declaration_result.message_count == 0
    finally:
        await close_channel(channel)
    assert await infra.advisory_lock_holders(pool) == []  # it gave its lock up


async def test_two_relayers_on_one_database_publish_each_event_once(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    store = PostgresEventStore(pool)
    async with relaying(database, pool, publisher), relaying(database, pool, publisher):
        for _ in range(5):
            await append_investor_story(store, uuid4())
        got = await receive(observed, 20)
        # Anything beyond the 20 would be a second relayer publishing the same events.
        channel = observed.channel
        assert isinstance(channel, aio_pika.abc.AbstractChannel)
        extra = await observed.get(no_ack=True, fail=False)
    assert extra is None
    assert len({message_id for message_id, _, _ in got}) == 20


class SkippingOutbox:
    """The real outbox, but `pending` leaves out the first event: what a bug in the
    reading query would do. The real `mark_relayed` must then refuse to skip it."""

    def __init__(self, real: PostgresOutbox) -> None:
        self.real = real

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        return (await self.real.pending(limit, after))[1:]

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        await self.real.mark_relayed(events)


async def test_a_broken_invariant_stops_the_relayer_loudly_instead_of_retrying(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    await append_investor_story(PostgresEventStore(pool), uuid4())

    async def all_pending() -> bool:  # a transaction elsewhere may hold the horizon back
        return len(await PostgresOutbox(pool).pending(10)) == 4

    await wait_until(all_pending, what="the events pending")
    running, wake_up = relayer(database, SkippingOutbox(PostgresOutbox(pool)), publisher)
    try:
        async with asyncio.timeout(5):  # not retried: it stops at once
            with pytest.raises(ValueError, match="would skip events"):
                await running.run()
    finally:
        await wake_up.close()

    assert len(await PostgresOutbox(pool).pending(10)) == 4  # the checkpoint did not move
    assert await infra.advisory_lock_holders(pool) == []  # and it gave its lock up on the way out


class BrokenWatchLock(PostgresRelayerLock):
    """The real lock, but watching it fails with a bug."""

    async def lost(self) -> None:
        raise RuntimeError("the lock's watch is broken")


async def test_a_bug_in_watching_the_lock_stops_the_relayer_loudly_instead_of_reelecting(
    database: Database, pool: asyncpg.Pool, publisher: Publisher
) -> None:
    wake_up = CommitListener(database)
    lock = BrokenWatchLock(database)
    running = Relayer(PostgresOutbox(pool), publisher, lock, wake_up, Outages())
    try:
        async with asyncio.timeout(5):  # not taken for a lost lock: it stops at once
            with pytest.raises(RuntimeError, match="watch is broken"):
                await running.run()
    finally:
        await wake_up.close()

    assert await infra.advisory_lock_holders(pool) == []  # it gave its lock up on the way out


async def test_a_relayer_that_lost_its_lock_stops_where_the_store_lost_events_it_relayed(
    database: Database,
    pool: asyncpg.Pool,
    broker: Broker,
    publisher: Publisher,
    observed: AbstractQueue,
) -> None:
    """Regression: of two instances behind a command database failed over to a standby
    that was behind, the one whose relayer had relayed the lost events lost its lock at
    the fail-over and stood by, saying nothing, while the other, with nothing of its own
    to compare, was elected and relayed new events under the lost ones' message ids."""
    investor = uuid4()
    await append_investor_story(PostgresEventStore(pool), investor)
    running, wake_up = relayer(database, PostgresOutbox(pool), publisher)
    other = await connect(database)  # the other instance's relayer, elected meanwhile
    try:
        await relayed_by(running, observed, 4)
        await pool.execute("DELETE FROM events WHERE aggregate_id = $1 AND version > 2", investor)
        await other.fetchval("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
        async with asyncio.timeout(10):  # it does not wait for the lock to say so
            with pytest.raises(relayer_module.LostHistory):
                await running.run()
    finally:
        await other.close()
        await wake_up.close()


class HeldPublisher:
    """Publishes for real once `gate` is opened; says what became of each batch."""

    def __init__(self, real: Publisher) -> None:
        self.real = real
        self.gate = asyncio.Event()
        self.outcomes: list[str] = []

    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        self.outcomes.append("begun")
        try:
            await self.gate.wait()
            await self.real.publish_events(envelopes)
        except asyncio.CancelledError:
            self.outcomes.append("cancelled")
            raise
        self.outcomes.append("published")


async def test_a_relayer_that_lost_its_lock_gives_up_the_batch_it_was_publishing(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    """Regression (a probe): a leader resumed after a SIGSTOP said it lost its lock, then
    finished the batch it had begun, as at a stop, though another instance had relayed
    it meanwhile: 47 stale copies went out after later versions of their aggregates."""
    await append_investor_story(PostgresEventStore(pool), uuid4())
    held = HeldPublisher(publisher)
    with capture_logs() as logs:
        async with relaying(database, pool, held):
            await wait_until(
                lambda: holds(held.outcomes == ["begun"]), what="a batch being published"
            )
            [lock_session] = await infra.advisory_lock_holders(pool)
            await pool.execute("SELECT pg_terminate_backend($1)", lock_session)
            await wait_until(
                lambda: holds(any(line["event"].startswith("relayer lost") for line in logs)),
                what="the lock lost",
            )
            held.gate.set()  # the batch could go on now; given up, it does not
            await wait_until(lambda: holds(len(held.outcomes) > 2), what="the next term's batch")
            got = await receive(observed, 4)
    assert held.outcomes[:3] == ["begun", "cancelled", "begun"], held.outcomes
    assert [version for _, _, version in got] == [1, 2, 3, 4]  # relayed in the next term


class HandedOnLock(PostgresRelayerLock):
    """The real lock, whose connection a pooler in transaction mode hands to another
    server session once the lock is taken (PgBouncer's transaction mode): the lock stays
    on the first, which no longer holds off another relayer."""

    async def acquire(self, answered: Any = lambda _: None) -> None:
        await super().acquire(answered)
        self._backend = -1  # the backend the lock was taken on is another than the next


async def test_a_relayer_whose_lock_session_is_handed_to_another_backend_stops_loudly(
    database: Database, pool: asyncpg.Pool, publisher: Publisher
) -> None:
    """Regression: behind PgBouncer in transaction mode, each instance's relayer took the
    lock on a pooled server session and went on on others: two relayers ran, every event
    went out twice, and every health check and `financing status` said all was well."""
    wake_up = CommitListener(database)
    running = Relayer(
        PostgresOutbox(pool),
        publisher,
        HandedOnLock(database, check_interval=0.05),
        wake_up,
        Outages(),
    )
    try:
        async with asyncio.timeout(10):  # not taken for a lost lock: it stops at once
            with pytest.raises(PooledSessions, match="PgBouncer's transaction or statement mode"):
                await running.run()
    finally:
        await wake_up.close()
    assert await infra.advisory_lock_holders(pool) == []  # it gave its lock up on the way out


async def checkpoint_at_the_last_event(observer: asyncpg.Connection) -> bool:
    done: bool = await observer.fetchval(
        "SELECT EXISTS (SELECT FROM relay_checkpoints WHERE name = 'relayer'"
        " AND position = (SELECT max(position) FROM events))"
    )
    return done


async def lock_holder(observer: asyncpg.Connection) -> int | None:
    holder: int | None = await observer.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return holder


async def test_the_relayer_keeps_relaying_after_its_database_sessions_are_ended(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    before, after = uuid4(), uuid4()
    await append_investor_story(PostgresEventStore(pool), before)
    observer = await connect(database)
    try:
        async with relaying(database, pool, publisher):
            got = await receive(observed, 4)
            await infra.wait_until(
                lambda: checkpoint_at_the_last_event(observer), what="the first events marked"
            )
            first_holder = await lock_holder(observer)
            # Its pool, its lock and its commit listener lose their sessions at once.
            await infra.terminate_sessions(
                database, sparing=await observer.fetchval("SELECT pg_backend_pid()")
            )
            writer = await create_pool(database, COMMAND_DATABASE)
            try:
                store = PostgresEventStore(writer)
                await append_investor_story(store, after)
                got += await receive(observed, 4, within=20.0)
                holder = await lock_holder(observer)
                expected = [
                    (
                        str(event_message_id(stored.aggregate_id, stored.version)),
                        str(stored.aggregate_id),
                        stored.version,
                    )
                    async for stored in store.read_all()
                ]
            finally:
                await writer.close()
    finally:
        await observer.close()

    assert got == expected  # in commit order, none skipped, none twice
    # It took the lock again, on a new session.
    assert first_holder is not None
    assert holder is not None
    assert holder != first_holder
    assert [aggregate for _, aggregate, _ in got] == [str(before)] * 4 + [str(after)] * 4


async def test_a_rewind_refused_for_a_lock_held_by_no_relayer_says_which_session_to_end(
    database: Database, pool: asyncpg.Pool
) -> None:
    """Regression: with an operator's psql holding the relayer lock, the rewind said to stop
    every instance that runs the relayer, which could not help."""
    holder = await asyncpg.connect(database.dsn(), server_settings={"application_name": "psql"})
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
        env = {**os.environ, "COMMAND_DB_CONNECTION_STRING": database.dsn()}

        refused = await run_cli(env, "relay", "rewind", "--since", "1h", "--any-age")

        pid = holder.get_server_pid()
    finally:
        await holder.close()
    assert refused.exit_code == 1, refused.describe()
    assert "a session that is no relayer of the service holds the relayer lock" in (
        refused.stderr
    ), refused.describe()
    assert f"pg_terminate_backend({pid})" in refused.stderr, refused.describe()
    assert "stop every instance" not in refused.stderr, refused.describe()


async def test_events_a_broker_lost_after_confirming_them_are_relayed_again_once_rewound(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    """Regression: events the broker confirmed and then lost (their queues deleted, its
    virtual host made again) left their sagas stopped half way, and nothing but an edit
    of relay_checkpoints by hand relayed them again."""
    store = PostgresEventStore(pool)
    kept, lost = uuid4(), uuid4()
    await append_investor_story(store, kept)
    since = await pool.fetchval("SELECT clock_timestamp()")
    await append_investor_story(store, lost)
    env = {**os.environ, "COMMAND_DB_CONNECTION_STRING": database.dsn()}
    rewinding = ("relay", "rewind", "--since", since.isoformat())

    async with relaying(database, pool, publisher):
        first = await receive(observed, 8)
        running = await run_cli(env, *rewinding)
    assert running.exit_code == 1, running.describe()
    assert "a relayer is running" in running.stderr, running.describe()

    too_old = await run_cli(env, "relay", "rewind", "--since", "30d")
    assert too_old.exit_code == 2, too_old.describe()
    assert "--any-age" in too_old.stderr, too_old.describe()
    # The retention as it is written (it was "7 days, 0:00:00"), the command named whole.
    assert too_old.stderr.startswith("financing relay rewind: "), too_old.describe()
    assert "(FINANCING_DEDUP_RETENTION, 7d," in too_old.stderr, too_old.describe()
    # The shortest retention leaves no hour to spare: any rewind needs --any-age.
    shortest = await run_cli({**env, "FINANCING_DEDUP_RETENTION": "1h"}, *rewinding)
    assert shortest.exit_code == 2, shortest.describe()
    assert "leaves no hour to spare" in shortest.stderr, shortest.describe()

    rewound = await run_cli(env, *rewinding)
    assert rewound.exit_code == 0, rewound.describe()
    assert "4 event(s) relayed before" in rewound.stdout, rewound.describe()
    async with relaying(database, pool, publisher):
        again = await receive(observed, 4)
    assert again == [got for got in first if got[1] == str(lost)]
    assert await PostgresOutbox(pool).pending(100) == []  # and the checkpoint past them

    # Never forward: a WHEN after events not relayed yet does not skip them.
    await append_investor_story(store, uuid4())
    later = await pool.fetchval("SELECT clock_timestamp()")
    await append_investor_story(store, uuid4())
    ahead = await run_cli(env, "relay", "rewind", "--since", later.isoformat())
    assert ahead.exit_code == 0, ahead.describe()
    assert ahead.stdout.startswith("nothing moved: "), ahead.describe()
    assert "; 8 event(s) in all wait behind it" in ahead.stdout, ahead.describe()
    assert len(await PostgresOutbox(pool).pending(100)) == 8
    future = await run_cli(env, "relay", "rewind", "--since", "2099-01-01T00:00:00Z")
    assert future.stdout.startswith("nothing to relay again: no event was recorded since")


async def test_a_second_rewind_further_back_says_every_event_it_leaves_to_relay(
    database: Database, pool: asyncpg.Pool, publisher: Publisher, observed: AbstractQueue
) -> None:
    """Regression (an operator's probe): a rewind after another said only the events it
    took back itself (35 of 52 the next relayer published), and one asked again said
    that no event relayed so far was recorded since, although all were to be relayed."""
    store = PostgresEventStore(pool)
    earlier = await pool.fetchval("SELECT clock_timestamp()")
    await append_investor_story(store, uuid4())
    later = await pool.fetchval("SELECT clock_timestamp()")
    await append_investor_story(store, uuid4())
    async with relaying(database, pool, publisher):
        await receive(observed, 8)
    env = {**os.environ, "COMMAND_DB_CONNECTION_STRING": database.dsn()}

    first = await run_cli(env, "relay", "rewind", "--since", later.isoformat())
    second = await run_cli(env, "relay", "rewind", "--since", earlier.isoformat())
    again = await run_cli(env, "relay", "rewind", "--since", earlier.isoformat())

    assert "4 event(s) relayed before" in first.stdout, first.describe()
    assert "; 4 event(s) in all wait behind it" in first.stdout, first.describe()
    assert "4 event(s) relayed before" in second.stdout, second.describe()
    assert "; 8 event(s) in all wait behind it" in second.stdout, second.describe()
    assert again.stdout.startswith("nothing moved: "), again.describe()
    assert "; 8 event(s) in all wait behind it" in again.stdout, again.describe()
    async with relaying(database, pool, publisher):
        await receive(observed, 8)


async def test_a_standby_tells_another_deployments_relayer_from_its_own(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a second deployment of the service in another schema of the same
    command database (the relayer lock is the database's) never relayed, said healthy,
    and its standing relayer said "another instance relays", as if all were well."""
    monkeypatch.setattr(outbox_module, "STANDBY_SAID", 0.1)
    admin = await connect(database)
    for schema in ("first", "second"):
        await admin.execute(f"CREATE SCHEMA {schema}")
    await admin.close()
    kwargs = dict(database.connect_kwargs)

    def in_schema(schema: str) -> Database:
        return Database({**kwargs, "server_settings": {"search_path": schema}}, 2)

    relaying = PostgresRelayerLock(in_schema("first"), poll_interval=0.05)
    beside, elsewhere = (
        PostgresRelayerLock(in_schema(schema), poll_interval=0.05) for schema in ("first", "second")
    )
    await relaying.acquire()
    try:
        with capture_logs() as logs:
            standing = [asyncio.create_task(lock.acquire()) for lock in (beside, elsewhere)]

            async def both_said() -> bool:
                return len([line for line in logs if "standing by" in line["event"]]) == 2

            await wait_until(both_said, timeout=10, what="both standbys said who relays")
        pool = await create_pool(in_schema("second"), COMMAND_DATABASE)
        try:
            await migrate(pool, "commands")
            await append_investor_story(PostgresEventStore(pool), uuid4())
            backlog = await PostgresOutbox(pool).backlog(held_back_after=0.5)
        finally:
            await pool.close()
    finally:
        for task in standing:
            task.cancel()
        await asyncio.gather(*standing, return_exceptions=True)
        for lock in (relaying, beside, elsewhere):
            await lock.release()
    said = {line["log_level"]: line["event"] for line in logs if "standing by" in line["event"]}
    assert said["info"] == "relayer standing by: another instance relays"
    assert said["error"].startswith(
        "relayer standing by: the relayer of another deployment of the service"
    )
    assert backlog.relayer_elsewhere and backlog.waiting


async def test_letting_the_relayer_lock_go_lets_its_schemas_go_with_it(
    database: Database, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the relayer lock was let go before its schema's, which the session
    held until it closed: a standby elected in between held no schema lock for its
    whole tenure, and another deployment's standbys took it for their own."""
    held: list[int] = []

    async def closing(conn: asyncpg.Connection) -> None:  # once the locks are let go
        held.append(
            await pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = $1",
                conn.get_server_pid(),
            )
        )
        await conn.close()

    monkeypatch.setattr(outbox_module, "close_connection", closing)
    lock = PostgresRelayerLock(database)
    await lock.acquire()
    await lock.release()
    assert held == [0]


async def test_a_standby_says_the_database_answers_while_it_waits_for_the_lock(
    database: Database,
) -> None:
    """Regression: a standby's wait for the lock, begun as a database outage ended, was an
    attempt under way that had not failed yet: its outage stayed open for
    FINANCING_DB_TIMEOUT more, `/health` at 503 over a database that answered."""
    leader = await asyncpg.connect(**database.connect_kwargs)
    lock = PostgresRelayerLock(database, poll_interval=0.02)
    answers: list[str] = []
    try:
        await leader.fetchval("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
        acquiring = asyncio.create_task(lock.acquire(answers.append))
        await wait_until(lambda: holds(len(answers) >= 3), what="polls answered")
        assert not acquiring.done()
        assert set(answers) == {COMMAND_DATABASE}
        await leader.fetchval("SELECT pg_advisory_unlock($1)", RELAYER_LOCK)
        await asyncio.wait_for(acquiring, 10)
    finally:
        await lock.release()
        await leader.close()


async def test_a_relayer_standing_by_lets_its_broker_connection_go(
    database: Database, pool: asyncpg.Pool, amqp_url: str, observed: AbstractQueue
) -> None:
    """Regression (a probe): an instance whose relayer lost the lock kept the broker
    connection it relayed on: with a vhost's `max-connections` at what the service holds,
    the newly elected relayer got none, and nothing was relayed until the limit was
    raised. Standing by, it lets the connection go, as no outage; elected again, it
    opens another."""
    own = Broker([amqp_url], Outages(), name="financing relayer")
    publisher = Publisher(own)
    other = await session_of(database, "another instance")
    try:
        with capture_logs() as logs:
            async with relaying(database, pool, publisher, stand_by=own.let_go):
                await append_investor_story(PostgresEventStore(pool), uuid4())
                await receive(observed, 4)
                assert own.connected
                [lock_session] = await infra.advisory_lock_holders(pool)
                await pool.execute("SELECT pg_terminate_backend($1)", lock_session)
                await other.fetchval("SELECT pg_advisory_lock($1)", RELAYER_LOCK)
                await wait_until(lambda: holds(not own.connected), what="the connection let go")
                await other.fetchval("SELECT pg_advisory_unlock($1)", RELAYER_LOCK)
                await append_investor_story(PostgresEventStore(pool), uuid4())
                await receive(observed, 4)  # elected again, on a new connection
                assert own.connected
    finally:
        await other.close()
        await publisher.close()
        await own.close()
    assert not [line for line in logs if line["event"].startswith("broker ")], logs
