"""The projector against real RabbitMQ and PostgreSQL.

Events are published the way a foreign (watermill) publisher would: only the
`name`, `aggregateID` and `_watermill_message_uuid` headers, random message ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractExchange

from financing.adapters.postgres.read_models import PostgresReadModels, create_tables
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.consumer import AmqpDelivery, QueueConsumer
from financing.adapters.rabbitmq.dead_letters import DeadLetters, list_dead_letters
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology import PROJECTOR_QUEUE
from financing.application.errors import Unavailable
from financing.application.ports import StoredEvent
from financing.application.read_models import (
    EMPTY,
    NOT_RECORDED,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    ReadModelStore,
)
from financing.application.retry import DELIVERIES, Outages
from financing.domain.aggregates import InvoiceStatus
from financing.domain.events import Bid, DomainEvent
from financing.workers.projector import Projector
from tests.support import infra, rabbitmq
from tests.support.storm import Repeated, WrappedReadModels

D = Decimal


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_projector", "queries") as pool:
        yield pool


@pytest.fixture(scope="module")
async def vhost() -> AsyncIterator[rabbitmq.Vhost]:
    # A vhost of this module's own: no other projector competes for its queue.
    async with rabbitmq.private_vhost("fin_projector") as vhost:
        yield vhost


@pytest.fixture(scope="module")
def outages() -> Outages:
    return Outages()


@pytest.fixture(scope="module")
async def broker(vhost: rabbitmq.Vhost, outages: Outages) -> AsyncIterator[Broker]:
    broker = Broker([vhost.url], outages)
    yield broker
    await broker.close()


@pytest.fixture(scope="module")
async def dead_letters(broker: Broker, outages: Outages) -> AsyncIterator[DeadLetters]:
    publisher = Publisher(broker)
    yield DeadLetters(publisher, outages, DELIVERIES)
    await publisher.close()


@pytest.fixture
async def channel(broker: Broker) -> AsyncIterator[AbstractChannel]:
    """A channel for the test's own publishing; the projector queue is declared
    and empty, so nothing published before the projector starts is lost."""
    channel = await broker.channel(publisher_confirms=True)
    queue = await topology.PROJECTOR.queue.declare(channel)
    await queue.purge()
    yield channel
    await channel.close()


@pytest.fixture
async def read_models(pool: asyncpg.Pool) -> PostgresReadModels:
    schema = f"read_models_{uuid4().hex[:12]}"
    async with pool.acquire() as conn:
        await create_tables(conn, schema)
    return PostgresReadModels(pool, schema)


@contextlib.asynccontextmanager
async def projecting(
    broker: Broker,
    read_models: ReadModelStore,
    dead_letters: DeadLetters,
    *,
    batch_size: int = 100,
    received: list[AmqpDelivery] | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """The projector wired as the service wires it, until the block ends.

    Every delivery handed to the projector is appended to `received`, if given.
    """
    outages = Outages()
    projector = Projector(read_models, outages, batch_size=batch_size)

    def receive(delivery: AmqpDelivery) -> None:
        if received is not None:
            received.append(delivery)
        projector.receive(delivery)

    consumer = QueueConsumer(
        broker,
        topology.PROJECTOR.queue,
        dead_letters,
        outages,
        receive,
        prefetch=projector.batch_size,
    )

    async def run() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(consumer.run())
                group.create_task(projector.run())
        finally:
            await consumer.close()

    task = asyncio.create_task(run())

    async def started() -> bool:
        if task.done():
            task.result()  # surface a start-up failure
        return consumer.consuming.is_set()

    try:
        await infra.wait_until(started, what="the projector consuming")
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(
    channel: AbstractChannel,
    name: str,
    body: dict[str, Any] | bytes,
    *,
    aggregate_id: UUID | None = None,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    message_id = message_id or str(uuid4())
    all_headers: dict[str, Any] = {"_watermill_message_uuid": message_id, "name": name}
    if aggregate_id is not None:
        all_headers["aggregateID"] = str(aggregate_id)
    all_headers.update(headers or {})
    exchange: AbstractExchange = await topology.declare_events_exchange(channel)
    await exchange.publish(
        aio_pika.Message(
            body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers=all_headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key="",
    )
    return message_id


async def investor_created(channel: AbstractChannel, investor_id: UUID) -> None:
    await publish(
        channel, "InvestorCreatedEvent", {"InvestorID": str(investor_id)}, aggregate_id=investor_id
    )


async def issuer_created(channel: AbstractChannel, issuer_id: UUID) -> str:
    return await publish(
        channel, "IssuerCreatedEvent", {"IssuerID": str(issuer_id)}, aggregate_id=issuer_id
    )


async def funds_added(
    channel: AbstractChannel,
    investor_id: UUID,
    amount: float,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    return await publish(
        channel,
        "InvestorFundsAddedEvent",
        {"Amount": amount},
        aggregate_id=investor_id,
        message_id=message_id,
        headers=headers,
    )


async def has_issuer(read_models: ReadModelStore, issuer_id: UUID) -> bool:
    return IssuerRow(issuer_id) in await read_models.issuers()


async def wait_settled(vhost: rabbitmq.Vhost) -> None:
    """Until the projector queue holds nothing, neither ready nor delivered and unacked."""
    await infra.wait_until(
        lambda: rabbitmq.queue_settled(vhost.name, PROJECTOR_QUEUE),
        what="every delivery of the projector queue settled",
    )


async def queued_messages(broker: Broker) -> int:
    """Messages waiting in the projector queue (unacked ones are back there once
    the projector has stopped)."""
    state = await rabbitmq.queue_state(await broker.connection(), PROJECTOR_QUEUE)
    assert state is not None
    return state[0]


async def test_events_carrying_only_watermill_headers_are_projected(
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    investor_id, issuer_id, invoice_id = uuid4(), uuid4(), uuid4()
    await investor_created(channel, investor_id)
    await funds_added(channel, investor_id, 100)
    await publish(
        channel,
        "BidOnInvoicePlacedEvent",
        {"InvoiceID": str(invoice_id), "BidAmount": 20},
        aggregate_id=investor_id,
    )
    await issuer_created(channel, issuer_id)
    await publish(
        channel,
        "InvoiceCreatedEvent",
        {"InvoiceID": str(invoice_id), "IssuerID": str(issuer_id), "AskingPrice": 10},
        aggregate_id=invoice_id,
    )
    await publish(
        channel,
        "InvoiceFinancedEvent",
        {"AskingPrice": 10, "Bid": {"InvestorID": str(investor_id), "Amount": 20}},
        aggregate_id=invoice_id,
    )
    await publish(channel, "InvestorFundsReleasedEvent", {"Amount": 10}, aggregate_id=investor_id)

    async with projecting(broker, read_models, dead_letters):

        async def projected() -> bool:
            return await read_models.investors() == [
                InvestorRow(investor_id, D(90), D(10), D(0))
            ] and await read_models.invoices() == [
                InvoiceRow(
                    invoice_id, issuer_id, D(10), InvoiceStatus.FINANCED, Bid(investor_id, D(20))
                )
            ]

        await infra.wait_until(projected, what="scenario 5 in the read models")
    assert await read_models.issuers() == [IssuerRow(issuer_id)]


async def test_redelivered_event_changes_nothing(
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    investor_id, marker = uuid4(), uuid4()
    await investor_created(channel, investor_id)
    message_id = await funds_added(channel, investor_id, 100)
    await funds_added(channel, investor_id, 100, message_id=message_id)
    async with projecting(broker, read_models, dead_letters):
        await funds_added(channel, investor_id, 100, message_id=message_id)
        await issuer_created(channel, marker)  # projected after the duplicates: order is kept
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
    assert await read_models.investors() == [InvestorRow(investor_id, D(100), D(0), D(0))]


async def test_poison_message_is_dead_lettered_with_its_reason_and_the_next_event_projects(
    vhost: rabbitmq.Vhost,
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    investor_id, marker = uuid4(), uuid4()
    bad_json = await publish(
        channel, "InvestorFundsAddedEvent", b"{not json", aggregate_id=investor_id
    )
    bad_header = await publish(
        channel,
        "InvestorCreatedEvent",
        {"InvestorID": str(investor_id)},
        aggregate_id=investor_id,
        headers={"aggregateVersion": 1},
    )
    await issuer_created(channel, marker)
    async with projecting(broker, read_models, dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
        # A batch is settled (acked, dead-lettered) once its events are projected.
        await wait_settled(vhost)

    letters = {letter.message_id: letter for letter in await list_dead_letters(broker)}
    assert "not valid JSON" in letters[bad_json].reason
    assert "aggregateVersion" in letters[bad_header].reason
    assert {letters[bad_json].source_queue, letters[bad_header].source_queue} == {PROJECTOR_QUEUE}
    assert await read_models.investors() == []
    assert await queued_messages(broker) == 0  # dead-lettered messages were acked


async def test_messages_it_does_not_project_are_acked_and_ignored(
    vhost: rabbitmq.Vhost,
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    registered, marker = uuid4(), uuid4()
    await publish(
        channel, "InvestorRegistered", {"ID": str(registered), "Name": "Ann", "Balance": 10}
    )
    await publish(channel, "CreateIssuer", {"ID": str(registered)})
    await issuer_created(channel, marker)
    dead_before = len(await list_dead_letters(broker))
    async with projecting(broker, read_models, dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
        await wait_settled(vhost)
    assert await queued_messages(broker) == 0
    assert len(await list_dead_letters(broker)) == dead_before
    assert await read_models.investors() == []
    assert await read_models.issuers() == [IssuerRow(marker)]


@dataclass
class FailingReadModels(WrappedReadModels):
    """Read models whose updates fail, as while the database is down."""

    error: Callable[[], Exception] = lambda: Unavailable("query database", "down")
    attempts: int = 0

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        self.attempts += 1
        raise self.error()


async def test_update_while_the_database_is_down_is_retried_and_never_acked(
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    issuer_id = uuid4()
    message_id = await issuer_created(channel, issuer_id)
    failing = FailingReadModels(read_models)
    async with projecting(broker, failing, dead_letters):

        async def retried() -> bool:
            # Beyond the attempts a bug gets: an unavailable database is waited for.
            return failing.attempts >= 6

        await infra.wait_until(retried, what="the update to be retried")
    assert await queued_messages(broker) == 1  # back in the queue: never acked
    assert message_id not in {letter.message_id for letter in await list_dead_letters(broker)}

    async with projecting(broker, read_models, dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, issuer_id), what="the issuer")


@dataclass
class RecordingReadModels(WrappedReadModels):
    """Read models that remember the size of every batch applied."""

    batches: list[int] = field(default_factory=list)

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        self.batches.append(len(batch))
        return await self.inner.apply(batch, digests, recorded)


async def test_projector_behind_catches_up_in_batches_and_keeps_the_order(
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    issuers = [uuid4() for _ in range(60)]
    for issuer_id in issuers:
        await issuer_created(channel, issuer_id)
    recording = RecordingReadModels(read_models)
    async with projecting(broker, recording, dead_letters, batch_size=20):

        async def all_projected() -> bool:
            return len(await read_models.issuers()) == len(issuers)

        await infra.wait_until(all_projected, what="every issuer")
    assert [row.id for row in await read_models.issuers()] == issuers
    assert sum(recording.batches) == len(issuers)
    assert max(recording.batches) > 1
    assert max(recording.batches) <= 20


async def test_each_batch_applied_repeatedly_gives_the_same_read_models(
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    investor_id, marker = uuid4(), uuid4()
    await investor_created(channel, investor_id)
    await funds_added(channel, investor_id, 0.1)
    await funds_added(channel, investor_id, 0.2)
    await issuer_created(channel, marker)
    recording = RecordingReadModels(read_models)
    async with projecting(broker, Repeated(recording, times=3), dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
    assert sum(recording.batches) == 4 * 3
    assert await read_models.investors() == [InvestorRow(investor_id, D("0.3"), D(0), D(0))]


@dataclass
class BuggyReadModels(WrappedReadModels):
    """Read models with a bug that one message triggers, whatever batch it comes in.

    The first batch is held until every expected delivery reached the projector,
    so the events after it are applied together, in one batch.
    """

    bug_for: str = ""
    received: list[AmqpDelivery] = field(default_factory=list)
    expected: int = 0
    batches: list[list[str]] = field(default_factory=list)

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        message_ids = [message_id for message_id, _ in batch]
        self.batches.append(message_ids)
        if len(self.batches) == 1:

            async def all_delivered() -> bool:
                return len(self.received) >= self.expected

            await infra.wait_until(all_delivered, what="every event delivered")
        if self.bug_for in message_ids:
            raise TypeError(f"cannot project {self.bug_for}")
        return await self.inner.apply(batch, digests, recorded)


async def test_an_event_whose_projection_has_a_bug_is_dead_lettered_and_the_rest_projected(
    vhost: rabbitmq.Vhost,
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    issuers = [uuid4() for _ in range(8)]
    message_ids = [await issuer_created(channel, issuer_id) for issuer_id in issuers]
    at_fault = 4
    buggy = BuggyReadModels(read_models, bug_for=message_ids[at_fault], expected=len(issuers))
    async with projecting(broker, buggy, dead_letters, received=buggy.received):

        async def dead_lettered() -> list[str]:
            letters = await list_dead_letters(broker, limit=1000)
            return [letter.reason for letter in letters if letter.message_id in message_ids]

        [reason] = await infra.wait_until(dead_lettered, what="the event at fault dead-lettered")
        await wait_settled(vhost)
    assert any(message_ids[at_fault] in batch and len(batch) > 1 for batch in buggy.batches)
    assert [row.id for row in await read_models.issuers()] == [
        issuer_id for index, issuer_id in enumerate(issuers) if index != at_fault
    ]
    assert f"TypeError: cannot project {message_ids[at_fault]}" in reason
    assert "(at test_projector.py:" in reason and "in apply)" in reason
    [letter] = [
        letter
        for letter in await list_dead_letters(broker, limit=1000)
        if letter.message_id in message_ids
    ]
    assert letter.message_id == message_ids[at_fault]
    assert letter.source_queue == PROJECTOR_QUEUE


def relayed_headers(aggregate_id: UUID, version: int) -> tuple[str, dict[str, Any]]:
    """The message id and headers this service's relayer gives the event at `version`."""
    stored = StoredEvent(
        position=version,
        aggregate_type="Investor",
        aggregate_id=aggregate_id,
        version=version,
        name="",
        body="",
        correlation_id=str(uuid4()),
        causation_id=str(uuid4()),
        recorded_at=datetime.now(UTC),
    )
    envelope = stored.envelope()
    return envelope.message_id, dict(envelope.headers)


