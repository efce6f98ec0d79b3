"""The Queries gRPC service, through a real server and the generated client.

While the query database cannot be reached the answer is UNAVAILABLE, naming
it; once the database is back, the answers are too.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from uuid import uuid4

import asyncpg
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from financing.adapters.postgres.connection import QUERY_DATABASE, create_pool
from financing.adapters.postgres.read_models import PostgresReadModels, create_tables
from financing.adapters.postgres.schema import migrate
from financing.application.read_models import ReadModelStore
from financing.application.retry import Outages
from financing.domain import events as ev
from financing.domain.events import Bid, DomainEvent
from financing.entrypoints.grpc.codec import RequestCodec
from financing.entrypoints.grpc.queries import QueriesService
from financing.generated import InvoiceStatus, QueriesStub
from tests.support import infra

D = Decimal


@pytest.fixture(scope="module")
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with infra.migrated_pool("fin_queries_api", "queries") as pool:
        yield pool


@pytest.fixture
async def read_models(pool: asyncpg.Pool) -> PostgresReadModels:
    schema = f"read_models_{uuid4().hex[:12]}"
    async with pool.acquire() as conn:
        await create_tables(conn, schema)
    return PostgresReadModels(pool, schema)


@asynccontextmanager
async def serving(read_models: ReadModelStore) -> AsyncIterator[QueriesStub]:
    """A Queries server on a free local port, and a client connected to it."""
    server = Server([QueriesService(read_models, Outages())], codec=RequestCodec())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await server.start(sock=sock)
    channel = Channel("127.0.0.1", sock.getsockname()[1])
    try:
        yield QueriesStub(channel)
    finally:
        channel.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client(read_models: PostgresReadModels) -> AsyncIterator[QueriesStub]:
    async with serving(read_models) as stub:
        yield stub


async def apply(read_models: ReadModelStore, *events: DomainEvent) -> None:
    await read_models.apply([(str(uuid4()), event) for event in events])


async def test_all_investors_lists_ids_balances_and_reserved_in_creation_order(
    client: QueriesStub, read_models: PostgresReadModels
) -> None:
    first, second = sorted([uuid4(), uuid4()], reverse=True)
    await apply(
        read_models,
        ev.InvestorCreatedEvent(first),
        ev.InvestorFundsAddedEvent(first, D(100)),
        ev.InvestorCreatedEvent(second),
        ev.BidOnInvoicePlacedEvent(first, uuid4(), D("20.25")),
    )
    reply = await client.all_investors(Empty())
    assert [(i.id.value, i.balance.amount, i.reserved.amount) for i in reply.investors] == [
        (str(first), 79.75, 20.25),
        (str(second), 0.0, 0.0),
    ]


async def test_money_is_answered_as_the_double_of_its_exact_sum(
    client: QueriesStub, read_models: PostgresReadModels
) -> None:
    investor_id = uuid4()
    await apply(read_models, ev.InvestorCreatedEvent(investor_id))
    for _ in range(3):
        await apply(read_models, ev.InvestorFundsAddedEvent(investor_id, D("0.1")))
    [investor] = (await client.all_investors(Empty())).investors
    assert investor.balance.amount == 0.3


async def test_all_invoices_has_no_winning_bid_until_financed_and_keeps_it_after(
    client: QueriesStub, read_models: PostgresReadModels
) -> None:
    issuer_id, investor_id = uuid4(), uuid4()
    available, financed, approved, reversed_ = (uuid4() for _ in range(4))
    bid = Bid(investor_id, D("12.5"))
    for invoice_id in (available, financed, approved, reversed_):
        await apply(read_models, ev.InvoiceCreatedEvent(invoice_id, issuer_id, D(10)))
    for invoice_id in (financed, approved, reversed_):
        await apply(read_models, ev.InvoiceFinancedEvent(invoice_id, D(10), bid))
    await apply(read_models, ev.InvoiceApprovedEvent(approved, D(10), bid))
    await apply(read_models, ev.InvoiceReversedEvent(reversed_, D(10), bid))

    invoices = (await client.all_invoices(Empty())).invoices

    assert [(i.id.value, i.issuer_id.value, i.asking_price.amount) for i in invoices] == [
        (str(invoice_id), str(issuer_id), 10.0)
        for invoice_id in (available, financed, approved, reversed_)
    ]
    assert [i.status for i in invoices] == [
        InvoiceStatus.AVAILABLE,
        InvoiceStatus.FINANCED,
        InvoiceStatus.APPROVED,
        InvoiceStatus.REVERSED,
    ]
    assert invoices[0].winning_bid is None
    for invoice in invoices[1:]:
        assert invoice.winning_bid is not None
        assert invoice.winning_bid.investor_id.value == str(investor_id)
        assert invoice.winning_bid.amount.amount == 12.5


async def test_all_issuers_lists_issuers_in_creation_order(
    client: QueriesStub, read_models: PostgresReadModels
) -> None:
    issuers = sorted((uuid4() for _ in range(3)), reverse=True)
    for issuer_id in issuers:
        await apply(read_models, ev.IssuerCreatedEvent(issuer_id))
    reply = await client.all_issuers(Empty())
    assert [i.id.value for i in reply.issuers] == [str(i) for i in issuers]


async def test_empty_read_models_answer_empty_lists(client: QueriesStub) -> None:
    assert (await client.all_investors(Empty())).investors == []
    assert (await client.all_invoices(Empty())).invoices == []
    assert (await client.all_issuers(Empty())).issuers == []


async def test_unreachable_database_is_answered_unavailable_naming_it() -> None:
    unreachable = await asyncpg.create_pool(
        host="127.0.0.1", port=1, user="postgres", database="postgres", min_size=0
    )
    try:
        async with serving(PostgresReadModels(unreachable)) as stub:
            for method, query in (
                ("AllInvestors", stub.all_investors),
                ("AllInvoices", stub.all_invoices),
                ("AllIssuers", stub.all_issuers),
            ):
                with pytest.raises(GRPCError) as raised:
                    await query(Empty())
                assert raised.value.status is Status.UNAVAILABLE
                assert str(raised.value.message).startswith(
                    f"{method} not answered: {QUERY_DATABASE} unavailable, try again: "
                ), raised.value.message
    finally:
        await unreachable.close()


async def answers(stub: QueriesStub) -> list[Status]:
    """The status of each query, as the client sees it."""
    statuses = []
    for query in (stub.all_investors, stub.all_invoices, stub.all_issuers):
        try:
            await query(Empty())
        except GRPCError as error:
            assert error.status is Status.UNAVAILABLE, (error.status, error.message)
            assert QUERY_DATABASE in str(error.message), error.message
            statuses.append(error.status)
        else:
            statuses.append(Status.OK)
    return statuses


async def test_a_query_database_refusing_connections_is_answered_unavailable_until_back() -> None:
    async with infra.fresh_database("fin_queries_outage") as db:
        pool = await create_pool(db, QUERY_DATABASE)
        try:
            await migrate(pool, "queries")
            read_models = PostgresReadModels(pool)
            issuer_id = uuid4()
            await apply(read_models, ev.IssuerCreatedEvent(issuer_id))
            async with serving(read_models) as stub:
                assert await answers(stub) == [Status.OK] * 3

                async with infra.refusing_connections(db):
                    # The pooled session was ended; every reconnection is refused.
                    for _ in range(2):
                        assert await answers(stub) == [Status.UNAVAILABLE] * 3

                async def answered_again() -> bool:
                    return await answers(stub) == [Status.OK] * 3

                await infra.wait_until(answered_again, timeout=10.0, what="answers again")
                reply = await stub.all_issuers(Empty())
                assert [i.id.value for i in reply.issuers] == [str(issuer_id)]
        finally:
            await pool.close()
