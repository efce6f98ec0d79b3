"""Concurrency: the same command from several clients at once has one effect, and many
investors racing for one invoice finance it exactly once and get every losing bid back.

Clients are separate gRPC connections (or separate broker publishes) fired at
the same moment; the service's consumers process up to 32 messages of a queue
at once, so the copies really are handled concurrently. Effects are counted
in the event store, and the read models are checked after `financing check`
passes (no violated invariant, no saga step in flight, read models equal to a
replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from grpclib.client import Channel

from financing.generated import (
    ApproveFinancingCommand,
    BidOnInvoiceCommand,
    CommandsStub,
    Money,
    Uuid,
)
from tests.faults.hostile import Observer, driving, observing, wait_drained
from tests.faults.workload import Deployment, deployment, settle

CLIENTS = 10
INVESTORS = 20
# Invoices raced for at the same time, each by INVESTORS investors of its own.
RACES = 3
BALANCE = Decimal(100)
ASKING = Decimal(50)


@pytest.fixture(scope="module")
async def racing_target() -> AsyncIterator[tuple[Deployment, Observer]]:
    async with deployment("concurrency") as target, observing(target) as observer:
        yield target, observer


@contextlib.asynccontextmanager
async def clients(target: Deployment, count: int) -> AsyncIterator[list[CommandsStub]]:
    """`count` Commands clients, each on a connection of its own."""
    channels = [Channel(*target.command_address) for _ in range(count)]
    try:
        yield [CommandsStub(channel, timeout=15) for channel in channels]
    finally:
        for channel in channels:
            channel.close()


async def event_names(target: Deployment, aggregate_id: UUID) -> list[str]:
    """The names of an aggregate's stored events, in order."""
    rows = await target.event_pool.fetch(
        "SELECT name FROM events WHERE aggregate_id = $1 ORDER BY version", aggregate_id
    )
    return [row["name"] for row in rows]


async def test_the_same_approval_from_several_clients_at_once_approves_once(
    racing_target: tuple[Deployment, Observer], fault_figures: dict[str, Any]
) -> None:
    target, observer = racing_target
    async with driving(target, observer) as financing:
        financed = await financing.finance_invoice(asking_price=10, bid=20, balance=100)
        async with clients(target, CLIENTS) as stubs:
            command = ApproveFinancingCommand(invoice_id=Uuid(str(financed.invoice_id)))
            await asyncio.gather(*(stub.approve_financing(command) for stub in stubs))

        await wait_drained(target.vhost, ["ApproveFinancing"])
        await settle(target)
        assert await event_names(target, financed.invoice_id) == [
            "InvoiceCreatedEvent",
            "InvoiceFinancedEvent",
            "InvoiceApprovedEvent",
        ]
        assert Counter(await event_names(target, financed.investor_id)) == Counter(
            {
                "InvestorCreatedEvent": 1,
                "InvestorFundsAddedEvent": 1,
                "BidOnInvoicePlacedEvent": 1,
                "InvestorFundsReleasedEvent": 1,  # the excess of 10
                "InvestorFundsCommittedEvent": 1,
            }
        )
        assert await financing.investor_funds(financed.investor_id) == (Decimal(90), Decimal(0))
    fault_figures["concurrent duplicate commands sent"] = (
        fault_figures.get("concurrent duplicate commands sent", 0) + CLIENTS
    )


async def test_one_bid_message_delivered_many_times_at_once_reserves_the_funds_once(
    racing_target: tuple[Deployment, Observer], fault_figures: dict[str, Any]
) -> None:
    # A bid is not idempotent in the domain (two bids reserve twice): only the
    # message id can tell that these copies are one bid.
    target, observer = racing_target
    async with driving(target, observer) as financing:
        invoice_id, _ = await financing.put_invoice_on_sale(10)
        investor_id = await financing.register_investor(100)
        body = {"InvestorID": str(investor_id), "InvoiceID": str(invoice_id), "BidAmount": 20}
        message_id = str(uuid.uuid4())

        await asyncio.gather(
            *(
                financing.broker.send_command("BidOnInvoice", body, message_id=message_id)
                for _ in range(CLIENTS)
            )
        )

        await wait_drained(target.vhost, ["BidOnInvoice"])
        await settle(target)
        assert Counter(await event_names(target, investor_id)) == Counter(
            {
                "InvestorCreatedEvent": 1,
                "InvestorFundsAddedEvent": 1,
                "BidOnInvoicePlacedEvent": 1,
                "InvestorFundsReleasedEvent": 1,
            }
        )
        assert await financing.investor_funds(investor_id) == (Decimal(90), Decimal(10))
    fault_figures["concurrent duplicate commands sent"] = (
        fault_figures.get("concurrent duplicate commands sent", 0) + CLIENTS
    )


