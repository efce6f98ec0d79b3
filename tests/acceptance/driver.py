"""Scenario steps in the domain's words, over the service's public interfaces only.

Registering's integration events go on the `events` exchange; commands go
through the Commands gRPC API; outcomes are read from the domain events on
the bus, the dead letters and the Queries gRPC API.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel

from financing.generated import (
    ApproveFinancingCommand,
    BidOnInvoiceCommand,
    CommandsStub,
    Investor,
    Invoice,
    InvoiceStatus,
    Money,
    QueriesStub,
    ReverseFinancingCommand,
    SellInvoiceCommand,
    Uuid,
)
from tests.acceptance import expected as ex
from tests.acceptance.bus import (
    DEAD_LETTER_TIMEOUT,
    DEFAULT_TIMEOUT,
    Broker,
    EventLog,
    MessageLog,
    Observed,
)
from tests.acceptance.expected import Amount, Expected
from tests.acceptance.system import System
from tests.support import infra


def new_id() -> UUID:
    return uuid.uuid4()


class ListedInvestor(NamedTuple):
    id: str
    balance: Decimal
    reserved: Decimal


class ListedInvoice(NamedTuple):
    id: str
    issuer_id: str
    asking_price: Decimal
    status: str
    winning_bid: tuple[str, Decimal] | None  # (investor id, amount); None while absent


@dataclass(frozen=True)
class Listing:
    """The three Queries lists, in the order the service returned them; money exact."""

    investors: tuple[ListedInvestor, ...]
    invoices: tuple[ListedInvoice, ...]
    issuers: tuple[str, ...]

    def only(self, ids: Iterable[UUID | str]) -> Listing:
        """The rows of these ids only, order kept (a shared deployment lists others' rows too)."""
        wanted = {str(i) for i in ids}
        return Listing(
            investors=tuple(i for i in self.investors if i.id in wanted),
            invoices=tuple(i for i in self.invoices if i.id in wanted),
            issuers=tuple(i for i in self.issuers if i in wanted),
        )


def grpc_money(amount: Amount | float) -> Money:
    return Money(amount=float(amount))


@dataclass(frozen=True)
class FinancedInvoice:
    invoice_id: UUID
    issuer_id: UUID
    investor_id: UUID
    asking_price: Decimal
    bid: Decimal
    balance: Decimal  # the investor's balance before the bid


class Financing:
    def __init__(
        self,
        commands: CommandsStub,
        queries: QueriesStub,
        broker: Broker,
        events: EventLog,
        dead_letters: MessageLog,
    ) -> None:
        self.commands = commands
        self.queries = queries
        self.broker = broker
        self.events = events
        self.dead_letters = dead_letters

    # -- Registering's integration events ---------------------------------------------------

    async def publish_issuer_registered(
        self, issuer_id: UUID, *, message_id: str | None = None
    ) -> str:
        body = {"ID": str(issuer_id), "Name": f"issuer {issuer_id.hex[:6]}"}
        return await self.broker.publish_event("IssuerRegistered", body, message_id=message_id)

    async def publish_investor_registered(
        self, investor_id: UUID, balance: Amount, *, message_id: str | None = None
    ) -> str:
        body = {
            "ID": str(investor_id),
            "Name": f"investor {investor_id.hex[:6]}",
            "Balance": ex.money(balance),
        }
        return await self.broker.publish_event("InvestorRegistered", body, message_id=message_id)

    async def register_issuer(self) -> UUID:
        """An issuer that exists: its IssuerCreatedEvent has been published."""
        issuer_id = new_id()
        since = self.events.mark()
        await self.publish_issuer_registered(issuer_id)
        await ex.expect_events(self.events, [ex.issuer_created(issuer_id)], since=since)
        return issuer_id

    async def register_investor(self, balance: Amount) -> UUID:
        """An investor that exists with this balance: its creation events have been published."""
        investor_id = new_id()
        since = self.events.mark()
        await self.publish_investor_registered(investor_id, balance)
        await ex.expect_events(
            self.events,
            [ex.investor_created(investor_id), ex.investor_funds_added(investor_id, balance)],
            since=since,
        )
        return investor_id

    # -- Commands ---------------------------------------------------------------------------

    async def sell_invoice(self, issuer_id: UUID, asking_price: Amount | float) -> UUID:
        reply = await self.commands.sell_invoice(
            SellInvoiceCommand(
                issuer_id=Uuid(str(issuer_id)), asking_price=grpc_money(asking_price)
            )
        )
        return UUID(reply.value)

    async def put_invoice_on_sale(self, asking_price: Amount) -> tuple[UUID, UUID]:
        """A registered issuer's invoice, created: (invoice id, issuer id)."""
        issuer_id = await self.register_issuer()
        since = self.events.mark()
        invoice_id = await self.sell_invoice(issuer_id, asking_price)
        await ex.expect_events(
            self.events, [ex.invoice_created(invoice_id, issuer_id, asking_price)], since=since
        )
        return invoice_id, issuer_id

    async def bid(self, investor_id: UUID, invoice_id: UUID, amount: Amount | float) -> None:
        await self.commands.bid_on_invoice(
            BidOnInvoiceCommand(
                investor_id=Uuid(str(investor_id)),
                invoice_id=Uuid(str(invoice_id)),
                bid=grpc_money(amount),
            )
        )

    async def approve(self, invoice_id: UUID) -> None:
        await self.commands.approve_financing(
            ApproveFinancingCommand(invoice_id=Uuid(str(invoice_id)))
        )

    async def reverse(self, invoice_id: UUID) -> None:
        await self.commands.reverse_financing(
            ReverseFinancingCommand(invoice_id=Uuid(str(invoice_id)))
        )

    async def finance_invoice(
        self, asking_price: Amount = 10, bid: Amount = 20, balance: Amount = 100
    ) -> FinancedInvoice:
        """Scenario 5 up to its events: a bid covering the price finances the invoice."""
        invoice_id, issuer_id = await self.put_invoice_on_sale(asking_price)
        investor_id = await self.register_investor(balance)
        since = self.events.mark()
        await self.bid(investor_id, invoice_id, bid)
        excess = ex.money(bid) - ex.money(asking_price)
        expected = [
            ex.bid_on_invoice_placed(investor_id, invoice_id, bid),
            ex.invoice_financed(invoice_id, asking_price, investor_id, bid),
        ]
        if excess > 0:
            expected.append(ex.investor_funds_released(investor_id, excess))
        await ex.expect_events(self.events, expected, since=since)
        return FinancedInvoice(
            invoice_id=invoice_id,
            issuer_id=issuer_id,
            investor_id=investor_id,
            asking_price=ex.money(asking_price),
            bid=ex.money(bid),
            balance=ex.money(balance),
        )

    async def reverse_financed(self, financed: FinancedInvoice) -> None:
        """Scenario 9 up to its events: the financing reversed, the price released to the
        investor."""
        since = self.events.mark()
        await self.reverse(financed.invoice_id)
        await ex.expect_events(
            self.events,
            [
                ex.invoice_reversed(
                    financed.invoice_id, financed.asking_price, financed.investor_id, financed.bid
                ),
                ex.investor_funds_released(financed.investor_id, financed.asking_price),
            ],
            since=since,
        )

    # -- Dead letters -----------------------------------------------------------------------

    async def dead_letter(
        self,
        *,
        since: int,
        source_queue: str,
        message_id: str | None = None,
        body: dict[str, Any] | None = None,
        within: float = DEAD_LETTER_TIMEOUT,
    ) -> Observed:
        """The dead letter of a message from `source_queue` (by its id, or by body fields).

        It must say why: a non-empty `x-death-reason`, every header a string.
        """

        def match(letter: Observed) -> bool:
            if letter.source_queue != source_queue:
                return False
            if message_id is not None and letter.message_id != message_id:
                return False
            if body is not None:
                data = letter.data
                return isinstance(data, dict) and all(data.get(k) == v for k, v in body.items())
            return True

        [letter, *_] = await self.dead_letters.wait_for(match, since=since, within=within)
        assert letter.reason, f"dead letter without a reason: {letter.headers}"
        not_strings = {k: v for k, v in letter.headers.items() if not isinstance(v, str)}
        assert not not_strings, f"dead letter headers that are not strings: {not_strings}"
        return letter

    # -- Domain events of another publisher -------------------------------------------------

    async def publish_domain_events(self, *events: Expected) -> list[str]:
        """Domain events on `events` as a reference relayer puts them there; their message ids.

        Only the three watermill headers (`_watermill_message_uuid`, random;
        `name`; `aggregateID`), the body as the contract spells it. Such events
        exist only on the bus, never in this service's event store.
        """
        return [
            await self.broker.publish_event(e.name, e.body, aggregate_id=e.aggregate_id)
            for e in events
        ]

    # -- Read models ------------------------------------------------------------------------

    async def listing(self) -> Listing:
        """AllInvestors, AllInvoices and AllIssuers, read one after the other."""
        investors = await self.queries.all_investors(Empty())
        invoices = await self.queries.all_invoices(Empty())
        issuers = await self.queries.all_issuers(Empty())
        return Listing(
            investors=tuple(
                ListedInvestor(i.id.value, _exact(i.balance.amount), _exact(i.reserved.amount))
                for i in investors.investors
            ),
            invoices=tuple(_listed_invoice(i) for i in invoices.invoices),
            issuers=tuple(i.id.value for i in issuers.issuers),
        )

    async def investor_view(self, investor_id: UUID) -> Investor | None:
        reply = await self.queries.all_investors(Empty())
        return next((i for i in reply.investors if i.id.value == str(investor_id)), None)

    async def invoice_view(self, invoice_id: UUID) -> Invoice | None:
        reply = await self.queries.all_invoices(Empty())
        return next((i for i in reply.invoices if i.id.value == str(invoice_id)), None)

    async def investor_funds(self, investor_id: UUID) -> tuple[Decimal, Decimal] | None:
        """(balance, reserved) as the read model shows them; None until it lists the investor."""
        view = await self.investor_view(investor_id)
        if view is None:
            return None
        return _exact(view.balance.amount), _exact(view.reserved.amount)

    async def invoice_state(
        self, invoice_id: UUID
    ) -> tuple[str, str | None, Decimal | None] | None:
        """(status, winning bidder, winning amount) as the read model shows them."""
        view = await self.invoice_view(invoice_id)
        if view is None:
            return None
        status = InvoiceStatus(view.status).name or ""
        bid = view.winning_bid
        if bid is None:
            return status, None, None
        return status, bid.investor_id.value, _exact(bid.amount.amount)


def _listed_invoice(view: Invoice) -> ListedInvoice:
    bid = view.winning_bid
    return ListedInvoice(
        view.id.value,
        view.issuer_id.value,
        _exact(view.asking_price.amount),
        InvoiceStatus(view.status).name or "",
        None if bid is None else (bid.investor_id.value, _exact(bid.amount.amount)),
    )


def _exact(amount: float) -> Decimal:
    """The double as its shortest decimal form (what the service means by it)."""
    return Decimal(repr(amount))


async def eventually_equal(
    read: Callable[[], Awaitable[object]],
    expected: object,
    *,
    what: str,
    within: float = DEFAULT_TIMEOUT,
) -> None:
    """Poll `read` until it returns `expected`; after `within` seconds show the last value read."""
    last: list[object] = []

    async def probe() -> bool:
        last[:] = [await read()]
        return last[0] == expected

    try:
        await infra.wait_until(probe, timeout=within, what=what)
    except AssertionError:
        shown = repr(last[0]) if last else "nothing"
        raise AssertionError(
            f"timed out after {within}s waiting for {what}:"
            f" expected {expected!r}, last read {shown}"
        ) from None


@contextlib.asynccontextmanager
async def financing_for(system: System) -> AsyncIterator[Financing]:
    """A driver for `system`, with gRPC channels that close on exit."""
    commands = Channel(system.command_address.host, system.command_address.port)
    queries = Channel(system.query_address.host, system.query_address.port)
    try:
        yield Financing(
            CommandsStub(commands, timeout=10),
            QueriesStub(queries, timeout=10),
            system.broker,
            system.events,
            system.dead_letters,
        )
    finally:
        commands.close()
        queries.close()
