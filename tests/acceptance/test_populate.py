"""`financing populate` registers issuers and investors that the read models then list.

It runs as an operator runs it, beside a deployment of this module's own. The
ids it prints are the ones listed afterwards, with the balance asked for: no
row more, none less, and the rows listed before stay as they were, first.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from tests.acceptance.driver import (
    Financing,
    ListedInvestor,
    Listing,
    eventually_equal,
    financing_for,
)
from tests.acceptance.system import System, local_system
from tests.support.service import run_cli

pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]

UUID_TEXT = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ISSUER_LINE = re.compile(rf"^issuer\s+({UUID_TEXT})$", re.MULTILINE)
INVESTOR_LINE = re.compile(rf"^investor\s+({UUID_TEXT})\s+balance\s+(\S+)$", re.MULTILINE)


@pytest.fixture(scope="module")
async def deployment() -> AsyncIterator[tuple[System, Financing]]:
    async with local_system() as system, financing_for(system) as financing:
        yield system, financing


def sorted_segment(listing: Listing, before: Listing) -> Listing:
    """What was listed after `before`'s rows, sorted (one run's rows come in any order)."""
    return Listing(
        investors=tuple(sorted(listing.investors[len(before.investors) :])),
        invoices=tuple(sorted(listing.invoices[len(before.invoices) :])),
        issuers=tuple(sorted(listing.issuers[len(before.issuers) :])),
    )


async def populate_and_expect(
    deployment: tuple[System, Financing],
    args: list[str],
    *,
    issuers: int,
    investors: int,
    balance: Decimal,
) -> None:
    system, financing = deployment
    before = await financing.listing()

    run = await run_cli(system.env, "populate", *args)

    assert run.exit_code == 0, run.describe()
    issuer_ids = ISSUER_LINE.findall(run.stdout)
    investor_lines = INVESTOR_LINE.findall(run.stdout)
    assert len(set(issuer_ids)) == len(issuer_ids) == issuers, run.describe()
    assert len({i for i, _ in investor_lines}) == len(investor_lines) == investors, run.describe()
    assert all(Decimal(printed) == balance for _, printed in investor_lines), run.describe()
    expected = Listing(
        investors=tuple(sorted(ListedInvestor(i, balance, Decimal(0)) for i, _ in investor_lines)),
        invoices=(),
        issuers=tuple(sorted(issuer_ids)),
    )

    async def read() -> tuple[Listing, Listing]:
        listing = await financing.listing()
        # What was listed before stays listed first, unchanged.
        prefix = Listing(
            listing.investors[: len(before.investors)],
            listing.invoices[: len(before.invoices)],
            listing.issuers[: len(before.issuers)],
        )
        return prefix, sorted_segment(listing, before)

    await eventually_equal(
        read,
        (before, expected),
        what=f"(earlier rows, the rows of `financing populate {' '.join(args)}`)",
    )


async def test_populate_by_default_lists_five_issuers_and_five_investors_of_100(
    deployment: tuple[System, Financing],
) -> None:
    await populate_and_expect(deployment, [], issuers=5, investors=5, balance=Decimal(100))


async def test_populate_lists_as_many_issuers_and_investors_as_asked_with_that_balance(
    deployment: tuple[System, Financing],
) -> None:
    await populate_and_expect(
        deployment,
        ["--issuers", "2", "--investors", "3", "--balance", "7.5"],
        issuers=2,
        investors=3,
        balance=Decimal("7.5"),
    )