async def test_one_registration_event_delivered_many_times_at_once_creates_one_investor(
    racing_target: tuple[Deployment, Observer], fault_figures: dict[str, Any]
) -> None:
    target, observer = racing_target
    async with driving(target, observer) as financing:
        investor_id = uuid.uuid4()
        message_id = str(uuid.uuid4())

        await asyncio.gather(
            *(
                financing.publish_investor_registered(investor_id, 100, message_id=message_id)
                for _ in range(CLIENTS)
            )
        )

        await wait_drained(target.vhost, ["events_InvestorRegistered", "CreateInvestor"])
        await settle(target)
        assert await event_names(target, investor_id) == [
            "InvestorCreatedEvent",
            "InvestorFundsAddedEvent",
        ]
        assert await financing.investor_funds(investor_id) == (Decimal(100), Decimal(0))
    fault_figures["concurrent duplicate commands sent"] = (
        fault_figures.get("concurrent duplicate commands sent", 0) + CLIENTS
    )


def racing_bids() -> list[Decimal]:
    """One bid per investor: at, above and below the asking price of 50."""
    above = [Decimal(v) for v in ("50.01", "55", "60", "75", "99.99", "100")]
    at = [ASKING] * 4
    below = [Decimal(v) for v in ("0.01", "1", "10", "25", "30", "40", "45", "49", "49.5", "49.99")]
    bids = above + at + below
    assert len(bids) == INVESTORS
    return bids


async def test_many_investors_bidding_at_once_finance_each_invoice_exactly_once(
    racing_target: tuple[Deployment, Observer], fault_figures: dict[str, Any]
) -> None:
    target, observer = racing_target
    bids = racing_bids()
    async with driving(target, observer) as financing:

        async def prepare() -> tuple[UUID, list[UUID]]:
            invoice_id, _ = await financing.put_invoice_on_sale(ASKING)
            investors = await asyncio.gather(*(financing.register_investor(BALANCE) for _ in bids))
            return invoice_id, list(investors)

        races = await asyncio.gather(*(prepare() for _ in range(RACES)))
        orders = [
            BidOnInvoiceCommand(
                investor_id=Uuid(str(investor)),
                invoice_id=Uuid(str(invoice_id)),
                bid=Money(amount=float(bid)),
            )
            for invoice_id, investors in races
            for investor, bid in zip(investors, bids, strict=True)
        ]
        async with clients(target, len(orders)) as stubs:
            await asyncio.gather(
                *(stub.bid_on_invoice(order) for stub, order in zip(stubs, orders, strict=True))
            )

        await wait_drained(target.vhost, ["BidOnInvoice"])
        await settle(target)

        for invoice_id, investors in races:
            invoice_events = await event_names(target, invoice_id)
            assert Counter(invoice_events) == Counter(
                {
                    "InvoiceCreatedEvent": 1,
                    "InvoiceFinancedEvent": 1,
                    "BidOnInvoiceRejectedEvent": INVESTORS - 1,
                }
            ), f"invoice {invoice_id}: {invoice_events}"
            state = await financing.invoice_state(invoice_id)
            assert state is not None
            status, winner, winning_amount = state
            assert status == "FINANCED" and winner is not None
            assert winning_amount == bids[investors.index(UUID(winner))] >= ASKING
            for investor, bid in zip(investors, bids, strict=True):
                funds = await financing.investor_funds(investor)
                if investor == UUID(winner):
                    assert funds == (BALANCE - ASKING, ASKING), f"winner {investor} bid {bid}"
                else:
                    assert funds == (BALANCE, Decimal(0)), f"loser {investor} bid {bid}"
    fault_figures["concurrent bids racing for an invoice"] = (
        fault_figures.get("concurrent bids racing for an invoice", 0) + RACES * INVESTORS
    )
