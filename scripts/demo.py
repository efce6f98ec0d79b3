"""`make demo`: a complete financing story through the public gRPC API.

Starts the service on a throwaway deployment, registers issuers and investors
through Registering's integration events, sells invoices, places a winning
bid, a losing bid and a bid below the asking price, approves one financing and
reverses another, then prints each aggregate's event stream (the event store)
next to its read-model row (the projection database), and stops the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar
from uuid import UUID

from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel

from financing import logging as service_logging
from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.entrypoints.cli.check import run_check
from financing.entrypoints.cli.populate import populate
from financing.generated import (
    ApproveFinancingCommand,
    BidOnInvoiceCommand,
    CommandsStub,
    Invoice,
    InvoiceStatus,
    Money,
    QueriesStub,
    ReverseFinancingCommand,
    SellInvoiceCommand,
    Uuid,
)
from scripts.sandbox import sandbox
from tests.support.deployment import LocalDeployment
from tests.support.infra import wait_until

T = TypeVar("T")
WIDTH = 92


def step(text: str) -> None:
    print(f"  - {text}")


class Story:
    def __init__(self, box: LocalDeployment) -> None:
        self.box = box
        self.commands_channel = Channel(*box.command_address)
        self.queries_channel = Channel(*box.query_address)
        self.commands = CommandsStub(self.commands_channel)
        self.queries = QueriesStub(self.queries_channel)
        self.names: dict[UUID, str] = {}

    def close(self) -> None:
        self.commands_channel.close()
        self.queries_channel.close()

    async def invoice(self, invoice_id: Uuid) -> Invoice | None:
        reply = await self.queries.all_invoices(Empty())
        return next((i for i in reply.invoices if i.id.value == invoice_id.value), None)

    async def until(self, what: str, probe: Callable[[], Awaitable[T]]) -> T:
        return await wait_until(probe, timeout=20, what=what)

    async def sell(self, issuer: UUID, price: float, label: str) -> Uuid:
        invoice_id = await self.commands.sell_invoice(
            SellInvoiceCommand(issuer_id=Uuid(str(issuer)), asking_price=Money(price))
        )
        self.names[UUID(invoice_id.value)] = label
        await self.until(f"{label} on sale", lambda: self.invoice(invoice_id))
        step(f"{self.names[issuer]} sells {label} asking {price}")
        return invoice_id

    async def bid(self, investor: UUID, invoice_id: Uuid, amount: float) -> None:
        await self.commands.bid_on_invoice(
            BidOnInvoiceCommand(
                investor_id=Uuid(str(investor)), invoice_id=invoice_id, bid=Money(amount)
            )
        )
        step(f"{self.names[investor]} bids {amount} on {self.names[UUID(invoice_id.value)]}")

    async def status(self, invoice_id: Uuid, status: InvoiceStatus) -> None:
        async def reached() -> bool:
            invoice = await self.invoice(invoice_id)
            return invoice is not None and invoice.status == status

        await self.until(f"{self.names[UUID(invoice_id.value)]} {status.name}", reached)

    async def run(self) -> None:
        print("Registering (integration events on the bus):")
        population = await populate(
            [self.box.amqp_url], issuers=2, investors=3, balance=Decimal(100)
        )
        for n, issuer in enumerate(population.issuers, start=1):
            self.names[issuer] = f"issuer {n}"
        for n, investor in enumerate(population.investors, start=1):
            self.names[investor] = f"investor {n}"
        step("2 issuers and 3 investors with a balance of 100 each")

        async def registered() -> bool:
            investors = (await self.queries.all_investors(Empty())).investors
            issuers = (await self.queries.all_issuers(Empty())).issuers
            return len(investors) == 3 and len(issuers) == 2

        await self.until("registrations projected", registered)
        alice, bob, carol = population.investors
        first, second = population.issuers

        print("Financing (commands over gRPC):")
        a = await self.sell(first, 10, "invoice A")
        b = await self.sell(first, 25, "invoice B")
        c = await self.sell(second, 40, "invoice C")

        await self.bid(alice, a, 15)
        await self.status(a, InvoiceStatus.FINANCED)
        step("invoice A is financed by investor 1; the excess 5 goes back to investor 1")
        await self.bid(bob, a, 12)
        step("invoice A is already financed: investor 2's bid is rejected and released")
        await self.bid(bob, b, 25)
        await self.status(b, InvoiceStatus.FINANCED)
        await self.bid(carol, c, 30)
        step("30 is below invoice C's asking price of 40: rejected and released")
        await self.bid(carol, c, 40)
        await self.status(c, InvoiceStatus.FINANCED)

        await self.commands.approve_financing(ApproveFinancingCommand(invoice_id=a))
        await self.status(a, InvoiceStatus.APPROVED)
        step("invoice A approved: investor 1's 10 are committed")
        await self.commands.reverse_financing(ReverseFinancingCommand(invoice_id=c))
        await self.status(c, InvoiceStatus.REVERSED)
        step("invoice C reversed: investor 3 gets its 40 back")

    def readable(self, text: str) -> str:
        """The JSON body as stored, with ids replaced by the story's names."""
        for aggregate_id, name in self.names.items():
            text = text.replace(f'"{aggregate_id}"', name.replace(" ", "_"))
        return text

    async def settle_and_show(self) -> None:
        pool = await create_pool(self.box.command_db)
        try:

            async def settled() -> bool:
                result = await run_check(pool)
                return result.invariants.ok

            await self.until("every saga step to finish", settled)
            store = PostgresEventStore(pool)
            queries = self.queries
            investors = {i.id.value: i for i in (await queries.all_investors(Empty())).investors}
            invoices = {i.id.value: i for i in (await queries.all_invoices(Empty())).invoices}
            issuers = {i.id.value for i in (await queries.all_issuers(Empty())).issuers}
            print()
            print(f"{'EVENT STORE (command database)':<{WIDTH}} │ READ MODEL (query database)")
            print("─" * WIDTH + "─┼─" + "─" * 44)
            for aggregate_id, name in self.names.items():
                key = str(aggregate_id)
                if key in investors:
                    row = investors[key]
                    model = [
                        f"balance  {row.balance.amount:g}",
                        f"reserved {row.reserved.amount:g}",
                    ]
                elif key in invoices:
                    inv = invoices[key]
                    bid = inv.winning_bid
                    model = [
                        f"status {inv.status.name}",
                        f"asking {inv.asking_price.amount:g}",
                        "winning bid "
                        + (
                            f"{bid.amount.amount:g} by {self.names[UUID(bid.investor_id.value)]}"
                            if bid
                            else "none"
                        ),
                    ]
                else:
                    model = ["registered" if key in issuers else "(no row)"]
                events = [
                    f"v{e.version} {e.name} {self.readable(e.body)}"
                    for e in await store.stream(aggregate_id)
                ]
                print(f"{name.upper()}  {key}")
                for i in range(max(len(events), len(model))):
                    left = events[i] if i < len(events) else ""
                    right = model[i] if i < len(model) else ""
                    if len(left) > WIDTH:
                        left = left[: WIDTH - 1] + "…"
                    print(f"  {left:<{WIDTH - 2}} │ {right}")
                print()
            result = await run_check(pool)
            print("\n".join(result.invariants.lines()))
        finally:
            await pool.close()


async def main() -> None:
    # The story's own lines only: what the service's code says in this process (the
    # broker connection of `populate`) only when it is a warning, as an operator's
    # command says it.
    service_logging.configure("WARNING")
    async with sandbox("financing_demo") as box:
        print(
            f"financing serve is running (commands {box.command_address[1]}, "
            f"queries {box.query_address[1]}; log {box.service.log_path})\n"
        )
        story = Story(box)
        try:
            await story.run()
            await story.settle_and_show()
        finally:
            story.close()
        print("\nstopping the service (SIGTERM)")
    print("service stopped cleanly (exit code 0)")


if __name__ == "__main__":
    asyncio.run(main())
