"""The Queries API's list replies in wire format: the bytes betterproto writes for the
same replies, a loop that keeps turning while a large one is written, and a reply
waiting for a slow reader that holds only its bytes."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from decimal import Decimal
from uuid import uuid4

import h2.config
import h2.connection
import h2.settings
import pytest
from grpclib.server import Server

from financing import generated as pb
from financing.application.read_models import (
    ROWS_PER_TURN,
    InMemoryReadModels,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
)
from financing.application.retry import Outages
from financing.domain.aggregates import InvoiceStatus
from financing.domain.events import Bid
from financing.domain.money import to_double
from financing.entrypoints.grpc import replies
from financing.entrypoints.grpc.codec import FramingChecked, RequestCodec
from financing.entrypoints.grpc.queries import QueriesService
from financing.entrypoints.grpc.replies import listed
from tests.support.infra import wait_until

AMOUNTS = [Decimal("0"), Decimal("0.01"), Decimal("10"), Decimal("999999999999.99")]


def money(amount: Decimal) -> pb.Money:
    return pb.Money(amount=to_double(amount))


def uuid(row_id: object) -> pb.Uuid:
    return pb.Uuid(value=str(row_id))


def invoices() -> list[InvoiceRow]:
    return [
        InvoiceRow(
            uuid4(),
            uuid4(),
            amount,
            status,
            None if status is InvoiceStatus.AVAILABLE else Bid(uuid4(), bid),
        )
        for amount in AMOUNTS
        for bid in AMOUNTS
        for status in InvoiceStatus
    ]


async def test_an_invoice_list_is_the_bytes_betterproto_writes() -> None:
    rows = invoices()

    encoded = await listed(rows, replies.invoice)

    expected = pb.AllInvoicesReply(
        invoices=[
            pb.Invoice(
                id=uuid(row.id),
                issuer_id=uuid(row.issuer_id),
                asking_price=money(row.asking_price),
                status=pb.InvoiceStatus.from_string(row.status.value),
                winning_bid=None
                if row.winning_bid is None
                else pb.Bid(
                    investor_id=uuid(row.winning_bid.investor_id),
                    amount=money(row.winning_bid.amount),
                ),
            )
            for row in rows
        ]
    )
    assert encoded.data == bytes(expected)
    parsed = pb.AllInvoicesReply().parse(encoded.data)
    assert parsed == expected
    assert [invoice.winning_bid is None for invoice in parsed.invoices] == [
        row.winning_bid is None for row in rows
    ]


async def test_investor_and_issuer_lists_are_the_bytes_betterproto_writes() -> None:
    investors = [InvestorRow(uuid4(), a, b, Decimal(0)) for a in AMOUNTS for b in AMOUNTS]
    issuers = [IssuerRow(uuid4()) for _ in range(3)]

    assert (await listed(investors, replies.investor)).data == bytes(
        pb.AllInvestorsReply(
            investors=[
                pb.Investor(
                    id=uuid(row.id), balance=money(row.balance), reserved=money(row.reserved)
                )
                for row in investors
            ]
        )
    )
    assert (await listed(issuers, replies.issuer)).data == bytes(
        pb.AllIssuersReply(issuers=[pb.Issuer(id=uuid(row.id)) for row in issuers])
    )
    assert (await listed([], replies.issuer)).data == b""


@pytest.mark.parametrize("count", [1, ROWS_PER_TURN, ROWS_PER_TURN + 1, 5 * ROWS_PER_TURN])
async def test_a_long_list_gives_the_loop_a_turn_every_so_many_rows(count: int) -> None:
    """Regression: a list of 11,000 invoices was built in one stretch of 4.5 s, in which
    the process answered no call, handled no delivery and failed its health probes."""
    rows = [IssuerRow(uuid4()) for _ in range(count)]
    loop = asyncio.get_running_loop()
    turns = 0
    ticking: asyncio.Handle | None = None

    def tick() -> None:
        # A callback scheduled again each time it runs: it runs once per turn of the loop.
        nonlocal turns, ticking
        turns += 1
        ticking = loop.call_soon(tick)

    ticking = loop.call_soon(tick)
    started = turns
    try:
        encoded = await listed(rows, replies.issuer)
    finally:
        assert ticking is not None
        ticking.cancel()

    assert turns - started == (count - 1) // ROWS_PER_TURN
    assert len(pb.AllIssuersReply().parse(encoded.data).issuers) == count


class FreshRows(InMemoryReadModels):
    """Issuers read anew for each call, as the database gives them; it keeps a weak
    reference to each row it made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[weakref.ref[IssuerRow]] = []

    async def issuers(self) -> list[IssuerRow]:
        rows = [IssuerRow(uuid4()) for _ in range(5_000)]  # a reply of 210 kB
        self.made += [weakref.ref(row) for row in rows]
        return rows


async def test_a_caller_that_does_not_read_its_reply_holds_its_bytes_not_its_rows() -> None:
    """Regression: the rows stayed alive as long as the reply waited for its reader,
    several times the reply's size: 20 MB per stalled caller of a list of 30,000
    invoices, a gigabyte for 40 of them."""
    store = FreshRows()
    queries = QueriesService(store, Outages())
    server = Server([FramingChecked(queries, calls=queries.calls)], codec=RequestCodec())
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # A caller with a 1 kB window that never reads: the reply waits for it.
        caller = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        caller.initiate_connection()
        caller.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
        caller.send_headers(
            1,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "x"),
                (":path", "/Queries/AllIssuers"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        caller.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
        writer.write(caller.data_to_send())

        async def rows_let_go() -> bool:
            return bool(store.made) and all(row() is None for row in store.made)

        await wait_until(rows_let_go, what="the rows let go while the reply waits")
        assert queries.calls.in_flight == 1  # still sending
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
