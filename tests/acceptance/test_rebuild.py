"""`financing projections rebuild` on a running deployment yields what the live projector built.

Every scenario of docs/domain.md runs on a deployment of this module's own, through
gRPC and Registering's integration events. Once everything is settled the
three lists are read, the read models are rebuilt from the event store while
the service keeps running, and the lists must come back identical: same rows,
same order. A row that never was in the event store (a foreign publisher's
event) must be gone, which shows the rebuild really replaced the read models.
The live projector then goes on projecting into the rebuilt read models, also
when sagas run while the rebuild swaps them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import NamedTuple
from uuid import UUID

import asyncpg
import pytest

from financing.adapters.postgres.connection import create_pool
from financing.config import Settings
from financing.entrypoints.cli.check import CheckResult, run_check
from tests.acceptance import expected as ex
from tests.acceptance.driver import (
    FinancedInvoice,
    Financing,
    ListedInvestor,
    ListedInvoice,
    Listing,
    eventually_equal,
    financing_for,
    new_id,
)
from tests.acceptance.expected import money
from tests.acceptance.system import System, local_system
from tests.support import infra
from tests.support.service import run_cli

pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]

SETTLE_TIMEOUT = 20.0
# Sagas side by side while a rebuild runs.
SAGAS = 4


@dataclass
class Created:
    """The ids every scenario created: what the lists must hold, no more."""

    investors: set[str] = field(default_factory=set)
    invoices: set[str] = field(default_factory=set)
    issuers: set[str] = field(default_factory=set)

    def add(
        self,
        *,
        investors: tuple[UUID, ...] = (),
        invoices: tuple[UUID, ...] = (),
        issuers: tuple[UUID, ...] = (),
    ) -> None:
        self.investors |= {str(i) for i in investors}
        self.invoices |= {str(i) for i in invoices}
        self.issuers |= {str(i) for i in issuers}


async def every_scenario(financing: Financing, created: Created) -> None:
    """Scenarios 1 to 10, side by side; returns once each one's outcome is on the bus."""

    async def registrations() -> None:  # scenarios 1 and 2
        created.add(issuers=(await financing.register_issuer(),))
        created.add(investors=(await financing.register_investor(100),))

    async def sale() -> None:  # scenario 3
        invoice_id, issuer_id = await financing.put_invoice_on_sale(20)
        created.add(invoices=(invoice_id,), issuers=(issuer_id,))

    async def sale_by_an_unregistered_issuer() -> None:  # scenario 4
        letters_since = financing.dead_letters.mark()
        issuer_id = new_id()
        invoice_id = await financing.sell_invoice(issuer_id, 20)
        await financing.dead_letter(
            since=letters_since,
            source_queue="SellInvoice",
            body={"InvoiceID": str(invoice_id), "IssuerID": str(issuer_id)},
        )

    async def financing_approved_reversed_outbid() -> None:  # scenarios 5, 8, 9, 10
        approved, reversed_, outbid = await asyncio.gather(
            *(financing.finance_invoice() for _ in range(3))
        )
        for financed in (approved, reversed_, outbid):
            created.add(
                investors=(financed.investor_id,),
                invoices=(financed.invoice_id,),
                issuers=(financed.issuer_id,),
            )
        latecomer = await financing.register_investor(100)
        created.add(investors=(latecomer,))
        since = financing.events.mark()
        await financing.approve(approved.invoice_id)
        await financing.reverse(reversed_.invoice_id)
        await financing.bid(latecomer, outbid.invoice_id, 15)
        for expected in (
            [
                ex.invoice_approved(approved.invoice_id, 10, approved.investor_id, 20),
                ex.investor_funds_committed(approved.investor_id, 10),
            ],
            [
                ex.invoice_reversed(reversed_.invoice_id, 10, reversed_.investor_id, 20),
                ex.investor_funds_released(reversed_.investor_id, 10),
            ],
            [
                ex.bid_on_invoice_placed(latecomer, outbid.invoice_id, 15),
                ex.bid_on_invoice_rejected(outbid.invoice_id, latecomer, 15),
                ex.investor_funds_released(latecomer, 15),
            ],
        ):
            await ex.expect_events(financing.events, expected, since=since)

    async def rejected_bid() -> None:  # scenario 6
        invoice_id, issuer_id = await financing.put_invoice_on_sale(10)
        investor_id = await financing.register_investor(100)
        created.add(investors=(investor_id,), invoices=(invoice_id,), issuers=(issuer_id,))
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

    async def bid_beyond_the_balance() -> None:  # scenario 7
        invoice_id, issuer_id = await financing.put_invoice_on_sale(10)
        investor_id = await financing.register_investor(5)
        created.add(investors=(investor_id,), invoices=(invoice_id,), issuers=(issuer_id,))
        letters_since = financing.dead_letters.mark()
        await financing.bid(investor_id, invoice_id, 10)
        await financing.dead_letter(
            since=letters_since,
            source_queue="BidOnInvoice",
            body={"InvestorID": str(investor_id), "InvoiceID": str(invoice_id)},
        )

    await asyncio.gather(
        registrations(),
        sale(),
        sale_by_an_unregistered_issuer(),
        financing_approved_reversed_outbid(),
        rejected_bid(),
        bid_beyond_the_balance(),
    )


