"""Across a restart the read models keep what they had and take in what arrived meanwhile.

The service is stopped with SIGTERM (exit code 0); Registering publishes while
it is down; once started again the Queries API lists the earlier state
unchanged and the investor registered during the outage.
"""

from __future__ import annotations

import pytest

from tests.acceptance.driver import (
    Financing,
    ListedInvestor,
    ListedInvoice,
    Listing,
    eventually_equal,
    new_id,
)
from tests.acceptance.expected import money
from tests.acceptance.system import ServiceProcess

pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]


async def test_read_models_survive_a_restart_and_take_in_what_was_published_meanwhile(
    financing: Financing, service: ServiceProcess
) -> None:
    financed = await financing.finance_invoice(asking_price=10, bid=20, balance=100)
    before = Listing(
        investors=(ListedInvestor(str(financed.investor_id), money(90), money(10)),),
        invoices=(
            ListedInvoice(
                str(financed.invoice_id),
                str(financed.issuer_id),
                money(10),
                "FINANCED",
                (str(financed.investor_id), money(20)),
            ),
        ),
        issuers=(str(financed.issuer_id),),
    )
    ids = [financed.investor_id, financed.invoice_id, financed.issuer_id]

    async def read() -> Listing:
        return (await financing.listing()).only(ids)

    await eventually_equal(read, before, what="the financed invoice before the restart")

    assert await service.stop() == 0, "the service did not exit cleanly on SIGTERM"
    registered_meanwhile = new_id()
    await financing.publish_investor_registered(registered_meanwhile, 50)
    await service.start()

    ids.append(registered_meanwhile)
    await eventually_equal(
        read,
        Listing(
            investors=(
                *before.investors,
                ListedInvestor(str(registered_meanwhile), money(50), money(0)),
            ),
            invoices=before.invoices,
            issuers=before.issuers,
        ),
        what="the earlier rows unchanged, then the investor registered during the outage",
    )
