"""A queue consumer against a real broker: ack after commit, retries, dead letters, redelivery,
and consumption that survives the broker closing its channel, its connection or its permissions."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing.adapters.rabbitmq import consumer as consumer_module
from financing.adapters.rabbitmq import dead_letters as dead_letters_module
from financing.adapters.rabbitmq.acks import ChannelAcks
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.consumer import (
    IN_FLIGHT_GRACE,
    LOGGED_HEADER_CHARS,
    Deliveries,
    QueueConsumer,
    consume,
)
from financing.adapters.rabbitmq.dead_letters import (
    DEFERRED_AT_HEADER,
    DEFERRED_CLOCK_HEADER,
    DEFERRED_DELAY_HEADER,
    DEFERRED_FOR_HEADER,
    DEFERRED_REASON_HEADER,
    DeadLetter,
    DeadLetters,
    list_dead_letters,
)
from financing.adapters.rabbitmq.envelopes import from_amqp, to_amqp
from financing.adapters.rabbitmq.frames import OutOfRangeTimestamp
from financing.adapters.rabbitmq.publisher import AmqpCommandSender, Publisher, PublishFailed
from financing.adapters.rabbitmq.topology import (
    DEFERRALS,
    QueueSpec,
    Subscription,
    command_queue,
)
from financing.application import codec, handlers, integration
from financing.application.errors import MissingAggregate, ReadAfterWrite, Unavailable
from financing.application.memory import InMemoryEventStore
from financing.application.messages import (
    CreateInvestor,
    CreateIssuer,
    IssuerRegistered,
    Message,
    SellInvoice,
)
from financing.application.moments import moment
from financing.application.pipeline import (
    Decoded,
    Delivery,
    Handler,
    HandlerPart,
    Outcome,
    exactly_once,
    sending,
)
from financing.application.ports import (
    Envelope,
    Processed,
    UnitOfWork,
    body_digest,
    derived_message_id,
)
from financing.application.retry import DELIVERIES, Backoff, Limit, Outages, RetryPolicy
from financing.domain import events as ev
from financing.domain.aggregates import Issuer
from tests.support import rabbitmq
from tests.support.deliveries import MemoryDelivery
from tests.support.infra import holds, unique_name, wait_until
from tests.support.storm import duplicated

BUG_ATTEMPTS = 3
# Every fault as DELIVERIES classifies it, with short pauses.
FAST = RetryPolicy(
    unavailable=Limit(Backoff(0.01, 0.05), None),
    conflict=Limit(Backoff(0.01, 0.05), 50),
    bug=Limit(Backoff(0.01, 0.05), BUG_ATTEMPTS),
    aggregate_wait=1.0,  # deferred for 0.25 s at a time (first_deferral, a quarter of it)
)


@pytest.fixture(scope="module")
async def vhost() -> AsyncIterator[rabbitmq.Vhost]:
    # Its own vhost: the dead-letter queue is per vhost and these tests read it.
    async with rabbitmq.private_vhost("fin_consumer") as vhost:
        yield vhost


class RecordingBroker(Broker):
    """A broker connection that remembers the consumers' channels (opened with a prefetch)."""

    def __init__(self, url: str, outages: Outages) -> None:
        super().__init__([url], outages)
        self.consumer_channels: list[AbstractChannel] = []

    async def channel(
        self, *, publisher_confirms: bool = False, prefetch: int | None = None
    ) -> AbstractChannel:
        channel = await super().channel(publisher_confirms=publisher_confirms, prefetch=prefetch)
        if prefetch is not None:
            self.consumer_channels.append(channel)
        return channel


