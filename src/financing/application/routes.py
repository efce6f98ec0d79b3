"""Which handler each message name goes to: the application's whole routing table.

Each route is named after its handler; that name identifies the consumer in
the processed-message records, so it must not change once deployed. How a
route is fed (which queue, which exchange) is the broker adapter's concern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from financing.application import handlers, integration, policies
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    InvestorRegistered,
    IssuerRegistered,
    ReverseFinancing,
    SellInvoice,
)
from financing.application.pipeline import SendingHandler, StoreHandler
from financing.domain import events as ev

H = TypeVar("H", StoreHandler, SendingHandler)


@dataclass(frozen=True)
class Route(Generic[H]):
    """One message name and the handler it goes to."""

    message_name: str
    handler: H

    @property
    def consumer(self) -> str:
        """The handler's name: who processed a message, in the exactly-once records."""
        return self.handler.__name__


def _routes(table: dict[str, H]) -> tuple[Route[H], ...]:
    return tuple(Route(name, handler) for name, handler in table.items())


COMMANDS: tuple[Route[StoreHandler], ...] = _routes(
    {
        CreateIssuer.name(): handlers.create_issuer,
        CreateInvestor.name(): handlers.create_investor,
        SellInvoice.name(): handlers.sell_invoice,
        BidOnInvoice.name(): handlers.bid_on_invoice,
        ApproveFinancing.name(): handlers.approve_financing,
        ReverseFinancing.name(): handlers.reverse_financing,
    }
)

POLICIES: tuple[Route[StoreHandler], ...] = _routes(
    {
        ev.BidOnInvoicePlacedEvent.name(): policies.bid_placed_offers_bid_to_invoice,
        ev.BidOnInvoiceRejectedEvent.name(): policies.rejected_bid_releases_funds,
        ev.InvoiceFinancedEvent.name(): policies.financing_releases_excess_bid,
        ev.InvoiceApprovedEvent.name(): policies.approval_commits_funds,
        ev.InvoiceReversedEvent.name(): policies.reversal_releases_funds,
    }
)

INTEGRATION: tuple[Route[SendingHandler], ...] = _routes(
    {
        IssuerRegistered.name(): integration.issuer_registered_creates_issuer,
        InvestorRegistered.name(): integration.investor_registered_creates_investor,
    }
)

# The consumers of the commands Registering's events become (INTEGRATION): their records
# say those events were consumed before.
REGISTRATION_CONSUMERS = tuple(
    route.consumer
    for route in COMMANDS
    if route.message_name in (CreateIssuer.name(), CreateInvestor.name())
)
