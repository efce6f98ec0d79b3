"""Commands in over gRPC, read models out over gRPC: scenarios 5, 6, 8, 9 and 10 end to end.

Each scenario waits for its domain events on the bus (the saga is over), then
for the Queries lists to show every row it touched, exactly: the investors'
balance and reserved funds, the invoice's issuer, price, status and winning
bid, and the issuer.
"""

from __future__ import annotations

from uuid import UUID

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import (
    FinancedInvoice,
    Financing,
    ListedInvestor,
    ListedInvoice,
    Listing,
    eventually_equal,
)
from tests.acceptance.expected import Amount, money

pytestmark = pytest.mark.acceptance


def investor(investor_id: UUID, balance: Amount, reserved: Amount) -> ListedInvestor:
    return ListedInvestor(str(investor_id), money(balance), money(reserved))


def invoice(
    invoice_id: UUID,
    issuer_id: UUID,
    asking_price: Amount,
    status: str,
    winner: tuple[UUID, Amount] | None = None,
) -> ListedInvoice:
    bid = None if winner is None else (str(winner[0]), money(winner[1]))
    return ListedInvoice(str(invoice_id), str(issuer_id), money(asking_price), status, bid)


async def listed(
    financing: Financing,
    *,
    investors: list[ListedInvestor],
    invoices: list[ListedInvoice],
    issuers: list[UUID],
    what: str,
) -> None:
    """Wait until the lists show exactly these rows, in this order, among their ids."""
    expected = Listing(tuple(investors), tuple(invoices), tuple(str(i) for i in issuers))
    ids = [row.id for row in investors] + [row.id for row in invoices] + list(expected.issuers)

    async def read() -> Listing:
        return (await financing.listing()).only(ids)

    await eventually_equal(read, expected, what=what)


async def financed_and_listed(financing: Financing) -> FinancedInvoice:
    """Scenario 5: investor (100) bids 20 on an invoice asking 10, as the read models show it."""
    financed = await financing.finance_invoice(asking_price=10, bid=20, balance=100)
    await listed(
        financing,
        investors=[investor(financed.investor_id, 90, 10)],
        invoices=[
            invoice(
                financed.invoice_id, financed.issuer_id, 10, "FINANCED", (financed.investor_id, 20)
            )
        ],
        issuers=[financed.issuer_id],
        what="scenario 5: balance 90, reserved 10; the invoice financed by the bid of 20",
    )
    return financed


async def test_bid_below_the_asking_price_leaves_the_invoice_available_and_the_funds_whole(
    financing: Financing,
) -> None:
    invoice_id, issuer_id = await financing.put_invoice_on_sale(10)
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
    await listed(
        financing,
        investors=[investor(investor_id, 100, 0)],
        invoices=[invoice(invoice_id, issuer_id, 10, "AVAILABLE")],
        issuers=[issuer_id],
        what="scenario 6: funds whole, the invoice available without a winning bid",
    )


async def test_second_bid_on_a_financed_invoice_changes_neither_the_invoice_nor_the_winner(
    financing: Financing,
) -> None:
    financed = await financed_and_listed(financing)
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
        among=[financed.investor_id],
    )
    await listed(
        financing,
        investors=[investor(financed.investor_id, 90, 10), investor(latecomer, 100, 0)],
        invoices=[
            invoice(
                financed.invoice_id, financed.issuer_id, 10, "FINANCED", (financed.investor_id, 20)
            )
        ],
        issuers=[financed.issuer_id],
        what="scenario 10: the first bid still wins; the latecomer's funds released",
    )


async def test_approved_financing_commits_the_price_and_keeps_the_winning_bid(
    financing: Financing,
) -> None:
    financed = await financed_and_listed(financing)
    since = financing.events.mark()

    await financing.approve(financed.invoice_id)

    await ex.expect_events(
        financing.events,
        [
            ex.invoice_approved(financed.invoice_id, 10, financed.investor_id, 20),
            ex.investor_funds_committed(financed.investor_id, 10),
        ],
        since=since,
    )
    await listed(
        financing,
        investors=[investor(financed.investor_id, 90, 0)],
        invoices=[
            invoice(
                financed.invoice_id, financed.issuer_id, 10, "APPROVED", (financed.investor_id, 20)
            )
        ],
        issuers=[financed.issuer_id],
        what="scenario 8: reserved back to 0, the invoice approved",
    )


async def test_reversed_financing_restores_the_balance_and_keeps_the_winning_bid(
    financing: Financing,
) -> None:
    financed = await financed_and_listed(financing)
    await financing.reverse_financed(financed)
    await listed(
        financing,
        investors=[investor(financed.investor_id, 100, 0)],
        invoices=[
            invoice(
                financed.invoice_id, financed.issuer_id, 10, "REVERSED", (financed.investor_id, 20)
            )
        ],
        issuers=[financed.issuer_id],
        what="scenario 9: balance restored, the invoice reversed",
    )