@dataclass
class Bus:
    """What a consumer runs on: one connection, one publisher, dead letters, one outage log."""

    vhost: rabbitmq.Vhost
    broker: RecordingBroker
    publisher: Publisher
    dead_letters: DeadLetters
    outages: Outages

    async def queue_state(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of `queue`."""
        return await rabbitmq.queue_state(await self.broker.connection(), queue)

    async def dead_letters_of(self, queue: str) -> list[DeadLetter]:
        letters = await list_dead_letters(self.broker, limit=1000)
        return [letter for letter in letters if letter.source_queue == queue]

    async def first_dead_letters(
        self, queue: str, what: str, count: int | None = None
    ) -> list[DeadLetter]:
        """The dead letters of `queue`, once there is at least one (`count` of them)."""

        async def dead_lettered() -> list[DeadLetter]:
            letters = await self.dead_letters_of(queue)
            return letters if count is None or len(letters) == count else []

        return await wait_until(dead_lettered, what=what)

    async def wait_settled(self, queue: str) -> None:
        """Until `queue` holds nothing, neither ready nor delivered and left unacked."""
        await wait_until(
            lambda: rabbitmq.queue_settled(self.vhost.name, queue),
            what=f"{queue} empty, nothing unacked",
        )


@pytest.fixture
async def bus(vhost: rabbitmq.Vhost) -> AsyncIterator[Bus]:
    outages = Outages()
    broker = RecordingBroker(vhost.url, outages)
    publisher = Publisher(broker)
    yield Bus(vhost, broker, publisher, DeadLetters(publisher, outages, FAST), outages)
    await publisher.close()
    await broker.close()


@pytest.fixture
async def queue(bus: Bus) -> str:
    """A fresh command queue, declared so that publishing to it is routable at once."""
    name = unique_name("cmd")
    await bus.publisher.declare_command_queue(name)
    return name


def envelope(message: Message, message_id: str | None = None) -> Envelope:
    return Envelope(
        message_id=message_id or str(uuid.uuid4()),
        name=codec.name_of(message),
        body=codec.encode(message),
    )


def on_command_queue(queue: str, name: str) -> Subscription:
    return Subscription(command_queue(queue), frozenset({name}))


class Counting:
    """Wraps a handler, counting calls; `before` runs first on each call."""

    def __init__(
        self, handler: Handler, before: Callable[[int], Awaitable[None]] | None = None
    ) -> None:
        self.calls = 0
        self._handler = handler
        self._before = before

    async def __call__(self, decoded: Decoded) -> Outcome:
        self.calls += 1
        if self._before is not None:
            await self._before(self.calls)
        return await self._handler(decoded)


@dataclass
class Consuming:
    consumer: QueueConsumer
    task: asyncio.Task[None]


@asynccontextmanager
async def consuming(
    bus: Bus,
    subscription: Subscription,
    handler: Handler,
    *,
    policy: RetryPolicy = FAST,
    handler_parts: tuple[HandlerPart, ...] = (),
    prefetch: int = 32,
    shutdown_grace: float = IN_FLIGHT_GRACE,
    last_processed: Callable[[], Awaitable[datetime | None]] | None = None,
) -> AsyncIterator[Consuming]:
    """A consumer of `subscription` wired as the service wires one, until the block ends."""
    step = subscription.step(
        handler,
        policy=policy,
        outages=bus.outages,
        handler_parts=handler_parts,
    )
    deliveries = Deliveries(step, shutdown_grace=shutdown_grace)
    consumer = QueueConsumer(
        bus.broker,
        subscription.queue,
        bus.dead_letters,
        bus.outages,
        deliveries.receive,
        prefetch=prefetch,
        last_processed=last_processed,
    )
    task = asyncio.create_task(consume(consumer, deliveries))

    async def started() -> bool:
        if task.done():
            task.result()  # surface a start-up failure
        return consumer.consuming.is_set()

    try:
        await wait_until(started, what=f"a consumer on {subscription.queue.name}")
        yield Consuming(consumer, task)
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def events_of(store: InMemoryEventStore, aggregate_id: uuid.UUID) -> list[str]:
    return [e.name for e in store.events if e.aggregate_id == aggregate_id]


async def test_command_is_processed_and_acked(bus: Bus, queue: str) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler):
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return events_of(store, issuer) == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the issuer to be created")
    # Stopped: an unacked message would be back in the queue now.
    assert await bus.queue_state(queue) == (0, 0)


async def test_every_log_line_about_a_delivery_names_its_correlation_and_causation(
    bus: Bus, queue: str
) -> None:
    # What the consumer binds for the delivery is in every line logged while it is handled.
    bound: dict[str, dict[str, object]] = {}

    async def remembers_the_log_context(decoded: Decoded) -> Outcome:
        bound[decoded.envelope.message_id] = structlog.contextvars.get_contextvars()
        return Outcome.processed()

    correlated = dataclasses.replace(
        envelope(CreateIssuer(uuid.uuid4())),
        headers={"correlation_id": "saga-1", "causation_id": "cause-1"},
    )
    foreign = envelope(CreateIssuer(uuid.uuid4()))
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), remembers_the_log_context):
        await bus.publisher.send_to_queue(queue, correlated)
        await bus.publisher.send_to_queue(queue, foreign)

        async def both_handled() -> bool:
            return len(bound) == 2

        await wait_until(both_handled, what="both messages handled")

    assert bound[correlated.message_id]["message_id"] == correlated.message_id
    assert bound[correlated.message_id]["correlation_id"] == "saga-1"
    assert bound[correlated.message_id]["causation_id"] == "cause-1"
    # A message without them starts a correlation of its own, its id, and has no cause
    # (logged without one, not as null).
    assert bound[foreign.message_id]["message_id"] == foreign.message_id
    assert bound[foreign.message_id]["correlation_id"] == foreign.message_id
    assert "causation_id" not in bound[foreign.message_id]


async def test_a_log_line_shows_at_most_a_message_id_s_length_of_any_header(
    bus: Bus, queue: str
) -> None:
    """Regression: headers of any length were copied whole into every line about their
    message: 40,000-character headers made 160 KB lines, the log growing faster than what
    was published."""
    bound: list[dict[str, object]] = []

    async def remembers_the_log_context(decoded: Decoded) -> Outcome:
        bound.append(structlog.contextvars.get_contextvars())
        return Outcome.processed()

    huge = "x" * 40_000
    sent = dataclasses.replace(
        envelope(CreateIssuer(uuid.uuid4())),
        headers={"correlation_id": huge, "causation_id": huge, "aggregateID": huge},
    )
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), remembers_the_log_context):
        await bus.publisher.send_to_queue(queue, sent)

        async def handled() -> bool:
            return bool(bound)

        await wait_until(handled, what="the message handled")

    [fields] = bound
    assert fields["correlation_id"] == sent.message_id  # too long to be kept: its own
    assert fields["causation_id"] == "x" * (LOGGED_HEADER_CHARS - 3) + "..."
    assert all(len(str(value)) <= LOGGED_HEADER_CHARS for value in fields.values()), fields


async def test_a_delivered_command_appends_its_events_under_its_correlation_and_id(
    bus: Bus, queue: str
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    command = dataclasses.replace(
        envelope(CreateIssuer(issuer)), headers={"correlation_id": "saga-2"}
    )
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler):
        await bus.publisher.send_to_queue(queue, command)

        async def created() -> list[str]:
            return events_of(store, issuer)

        await wait_until(created, what="the issuer to be created")

    assert [(e.correlation_id, e.causation_id) for e in store.events] == [
        ("saga-2", command.message_id)
    ]
    assert store.outcomes == {
        ("create_issuer", command.message_id): Processed(
            "CreateIssuer", "processed", "", 1, body_digest(command.body)
        )
    }


async def test_message_is_not_acked_before_the_handler_returns(bus: Bus, queue: str) -> None:
    entered = asyncio.Event()

    async def never_returns(decoded: Decoded) -> Outcome:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    subscription = on_command_queue(queue, "CreateIssuer")
    async with consuming(bus, subscription, never_returns, shutdown_grace=0.1):
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(uuid.uuid4())))
        await asyncio.wait_for(entered.wait(), timeout=10)
        assert await bus.queue_state(queue) == (0, 1)  # delivered, in process

    async def returned() -> bool:
        return await bus.queue_state(queue) == (1, 0)

    await wait_until(returned, what="the unacked message back in the queue")

    store = InMemoryEventStore()
    working = exactly_once(store, "create_issuer", handlers.create_issuer)
    async with consuming(bus, subscription, working):

        async def processed() -> bool:
            return [e.name for e in store.events] == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the returned message to be processed")


async def test_transient_failures_are_retried_until_processed_once(bus: Bus, queue: str) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()

    async def fail_twice(call: int) -> None:
        if call == 1:
            raise Unavailable("database", "the database is restarting")
        if call == 2:
            raise RuntimeError("something odd, once")

    handler = Counting(exactly_once(store, "create_issuer", handlers.create_issuer), fail_twice)
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler):
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return events_of(store, issuer) == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the issuer to be created")
    assert handler.calls == 3
    assert await bus.queue_state(queue) == (0, 0)
    assert await bus.dead_letters_of(queue) == []


async def test_an_unavailable_dependency_is_retried_beyond_the_bug_attempts(
    bus: Bus, queue: str
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    outage = BUG_ATTEMPTS * 3

    async def down_for_a_while(call: int) -> None:
        if call <= outage:
            raise Unavailable("database", "connection refused")

    handler = Counting(
        exactly_once(store, "create_issuer", handlers.create_issuer), down_for_a_while
    )
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler):
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return events_of(store, issuer) == ["IssuerCreatedEvent"]

        await wait_until(processed, what="the issuer to be created after the outage")
    assert handler.calls == outage + 1
    assert await bus.dead_letters_of(queue) == []
    assert bus.outages.down() == frozenset()  # the outage is over


async def test_poison_messages_are_dead_lettered_without_blocking_the_queue(
    bus: Bus, queue: str
) -> None:
    store = InMemoryEventStore()
    first, last = uuid.uuid4(), uuid.uuid4()
    good_body = codec.encode(CreateIssuer(uuid.uuid4()))

    def headers(message_id: str, **extra: object) -> dict[str, object]:
        return {"_watermill_message_uuid": message_id, "name": "CreateIssuer", **extra}

    poison = {
        "non_string_header": (good_body, headers("m-int", aggregateVersion=3)),
        "bad_json": (b'{"ID": ', headers("m-json")),
        "wrong_field_names": (b'{"IssuerId": "%s"}' % str(uuid.uuid4()).encode(), headers("m-f")),
        "bad_uuid": (b'{"ID": "not-a-uuid"}', headers("m-uuid")),
    }
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    # One message at a time: a poison message that blocked would stall the last one.
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler, prefetch=1):
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(first)))
        connection = await bus.broker.connection()
        for body, raw_headers in poison.values():
            await rabbitmq.publish_raw(connection, queue, body, raw_headers)
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(last)))

        async def processed() -> bool:
            return bool(events_of(store, last))

        await wait_until(processed, what="the message behind the poison ones")

        letters = await bus.first_dead_letters(
            queue, "the poison messages dead-lettered", len(poison)
        )
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
    assert await bus.queue_state(queue) == (0, 0)


async def test_a_message_whose_content_header_pamqp_cannot_decode_is_dead_lettered(
    bus: Bus, queue: str
) -> None:
    """Regression: pamqp raised decoding these content headers (which the broker accepts),
    aiormq closed the connection as an invalid frame, and the broker redelivered the
    message on the next connection: the connection dropped about once a second for ever,
    and nothing on it made progress."""
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    body = codec.encode(CreateIssuer(uuid.uuid4()))
    latest, negative = 2**64 - 1, -(2**62) & (2**64 - 1)  # -2**62 as the 64 bits on the wire

    def headers(message_id: str, **extra: object) -> dict[str, object]:
        return {"_watermill_message_uuid": message_id, "name": "CreateIssuer", **extra}

    # message id: (headers, properties, the reason it is dead-lettered with)
    undecodable: dict[str, tuple[dict[str, object], dict[str, object], str]] = {
        "m-ts": (
            headers("m-ts", ts=OutOfRangeTimestamp.of(latest)),
            {},
            f"header 'ts' holds a timestamp out of range ({latest})",
        ),
        "m-negative-ts": (
            headers("m-negative-ts", ts=OutOfRangeTimestamp.of(negative)),
            {},
            f"header 'ts' holds a timestamp out of range ({negative})",
        ),
        "m-key": (
            {**headers("m-key"), rabbitmq.RawText(b"k\xff\xfe"): "v"},
            {},
            r"header name b'k\xff\xfe' is not valid UTF-8",
        ),
        "m-content-type": (
            headers("m-content-type"),
            {"content_type": rabbitmq.RawText(b"application/json\xff")},
            "property content_type is not valid UTF-8",
        ),
        "m-message-id": (
            headers("m-message-id"),
            {"message_id": rabbitmq.RawText(b"m-\xff\xfe")},
            "property message_id is not valid UTF-8",
        ),
        "m-timestamp": (
            headers("m-timestamp"),
            {"timestamp": OutOfRangeTimestamp.of(latest)},
            f"property timestamp holds a timestamp out of range ({latest})",
        ),
    }
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    # Published from a connection of their own, as another service would.
    elsewhere = Broker([bus.vhost.url], Outages())
    sender = Publisher(elsewhere)
    with capture_logs() as logs:
        async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler, prefetch=1):
            consumers = await bus.broker.connection()
            try:
                for message_headers, properties, _ in undecodable.values():
                    await rabbitmq.publish_raw(
                        await elsewhere.connection(), queue, body, message_headers, **properties
                    )
                await sender.send_to_queue(queue, envelope(CreateIssuer(issuer)))
            finally:
                await sender.close()
                await elsewhere.close()

            async def processed() -> bool:
                return bool(events_of(store, issuer))

            await wait_until(processed, what="the message behind the undecodable ones")

            letters = await bus.first_dead_letters(
                queue, "the messages dead-lettered", len(undecodable)
            )
            assert await bus.broker.connection() is consumers  # never lost
    reasons = {letter.message_id: letter.reason for letter in letters}
    assert reasons.keys() == undecodable.keys()
    for message_id, (_, _, reason) in undecodable.items():
        assert reasons[message_id].startswith(f"PoisonMessage: {reason} (permanent")
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == [
        "message dead-lettered"
    ] * len(undecodable)
    copies = {letter.message_id: letter for letter in letters}
    assert copies["m-ts"].headers["ts"] == str(latest)
    assert copies["m-key"].headers["k\ufffd\ufffd"] == "v"
    assert copies["m-key"].body == body
    assert events_of(store, issuer) == ["IssuerCreatedEvent"]
    assert len(store.events) == 1
    assert await bus.queue_state(queue) == (0, 0)


async def test_a_refused_message_is_acked_only_once_its_dead_letter_is_confirmed(
    bus: Bus, queue: str
) -> None:
    """The original goes only once the dead-letter queue holds its copy: a copy that is
    never confirmed (the broker down, the process killed) leaves the original queued."""
    sending = asyncio.Event()

    class Unconfirmed(DeadLetters):
        async def keep(
            self, message: AbstractIncomingMessage, *, reason: str, source_queue: str
        ) -> bool:
            sending.set()
            await asyncio.Event().wait()  # the broker never confirms the copy
            raise AssertionError("unreachable")

    unconfirmed = replace(bus, dead_letters=Unconfirmed(bus.publisher, bus.outages, FAST))
    store = InMemoryEventStore()
    handler = exactly_once(store, "create_investor", handlers.create_investor)
    refused = envelope(CreateInvestor(uuid.uuid4(), Decimal("-1")))
    subscription = on_command_queue(queue, "CreateInvestor")
    async with consuming(unconfirmed, subscription, handler, shutdown_grace=0.1):
        await bus.publisher.send_to_queue(queue, refused)
        await asyncio.wait_for(sending.wait(), timeout=10)
        assert await bus.queue_state(queue) == (0, 1)  # delivered, not acked

    async def returned() -> bool:
        return await bus.queue_state(queue) == (1, 0)

    await wait_until(returned, what="the refused message back in its queue")


async def test_rule_violation_is_dead_lettered_at_once(bus: Bus, queue: str) -> None:
    store = InMemoryEventStore()
    handler = Counting(exactly_once(store, "create_investor", handlers.create_investor))
    message = envelope(CreateInvestor(uuid.uuid4(), Decimal("-1")))
    async with consuming(bus, on_command_queue(queue, "CreateInvestor"), handler):
        await bus.publisher.send_to_queue(queue, message)

        [letter] = await bus.first_dead_letters(queue, "the refused command dead-lettered")
    assert handler.calls == 1
    assert letter.message_id == message.message_id
    assert letter.name == "CreateInvestor"
    assert "RuleViolation" in letter.reason and "balance" in letter.reason
    assert store.events == []
    assert await bus.queue_state(queue) == (0, 0)


async def test_missing_aggregate_is_retried_deferred_then_dead_lettered(
    bus: Bus, queue: str
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    handler = Counting(exactly_once(store, "sell_invoice", handlers.sell_invoice))
    message = envelope(SellInvoice(uuid.uuid4(), issuer, Decimal("100.00")))
    with capture_logs() as logs:
        async with consuming(bus, on_command_queue(queue, "SellInvoice"), handler):
            await bus.publisher.send_to_queue(queue, message)

            [letter] = await bus.first_dead_letters(queue, "the orphan command dead-lettered")
    # Its attempts on its first delivery, then one on each return from a deferral.
    returns = handler.calls - MissingAggregate.retry_attempts
    assert returns >= 2, handler.calls
    # One line at INFO when it is first deferred, however often it comes back (its
    # returns at DEBUG, which a run configured at INFO does not even capture).
    deferred = [line["log_level"] for line in logs if line["event"] == "message deferred"]
    assert [level for level in deferred if level != "debug"] == ["info"], deferred
    assert f"issuer {issuer} is not registered" in letter.reason
    waited = float(letter.reason.rsplit("waited ", 1)[1].split(" s ")[0])
    assert FAST.aggregate_wait <= waited < FAST.aggregate_wait + 5
    assert letter.message_id == message.message_id
    assert letter.body == message.body
    assert store.events == []
    assert await bus.queue_state(DEFERRALS) == (0, 0)


async def test_a_deferred_message_back_late_past_its_wait_waits_once_more_for_its_aggregate(
    bus: Bus, queue: str
) -> None:
    """Regression: the service stopped longer than the wait (an upgrade), the registration
    creating the aggregate waiting in its queue: the deferred message was dead-lettered
    at its first attempt after the start, its aggregate created a moment later."""
    store = InMemoryEventStore()
    issuer = uuid.uuid4()

    async def registered_after_the_first_attempt(calls: int) -> None:
        if calls == 2:  # back from its deferral: the registration went through meanwhile
            async with store.unit_of_work() as uow:
                await handlers.create_issuer(uow, CreateIssuer(issuer))

    handler = Counting(
        exactly_once(store, "sell_invoice", handlers.sell_invoice),
        before=registered_after_the_first_attempt,
    )
    message = to_amqp(envelope(SellInvoice(uuid.uuid4(), issuer, Decimal("100.00"))))
    message.headers.update(  # put aside 70 s ago for 0.25 s, having waited 2 s then
        {
            DEFERRED_AT_HEADER: datetime.now(UTC).isoformat(),
            DEFERRED_FOR_HEADER: "2.000",
            DEFERRED_DELAY_HEADER: "0.250",
            DEFERRED_CLOCK_HEADER: f"{THIS_BOOT} {time.monotonic() - 70:.3f}",
        }
    )
    async with consuming(bus, on_command_queue(queue, "SellInvoice"), handler):
        await bus.publisher.send_message_to_queue(queue, message)

        async def created() -> bool:
            return any(isinstance(stored.event, ev.InvoiceCreatedEvent) for stored in store.events)

        await wait_until(created, what="the invoice created once its issuer was")
    assert handler.calls == 2
    assert await bus.dead_letters_of(queue) == []


async def test_a_message_always_back_late_is_dead_lettered_after_one_pass_past_its_wait(
    bus: Bus, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: under a backlog every return is late; given a pass past its wait at
    every late return, a flood of bids naming investors that never come went round for
    ever (none of 20,000 dead-lettered after 4 minutes)."""
    monkeypatch.setattr(dead_letters_module, "LATE_BY", -60.0)  # every return is late
    store = InMemoryEventStore()
    handler = Counting(exactly_once(store, "sell_invoice", handlers.sell_invoice))
    message = envelope(SellInvoice(uuid.uuid4(), uuid.uuid4(), Decimal("100.00")))
    async with consuming(bus, on_command_queue(queue, "SellInvoice"), handler):
        await bus.publisher.send_to_queue(queue, message)

        [letter] = await bus.first_dead_letters(queue, "the orphan command dead-lettered")
    assert letter.message_id == message.message_id
    assert store.events == []


async def test_a_deferred_copy_keeps_the_originals_properties(bus: Bus, queue: str) -> None:
    handler = exactly_once(InMemoryEventStore(), "sell_invoice", handlers.sell_invoice)
    issuer = uuid.uuid4()
    message = envelope(SellInvoice(uuid.uuid4(), issuer, Decimal("10")))
    original = to_amqp(message)
    for name, value in PROPERTIES.items():
        setattr(original, name, value)
    slow = dataclasses.replace(FAST, aggregate_wait=60.0, first_deferral=5.0)  # waits 5 s
    async with consuming(bus, on_command_queue(queue, "SellInvoice"), handler, policy=slow):
        await bus.publisher.send_message_to_queue(queue, original)

        async def waiting() -> bool:
            return await bus.queue_state(DEFERRALS) == (1, 0)

        await wait_until(waiting, what="the copy waiting in financing_deferred")
        channel = await bus.broker.channel()
        try:
            deferrals = await channel.declare_queue(DEFERRALS, passive=True)
            copy = await deferrals.get(no_ack=False)  # given back as the channel closes
            kept = {name: getattr(copy, name) for name in PROPERTIES}
            assert copy.routing_key == queue and copy.message_id == message.message_id
            assert copy.headers[DEFERRED_AT_HEADER]
            assert copy.expiration == 5.0  # put aside for the policy's first deferral
            # Counted so: nothing waited before, 5 s put aside, when by this host's clock.
            assert copy.headers[DEFERRED_FOR_HEADER] == "0.000"
            assert copy.headers[DEFERRED_DELAY_HEADER] == "5.000"
            # Why it waits, for `financing trace` to say (it said "an aggregate it names").
            waits = f"issuer {issuer} is not registered"
            assert waits in copy.headers[DEFERRED_REASON_HEADER], copy.headers
            boot, _, _ = copy.headers[DEFERRED_CLOCK_HEADER].partition(" ")
            assert boot == THIS_BOOT
        finally:
            await channel.close()
    assert kept == PROPERTIES


THIS_BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
PROPERTIES = {
    "app_id": "registering",
    "type": "command",
    "reply_to": "replies",
    "priority": 3,
    "timestamp": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
}


async def test_a_message_too_large_to_copy_whole_is_dead_lettered_rather_than_deferred(
    bus: Bus, queue: str
) -> None:
    """Regression: its copy, headers and all, exceeded the broker's frame size: the broker
    closed the service's whole connection, and the message came back, about once a
    second, for ever."""
    handler = Counting(exactly_once(InMemoryEventStore(), "sell_invoice", handlers.sell_invoice))
    message = dataclasses.replace(
        envelope(SellInvoice(uuid.uuid4(), uuid.uuid4(), Decimal("10"))),
        headers={"pad": "x" * 40_000},
    )
    async with consuming(bus, on_command_queue(queue, "SellInvoice"), handler):
        await bus.publisher.send_to_queue(queue, message)

        [letter] = await bus.first_dead_letters(queue, "the large message dead-lettered")
    assert handler.calls == MissingAggregate.retry_attempts  # delivered once
    assert "MissingAggregate" in letter.reason
    assert "it could not be deferred: its headers (40" in letter.reason


async def test_a_message_the_deferrals_queue_refuses_is_dead_lettered_rather_than_redelivered(
    bus: Bus, queue: str
) -> None:
    """Regression: with `financing_deferred` recreated under the service with other
    arguments (another queue type, no dead-letter exchange), every deferral failed for
    good and the message came back, about once a second, for ever."""
    channel = await bus.broker.channel()
    await channel.queue_delete(DEFERRALS)
    await channel.declare_queue(DEFERRALS, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.close()
    handler = Counting(exactly_once(InMemoryEventStore(), "sell_invoice", handlers.sell_invoice))
    try:
        async with consuming(bus, on_command_queue(queue, "SellInvoice"), handler):
            message = envelope(SellInvoice(uuid.uuid4(), uuid.uuid4(), Decimal("10")))
            await bus.publisher.send_to_queue(queue, message)

            [letter] = await bus.first_dead_letters(queue, "the undeferrable message")
    finally:
        channel = await bus.broker.channel()
        await channel.queue_delete(DEFERRALS)  # declared again, classic, by the next one
        await channel.close()
    assert handler.calls == MissingAggregate.retry_attempts
    assert "it could not be deferred" in letter.reason
    assert "PRECONDITION_FAILED" in letter.reason


async def test_a_deferred_command_comes_back_and_is_processed_once_its_aggregate_exists(
    bus: Bus, queue: str
) -> None:
    store = InMemoryEventStore()
    issuer, invoice = uuid.uuid4(), uuid.uuid4()
    deferred_at: list[str] = []

    async def issuer_arrives_once_deferred(call: int) -> None:
        if call == MissingAggregate.retry_attempts + 1:  # the first attempt after its return
            async with store.unit_of_work() as uow:
                await handlers.create_issuer(uow, CreateIssuer(issuer))

    async def noting_the_deferral(decoded: Decoded) -> Outcome:
        deferred_at.append(decoded.envelope.headers.get(DEFERRED_AT_HEADER, ""))
        return await handler(decoded)

    handler = Counting(
        exactly_once(store, "sell_invoice", handlers.sell_invoice), issuer_arrives_once_deferred
    )
    message = envelope(SellInvoice(invoice, issuer, Decimal("10")), "sale-1")
    async with consuming(bus, on_command_queue(queue, "SellInvoice"), noting_the_deferral):
        await bus.publisher.send_to_queue(queue, message)

        async def created() -> bool:
            return events_of(store, invoice) == ["InvoiceCreatedEvent"]

        await wait_until(created, what="the invoice to be created")
    assert handler.calls == MissingAggregate.retry_attempts + 1
    assert deferred_at[0] == "" and deferred_at[-1] != ""  # the copy says since when
    assert store.outcomes[("sell_invoice", "sale-1")].digest == body_digest(message.body)
    assert await bus.dead_letters_of(queue) == []
    assert await bus.queue_state(DEFERRALS) == (0, 0)


async def test_command_waiting_for_its_aggregate_is_processed_once_it_exists(
    bus: Bus, queue: str
) -> None:
    store = InMemoryEventStore()
    issuer, invoice = uuid.uuid4(), uuid.uuid4()

    async def issuer_arrives_after_first_attempt(call: int) -> None:
        if call == 2:
            async with store.unit_of_work() as uow:
                await handlers.create_issuer(uow, CreateIssuer(issuer))

    handler = Counting(
        exactly_once(store, "sell_invoice", handlers.sell_invoice),
        issuer_arrives_after_first_attempt,
    )
    async with consuming(bus, on_command_queue(queue, "SellInvoice"), handler):
        message = envelope(SellInvoice(invoice, issuer, Decimal("10")))
        await bus.publisher.send_to_queue(queue, message)

        async def created() -> bool:
            return events_of(store, invoice) == ["InvoiceCreatedEvent"]

        await wait_until(created, what="the invoice to be created")
    assert handler.calls == 2
    assert await bus.dead_letters_of(queue) == []


async def test_unexpected_error_is_dead_lettered_after_the_bug_attempts(
    bus: Bus, queue: str
) -> None:
    async def broken(decoded: Decoded) -> Outcome:
        raise ValueError("handler bug")

    handler = Counting(broken)
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler):
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(uuid.uuid4())))

        [letter] = await bus.first_dead_letters(queue, "the failing message dead-lettered")
    assert handler.calls == BUG_ATTEMPTS
    assert "ValueError: handler bug" in letter.reason
    assert await bus.queue_state(queue) == (0, 0)


