"""A restart in the middle of a saga loses nothing and duplicates nothing."""

from __future__ import annotations

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, new_id
from tests.acceptance.system import ServiceProcess
from tests.acceptance.test_message_ids import inconsistent_copies

pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]


async def test_saga_interrupted_by_a_restart_completes_exactly_once(
    financing: Financing, service: ServiceProcess
) -> None:
    invoice_id, _ = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(100)
    since = financing.events.mark()
    copies_since = len(financing.events.messages)

    await financing.bid(investor_id, invoice_id, 20)
    assert await service.stop() == 0, "the service did not exit cleanly on SIGTERM"
    # Registering keeps publishing while the service is down.
    absent_investor = new_id()
    await financing.publish_investor_registered(absent_investor, 50)
    await service.start()

    await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(investor_id, invoice_id, 20),
            ex.invoice_financed(invoice_id, 10, investor_id, 20),
            ex.investor_funds_released(investor_id, 10),
        ],
        since=since,
    )
    await ex.expect_events(
        financing.events,
        [ex.investor_created(absent_investor), ex.investor_funds_added(absent_investor, 50)],
        since=since,
    )
    approved_since = financing.events.mark()
    await financing.approve(invoice_id)  # the restarted Commands API accepts commands
    await ex.expect_events(
        financing.events,
        [
            ex.invoice_approved(invoice_id, 10, investor_id, 20),
            ex.investor_funds_committed(investor_id, 10),
        ],
        since=approved_since,
    )
    assert inconsistent_copies(financing.events, copies_since) == []
