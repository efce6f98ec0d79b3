"""Commands and integration events: the messages that are not domain events."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

from financing.domain.events import DomainEvent


@dataclass(frozen=True)
class Command(ABC):
    @classmethod
    def name(cls) -> str:
        return cls.__name__

    @property
    @abstractmethod
    def aggregate_id(self) -> UUID:
        """The id of the aggregate the command's handler changes (its log lines say it)."""


@dataclass(frozen=True)
class SellInvoice(Command):
    invoice_id: UUID
    issuer_id: UUID
    asking_price: Decimal

    @property
    def aggregate_id(self) -> UUID:
        return self.invoice_id


@dataclass(frozen=True)
class BidOnInvoice(Command):
    investor_id: UUID
    invoice_id: UUID
    bid_amount: Decimal

    @property
    def aggregate_id(self) -> UUID:
        return self.investor_id


@dataclass(frozen=True)
class ApproveFinancing(Command):
    invoice_id: UUID

    @property
    def aggregate_id(self) -> UUID:
        return self.invoice_id


@dataclass(frozen=True)
class ReverseFinancing(Command):
    invoice_id: UUID

    @property
    def aggregate_id(self) -> UUID:
        return self.invoice_id


@dataclass(frozen=True)
class CreateInvestor(Command):
    id: UUID
    balance: Decimal

    @property
    def aggregate_id(self) -> UUID:
        return self.id


@dataclass(frozen=True)
class CreateIssuer(Command):
    id: UUID

    @property
    def aggregate_id(self) -> UUID:
        return self.id


@dataclass(frozen=True)
class IntegrationEvent:
    """An event published by another bounded context (Registering)."""

    @classmethod
    def name(cls) -> str:
        return cls.__name__


@dataclass(frozen=True)
class IssuerRegistered(IntegrationEvent):
    id: UUID
    name_: str


@dataclass(frozen=True)
class InvestorRegistered(IntegrationEvent):
    id: UUID
    name_: str
    balance: Decimal


Message = Command | IntegrationEvent | DomainEvent

COMMAND_TYPES: tuple[type[Command], ...] = (
    SellInvoice,
    BidOnInvoice,
    ApproveFinancing,
    ReverseFinancing,
    CreateInvestor,
    CreateIssuer,
)
INTEGRATION_TYPES: tuple[type[IntegrationEvent], ...] = (IssuerRegistered, InvestorRegistered)