async def test_a_relayed_event_published_again_under_a_new_id_is_dead_lettered(
    vhost: rabbitmq.Vhost,
    broker: Broker,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    """Regression: a relayed InvestorFundsAddedEvent published again with every header
    but a new message id was projected again (balance 1850 where the store had 850),
    and foreign copies of relayed events made up invoices and negative balances."""
    investor_id, invoice_id, marker = uuid4(), uuid4(), uuid4()
    created_id, created = relayed_headers(investor_id, 1)
    await publish(
        channel,
        "InvestorCreatedEvent",
        {"InvestorID": str(investor_id)},
        aggregate_id=investor_id,
        message_id=created_id,
        headers=created,
    )
    added_id, added = relayed_headers(investor_id, 2)
    await funds_added(channel, investor_id, 1000, message_id=added_id, headers=added)
    copies = [await funds_added(channel, investor_id, 1000, headers=added)]
    _, bid = relayed_headers(investor_id, 3)
    copies.append(
        await publish(
            channel,
            "BidOnInvoicePlacedEvent",
            {"InvoiceID": str(invoice_id), "BidAmount": 1005},
            aggregate_id=investor_id,
            headers=bid,
        )
    )
    # A reference relayer's event (watermill's headers only) is projected, as before.
    await funds_added(channel, investor_id, 7)
    await issuer_created(channel, marker)
    async with projecting(broker, read_models, dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
        await wait_settled(vhost)

    assert await read_models.investors() == [InvestorRow(investor_id, D(1007), D(0), D(0))]
    letters = {letter.message_id: letter for letter in await list_dead_letters(broker)}
    for copy in copies:
        assert "is not an event of this service's event store" in letters[copy].reason
        assert letters[copy].source_queue == PROJECTOR_QUEUE
    assert created_id not in letters and added_id not in letters
    assert await queued_messages(broker) == 0  # dead-lettered messages were acked
