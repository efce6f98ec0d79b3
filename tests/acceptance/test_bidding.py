"""Scenarios 5, 6, 7 and 10: bids finance an invoice, are rejected, or are refused."""

from __future__ import annotations

import pytest

from financing.generated import BidOnInvoiceCommand, Uuid
from tests.acceptance import expected as ex
from tests.acceptance.bus import Observed
from tests.acceptance.driver import Financing, eventually_equal, grpc_money, new_id
from tests.acceptance.expected import money

pytestmark = pytest.mark.acceptance


async def test_bid_covering_the_asking_price_finances_the_invoice_and_releases_the_excess(
    financing: Financing,
) -> None:
    invoice_id, _ = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(100)
    since = financing.events.mark()

    await financing.bid(investor_id, invoice_id, 20)

    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(investor_id, invoice_id, 20),
            ex.invoice_financed(invoice_id, 10, investor_id, 20),
            ex.investor_funds_released(investor_id, 10),
        ],
        since=since,
    )
    await eventually_equal(
        lambda: financing.investor_funds(investor_id),
        (money(90), money(10)),
        what="the investor's (balance, reserved) in the read model",
    )
    await eventually_equal(
        lambda: financing.invoice_state(invoice_id),
        ("FINANCED", str(investor_id), money(20)),
        what="the invoice's (status, winning bidder, winning amount) in the read model",
    )


async def test_bid_below_asking_price_is_rejected_and_its_funds_released(
    financing: Financing,
) -> None:
    invoice_id, _ = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(100)
    since = financing.events.mark()

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
    await eventually_equal(
        lambda: financing.investor_funds(investor_id),
        (money(100), money(0)),
        what="the investor's (balance, reserved) in the read model",
    )


async def test_bid_above_the_investors_balance_is_refused_without_any_event(
    financing: Financing,
) -> None:
    invoice_id, _ = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(5)
    since = financing.events.mark()
    letters_since = financing.dead_letters.mark()

    await financing.bid(investor_id, invoice_id, 10)

    await financing.dead_letter(
        since=letters_since,
        source_queue="BidOnInvoice",
        body={"InvestorID": str(investor_id), "InvoiceID": str(invoice_id)},
    )
    assert financing.events.concerning([str(investor_id), str(invoice_id)], since) == []


async def test_bid_on_an_invoice_that_does_not_exist_reserves_nothing(
    financing: Financing,
) -> None:
    investor_id = await financing.register_investor(100)
    invoice_id = new_id()
    since = financing.events.mark()
    letters_since = financing.dead_letters.mark()

    await financing.bid(investor_id, invoice_id, 10)

    letter = await financing.dead_letter(
        since=letters_since,
        source_queue="BidOnInvoice",
        body={"InvestorID": str(investor_id), "InvoiceID": str(invoice_id)},
    )
    assert str(invoice_id) in (letter.reason or ""), (
        f"reason does not name the invoice: {letter.reason}"
    )
    assert financing.events.concerning([str(investor_id), str(invoice_id)], since) == []
    await eventually_equal(
        lambda: financing.investor_funds(investor_id),
        (money(100), money(0)),
        what="the investor's (balance, reserved) in the read model",
    )


async def test_second_bid_on_a_financed_invoice_is_rejected_and_its_funds_released(
    financing: Financing,
) -> None:
    financed = await financing.finance_invoice(asking_price=10, bid=20)
    latecomer = await financing.register_investor(100)
    since = financing.events.mark()

    await financing.bid(latecomer, financed.invoice_id, 15)

    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(latecomer, financed.invoice_id, 15),
            ex.bid_on_invoice_rejected(financed.invoice_id, latecomer, 15),
            ex.investor_funds_released(latecomer, 15),
        ],
        since=since,
        among=[financed.investor_id],  # the winner's funds stay as they were
    )
    await eventually_equal(
        lambda: financing.invoice_state(financed.invoice_id),
        ("FINANCED", str(financed.investor_id), money(20)),
        what="the invoice's (status, winning bidder, winning amount) in the read model",
    )


async def test_funds_do_not_drift_when_amounts_have_decimals(financing: Financing) -> None:
    # In binary floating point 0.3 - 0.1 < 0.2: the second bid would be refused.
    first_invoice, _ = await financing.put_invoice_on_sale("0.1")
    second_invoice, _ = await financing.put_invoice_on_sale("0.2")
    investor_id = await financing.register_investor("0.3")
    since = financing.events.mark()

    await financing.bid(investor_id, first_invoice, 0.1)
    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(investor_id, first_invoice, "0.1"),
            ex.invoice_financed(first_invoice, "0.1", investor_id, "0.1"),
        ],
        since=since,
    )
    since = financing.events.mark()
    await financing.bid(investor_id, second_invoice, 0.2)

    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(investor_id, second_invoice, "0.2"),
            ex.invoice_financed(second_invoice, "0.2", investor_id, "0.2"),
        ],
        since=since,
    )
    await eventually_equal(
        lambda: financing.investor_funds(investor_id),
        (money(0), money("0.3")),
        what="the investor's (balance, reserved) in the read model",
    )


async def test_a_bid_on_an_issuers_id_is_refused_and_reserves_nothing(
    financing: Financing,
) -> None:
    """Regression: an issuer's stream passed for an invoice; the bid reserved funds, and
    the invoice's saga appended invoice events to the issuer's stream."""
    issuer_id = await financing.register_issuer()
    investor_id = await financing.register_investor(100)
    since = financing.events.mark()
    letters_since = financing.dead_letters.mark()

    await financing.bid(investor_id, issuer_id, 10)

    letter = await financing.dead_letter(
        since=letters_since,
        source_queue="BidOnInvoice",
        body={"InvestorID": str(investor_id), "InvoiceID": str(issuer_id)},
    )
    assert f"{issuer_id} is the id of an Issuer" in (letter.reason or ""), letter.reason
    assert financing.events.concerning([str(investor_id), str(issuer_id)], since) == []


async def test_a_refused_bid_retried_with_its_key_once_funds_are_back_stays_refused(
    financing: Financing,
) -> None:
    """Regression: a refusal was not recorded, so a client's retry under the same
    idempotency key was judged again: once the investor's funds were back, placed, while
    the first copy's dead letter said it was refused. The retry is dead-lettered again,
    for the same rule."""
    financed = await financing.finance_invoice(asking_price=10, bid=10, balance=10)
    investor_id = financed.investor_id
    other, _ = await financing.put_invoice_on_sale(5)
    letters_since = financing.dead_letters.mark()
    request = BidOnInvoiceCommand(
        investor_id=Uuid(str(investor_id)), invoice_id=Uuid(str(other)), bid=grpc_money(5)
    )
    key = {"idempotency-key": f"bid-{new_id()}"}
    await financing.commands.bid_on_invoice(request, metadata=key)

    def of_the_bid(letter: Observed) -> bool:
        return isinstance(letter.data, dict) and letter.data.get("InvoiceID") == str(other)

    [letter] = await financing.dead_letters.wait_for(of_the_bid, since=letters_since)
    assert "balance 0 is less than the bid 5" in (letter.reason or ""), letter.reason
    await financing.reverse_financed(financed)  # the investor's 10 come back
    since = financing.events.mark()

    await financing.commands.bid_on_invoice(request, metadata=key)

    first, again = await financing.dead_letters.wait_for(of_the_bid, since=letters_since, count=2)
    assert again.message_id == first.message_id and again.reason == first.reason
    assert financing.events.concerning([str(other)], since) == []
    assert financing.events.select(of_the_bid, since) == []  # no BidOnInvoicePlacedEvent
