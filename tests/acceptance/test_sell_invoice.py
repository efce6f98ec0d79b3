"""Scenarios 3 and 4: a registered issuer sells an invoice; an unregistered one cannot."""

from __future__ import annotations

from uuid import UUID

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, new_id

pytestmark = pytest.mark.acceptance


async def test_registered_issuer_sells_an_invoice(financing: Financing) -> None:
    issuer_id = await financing.register_issuer()
    since = financing.events.mark()

    invoice_id = await financing.sell_invoice(issuer_id, 20)

    await ex.expect_events(
        financing.events, [ex.invoice_created(invoice_id, issuer_id, 20)], since=since
    )


async def test_every_sold_invoice_gets_a_new_id(financing: Financing) -> None:
    issuer_id = await financing.register_issuer()
    since = financing.events.mark()

    first = await financing.sell_invoice(issuer_id, 20)
    second = await financing.sell_invoice(issuer_id, 20)

    assert first != second
    # Two aggregates: the contract orders each one's events, not the two among themselves.
    await ex.expect_events(
        financing.events, [ex.invoice_created(first, issuer_id, 20)], since=since
    )
    await ex.expect_events(
        financing.events, [ex.invoice_created(second, issuer_id, 20)], since=since
    )


async def test_unregistered_issuer_cannot_sell_an_invoice(financing: Financing) -> None:
    issuer_id = new_id()  # never registered
    since = financing.events.mark()
    letters_since = financing.dead_letters.mark()

    invoice_id = await financing.sell_invoice(issuer_id, 20)

    assert isinstance(invoice_id, UUID)
    # The command is refused for good once it is dead-lettered; nothing was created before.
    letter = await financing.dead_letter(
        since=letters_since,
        source_queue="SellInvoice",
        body={"InvoiceID": str(invoice_id), "IssuerID": str(issuer_id)},
    )
    assert str(issuer_id) in (letter.reason or ""), (
        f"reason does not name the issuer: {letter.reason}"
    )
    assert letter.name == "SellInvoice"
    assert financing.events.concerning([str(invoice_id), str(issuer_id)], since) == []
    assert await financing.invoice_view(invoice_id) is None
