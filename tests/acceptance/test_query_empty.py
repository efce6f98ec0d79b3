"""On a deployment that has projected nothing yet, every Queries list is empty."""

from __future__ import annotations

import pytest

from tests.acceptance.driver import Listing, financing_for
from tests.acceptance.system import local_system

# A fresh deployment of its own: the session's lists hold other tests' rows.
pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]


async def test_every_list_is_empty_on_a_fresh_deployment() -> None:
    async with local_system() as system, financing_for(system) as financing:
        assert await financing.listing() == Listing(investors=(), invoices=(), issuers=())
