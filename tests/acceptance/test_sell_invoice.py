"""Scenarios 3 and 4: a registered issuer sells an invoice; an unregistered one cannot."""

from __future__ import annotations

import asyncio
from uuid import UUID

import pytest

from financing.generated import Money, SellInvoiceCommand, Uuid
from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, new_id
from tests.acceptance.system import System
from tests.acceptance.test_operability import scrape_every_process
from tests.support import infra
from tests.support.metrics import value

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


async def test_a_sale_retried_with_its_idempotency_key_creates_one_invoice(
    financing: Financing, system: System
) -> None:
    """A client that lost the first answer retries with the same key: the same invoice id
    comes back, and the second command is dropped as a duplicate."""
    issuer_id = await financing.register_issuer()
    since = financing.events.mark()

    def duplicates() -> float:
        samples = scrape_every_process(system)
        return value(samples, "financing_messages_total", queue="SellInvoice", outcome="duplicate")

    before = await asyncio.to_thread(duplicates)
    request = SellInvoiceCommand(issuer_id=Uuid(str(issuer_id)), asking_price=Money(amount=20))
    key = {"idempotency-key": f"sale-{new_id()}"}
    first = await financing.commands.sell_invoice(request, metadata=key)
    again = await financing.commands.sell_invoice(request, metadata=key)

    assert first.value == again.value
    invoice_id = UUID(first.value)

    async def dropped() -> bool:
        return await asyncio.to_thread(duplicates) >= before + 1

    await infra.wait_until(dropped, timeout=30, interval=0.2, what="the duplicate dropped")
    await ex.expect_events(
        financing.events, [ex.invoice_created(invoice_id, issuer_id, 20)], since=since
    )


async def test_a_key_reused_for_another_sale_has_that_sale_dead_lettered_not_dropped(
    financing: Financing,
) -> None:
    """The key names the invoice id and the command's message id: a second sale under it
    (another asking price) is another message, kept aside with the reason, not lost."""
    issuer_id = await financing.register_issuer()
    since = financing.events.mark()
    letters_since = financing.dead_letters.mark()
    key = {"idempotency-key": f"sale-{new_id()}"}
    first = await financing.commands.sell_invoice(
        SellInvoiceCommand(issuer_id=Uuid(str(issuer_id)), asking_price=Money(amount=20)),
        metadata=key,
    )
    await ex.expect_events(
        financing.events, [ex.invoice_created(UUID(first.value), issuer_id, 20)], since=since
    )

    again = await financing.commands.sell_invoice(
        SellInvoiceCommand(issuer_id=Uuid(str(issuer_id)), asking_price=Money(amount=30)),
        metadata=key,
    )

    assert again.value == first.value
    letter = await financing.dead_letter(
        since=letters_since,
        source_queue="SellInvoice",
        body={"InvoiceID": first.value, "IssuerID": str(issuer_id)},
    )
    assert "ReusedMessageId" in (letter.reason or ""), letter.reason
    assert "already processed a SellInvoice message" in (letter.reason or "")
    # Refused before it appended anything: the invoice keeps its first sale only.
    assert [event.name for event in financing.events.concerning([first.value], since)] == [
        "InvoiceCreatedEvent"
    ]