@contextlib.asynccontextmanager
async def pools(system: System) -> AsyncIterator[tuple[asyncpg.Pool, asyncpg.Pool]]:
    settings = Settings.from_env(system.env)
    events = await create_pool(settings.command_db)
    try:
        queries = await create_pool(settings.query_db)
        try:
            yield events, queries
        finally:
            await queries.close()
    finally:
        await events.close()


async def settled(events: asyncpg.Pool, queries: asyncpg.Pool) -> CheckResult:
    """Wait until the invariants hold and the read models equal a replay of the event store."""
    last: list[CheckResult] = []

    async def probe() -> bool:
        last[:] = [await run_check(events, queries)]
        return last[0].ok

    try:
        await infra.wait_until(probe, timeout=SETTLE_TIMEOUT, interval=0.1, what="a clean check")
    except AssertionError:
        shown = "\n".join(last[0].lines()) if last else "no check ran"
        raise AssertionError(f"not settled within {SETTLE_TIMEOUT}s:\n{shown}") from None
    return last[0]


REBUILT = re.compile(
    r"rebuilt read models from (\d+) event\(s\)(?: and (\d+) of another relayer)?:"
    r" (\d+) investor\(s\), (\d+) invoice\(s\), (\d+) issuer\(s\)"
)


@dataclass(frozen=True)
class Deployment:
    system: System
    financing: Financing
    event_pool: asyncpg.Pool
    query_pool: asyncpg.Pool


@pytest.fixture(scope="module")
async def deployment() -> AsyncIterator[Deployment]:
    async with (
        local_system() as system,
        financing_for(system) as financing,
        pools(system) as (event_pool, query_pool),
    ):
        yield Deployment(system, financing, event_pool, query_pool)


class RebuildCounts(NamedTuple):
    investors: int
    invoices: int
    issuers: int
    foreign: int = 0  # events of another relayer replayed


async def rebuild(system: System) -> RebuildCounts:
    """`financing projections rebuild` beside the running service; the rows it reports."""
    run = await run_cli(system.env, "projections", "rebuild")
    assert run.exit_code == 0, run.describe()
    counts = REBUILT.search(run.stdout)
    assert counts is not None, run.describe()
    _, foreign, investors, invoices, issuers = (int(n or 0) for n in counts.groups())
    return RebuildCounts(investors, invoices, issuers, foreign)