async def test_a_type_error_is_retried_a_few_times_then_dead_lettered_with_where_it_was_raised(
    bus: Bus, queue: str
) -> None:
    async def misuses_a_value(decoded: Decoded) -> Outcome:
        raise TypeError("unsupported operand")

    handler = Counting(misuses_a_value)
    message = envelope(CreateIssuer(uuid.uuid4()))
    # The policy every consumer of the service uses.
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler, policy=DELIVERIES):
        await bus.publisher.send_to_queue(queue, message)

        [letter] = await bus.first_dead_letters(queue, "the failing message dead-lettered")
        # Nothing held unacked by the consumer, which is still running.
        await bus.wait_settled(queue)
    assert DELIVERIES.bug is not None
    assert handler.calls == DELIVERIES.bug.attempts
    assert letter.message_id == message.message_id
    assert "TypeError: unsupported operand" in letter.reason
    assert "(at test_rabbitmq_consumer.py:" in letter.reason
    assert "in misuses_a_value)" in letter.reason


async def test_a_read_after_write_is_dead_lettered_without_a_retry(bus: Bus, queue: str) -> None:
    store = InMemoryEventStore()

    async def reads_after_writing(uow: UnitOfWork, command: CreateIssuer) -> None:
        issuer = await uow.load(Issuer, command.id)
        issuer.create()
        await uow.save(issuer)
        await uow.load(Issuer, command.id)  # the unit of work refuses: ReadAfterWrite

    handler = Counting(exactly_once(store, "reads_after_writing", reads_after_writing))
    message = envelope(CreateIssuer(uuid.uuid4()))
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler, policy=DELIVERIES):
        await bus.publisher.send_to_queue(queue, message)

        [letter] = await bus.first_dead_letters(queue, "the message dead-lettered")
        await bus.wait_settled(queue)
    assert handler.calls == 1
    assert letter.message_id == message.message_id
    assert f"{ReadAfterWrite.__name__}: load after a write" in letter.reason
    assert store.events == []


