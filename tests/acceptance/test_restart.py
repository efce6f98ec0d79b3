"""A restart in the middle of sagas loses nothing and duplicates nothing."""

from __future__ import annotations

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.driver import Financing, new_id
from tests.acceptance.system import ServiceProcess
from tests.acceptance.test_message_ids import inconsistent_copies

pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]

SAGAS = 3


async def test_sagas_interrupted_by_a_restart_complete_exactly_once(
    financing: Financing, service: ServiceProcess
) -> None:
    parties = [
        ((await financing.put_invoice_on_sale(10))[0], await financing.register_investor(100))
        for _ in range(SAGAS)
    ]
    since = financing.events.mark()
    copies_since = len(financing.events.messages)

    for invoice_id, investor_id in parties:
        await financing.bid(investor_id, invoice_id, 20)
    # Stop once a saga has taken its first step: the sagas are caught half way.
    await financing.events.wait_for(lambda e: e.name == "BidOnInvoicePlacedEvent", since=since)
    assert await service.stop() == 0, "the service did not exit cleanly on SIGTERM"
    # Registering keeps publishing while the service is down.
    absent_investor = new_id()
    await financing.publish_investor_registered(absent_investor, 50)
    await service.start()

    for invoice_id, investor_id in parties:
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
    invoice_id, investor_id = parties[0]
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
