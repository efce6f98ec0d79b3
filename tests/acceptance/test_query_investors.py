"""AllInvestors: the investors' read model built from domain events published on `events`.

As the reference's query acceptance tests do, each test publishes domain
events itself (watermill headers only, random message ids) and reads the
result through the Queries API. These events never reach the event store, and
the session's deployment is shared, so each test looks at its own ids only.
"""

from __future__ import annotations

from uuid import UUID

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, ListedInvestor, eventually_equal, new_id
from tests.acceptance.expected import Amount, money

pytestmark = pytest.mark.acceptance


def investor(investor_id: UUID, balance: Amount, reserved: Amount = 0) -> ListedInvestor:
    return ListedInvestor(str(investor_id), money(balance), money(reserved))


async def investors_listed(
    financing: Financing, expected: list[ListedInvestor], *, what: str
) -> None:
    """Wait until AllInvestors lists exactly these rows (in this order) among their ids."""
    ids = [row.id for row in expected]

    async def read() -> tuple[ListedInvestor, ...]:
        return (await financing.listing()).only(ids).investors

    await eventually_equal(read, tuple(expected), what=what)


async def test_created_investor_is_listed_with_no_funds(financing: Financing) -> None:
    investor_id = new_id()

    await financing.publish_domain_events(ex.investor_created(investor_id))

    await investors_listed(financing, [investor(investor_id, 0, 0)], what="the new investor")


async def test_investors_are_listed_in_creation_order(financing: Financing) -> None:
    first, second, third = new_id(), new_id(), new_id()

    await financing.publish_domain_events(
        ex.investor_created(second), ex.investor_created(first), ex.investor_created(third)
    )

    await investors_listed(
        financing,
        [investor(second, 0), investor(first, 0), investor(third, 0)],
        what="three investors in the order they were created",
    )


async def test_funds_added_twice_add_up(financing: Financing) -> None:
    investor_id = new_id()

    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, 20),
        ex.investor_funds_added(investor_id, 30),
    )

    await investors_listed(financing, [investor(investor_id, 50)], what="20 + 30 added")


async def test_amounts_not_above_zero_change_nothing(financing: Financing) -> None:
    investor_id = new_id()

    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, 10),
        ex.investor_funds_added(investor_id, 0),
        ex.investor_funds_added(investor_id, -5),
        ex.bid_on_invoice_placed(investor_id, new_id(), -3),
        ex.investor_funds_released(investor_id, -2),
        ex.investor_funds_committed(investor_id, -1),
        ex.investor_funds_added(investor_id, 1),
    )

    await investors_listed(financing, [investor(investor_id, 11)], what="10, then only 1 more")


async def test_placed_bid_reserves_funds_and_released_excess_returns_to_the_balance(
    financing: Financing,
) -> None:
    investor_id, issuer_id, invoice_id = new_id(), new_id(), new_id()
    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, 30),
        ex.issuer_created(issuer_id),
        ex.invoice_created(invoice_id, issuer_id, 15),
        ex.bid_on_invoice_placed(investor_id, invoice_id, 20),
    )
    await investors_listed(
        financing, [investor(investor_id, 10, 20)], what="the bid of 20 reserved"
    )

    await financing.publish_domain_events(
        ex.invoice_financed(invoice_id, 15, investor_id, 20),
        ex.investor_funds_released(investor_id, 5),
    )

    await investors_listed(
        financing, [investor(investor_id, 15, 15)], what="the excess of 5 released"
    )


async def test_approval_commits_the_reserved_funds_for_good(financing: Financing) -> None:
    investor_id, invoice_id = await financed_investor(financing)

    await financing.publish_domain_events(
        ex.invoice_approved(invoice_id, 10, investor_id, 20),
        ex.investor_funds_committed(investor_id, 10),
    )

    # Reserved back to 0; the committed 10 does not return to the balance.
    await investors_listed(
        financing, [investor(investor_id, 90, 0)], what="the sold price committed"
    )


async def test_reversal_gives_the_sold_price_back_to_the_balance(financing: Financing) -> None:
    investor_id, invoice_id = await financed_investor(financing)

    await financing.publish_domain_events(
        ex.invoice_reversed(invoice_id, 10, investor_id, 20),
        ex.investor_funds_released(investor_id, 10),
    )

    await investors_listed(financing, [investor(investor_id, 100, 0)], what="the balance restored")


async def test_rejected_bid_releases_the_whole_bid(financing: Financing) -> None:
    investor_id, invoice_id = new_id(), new_id()
    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, 100),
        ex.bid_on_invoice_placed(investor_id, invoice_id, 5),
        ex.bid_on_invoice_rejected(invoice_id, investor_id, 5),
        ex.investor_funds_released(investor_id, 5),
    )

    await investors_listed(
        financing, [investor(investor_id, 100, 0)], what="the rejected bid released"
    )


async def financed_investor(financing: Financing) -> tuple[UUID, UUID]:
    """An investor of 100 whose bid of 20 financed an invoice asking 10, listed with (90, 10).

    Returns (investor id, invoice id).
    """
    investor_id, issuer_id, invoice_id = new_id(), new_id(), new_id()
    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, 100),
        ex.issuer_created(issuer_id),
        ex.invoice_created(invoice_id, issuer_id, 10),
        ex.bid_on_invoice_placed(investor_id, invoice_id, 20),
        ex.invoice_financed(invoice_id, 10, investor_id, 20),
        ex.investor_funds_released(investor_id, 10),
    )
    await investors_listed(
        financing, [investor(investor_id, 90, 10)], what="the excess of 10 released"
    )
    return investor_id, invoice_id