async def test_messages_of_other_names_are_acked_and_ignored_on_an_events_queue(
    bus: Bus,
) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    handler = Counting(exactly_once(store, "create_issuer", handlers.create_issuer))
    # A queue bound to `events` receives every event: other names are not for it.
    queue = f"events_{unique_name('other_names')}"
    subscription = Subscription(QueueSpec(queue, bound_to_events=True), frozenset({"CreateIssuer"}))
    other = envelope(CreateInvestor(uuid.uuid4(), Decimal("5")))
    async with consuming(bus, subscription, handler, prefetch=1):
        await bus.publisher.send_to_queue(queue, other)
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

        async def processed() -> bool:
            return bool(events_of(store, issuer))

        await wait_until(processed, what="the handled message after the ignored one")
    assert handler.calls == 1
    assert [e.name for e in store.events] == ["IssuerCreatedEvent"]
    assert await bus.queue_state(queue) == (0, 0)
    assert await bus.dead_letters_of(queue) == []


async def test_a_message_of_another_name_on_a_command_queue_is_dead_lettered(
    bus: Bus, queue: str
) -> None:
    store = InMemoryEventStore()
    handler = Counting(exactly_once(store, "create_issuer", handlers.create_issuer))
    misrouted = envelope(CreateInvestor(uuid.uuid4(), Decimal("5")))
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler):
        await bus.publisher.send_to_queue(queue, misrouted)

        [letter] = await bus.first_dead_letters(queue, "the misrouted command dead-lettered")
    assert handler.calls == 0
    assert letter.message_id == misrouted.message_id
    assert f"a 'CreateInvestor' message on '{queue}'" in letter.reason
    assert await bus.queue_state(queue) == (0, 0)


