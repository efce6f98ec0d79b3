"""The projector against real RabbitMQ and PostgreSQL.

Events are published the way a foreign (watermill) publisher would: only the
`name`, `aggregateID` and `_watermill_message_uuid` headers, random message ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from financing.adapters.postgres.read_models import PostgresReadModels, create_tables
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.dead_letters import DeadLetters, list_dead_letters
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application.read_models import (
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    ReadModelStore,
    ReadModelsUnavailable,
)
from financing.domain.events import Bid, DomainEvent
from financing.entrypoints.projector import PROJECTOR_QUEUE, QUEUE_ARGUMENTS, run_projector
from tests.support import infra

D = Decimal


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_projector", "queries") as pool:
        yield pool


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    # A vhost of this module's own: no other projector competes for its queue.
    name = infra.unique_name("fin_projector")
    yield infra.create_vhost(name)
    infra.delete_vhost(name)


@pytest.fixture(scope="module")
async def connection(broker_url: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await topology.connect(broker_url)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def dead_letters(connection: AbstractRobustConnection) -> DeadLetters:
    return DeadLetters(await Publisher.open(connection))


@pytest.fixture
async def channel(connection: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    """A channel for the test's own publishing; the projector queue is declared
    and empty, so nothing published before the projector starts is lost."""
    channel = await connection.channel(publisher_confirms=True)
    queue = await topology.declare_event_queue(channel, PROJECTOR_QUEUE, arguments=QUEUE_ARGUMENTS)
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
    connection: AbstractRobustConnection,
    read_models: ReadModelStore,
    dead_letters: DeadLetters,
    **options: Any,
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(run_projector(connection, read_models, dead_letters, **options))
    try:
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
    channel: AbstractChannel, investor_id: UUID, amount: float, message_id: str | None = None
) -> str:
    return await publish(
        channel,
        "InvestorFundsAddedEvent",
        {"Amount": amount},
        aggregate_id=investor_id,
        message_id=message_id,
    )


async def has_issuer(read_models: ReadModelStore, issuer_id: UUID) -> bool:
    return IssuerRow(issuer_id) in await read_models.issuers()


async def queued_messages(connection: AbstractRobustConnection) -> int:
    """Messages waiting in the projector queue (unacked ones are back there once
    the projector has stopped)."""
    # A fresh channel: a robust channel answers a passive declaration from its cache.
    async with connection.channel() as channel:
        queue = await channel.declare_queue(PROJECTOR_QUEUE, passive=True)
        return queue.declaration_result.message_count or 0


async def test_events_carrying_only_watermill_headers_are_projected(
    connection: AbstractRobustConnection,
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

    async with projecting(connection, read_models, dead_letters):

        async def projected() -> bool:
            return await read_models.investors() == [
                InvestorRow(investor_id, D(90), D(10), D(0))
            ] and await read_models.invoices() == [
                InvoiceRow(invoice_id, issuer_id, D(10), "FINANCED", Bid(investor_id, D(20)))
            ]

        await infra.wait_until(projected, what="scenario 5 in the read models")
    assert await read_models.issuers() == [IssuerRow(issuer_id)]


async def test_redelivered_event_changes_nothing(
    connection: AbstractRobustConnection,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    investor_id, marker = uuid4(), uuid4()
    await investor_created(channel, investor_id)
    message_id = await funds_added(channel, investor_id, 100)
    await funds_added(channel, investor_id, 100, message_id=message_id)
    async with projecting(connection, read_models, dead_letters):
        await funds_added(channel, investor_id, 100, message_id=message_id)
        await issuer_created(channel, marker)  # projected after the duplicates: order is kept
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
    assert await read_models.investors() == [InvestorRow(investor_id, D(100), D(0), D(0))]


async def test_poison_message_is_dead_lettered_with_its_reason_and_the_next_event_projects(
    connection: AbstractRobustConnection,
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
    async with projecting(connection, read_models, dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")

    letters = {letter.message_id: letter for letter in await list_dead_letters(connection)}
    assert "not valid JSON" in letters[bad_json].reason
    assert "aggregateVersion" in letters[bad_header].reason
    assert {letters[bad_json].source_queue, letters[bad_header].source_queue} == {PROJECTOR_QUEUE}
    assert await read_models.investors() == []
    assert await queued_messages(connection) == 0  # dead-lettered messages were acked


async def test_messages_it_does_not_project_are_acked_and_ignored(
    connection: AbstractRobustConnection,
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
    dead_before = len(await list_dead_letters(connection))
    async with projecting(connection, read_models, dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
    assert await queued_messages(connection) == 0
    assert len(await list_dead_letters(connection)) == dead_before
    assert await read_models.investors() == []
    assert await read_models.issuers() == [IssuerRow(marker)]


@dataclass
class FailingReadModels:
    """Read models whose updates fail, as while the database is down."""

    inner: ReadModelStore
    error: Callable[[], Exception]
    attempts: int = 0

    async def apply(self, batch: Sequence[tuple[str, DomainEvent]]) -> None:
        self.attempts += 1
        raise self.error()

    async def investors(self) -> list[InvestorRow]:
        return await self.inner.investors()

    async def invoices(self) -> list[InvoiceRow]:
        return await self.inner.invoices()

    async def issuers(self) -> list[IssuerRow]:
        return await self.inner.issuers()


@pytest.mark.parametrize(
    "error",
    [lambda: ReadModelsUnavailable("query database down"), lambda: RuntimeError("unexpected")],
    ids=["database-down", "unexpected-error"],
)
async def test_failed_update_is_retried_and_never_acked(
    connection: AbstractRobustConnection,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
    error: Callable[[], Exception],
) -> None:
    issuer_id = uuid4()
    message_id = await issuer_created(channel, issuer_id)
    failing = FailingReadModels(read_models, error)
    async with projecting(connection, failing, dead_letters):

        async def retried() -> bool:
            return failing.attempts >= 3

        await infra.wait_until(retried, what="the update to be retried")
    assert await queued_messages(connection) == 1  # back in the queue: never acked
    assert message_id not in {letter.message_id for letter in await list_dead_letters(connection)}

    async with projecting(connection, read_models, dead_letters):
        await infra.wait_until(lambda: has_issuer(read_models, issuer_id), what="the issuer")


@dataclass
class RecordingReadModels:
    """Read models that remember the size of every batch applied."""

    inner: ReadModelStore
    batches: list[int] = field(default_factory=list)

    async def apply(self, batch: Sequence[tuple[str, DomainEvent]]) -> None:
        self.batches.append(len(batch))
        await self.inner.apply(batch)

    async def investors(self) -> list[InvestorRow]:
        return await self.inner.investors()

    async def invoices(self) -> list[InvoiceRow]:
        return await self.inner.invoices()

    async def issuers(self) -> list[IssuerRow]:
        return await self.inner.issuers()


async def test_projector_behind_catches_up_in_batches_and_keeps_the_order(
    connection: AbstractRobustConnection,
    channel: AbstractChannel,
    read_models: PostgresReadModels,
    dead_letters: DeadLetters,
) -> None:
    issuers = [uuid4() for _ in range(60)]
    for issuer_id in issuers:
        await issuer_created(channel, issuer_id)
    recording = RecordingReadModels(read_models)
    async with projecting(connection, recording, dead_letters, batch_size=20):

        async def all_projected() -> bool:
            return len(await read_models.issuers()) == len(issuers)

        await infra.wait_until(all_projected, what="every issuer")
    assert [row.id for row in await read_models.issuers()] == issuers
    assert sum(recording.batches) == len(issuers)
    assert max(recording.batches) > 1
    assert max(recording.batches) <= 20


async def test_each_batch_applied_repeatedly_gives_the_same_read_models(
    connection: AbstractRobustConnection,
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
    async with projecting(connection, recording, dead_letters, redeliver_times=3):
        await infra.wait_until(lambda: has_issuer(read_models, marker), what="marker issuer")
    assert sum(recording.batches) == 4 * 3
    assert await read_models.investors() == [InvestorRow(investor_id, D("0.3"), D(0), D(0))]
