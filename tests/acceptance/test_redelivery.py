"""At-least-once delivery, exactly-once effects: a message delivered twice acts once.

Each test delivers a message twice, then a later message through the same
queue (whose effects it waits for), and only then checks the exact events:
the duplicate was consumed before the later message, so its effect, had it
had one, would already be there.
"""

from __future__ import annotations

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, new_id

pytestmark = pytest.mark.acceptance


async def test_redelivered_bid_placed_event_finances_the_invoice_once(
    financing: Financing,
) -> None:
    financed = await financing.finance_invoice(asking_price=10, bid=20)
    [placed] = financing.events.select(
        ex.named("BidOnInvoicePlacedEvent", InvoiceID=str(financed.invoice_id))
    )
    latecomer = await financing.register_investor(100)
    since = financing.events.mark()

    await financing.broker.republish(placed)
    await financing.broker.republish(placed)
    await financing.bid(latecomer, financed.invoice_id, 15)

    # The duplicate must not reject "another" bid and release the winner's funds.
    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(latecomer, financed.invoice_id, 15),
            ex.bid_on_invoice_rejected(financed.invoice_id, latecomer, 15),
            ex.investor_funds_released(latecomer, 15),
        ],
        since=since,
        among=[financed.investor_id],
    )


async def test_redelivered_investor_registration_adds_the_funds_once(
    financing: Financing,
) -> None:
    investor_id = new_id()
    since = financing.events.mark()

    message_id = await financing.publish_investor_registered(investor_id, 100)
    await financing.publish_investor_registered(investor_id, 100, message_id=message_id)
    await financing.register_investor(1)

    await ex.expect_events(
        financing.events,
        [ex.investor_created(investor_id), ex.investor_funds_added(investor_id, 100)],
        since=since,
    )


async def test_redelivered_bid_command_reserves_the_funds_once(financing: Financing) -> None:
    invoice_id, _ = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(100)
    other_invoice, _ = await financing.put_invoice_on_sale(10)
    other_investor = await financing.register_investor(100)
    since = financing.events.mark()
    bid = {"InvestorID": str(investor_id), "InvoiceID": str(invoice_id), "BidAmount": 5}

    message_id = await financing.broker.send_command("BidOnInvoice", bid)
    await financing.broker.send_command("BidOnInvoice", bid, message_id=message_id)
    await financing.bid(other_investor, other_invoice, 20)

    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(other_investor, other_invoice, 20),
            ex.invoice_financed(other_invoice, 10, other_investor, 20),
            ex.investor_funds_released(other_investor, 10),
        ],
        since=since,
    )
    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(investor_id, invoice_id, 5),
            ex.bid_on_invoice_rejected(invoice_id, investor_id, 5),
            ex.investor_funds_released(investor_id, 5),
        ],
        since=since,
    )