async def test_redelivery_storm_has_a_single_effect(bus: Bus, queue: str) -> None:
    store = InMemoryEventStore()
    investors = [uuid.uuid4() for _ in range(5)]

    async def interleave(call: int) -> None:
        await asyncio.sleep(0)  # let the concurrent runs of one delivery overlap

    handler = Counting(exactly_once(store, "create_investor", handlers.create_investor), interleave)
    async with consuming(
        bus,
        on_command_queue(queue, "CreateInvestor"),
        handler,
        handler_parts=(duplicated(3),),
    ):
        for investor in investors:
            message = envelope(CreateInvestor(investor, Decimal("50")))
            await bus.publisher.send_to_queue(queue, message)

        async def all_created() -> bool:
            return len(store.processed) == len(investors)

        await wait_until(all_created, what="every investor to be created")
        await bus.wait_settled(queue)
    assert handler.calls >= 3 * len(investors)
    for investor in investors:
        assert events_of(store, investor) == ["InvestorCreatedEvent", "InvestorFundsAddedEvent"]
    assert await bus.queue_state(queue) == (0, 0)
    assert await bus.dead_letters_of(queue) == []


async def test_event_subscription_consumes_the_events_exchange(bus: Bus) -> None:
    received: list[Envelope] = []

    async def record(decoded: Decoded) -> Outcome:
        received.append(decoded.envelope)
        return Outcome.processed()

    queue = f"events_{unique_name('policy')}"
    subscription = Subscription(
        QueueSpec(queue, bound_to_events=True), frozenset({"IssuerCreatedEvent"})
    )
    issuer = uuid.uuid4()
    published = Envelope(
        message_id=str(uuid.uuid4()),
        name="IssuerCreatedEvent",
        body=codec.encode(ev.IssuerCreatedEvent(issuer_id=issuer)),
        aggregate_id=str(issuer),
        headers={"aggregateVersion": "1"},
    )
    async with consuming(bus, subscription, record):
        await bus.publisher.publish_events([published])

        async def arrived() -> list[Envelope]:
            return received

        await wait_until(arrived, what="the event on the policy's queue")
    assert received == [published]


async def test_a_delivery_after_stop_is_left_for_the_broker_to_deliver_again() -> None:
    """`stop` takes no more deliveries: one that arrives then (the queue of a single
    active consumer is not cancelled first) starts no task that nothing waits for."""
    started: list[Delivery] = []

    async def step(delivery: Delivery) -> Outcome:
        started.append(delivery)
        return Outcome.processed()

    deliveries = Deliveries(step)
    await deliveries.stop()
    tasks = asyncio.all_tasks()
    deliveries.receive(
        cast(consumer_module.AmqpDelivery, MemoryDelivery(envelope(CreateIssuer(uuid.uuid4()))))
    )
    assert asyncio.all_tasks() == tasks
    assert started == []


async def test_cancellation_lets_in_flight_messages_finish(bus: Bus, queue: str) -> None:
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(call: int) -> None:
        entered.set()
        await release.wait()

    handler = Counting(exactly_once(store, "create_issuer", handlers.create_issuer), slow)
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler) as running:
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))
        await asyncio.wait_for(entered.wait(), timeout=10)
        running.task.cancel()
        release.set()
        with suppress(asyncio.CancelledError):
            await running.task
    assert events_of(store, issuer) == ["IssuerCreatedEvent"]
    assert await bus.queue_state(queue) == (0, 0)


