"""Scenarios 1 and 2: Registering's integration events create issuers and investors."""

from __future__ import annotations

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, new_id

pytestmark = pytest.mark.acceptance


async def test_registered_issuer_is_created(financing: Financing) -> None:
    issuer_id = new_id()
    since = financing.events.mark()

    await financing.publish_issuer_registered(issuer_id)

    await ex.expect_events(financing.events, [ex.issuer_created(issuer_id)], since=since)


async def test_registered_investor_is_created_with_the_registered_balance(
    financing: Financing,
) -> None:
    investor_id = new_id()
    since = financing.events.mark()

    await financing.publish_investor_registered(investor_id, 100)

    await ex.expect_events(
        financing.events,
        [ex.investor_created(investor_id), ex.investor_funds_added(investor_id, 100)],
        since=since,
    )


async def test_an_investor_registered_under_an_issuers_id_is_dead_lettered(
    financing: Financing,
) -> None:
    """Regression: it was taken for an investor that already existed, and dropped."""
    issuer_id = await financing.register_issuer()
    since = financing.events.mark()
    letters_since = financing.dead_letters.mark()

    await financing.publish_investor_registered(issuer_id, 100)

    letter = await financing.dead_letter(
        since=letters_since, source_queue="CreateInvestor", body={"ID": str(issuer_id)}
    )
    assert f"{issuer_id} is the id of an Issuer" in (letter.reason or ""), letter.reason
    assert financing.events.concerning([str(issuer_id)], since) == []