async def test_rebuild_on_a_running_service_yields_exactly_the_live_read_models(
    deployment: Deployment,
) -> None:
    system, financing = deployment.system, deployment.financing
    earlier = await financing.listing()
    created = Created()
    await every_scenario(financing, created)
    await settled(deployment.event_pool, deployment.query_pool)
    live = await financing.listing()
    added = Listing(
        live.investors[len(earlier.investors) :],
        live.invoices[len(earlier.invoices) :],
        live.issuers[len(earlier.issuers) :],
    )
    assert sorted(i.id for i in added.investors) == sorted(created.investors), live
    assert sorted(i.id for i in added.invoices) == sorted(created.invoices), live
    assert sorted(added.issuers) == sorted(created.issuers), live
    # A row of another relayer's event (a reference relayer's): in the read models, never
    # in the event store. Regression: a rebuild dropped it (and `check` failed until then).
    foreign = new_id()
    await financing.publish_domain_events(ex.issuer_created(foreign))
    await eventually_equal(
        lambda: listed_issuers(financing, foreign), (str(foreign),), what="the foreign issuer"
    )
    live = await financing.listing()
    assert (await run_cli(system.env, "check")).exit_code == 0

    counts = await rebuild(system)

    assert counts == RebuildCounts(
        len(live.investors), len(live.invoices), len(live.issuers), foreign=1
    )
    rebuilt = await financing.listing()
    assert rebuilt == live, differences(live, rebuilt)
    check = await run_cli(system.env, "check")
    assert check.exit_code == 0, check.describe()

    # The running projector goes on projecting into the rebuilt read models.
    newcomer = await financing.register_investor(30)
    await eventually_equal(
        financing.listing,
        Listing(
            investors=(*live.investors, ListedInvestor(str(newcomer), money(30), money(0))),
            invoices=live.invoices,
            issuers=live.issuers,
        ),
        what="the rebuilt lists with the investor registered after the rebuild",
    )
    await settled(deployment.event_pool, deployment.query_pool)


async def test_rebuild_while_sagas_run_settles_on_what_a_replay_of_the_event_store_gives(
    deployment: Deployment,
) -> None:
    system, financing = deployment.system, deployment.financing
    running = asyncio.create_task(rebuild(system))
    financed: list[FinancedInvoice] = []
    # Keep sagas going until the rebuild is over, so that some straddle its swap.
    while not financed or not running.done():
        financed += await asyncio.gather(*(financing.finance_invoice() for _ in range(SAGAS)))
    await running

    await settled(deployment.event_pool, deployment.query_pool)
    ids = [i for f in financed for i in (f.investor_id, f.invoice_id, f.issuer_id)]
    listing = (await financing.listing()).only(ids)
    # Sagas side by side create their rows in any order: compare the rows as sets.
    assert sorted(listing.investors) == sorted(
        ListedInvestor(str(f.investor_id), money(90), money(10)) for f in financed
    )
    assert sorted(listing.invoices) == sorted(
        ListedInvoice(
            str(f.invoice_id),
            str(f.issuer_id),
            money(10),
            "FINANCED",
            (str(f.investor_id), money(20)),
        )
        for f in financed
    )
    assert sorted(listing.issuers) == sorted(str(f.issuer_id) for f in financed)
    check = await run_cli(system.env, "check")
    assert check.exit_code == 0, check.describe()


async def listed_issuers(financing: Financing, issuer_id: UUID) -> tuple[str, ...]:
    return (await financing.listing()).only([issuer_id]).issuers


def differences(before: Listing, after: Listing) -> str:
    lines = ["the rebuilt lists differ from the live ones:"]
    for name in ("investors", "invoices", "issuers"):
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            lines.append(f"{name}: {len(old)} rows live, {len(new)} rebuilt")
            lines += [f"  live    {row}" for row in old if row not in new]
            lines += [f"  rebuilt {row}" for row in new if row not in old]
            if set(old) == set(new):
                lines.append("  same rows, in another order")
    return "\n".join(lines)