async def test_consumption_resumes_after_the_broker_drops_connections(bus: Bus, queue: str) -> None:
    store = InMemoryEventStore()
    before, after = uuid.uuid4(), uuid.uuid4()
    entered, release = asyncio.Event(), asyncio.Event()

    async def first_call_waits(call: int) -> None:
        if call == 1:
            entered.set()
            await release.wait()

    handler = Counting(
        exactly_once(store, "create_issuer", handlers.create_issuer), first_call_waits
    )
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler) as running:
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(before)))
        await asyncio.wait_for(entered.wait(), timeout=10)
        await rabbitmq.close_connections(bus.vhost.name)
        # The commit happens after the delivery channel died: its ack cannot
        # reach the broker, which redelivers; deduplication absorbs it.
        release.set()

        async def resent() -> bool:
            try:
                await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(after)))
            except Unavailable:
                return False
            return True

        await wait_until(resent, timeout=30, what="publishing after the reconnection")

        async def both_processed() -> bool:
            return bool(events_of(store, after)) and handler.calls >= 3

        await wait_until(both_processed, timeout=30, what="consumption to resume")
        assert not running.task.done()
    assert events_of(store, before) == ["IssuerCreatedEvent"]
    assert events_of(store, after) == ["IssuerCreatedEvent"]
    assert await bus.queue_state(queue) == (0, 0)


async def close_consumer_channel(bus: Bus, queue: str) -> None:
    """Make the broker close the consumer's channel: an ack of a delivery it never made
    is a channel error (PRECONDITION_FAILED, unknown delivery tag)."""
    channel = bus.broker.consumer_channels[-1]
    underlay = await channel.get_underlay_channel()
    await underlay.basic_ack(delivery_tag=1_000_000)

    async def closed() -> bool:
        return channel.is_closed

    await wait_until(closed, what="the broker to close the consumer's channel")


async def close_connections(bus: Bus, queue: str) -> None:
    await rabbitmq.close_connections(bus.vhost.name)


async def delete_the_queue(bus: Bus, queue: str) -> None:
    """Delete the consumer's queue: the broker cancels the consumer and leaves its channel
    open (regression: the consumer waited for that channel to close, for ever)."""
    channel = await bus.broker.channel()
    try:
        await channel.queue_delete(queue)
    finally:
        await channel.close()


@pytest.mark.parametrize(
    "broker_closes",
    [close_consumer_channel, close_connections, delete_the_queue],
    ids=["its-channel", "its-connection", "its-queue"],
)
async def test_consumer_keeps_consuming_after_the_broker_closes(
    bus: Bus, queue: str, broker_closes: Callable[[Bus, str], Awaitable[None]]
) -> None:
    store = InMemoryEventStore()
    before, after = uuid.uuid4(), uuid.uuid4()
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler) as running:
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(before)))

        async def first_processed() -> bool:
            return bool(events_of(store, before))

        await wait_until(first_processed, what="the message before the closure")
        await broker_closes(bus, queue)
        closed_at = time.monotonic()

        # The test's own publishing is not what is checked: let it reconnect first.
        async def sent() -> bool:
            try:
                await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(after)))
            except Unavailable:
                return False
            return True

        await wait_until(sent, what="publishing after the closure")

        async def processed() -> bool:
            return bool(events_of(store, after))

        await wait_until(processed, timeout=10, what="a message published after the closure")
        assert time.monotonic() - closed_at < 10
        assert not running.task.done()
        assert await bus.queue_state(queue) == (0, 1)  # one consumer again, nothing left
    assert events_of(store, before) == ["IssuerCreatedEvent"]
    assert events_of(store, after) == ["IssuerCreatedEvent"]


