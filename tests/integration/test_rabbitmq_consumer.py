"""run_subscription against a real broker: ack after commit, retries, dead letters, redelivery."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from decimal import Decimal
from typing import Any

import pytest
from aio_pika.abc import AbstractRobustConnection

from financing.adapters.rabbitmq import (
    DeadLetter,
    DeadLetters,
    Publisher,
    RetryPolicy,
    connect,
    declare_command_queue,
    list_dead_letters,
    run_subscription,
)
from financing.application import codec, handlers
from financing.application.memory import InMemoryEventStore
from financing.application.messages import CreateInvestor, CreateIssuer, Message, SellInvoice
from financing.application.ports import Envelope
from financing.application.processing import Process, Subscription, exactly_once
from financing.domain import events as ev
from tests.support import rabbitmq
from tests.support.infra import unique_name, wait_until

FAST = RetryPolicy(base_delay=0.01, max_delay=0.05, max_attempts=3, missing_attempts=3)


@pytest.fixture(scope="module")
async def vhost() -> AsyncIterator[rabbitmq.Vhost]:
    # Its own vhost: the dead-letter queue is per vhost and these tests read it.
    async with rabbitmq.private_vhost("fin_consumer") as vhost:
        yield vhost


@pytest.fixture
async def connection(vhost: rabbitmq.Vhost) -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect(vhost.url)
    yield connection
    await connection.close()


@pytest.fixture
async def publisher(connection: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    publisher = await Publisher.open(connection)
    yield publisher
    await publisher.close()


@pytest.fixture
def dead_letters(publisher: Publisher) -> DeadLetters:
    return DeadLetters(publisher)


@pytest.fixture
async def queue(connection: AbstractRobustConnection) -> str:
    """A fresh command queue, declared so that publishing to it is routable at once."""
    name = unique_name("cmd")
    channel = await connection.channel()
    await declare_command_queue(channel, name)
    await channel.close()
    return name


def envelope(message: Message, message_id: str | None = None) -> Envelope:
    return Envelope(
        message_id=message_id or str(uuid.uuid4()),
        name=codec.name_of(message),
        body=codec.encode(message),
    )


class Counting:
    """Wraps a process, counting calls; `before` runs first on each call."""

    def __init__(
        self, process: Process, before: Callable[[int], Awaitable[None]] | None = None
    ) -> None:
        self.calls = 0
        self._process = process
        self._before = before

    async def __call__(self, envelope: Envelope, message: Message) -> None:
        self.calls += 1
        if self._before is not None:
            await self._before(self.calls)
        await self._process(envelope, message)


@asynccontextmanager
async def consuming(
    connection: AbstractRobustConnection,
    subscription: Subscription,
    dead_letters: DeadLetters,
    **options: Any,
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(run_subscription(connection, subscription, dead_letters, **options))

    async def registered() -> bool:
        if task.done():
            task.result()  # surface a start-up failure
        state = await rabbitmq.queue_state(connection, subscription.queue)
        return state is not None and state[1] == 1

    try:
        await wait_until(registered, what=f"a consumer on {subscription.queue}")
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def dead_letters_of(connection: AbstractRobustConnection, queue: str) -> list[DeadLetter]:
    return [d for d in await list_dead_letters(connection, limit=1000) if d.source_queue == queue]


async def first_dead_letters(
    connection: AbstractRobustConnection, queue: str, what: str
) -> list[DeadLetter]:
    """The dead letters of `queue`, once there is at least one."""

    async def dead_lettered() -> list[DeadLetter]:
        return await dead_letters_of(connection, queue)

    return await wait_until(dead_lettered, what=what)


def events_of(store: InMemoryEventStore, aggregate_id: uuid.UUID) -> list[str]:
    return [e.name for e in store.events if e.aggregate_id == aggregate_id]


async def test_command_is_processed_and_acked(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    subscription = Subscription(
        queue, "CreateIssuer", False, exactly_once(store, queue, handlers.create_issuer)
    )
    async with consuming(connection, subscription, dead_letters):
        await publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return events_of(store, issuer) == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the issuer to be created")
    # Stopped: an unacked message would be back in the queue now.
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)


async def test_message_is_not_acked_before_process_returns(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    entered = asyncio.Event()

    async def never_returns(envelope: Envelope, message: Message) -> None:
        entered.set()
        await asyncio.Event().wait()

    blocked = Subscription(queue, "CreateIssuer", False, never_returns)
    async with consuming(connection, blocked, dead_letters, shutdown_grace=0.1):
        await publisher.send_to_queue(queue, envelope(CreateIssuer(uuid.uuid4())))
        await asyncio.wait_for(entered.wait(), timeout=10)
        assert await rabbitmq.queue_state(connection, queue) == (0, 1)  # delivered, in process

    async def returned() -> bool:
        return await rabbitmq.queue_state(connection, queue) == (1, 0)

    await wait_until(returned, what="the unacked message back in the queue")

    store = InMemoryEventStore()
    working = Subscription(
        queue, "CreateIssuer", False, exactly_once(store, queue, handlers.create_issuer)
    )
    async with consuming(connection, working, dead_letters):

        async def processed() -> bool:
            return [e.name for e in store.events] == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the returned message to be processed")


async def test_transient_failures_are_retried_until_processed_once(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()

    async def fail_twice(call: int) -> None:
        if call == 1:
            raise ConnectionRefusedError("database is restarting")
        if call == 2:
            raise RuntimeError("something odd, once")

    process = Counting(exactly_once(store, queue, handlers.create_issuer), fail_twice)
    subscription = Subscription(queue, "CreateIssuer", False, process)
    async with consuming(connection, subscription, dead_letters, retry=FAST):
        await publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return events_of(store, issuer) == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the issuer to be created")
    assert process.calls == 3
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)
    assert await dead_letters_of(connection, queue) == []


async def test_infrastructure_errors_are_retried_beyond_max_attempts(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    class DatabaseDown(Exception):
        pass

    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    outage = FAST.max_attempts * 3

    async def down_for_a_while(call: int) -> None:
        if call <= outage:
            raise DatabaseDown("connection refused")

    process = Counting(exactly_once(store, queue, handlers.create_issuer), down_for_a_while)
    subscription = Subscription(queue, "CreateIssuer", False, process)
    async with consuming(
        connection, subscription, dead_letters, retry=FAST, infrastructure_errors=(DatabaseDown,)
    ):
        await publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return events_of(store, issuer) == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the issuer to be created after the outage")
    assert process.calls == outage + 1
    assert await dead_letters_of(connection, queue) == []


async def test_poison_messages_are_dead_lettered_without_blocking_the_queue(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    first, last = uuid.uuid4(), uuid.uuid4()
    good_body = codec.encode(CreateIssuer(uuid.uuid4()))

    def headers(message_id: str, **extra: Any) -> dict[str, Any]:
        return {"_watermill_message_uuid": message_id, "name": "CreateIssuer", **extra}

    poison = {
        "non_string_header": (good_body, headers("m-int", aggregateVersion=3)),
        "bad_json": (b'{"ID": ', headers("m-json")),
        "wrong_field_names": (b'{"IssuerId": "%s"}' % str(uuid.uuid4()).encode(), headers("m-f")),
        "bad_uuid": (b'{"ID": "not-a-uuid"}', headers("m-uuid")),
    }
    subscription = Subscription(
        queue, "CreateIssuer", False, exactly_once(store, queue, handlers.create_issuer)
    )
    # One message at a time: a poison message that blocked would stall the last one.
    async with consuming(connection, subscription, dead_letters, prefetch=1):
        await publisher.send_to_queue(queue, envelope(CreateIssuer(first)))
        for body, raw_headers in poison.values():
            await rabbitmq.publish_raw(connection, queue, body, raw_headers)
        await publisher.send_to_queue(queue, envelope(CreateIssuer(last)))

        async def processed() -> bool:
            return bool(events_of(store, last))

        await wait_until(processed, what="the message behind the poison ones")

        async def all_dead_lettered() -> list[DeadLetter]:
            letters = await dead_letters_of(connection, queue)
            return letters if len(letters) == len(poison) else []

        letters = await wait_until(all_dead_lettered, what="the poison messages dead-lettered")
    assert events_of(store, first) == ["IssuerCreatedEvent"]
    assert len(store.events) == 2
    reasons = {letter.headers["_watermill_message_uuid"]: letter.reason for letter in letters}
    assert "'aggregateVersion' is not a string" in reasons["m-int"]
    assert "not valid JSON" in reasons["m-json"]
    assert "missing field ID" in reasons["m-f"]
    assert "is not a UUID" in reasons["m-uuid"]
    non_string = next(letter for letter in letters if letter.message_id == "m-int")
    assert non_string.headers["aggregateVersion"] == "3"
    assert non_string.body == good_body
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)


async def test_rule_violation_is_dead_lettered_at_once(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    process = Counting(exactly_once(store, queue, handlers.create_investor))
    subscription = Subscription(queue, "CreateInvestor", False, process)
    message = envelope(CreateInvestor(uuid.uuid4(), Decimal("-1")))
    async with consuming(connection, subscription, dead_letters, retry=FAST):
        await publisher.send_to_queue(queue, message)

        [letter] = await first_dead_letters(connection, queue, "the refused command dead-lettered")
    assert process.calls == 1
    assert letter.message_id == message.message_id
    assert letter.name == "CreateInvestor"
    assert "RuleViolation" in letter.reason and "balance" in letter.reason
    assert store.events == []
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)


async def test_missing_aggregate_is_retried_then_dead_lettered(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    process = Counting(exactly_once(store, queue, handlers.sell_invoice))
    subscription = Subscription(queue, "SellInvoice", False, process)
    message = envelope(SellInvoice(uuid.uuid4(), issuer, Decimal("100.00")))
    async with consuming(connection, subscription, dead_letters, retry=FAST):
        await publisher.send_to_queue(queue, message)

        [letter] = await first_dead_letters(connection, queue, "the orphan command dead-lettered")
    assert process.calls == FAST.missing_attempts
    assert f"issuer {issuer} is not registered" in letter.reason
    assert letter.message_id == message.message_id
    assert store.events == []


async def test_command_waiting_for_its_aggregate_is_processed_once_it_exists(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    issuer, invoice = uuid.uuid4(), uuid.uuid4()

    async def issuer_arrives_after_first_attempt(call: int) -> None:
        if call == 2:
            async with store.unit_of_work() as uow:
                await handlers.create_issuer(uow, CreateIssuer(issuer))

    process = Counting(
        exactly_once(store, queue, handlers.sell_invoice), issuer_arrives_after_first_attempt
    )
    subscription = Subscription(queue, "SellInvoice", False, process)
    async with consuming(connection, subscription, dead_letters, retry=FAST):
        await publisher.send_to_queue(queue, envelope(SellInvoice(invoice, issuer, Decimal("10"))))

        async def created() -> bool:
            return events_of(store, invoice) == ["InvoiceCreatedEvent"]

        await wait_until(created, what="the invoice to be created")
    assert process.calls == 2
    assert await dead_letters_of(connection, queue) == []


async def test_unexpected_error_is_dead_lettered_after_max_attempts(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    async def broken(envelope: Envelope, message: Message) -> None:
        raise ValueError("handler bug")

    process = Counting(broken)
    subscription = Subscription(queue, "CreateIssuer", False, process)
    async with consuming(connection, subscription, dead_letters, retry=FAST):
        await publisher.send_to_queue(queue, envelope(CreateIssuer(uuid.uuid4())))

        [letter] = await first_dead_letters(connection, queue, "the failing message dead-lettered")
    assert process.calls == FAST.max_attempts
    assert "ValueError: handler bug" in letter.reason
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)


async def test_messages_of_other_names_are_acked_and_ignored(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    process = Counting(exactly_once(store, queue, handlers.create_issuer))
    # An events queue: a command queue dead-letters other names (a misrouted command).
    subscription = Subscription(queue, "CreateIssuer", True, process)
    other = envelope(CreateInvestor(uuid.uuid4(), Decimal("5")))
    async with consuming(connection, subscription, dead_letters, prefetch=1):
        await publisher.send_to_queue(queue, other)
        await publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return bool(events_of(store, issuer))

        await wait_until(processed, what="the handled message after the ignored one")
    assert process.calls == 1
    assert [e.name for e in store.events] == ["IssuerCreatedEvent"]
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)
    assert await dead_letters_of(connection, queue) == []


async def test_redelivery_storm_has_a_single_effect(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    investors = [uuid.uuid4() for _ in range(5)]
    process = Counting(exactly_once(store, queue, handlers.create_investor))
    subscription = Subscription(queue, "CreateInvestor", False, process)
    async with consuming(connection, subscription, dead_letters, redeliver_times=3):
        for investor in investors:
            await publisher.send_to_queue(queue, envelope(CreateInvestor(investor, Decimal("50"))))

        async def all_created() -> bool:
            return len(store.processed) == len(investors)

        await wait_until(all_created, what="every investor to be created")
    assert process.calls >= 3 * len(investors)
    for investor in investors:
        assert events_of(store, investor) == ["InvestorCreatedEvent", "InvestorFundsAddedEvent"]
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)
    assert await dead_letters_of(connection, queue) == []


async def test_event_subscription_consumes_the_events_exchange(
    connection: AbstractRobustConnection, publisher: Publisher, dead_letters: DeadLetters
) -> None:
    received: list[Envelope] = []

    async def record(envelope: Envelope, message: Message) -> None:
        received.append(envelope)

    queue = f"events_{unique_name('policy')}"
    subscription = Subscription(queue, "IssuerCreatedEvent", True, record)
    issuer = uuid.uuid4()
    event = ev.IssuerCreatedEvent(issuer_id=issuer)
    published = Envelope(
        message_id=str(uuid.uuid4()),
        name="IssuerCreatedEvent",
        body=codec.encode(event),
        aggregate_id=str(issuer),
        headers={"aggregateVersion": "1"},
    )
    async with consuming(connection, subscription, dead_letters):
        await publisher.publish_events([published])

        async def arrived() -> list[Envelope]:
            return received

        await wait_until(arrived, what="the event on the policy's queue")
    assert received == [published]


async def test_cancellation_lets_in_flight_messages_finish(
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(call: int) -> None:
        entered.set()
        await release.wait()

    process = Counting(exactly_once(store, queue, handlers.create_issuer), slow)
    subscription = Subscription(queue, "CreateIssuer", False, process)
    async with consuming(connection, subscription, dead_letters) as task:
        await publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))
        await asyncio.wait_for(entered.wait(), timeout=10)
        task.cancel()
        release.set()
        with suppress(asyncio.CancelledError):
            await task
    assert events_of(store, issuer) == ["IssuerCreatedEvent"]
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)


async def test_consumption_resumes_after_the_broker_drops_connections(
    vhost: rabbitmq.Vhost,
    connection: AbstractRobustConnection,
    publisher: Publisher,
    dead_letters: DeadLetters,
    queue: str,
) -> None:
    store = InMemoryEventStore()
    before, after = uuid.uuid4(), uuid.uuid4()
    entered, release = asyncio.Event(), asyncio.Event()

    async def first_call_waits(call: int) -> None:
        if call == 1:
            entered.set()
            await release.wait()

    process = Counting(exactly_once(store, queue, handlers.create_issuer), first_call_waits)
    subscription = Subscription(queue, "CreateIssuer", False, process)
    async with consuming(connection, subscription, dead_letters) as task:
        await publisher.send_to_queue(queue, envelope(CreateIssuer(before)))
        await asyncio.wait_for(entered.wait(), timeout=10)
        await rabbitmq.close_connections(vhost.name)
        # The commit happens after the delivery channel died: its ack cannot
        # reach the broker, which redelivers; deduplication absorbs it.
        release.set()

        async def resent() -> bool:
            try:
                await publisher.send_to_queue(queue, envelope(CreateIssuer(after)))
            except Exception:
                return False
            return True

        await wait_until(resent, timeout=30, what="publishing after the reconnection")

        async def both_processed() -> bool:
            return bool(events_of(store, after)) and process.calls >= 3

        await wait_until(both_processed, timeout=30, what="consumption to resume")
        assert not task.done()
    assert events_of(store, before) == ["IssuerCreatedEvent"]
    assert events_of(store, after) == ["IssuerCreatedEvent"]
    assert await rabbitmq.queue_state(connection, queue) == (0, 0)
