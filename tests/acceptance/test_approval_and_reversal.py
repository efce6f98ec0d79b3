"""Scenarios 8 and 9: a financed invoice is approved (funds committed) or reversed (returned)."""

from __future__ import annotations

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, eventually_equal
from tests.acceptance.expected import money

pytestmark = pytest.mark.acceptance


async def test_approving_a_financed_invoice_commits_the_investors_funds(
    financing: Financing,
) -> None:
    financed = await financing.finance_invoice(asking_price=10, bid=20, balance=100)
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
    await eventually_equal(
        lambda: financing.investor_funds(financed.investor_id),
        (money(90), money(0)),
        what="the investor's (balance, reserved) in the read model",
    )
    await eventually_equal(
        lambda: financing.invoice_state(financed.invoice_id),
        ("APPROVED", str(financed.investor_id), money(20)),
        what="the invoice's (status, winning bidder, winning amount) in the read model",
    )


async def test_reversing_a_financed_invoice_gives_the_investor_the_price_back(
    financing: Financing,
) -> None:
    financed = await financing.finance_invoice(asking_price=10, bid=20, balance=100)
    await financing.reverse_financed(financed)
    await eventually_equal(
        lambda: financing.investor_funds(financed.investor_id),
        (money(100), money(0)),
        what="the investor's (balance, reserved) in the read model",
    )
    await eventually_equal(
        lambda: financing.invoice_state(financed.invoice_id),
        ("REVERSED", str(financed.investor_id), money(20)),
        what="the invoice's (status, winning bidder, winning amount) in the read model",
    )
