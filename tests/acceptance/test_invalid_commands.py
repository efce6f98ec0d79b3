"""Malformed gRPC input is refused with INVALID_ARGUMENT naming the field, and never enqueued."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from financing.generated import (
    ApproveFinancingCommand,
    BidOnInvoiceCommand,
    Money,
    ReverseFinancingCommand,
    SellInvoiceCommand,
    Uuid,
)
from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, new_id

pytestmark = pytest.mark.acceptance

# Amounts the contract refuses: not finite, not > 0, or more than 2 decimal places.
BAD_AMOUNTS = {
    "nan": math.nan,
    "infinity": math.inf,
    "negative_infinity": -math.inf,
    "zero": 0.0,
    "negative": -10.0,
    "three_decimals": 10.001,
}
GARBAGE_UUID = "not-a-uuid"


async def refusal(call: Awaitable[Any]) -> GRPCError:
    with pytest.raises(GRPCError) as raised:
        await call
    return raised.value


def assert_invalid_argument(error: GRPCError, field: str) -> None:
    assert error.status is Status.INVALID_ARGUMENT, (
        f"expected INVALID_ARGUMENT, got {error.status.name}: {error.message}"
    )
    assert field in (error.message or ""), f"message does not name {field!r}: {error.message!r}"


def sell_cases() -> dict[str, tuple[SellInvoiceCommand, str]]:
    issuer = Uuid(str(new_id()))
    cases = {
        "missing_issuer_id": (SellInvoiceCommand(asking_price=Money(10.0)), "issuer_id"),
        "garbage_issuer_id": (
            SellInvoiceCommand(issuer_id=Uuid(GARBAGE_UUID), asking_price=Money(10.0)),
            "issuer_id",
        ),
        "missing_asking_price": (SellInvoiceCommand(issuer_id=issuer), "asking_price"),
    }
    for label, amount in BAD_AMOUNTS.items():
        command = SellInvoiceCommand(issuer_id=issuer, asking_price=Money(amount))
        cases[f"{label}_asking_price"] = (command, "asking_price")
    return cases


def bid_cases() -> dict[str, tuple[BidOnInvoiceCommand, str]]:
    investor, invoice = Uuid(str(new_id())), Uuid(str(new_id()))
    cases = {
        "missing_investor_id": (
            BidOnInvoiceCommand(invoice_id=invoice, bid=Money(10.0)),
            "investor_id",
        ),
        "garbage_investor_id": (
            BidOnInvoiceCommand(
                investor_id=Uuid(GARBAGE_UUID), invoice_id=invoice, bid=Money(10.0)
            ),
            "investor_id",
        ),
        "missing_invoice_id": (
            BidOnInvoiceCommand(investor_id=investor, bid=Money(10.0)),
            "invoice_id",
        ),
        "garbage_invoice_id": (
            BidOnInvoiceCommand(
                investor_id=investor, invoice_id=Uuid(GARBAGE_UUID), bid=Money(10.0)
            ),
            "invoice_id",
        ),
        "missing_bid": (BidOnInvoiceCommand(investor_id=investor, invoice_id=invoice), "bid"),
    }
    for label, amount in BAD_AMOUNTS.items():
        command = BidOnInvoiceCommand(investor_id=investor, invoice_id=invoice, bid=Money(amount))
        cases[f"{label}_bid"] = (command, "bid")
    return cases


SELL_CASES = sell_cases()
BID_CASES = bid_cases()


@pytest.mark.parametrize("case", SELL_CASES)
async def test_sell_invoice_with_malformed_input_is_refused_naming_the_field(
    financing: Financing, case: str
) -> None:
    command, field = SELL_CASES[case]

    error = await refusal(financing.commands.sell_invoice(command))

    assert_invalid_argument(error, field)


@pytest.mark.parametrize("case", BID_CASES)
async def test_bid_with_malformed_input_is_refused_naming_the_field(
    financing: Financing, case: str
) -> None:
    command, field = BID_CASES[case]

    error = await refusal(financing.commands.bid_on_invoice(command))

    assert_invalid_argument(error, field)


@pytest.mark.parametrize("invoice_id", ["", GARBAGE_UUID], ids=["missing", "garbage"])
async def test_approve_financing_with_malformed_invoice_id_is_refused(
    financing: Financing, invoice_id: str
) -> None:
    command = ApproveFinancingCommand(invoice_id=Uuid(invoice_id))

    error = await refusal(financing.commands.approve_financing(command))

    assert_invalid_argument(error, "invoice_id")


@pytest.mark.parametrize("invoice_id", ["", GARBAGE_UUID], ids=["missing", "garbage"])
async def test_reverse_financing_with_malformed_invoice_id_is_refused(
    financing: Financing, invoice_id: str
) -> None:
    command = ReverseFinancingCommand(invoice_id=Uuid(invoice_id))

    error = await refusal(financing.commands.reverse_financing(command))

    assert_invalid_argument(error, "invoice_id")


async def test_refused_commands_are_never_enqueued(financing: Financing) -> None:
    invoice_id, issuer_id = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(100)
    since = financing.events.mark()
    issuer, investor, invoice = (Uuid(str(i)) for i in (issuer_id, investor_id, invoice_id))

    for amount in BAD_AMOUNTS.values():
        sell = SellInvoiceCommand(issuer_id=issuer, asking_price=Money(amount))
        assert_invalid_argument(
            await refusal(financing.commands.sell_invoice(sell)), "asking_price"
        )
        bid = BidOnInvoiceCommand(investor_id=investor, invoice_id=invoice, bid=Money(amount))
        assert_invalid_argument(await refusal(financing.commands.bid_on_invoice(bid)), "bid")

    # Valid commands sent afterwards through the same queues: once their events are
    # out, a refused command that had been enqueued would have had its effect too.
    accepted_invoice = await financing.sell_invoice(issuer_id, 30)
    await financing.bid(investor_id, invoice_id, 5)

    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(investor_id, invoice_id, 5),
            ex.bid_on_invoice_rejected(invoice_id, investor_id, 5),
            ex.investor_funds_released(investor_id, 5),
        ],
        since=since,
    )
    created = await financing.events.wait_for(
        ex.named("InvoiceCreatedEvent", IssuerID=str(issuer_id)), since=since
    )
    assert [e.aggregate_id for e in created] == [str(accepted_invoice)]


async def test_amounts_with_two_decimals_are_accepted_exactly(financing: Financing) -> None:
    issuer_id = await financing.register_issuer()
    since = financing.events.mark()

    invoice_id = await financing.sell_invoice(issuer_id, 0.1)

    await ex.expect_events(
        financing.events, [ex.invoice_created(invoice_id, issuer_id, "0.1")], since=since
    )
