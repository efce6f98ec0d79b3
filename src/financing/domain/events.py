"""Domain events of the financing context.

Class names are the event names on the wire (docs/contract.md section 2) and field
names map one-to-one onto the Go field names of the JSON bodies.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar
from uuid import UUID


@dataclass(frozen=True)
class Bid:
    investor_id: UUID
    amount: Decimal


@dataclass(frozen=True)
class DomainEvent:
    """Base of all domain events; `aggregate_type` names the stream they belong to."""

    aggregate_type: ClassVar[str]

    @property
    def aggregate_id(self) -> UUID:
        raise NotImplementedError

    @classmethod
    def name(cls) -> str:
        return cls.__name__


# Issuer


@dataclass(frozen=True)
class IssuerEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "Issuer"
    issuer_id: UUID

    @property
    def aggregate_id(self) -> UUID:
        return self.issuer_id


@dataclass(frozen=True)
class IssuerCreatedEvent(IssuerEvent):
    pass


# Investor


@dataclass(frozen=True)
class InvestorEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "Investor"
    investor_id: UUID

    @property
    def aggregate_id(self) -> UUID:
        return self.investor_id


@dataclass(frozen=True)
class InvestorCreatedEvent(InvestorEvent):
    pass


@dataclass(frozen=True)
class InvestorFundsAddedEvent(InvestorEvent):
    amount: Decimal


@dataclass(frozen=True)
class BidOnInvoicePlacedEvent(InvestorEvent):
    invoice_id: UUID
    bid_amount: Decimal


@dataclass(frozen=True)
class InvestorFundsReleasedEvent(InvestorEvent):
    amount: Decimal


@dataclass(frozen=True)
class InvestorFundsCommittedEvent(InvestorEvent):
    amount: Decimal


# Invoice


@dataclass(frozen=True)
class InvoiceEvent(DomainEvent):
    aggregate_type: ClassVar[str] = "Invoice"
    invoice_id: UUID

    @property
    def aggregate_id(self) -> UUID:
        return self.invoice_id


@dataclass(frozen=True)
class InvoiceCreatedEvent(InvoiceEvent):
    issuer_id: UUID
    asking_price: Decimal


@dataclass(frozen=True)
class InvoiceFinancedEvent(InvoiceEvent):
    asking_price: Decimal
    bid: Bid


@dataclass(frozen=True)
class BidOnInvoiceRejectedEvent(InvoiceEvent):
    bid: Bid


@dataclass(frozen=True)
class InvoiceApprovedEvent(InvoiceEvent):
    sold_price: Decimal
    bid: Bid


@dataclass(frozen=True)
class InvoiceReversedEvent(InvoiceEvent):
    sold_price: Decimal
    bid: Bid


EVENT_TYPES: tuple[type[DomainEvent], ...] = (
    IssuerCreatedEvent,
    InvestorCreatedEvent,
    InvestorFundsAddedEvent,
    BidOnInvoicePlacedEvent,
    InvestorFundsReleasedEvent,
    InvestorFundsCommittedEvent,
    InvoiceCreatedEvent,
    InvoiceFinancedEvent,
    BidOnInvoiceRejectedEvent,
    InvoiceApprovedEvent,
    InvoiceReversedEvent,
)