@pytest.mark.parametrize("fed_with", ["events", "commands", "integration"])
async def test_a_queue_deleted_under_its_consumer_is_said_once_consumed_again(
    bus: Bus, queue: str, fed_with: str
) -> None:
    """Regression (a probe): an operator deleted a queue of the service's under load (a
    vhost's queue limit keeping it from being declared again for 35 s): the events
    relayed meanwhile were lost for its consumer, and the only line as it came back was
    the outage's end; nothing said what was missed or how to have it again."""
    spec = {
        "events": QueueSpec(queue, bound_to_events=True),
        "commands": command_queue(queue),
        "integration": QueueSpec(
            queue, bound_to_events=True, routed_names=frozenset({"IssuerRegistered"})
        ),
    }[fed_with]
    subscription = Subscription(spec, frozenset({"CreateIssuer"}))
    store = InMemoryEventStore()
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    # The last event delivered before the deletion, recorded 10 minutes before: what was
    # queued behind it was relayed after it, and is lost with the queue.
    recorded = datetime.now(UTC) - timedelta(minutes=10)
    issuer = uuid.uuid4()
    last = replace(envelope(CreateIssuer(issuer)), headers={"recorded_at": recorded.isoformat()})
    with capture_logs() as logs:
        async with consuming(bus, subscription, handler) as running:
            await bus.publisher.send_to_queue(queue, last)
            await wait_until(lambda: holds(bool(events_of(store, issuer))), what="delivered")
            await close_consumer_channel(bus, queue)  # not cancelled: nothing to say
            await wait_until(lambda: holds(running.consumer.consuming.is_set()), what="back")
            before = datetime.now(UTC)
            await delete_the_queue(bus, queue)

            def said() -> list[dict[str, Any]]:
                return [line for line in logs if line["event"].startswith("consuming again after")]

            await wait_until(lambda: holds(bool(said())), what="the line once consumed again")
            assert running.consumer.consuming.is_set()
    [line] = said()
    assert line["queue"] == queue and line["log_level"] == "warning", line
    cancelled_at = datetime.fromisoformat(line["cancelled_at"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= cancelled_at <= datetime.now(UTC), line
    counted = REGISTRY.get_sample_value("financing_consumers_cancelled_total", {"queue": queue})
    assert counted == 1
    if fed_with == "events":
        since = moment(recorded - timedelta(minutes=1))
        assert f"financing relay rewind --since {since}" in line["events"], line
        assert line["last_delivered_recorded_at"] == moment(recorded), line
    elif fed_with == "integration":  # which no event store keeps: no rewind to offer
        assert "no rewind sends them again" in line["events"], line
    else:
        assert "events" not in line, line


async def test_a_queue_deleted_while_its_consumer_held_deliveries_is_dated_by_the_oldest_held(
    bus: Bus, queue: str
) -> None:
    """Regression (a probe): the instance the broker delivered to dated the rewind by the
    last event delivered to it, while the deliveries it held unsettled, older, were lost
    with the queue too: a rewind from there missed the 25 oldest of 135 events."""
    spec = QueueSpec(queue, bound_to_events=True)
    store = InMemoryEventStore()
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    held = asyncio.Event()
    entered: list[Decoded] = []

    async def holding(decoded: Decoded) -> Outcome:
        entered.append(decoded)
        await held.wait()  # a table locked under the projector, say
        return await handler(decoded)

    now = datetime.now(UTC)
    oldest, newest = now - timedelta(minutes=20), now - timedelta(minutes=10)
    with capture_logs() as logs:
        subscription = Subscription(spec, frozenset({"CreateIssuer"}))
        async with consuming(bus, subscription, holding):
            for recorded in (oldest, newest):
                message = envelope(CreateIssuer(uuid.uuid4()))
                dated = replace(message, headers={"recorded_at": recorded.isoformat()})
                await bus.publisher.send_to_queue(queue, dated)

            async def both_held() -> bool:  # none left ready in the queue, one in the handler
                return bool(entered) and await bus.queue_state(queue) == (0, 1)

            await wait_until(both_held, what="both delivered and held")
            await delete_the_queue(bus, queue)

            def said() -> list[dict[str, Any]]:
                return [line for line in logs if line["event"].startswith("consuming again after")]

            await wait_until(lambda: holds(bool(said())), what="the line once consumed again")
            held.set()
    [line] = said()
    assert line["oldest_in_hand_recorded_at"] == moment(oldest), line
    assert line["last_delivered_recorded_at"] == moment(newest), line
    since = moment(oldest - timedelta(minutes=1))
    assert f"financing relay rewind --since {since}" in line["events"], line


@pytest.mark.parametrize("records", ["dated", "undated", "late", "out"])
async def test_a_queue_deleted_under_a_consumer_that_had_no_delivery_is_dated_by_its_records(
    bus: Bus, queue: str, records: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (a probe): the standby of a queue with a single active consumer (or any
    instance that had no delivery) dated the rewind a minute before the cancel, which
    missed the 750 events queued behind a backlog, while the active instance's line gave
    the right time: the line now takes the consumer's records, shared by the instances,
    when the event processed last was recorded. Records that did not answer at once (a
    DBA's lock) were said to date nothing, `undated`, and a rewind by that line missed
    186 events (a probe of the fix): the line waits for them, and says when they could
    never be read."""
    monkeypatch.setattr(consumer_module, "RECORDS_PACE", 0.2)
    monkeypatch.setattr(consumer_module, "RECORDS_WAITED", 1.0)
    spec = QueueSpec(queue, bound_to_events=True)
    processed = datetime.now(UTC) - timedelta(minutes=30)
    asked: list[datetime] = []

    async def last_processed(before: datetime) -> datetime | None:
        asked.append(before)
        if records == "out" or (records == "late" and len(asked) < 3):
            raise Unavailable("command database", "down")
        return None if records == "undated" else processed

    handler = exactly_once(InMemoryEventStore(), "create_issuer", handlers.create_issuer)
    with capture_logs() as logs:
        subscription = Subscription(spec, frozenset({"CreateIssuer"}))
        async with consuming(bus, subscription, handler, last_processed=last_processed):
            before = datetime.now(UTC)
            await delete_the_queue(bus, queue)

            def said() -> list[dict[str, Any]]:
                return [line for line in logs if line["event"].startswith("consuming again after")]

            await wait_until(lambda: holds(bool(said())), what="the line once consumed again")
    [line] = said()
    assert "last_delivered_recorded_at" not in line, line
    cancelled_at = datetime.fromisoformat(line["cancelled_at"].replace("Z", "+00:00"))
    # The records are asked what was processed by the cancel, not what came after it.
    assert {moment(at) for at in asked} == {line["cancelled_at"]}, (asked, line)
    if records in ("dated", "late"):
        since = moment(processed - timedelta(minutes=1))
        assert f"financing relay rewind --since {since}" in line["events"], line
        assert line["last_processed_recorded_at"] == moment(processed), line
        assert "undated" not in line and "unread" not in line, line
    else:  # the cancel's time, and why nothing dated what the queue held
        assert cancelled_at >= before - timedelta(seconds=1), line
        since = moment(cancelled_at - timedelta(minutes=1))
        assert f"financing relay rewind --since {since}" in line["events"], line
        if records == "undated":
            assert "rewind from before its oldest event" in line["undated"], line
            assert "unread" not in line, line
        else:
            assert "could not be read" in line["unread"], line
            assert "undated" not in line, line


async def test_a_queue_made_again_with_other_arguments_is_an_outage_of_that_queue_alone(
    bus: Bus, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an operator deleted a command queue and declared it again with an
    argument (`x-max-length`): its consumer's declaration was refused (PRECONDITION_FAILED),
    which stopped the whole service, and every start after that failed."""
    pace = 2.0
    monkeypatch.setattr(consumer_module, "REFUSED_PACE", pace)
    store = InMemoryEventStore()
    handler = exactly_once(store, "create_issuer", handlers.create_issuer)
    with capture_logs() as logs:
        async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler) as running:
            operator = await bus.broker.channel()
            await operator.queue_delete(queue)
            await operator.declare_queue(queue, durable=True, arguments={"x-max-length": 10})

            async def down() -> bool:
                return f"queue {queue}" in bus.outages.down()

            await wait_until(down, what="the queue's outage")
            assert not running.task.done()
            assert "broker" not in bus.outages.down()
            # Looked at again at its own pace, not the retry's: each look is a channel the
            # broker closes, each leaving 4 kB behind in aiormq (20 MB an hour).
            opened = len(bus.broker.consumer_channels)

            async def looked_again() -> bool:
                return len(bus.broker.consumer_channels) > opened

            await wait_until(looked_again, timeout=pace + 5, what="a look again")
            looked_at = time.monotonic()
            await operator.queue_delete(queue)  # the operator's mend
            await operator.close()

            async def consuming_again() -> bool:
                return running.consumer.consuming.is_set()

            await wait_until(consuming_again, timeout=pace + 5, what="the queue declared anew")
            assert time.monotonic() - looked_at >= pace * 0.9  # the pace kept
            issuer = uuid.uuid4()
            await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))

            async def processed() -> bool:
                return bool(events_of(store, issuer))

            await wait_until(processed, timeout=10, what="a command on the queue declared anew")
    [said] = [line for line in logs if line["event"] == f"queue {queue} unavailable"]
    assert "inequivalent arg 'x-max-length'" in said["error"], said
    assert f"rabbitmqctl delete_queue -p VHOST {queue}" in said["error"], said
    assert [line["event"] for line in logs].count(f"queue {queue} recovered") == 1


def first_ack_never_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ack frame waits for good, as a write to a blocked connection waits; the
    ack times out within 0.2 s."""
    monkeypatch.setattr(consumer_module, "ACK_TIMEOUT", 0.2)
    write = ChannelAcks._write
    blocked = True

    async def first_write_blocks(acks: ChannelAcks, ready: Mapping[int, object]) -> None:
        nonlocal blocked
        if blocked:
            blocked = False
            await asyncio.Event().wait()
        await write(acks, ready)

    monkeypatch.setattr(ChannelAcks, "_write", first_write_blocks)


async def test_an_ack_not_written_on_an_open_channel_gives_the_channel_up_for_a_redelivery(
    bus: Bus, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an ack whose frame could not be written in time (the connection blocked
    by a broker alarm) was taken for one lost with its channel; the channel stayed open,
    so the broker held the message unacked, and its prefetch slot, until it closed."""
    first_ack_never_written(monkeypatch)
    store = InMemoryEventStore()
    issuer = uuid.uuid4()
    handler = Counting(exactly_once(store, "create_issuer", handlers.create_issuer))
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler) as running:
        await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))
        await wait_until(
            lambda: rabbitmq.queue_settled(bus.vhost.name, queue),
            timeout=10,
            what="the message delivered again on a new channel, and acked",
        )
        assert handler.calls == 2  # the second found it processed: a duplicate
        assert not running.task.done()
        assert await bus.queue_state(queue) == (0, 1)
    assert events_of(store, issuer) == ["IssuerCreatedEvent"]


