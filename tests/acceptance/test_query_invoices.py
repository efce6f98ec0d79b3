"""AllInvoices and AllIssuers: read models built from domain events published on `events`.

Each invoice is listed with its issuer, asking price and status; the winning
bid is absent until the invoice is financed and stays once it is approved or
reversed. The events are published by the test (watermill headers only) and
exist only on the bus; each test looks at its own ids only.
"""

from __future__ import annotations

from uuid import UUID

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import (
    Financing,
    ListedInvestor,
    ListedInvoice,
    eventually_equal,
    new_id,
)
from tests.acceptance.expected import Amount, money

pytestmark = pytest.mark.acceptance


def invoice(
    invoice_id: UUID,
    issuer_id: UUID,
    asking_price: Amount,
    status: str,
    winner: tuple[UUID, Amount] | None = None,
) -> ListedInvoice:
    bid = None if winner is None else (str(winner[0]), money(winner[1]))
    return ListedInvoice(str(invoice_id), str(issuer_id), money(asking_price), status, bid)


async def invoices_listed(
    financing: Financing, expected: list[ListedInvoice], *, what: str
) -> None:
    """Wait until AllInvoices lists exactly these rows (in this order) among their ids."""
    ids = [row.id for row in expected]

    async def read() -> tuple[ListedInvoice, ...]:
        return (await financing.listing()).only(ids).invoices

    await eventually_equal(read, tuple(expected), what=what)


async def issuers_listed(financing: Financing, expected: list[UUID], *, what: str) -> None:
    async def read() -> tuple[str, ...]:
        return (await financing.listing()).only(expected).issuers

    await eventually_equal(read, tuple(str(i) for i in expected), what=what)


async def test_created_issuers_are_listed_in_creation_order(financing: Financing) -> None:
    first, second = new_id(), new_id()

    await financing.publish_domain_events(ex.issuer_created(second), ex.issuer_created(first))

    await issuers_listed(financing, [second, first], what="two issuers in creation order")


async def test_sold_invoices_are_listed_available_without_a_bid_in_creation_order(
    financing: Financing,
) -> None:
    issuer_id, first, second = new_id(), new_id(), new_id()

    await financing.publish_domain_events(
        ex.issuer_created(issuer_id),
        ex.invoice_created(second, issuer_id, 20),
        ex.invoice_created(first, issuer_id, 15),
    )

    await invoices_listed(
        financing,
        [
            invoice(second, issuer_id, 20, "AVAILABLE"),
            invoice(first, issuer_id, 15, "AVAILABLE"),
        ],
        what="two available invoices in the order they were sold",
    )
    await issuers_listed(financing, [issuer_id], what="their issuer")


async def test_placed_bid_alone_does_not_set_a_winning_bid(financing: Financing) -> None:
    issuer_id, invoice_id, investor_id = new_id(), new_id(), new_id()

    await financing.publish_domain_events(
        ex.issuer_created(issuer_id),
        ex.invoice_created(invoice_id, issuer_id, 15),
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, 20),
        ex.bid_on_invoice_placed(investor_id, invoice_id, 20),
    )

    # The bid is projected (its funds are reserved) and yet the invoice has no winner.
    async def investor_read() -> tuple[ListedInvestor, ...]:
        return (await financing.listing()).only([investor_id]).investors

    await eventually_equal(
        investor_read,
        (ListedInvestor(str(investor_id), money(0), money(20)),),
        what="the bid's funds reserved",
    )
    await invoices_listed(
        financing,
        [invoice(invoice_id, issuer_id, 15, "AVAILABLE")],
        what="the invoice still available, without a winning bid",
    )


async def test_financed_invoice_shows_its_winning_bid(financing: Financing) -> None:
    invoice_id, issuer_id, investor_id = await financed_invoice(financing)

    await invoices_listed(
        financing,
        [invoice(invoice_id, issuer_id, 15, "FINANCED", (investor_id, 20))],
        what="the financed invoice",
    )


async def test_rejected_second_bid_leaves_the_financed_invoice_and_its_winner(
    financing: Financing,
) -> None:
    invoice_id, issuer_id, investor_id = await financed_invoice(financing)
    latecomer = new_id()

    await financing.publish_domain_events(
        ex.investor_created(latecomer),
        ex.investor_funds_added(latecomer, 50),
        ex.bid_on_invoice_placed(latecomer, invoice_id, 30),
        ex.bid_on_invoice_rejected(invoice_id, latecomer, 30),
        ex.investor_funds_released(latecomer, 30),
    )

    async def latecomer_read() -> tuple[ListedInvestor, ...]:
        return (await financing.listing()).only([latecomer]).investors

    await eventually_equal(
        latecomer_read,
        (ListedInvestor(str(latecomer), money(50), money(0)),),
        what="the latecomer's rejected bid released",
    )
    await invoices_listed(
        financing,
        [invoice(invoice_id, issuer_id, 15, "FINANCED", (investor_id, 20))],
        what="the invoice financed by its first bidder",
    )


async def test_approved_invoice_keeps_its_winning_bid(financing: Financing) -> None:
    invoice_id, issuer_id, investor_id = await financed_invoice(financing)

    await financing.publish_domain_events(
        ex.invoice_approved(invoice_id, 15, investor_id, 20),
        ex.investor_funds_committed(investor_id, 15),
    )

    await invoices_listed(
        financing,
        [invoice(invoice_id, issuer_id, 15, "APPROVED", (investor_id, 20))],
        what="the approved invoice",
    )


async def test_reversed_invoice_keeps_its_winning_bid(financing: Financing) -> None:
    invoice_id, issuer_id, investor_id = await financed_invoice(financing)

    await financing.publish_domain_events(
        ex.invoice_reversed(invoice_id, 15, investor_id, 20),
        ex.investor_funds_released(investor_id, 15),
    )

    await invoices_listed(
        financing,
        [invoice(invoice_id, issuer_id, 15, "REVERSED", (investor_id, 20))],
        what="the reversed invoice",
    )


async def financed_invoice(financing: Financing) -> tuple[UUID, UUID, UUID]:
    """An invoice asking 15 financed by a bid of 20: (invoice id, issuer id, investor id).

    Waits until it is listed AVAILABLE first, then FINANCED: each status is seen.
    """
    issuer_id, invoice_id, investor_id = new_id(), new_id(), new_id()
    await financing.publish_domain_events(
        ex.issuer_created(issuer_id), ex.invoice_created(invoice_id, issuer_id, 15)
    )
    await invoices_listed(
        financing,
        [invoice(invoice_id, issuer_id, 15, "AVAILABLE")],
        what="the invoice on sale",
    )
    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, 20),
        ex.bid_on_invoice_placed(investor_id, invoice_id, 20),
        ex.invoice_financed(invoice_id, 15, investor_id, 20),
    )
    await invoices_listed(
        financing,
        [invoice(invoice_id, issuer_id, 15, "FINANCED", (investor_id, 20))],
        what="the invoice financed",
    )
    return invoice_id, issuer_id, investor_id