async def test_acks_asked_for_while_a_given_up_channel_closes_never_follow_its_close(
    bus: Bus, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: aiormq writes a channel's frames until the broker answers its Close,
    and RabbitMQ takes a frame after a channel's Close for a breach of the protocol that
    closes the whole connection. Under load, a consumer gave a channel up (an ack not
    written in time) while its other deliveries finished: their acks followed the Close,
    and the broker closed the connection (`CHANNEL_ERROR - expected 'channel.open'`),
    every consumer's and publisher's channel with it, logged as the broker's outage."""
    first_ack_never_written(monkeypatch)
    closing = asyncio.Event()
    close_channel = consumer_module.close_channel

    async def closing_said(channel: AbstractChannel) -> None:
        closing.set()
        await close_channel(channel)

    monkeypatch.setattr(consumer_module, "close_channel", closing_said)
    store = InMemoryEventStore()
    issuers = [uuid.uuid4() for _ in range(20)]

    async def the_rest_end_as_the_channel_closes(call: int) -> None:
        if call > 1 and not closing.is_set():
            await closing.wait()

    handler = Counting(
        exactly_once(store, "create_issuer", handlers.create_issuer),
        before=the_rest_end_as_the_channel_closes,
    )
    connection = await bus.broker.connection()
    async with consuming(bus, on_command_queue(queue, "CreateIssuer"), handler):
        for issuer in issuers:
            await bus.publisher.send_to_queue(queue, envelope(CreateIssuer(issuer)))
        await wait_until(
            lambda: rabbitmq.queue_settled(bus.vhost.name, queue),
            timeout=10,
            what="every message delivered again on a new channel, and acked",
        )
        assert closing.is_set()
        assert await bus.broker.connection() is connection, "the broker closed the connection"
    assert all(events_of(store, issuer) == ["IssuerCreatedEvent"] for issuer in issuers)


async def refused_by_the_broker(publisher: Publisher, queue: str) -> None:
    """Until `publisher` is refused by the broker (a channel hears of a permission
    change a moment after it is made)."""

    async def refused() -> bool:
        probe = Envelope(message_id=str(uuid.uuid4()), name="probe", body=b"{}")
        try:
            await publisher.send_to_queue(queue, probe)
        except PublishFailed as failure:
            return "ACCESS_REFUSED" in str(failure)
        return False

    await wait_until(refused, timeout=10, what="the broker to refuse publishing")


async def test_a_message_handled_during_a_permission_outage_sends_its_command_once_it_is_over(
    bus: Bus,
) -> None:
    queue = f"events_{unique_name('registered')}"
    subscription = Subscription(
        QueueSpec(queue, bound_to_events=True), frozenset({IssuerRegistered.name()})
    )
    entered, release = asyncio.Event(), asyncio.Event()

    async def first_call_waits(call: int) -> None:
        if call == 1:
            entered.set()
            await release.wait()

    handler = Counting(
        sending(AmqpCommandSender(bus.publisher), integration.issuer_registered_creates_issuer),
        first_call_waits,
    )
    registered = IssuerRegistered(uuid.uuid4(), "Issuer Ltd")
    event = Envelope(
        message_id=str(uuid.uuid4()),
        name=IssuerRegistered.name(),
        body=codec.encode(registered),
    )
    command_id = str(derived_message_id(event.message_id, CreateIssuer.name()))
    async with consuming(bus, subscription, handler, policy=DELIVERIES) as running:
        await bus.publisher.publish_events([event])
        await asyncio.wait_for(entered.wait(), timeout=10)
        await rabbitmq.revoke_permissions(bus.vhost.name)
        try:
            await refused_by_the_broker(bus.publisher, queue)
            release.set()

            async def refused_a_few_times() -> bool:
                return handler.calls >= 5 and "broker" in bus.outages.down()

            await wait_until(refused_a_few_times, what="sending the command to be refused")
            assert await rabbitmq.queue_settled(bus.vhost.name, queue) is False  # still unacked
        finally:
            await rabbitmq.grant_permissions(bus.vhost.name)

        await wait_until(
            lambda: rabbitmq.queue_settled(bus.vhost.name, queue),
            timeout=10,
            what="the event acked once the command is sent",
        )
        assert not running.task.done()
    [command] = await rabbitmq.drain(await bus.broker.connection(), "CreateIssuer", expected=1)
    assert from_amqp(command) == Envelope(
        message_id=command_id,
        name=CreateIssuer.name(),
        body=codec.encode(CreateIssuer(registered.id)),
        # Registering sent no correlation id: the event starts one of its own.
        headers={"correlation_id": event.message_id, "causation_id": event.message_id},
    )
    assert await bus.queue_state("CreateIssuer") == (0, 0)
    assert await bus.dead_letters_of(queue) == []
    assert bus.outages.down() == frozenset()


async def test_a_single_active_consumer_stopping_hands_what_it_holds_over_in_order(
    bus: Bus,
) -> None:
    """Regression: stopping, the active consumer of a single-active-consumer queue (the
    projector's) cancelled its consumption first: the broker made the next consumer
    active at once, which took the messages published meanwhile while the first still
    held older ones unacked; those came back behind them when its channel closed (the
    read models' rows out of their order after a rolling restart)."""
    spec = QueueSpec(
        unique_name("sac"), bound_to_events=False, arguments={"x-single-active-consumer": True}
    )
    held: list[consumer_module.AmqpDelivery] = []
    taken: list[str] = []
    stopping = QueueConsumer(
        bus.broker, spec, bus.dead_letters, bus.outages, held.append, prefetch=5
    )
    taking = QueueConsumer(
        bus.broker,
        spec,
        bus.dead_letters,
        bus.outages,
        lambda delivery: taken.append(delivery.envelope().message_id),
        prefetch=50,
    )
    ids = [f"m-{number:02}" for number in range(25)]

    async def published(some: list[str]) -> None:
        for message_id in some:
            await bus.publisher.send_to_queue(
                spec.name, envelope(CreateIssuer(uuid.uuid4()), message_id)
            )

    first = asyncio.create_task(stopping.run())
    await wait_until(lambda: holds(stopping.consuming.is_set()), what="the first consumer")
    second = asyncio.create_task(taking.run())
    try:
        await wait_until(lambda: holds(taking.consuming.is_set()), what="the second consumer")
        await published(ids[:20])
        await wait_until(lambda: holds(len(held) == 5), what="the first consumer's prefetch")

        first.cancel()  # the service stopping: what it holds goes back once it closes
        with suppress(asyncio.CancelledError):
            await first
        await published(ids[20:])  # events keep coming while it stops

        async def all_waiting() -> bool:
            return await bus.queue_state(spec.name) == (20, 2)

        # Nobody else takes them while the first consumer holds older ones.
        await wait_until(all_waiting, timeout=5, what="the newer messages left in the queue")
        await stopping.close()

        await wait_until(lambda: holds(len(taken) >= len(ids)), what="every message taken over")
        assert taken[: len(ids)] == ids
    finally:
        second.cancel()
        with suppress(asyncio.CancelledError):
            await second
        await taking.close()
        await stopping.close()


async def test_the_consumer_a_single_active_consumer_queue_delivers_to_says_so_once(
    bus: Bus,
) -> None:
    """Regression: nothing in a process's log said that it had become the active
    consumer of the projector's queue (RabbitMQ tells an AMQP consumer nothing), so that
    after a take-over no line named the instance that projects."""
    spec = QueueSpec(
        unique_name("sac"), bound_to_events=False, arguments={"x-single-active-consumer": True}
    )
    got: dict[str, list[str]] = {"first": [], "second": []}
    consumers = {
        name: QueueConsumer(
            bus.broker,
            spec,
            bus.dead_letters,
            bus.outages,
            lambda delivery, name=name: got[name].append(delivery.envelope().message_id),
            prefetch=5,
        )
        for name in got
    }

    async def published(message_id: str) -> None:
        await bus.publisher.send_to_queue(
            spec.name, envelope(CreateIssuer(uuid.uuid4()), message_id)
        )

    def active_lines() -> list[dict[str, object]]:
        return [line for line in logs if str(line["event"]).startswith("deliveries come")]

    with capture_logs() as logs:
        first = asyncio.create_task(consumers["first"].run())
        await wait_until(lambda: holds(consumers["first"].consuming.is_set()), what="the first")
        second = asyncio.create_task(consumers["second"].run())
        try:
            await wait_until(
                lambda: holds(consumers["second"].consuming.is_set()), what="the second"
            )
            assert active_lines() == []  # nothing delivered yet
            for message_id in ("m-1", "m-2"):
                await published(message_id)
            await wait_until(lambda: holds(len(got["first"]) == 2), what="the first's two")
            assert [line["queue"] for line in active_lines()] == [spec.name]

            first.cancel()
            with suppress(asyncio.CancelledError):
                await first
            await consumers["first"].close()  # m-1 and m-2 go back, to the second
            await published("m-3")
            await wait_until(lambda: holds(len(got["second"]) == 3), what="the take-over")
            assert len(active_lines()) == 2
        finally:
            second.cancel()
            with suppress(asyncio.CancelledError):
                await second
            for consumer in consumers.values():
                await consumer.close()
