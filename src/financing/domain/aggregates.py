"""The three aggregates: Issuer, Investor and Invoice.

Each aggregate is rebuilt by applying its past events (`apply`), decides with
command methods that return the new events (already applied to itself) and
never performs I/O. A rule that forbids a command raises `RuleViolation`.
A command that has nothing to do (amounts <= 0, approving an invoice that is
not financed) produces no event and notes why in `unchanged`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, ClassVar, Self
from uuid import UUID

from financing.domain.events import (
    Bid,
    BidOnInvoicePlacedEvent,
    BidOnInvoiceRejectedEvent,
    DomainEvent,
    InvestorCreatedEvent,
    InvestorFundsAddedEvent,
    InvestorFundsCommittedEvent,
    InvestorFundsReleasedEvent,
    InvoiceApprovedEvent,
    InvoiceCreatedEvent,
    InvoiceFinancedEvent,
    InvoiceReversedEvent,
    IssuerCreatedEvent,
)
from financing.domain.money import ZERO, add, canonical, subtract


class RuleViolation(Exception):
    """A command that the domain refuses; permanent, so its message is dead-lettered."""


class ForeignId(RuleViolation):
    """A command names an aggregate by an id whose stream is another type's: an issuer's
    id given as an invoice's, say. Ids are unique across types, so the aggregate it asks
    for cannot exist, nor be created under that id."""


class Aggregate:
    """An event-sourced entity: its state is the fold of its events."""

    aggregate_type: ClassVar[str]

    def __init__(self, aggregate_id: UUID) -> None:
        self.id = aggregate_id
        self.version = 0  # number of events applied, new ones included
        self.changes: list[DomainEvent] = []  # raised since load, not yet stored
        self.unchanged: list[str] = []  # why commands since load changed nothing

    @property
    def exists(self) -> bool:
        return self.version > 0

    @property
    def stored_version(self) -> int:
        """The version the event store held when this aggregate was loaded."""
        return self.version - len(self.changes)

    def apply(self, event: DomainEvent) -> None:
        if event.aggregate_type != self.aggregate_type:
            raise ForeignId(
                f"{self.id} is the id of an {event.aggregate_type}, not of an {self.aggregate_type}"
            )
        self.when(event)
        self.version += 1

    def replay(self, events: Iterable[DomainEvent]) -> Self:
        for event in events:
            self.apply(event)
        return self

    def _raise(self, *events: DomainEvent) -> list[DomainEvent]:
        for event in events:
            self.apply(event)
            self.changes.append(event)
        return list(events)

    def _nothing_to_do(self, reason: str) -> list[DomainEvent]:
        self.unchanged.append(f"{self.aggregate_type} {self.id}: {reason}")
        return []

    def when(self, event: DomainEvent) -> None:
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """The state as JSON-ready values (money as strings: exact)."""
        raise NotImplementedError

    @classmethod
    def restore(cls, aggregate_id: UUID, version: int, state: Mapping[str, Any]) -> Self:
        raise NotImplementedError


class Issuer(Aggregate):
    aggregate_type = "Issuer"

    def create(self) -> list[DomainEvent]:
        if self.exists:
            return self._nothing_to_do("already exists")
        return self._raise(IssuerCreatedEvent(issuer_id=self.id))

    def when(self, event: DomainEvent) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {}

    @classmethod
    def restore(cls, aggregate_id: UUID, version: int, state: Mapping[str, Any]) -> Self:
        issuer = cls(aggregate_id)
        issuer.version = version
        return issuer


class Investor(Aggregate):
    aggregate_type = "Investor"

    def __init__(self, aggregate_id: UUID) -> None:
        super().__init__(aggregate_id)
        self.balance = ZERO
        self.reserved = ZERO
        self.committed = ZERO

    def create(self, balance: Decimal) -> list[DomainEvent]:
        if self.exists:
            # Funds are added once, at creation, and only move between the three after.
            registered = add(add(self.balance, self.reserved), self.committed)
            if balance != registered:
                raise RuleViolation(
                    f"investor {self.id} already exists, registered with {registered};"
                    f" registered again with {balance}, which is not applied"
                )
            return self._nothing_to_do("already exists")
        if balance < ZERO:
            raise RuleViolation(f"investor {self.id}: initial balance must be >= 0, got {balance}")
        # Both events, whatever the balance, as the reference raises them: a consumer of
        # `events` sees every investor's first funds, 0 included.
        created = InvestorCreatedEvent(investor_id=self.id)
        return self._raise(created, InvestorFundsAddedEvent(investor_id=self.id, amount=balance))

    def place_bid(self, invoice_id: UUID, amount: Decimal) -> list[DomainEvent]:
        self._must_exist()
        if amount <= ZERO:
            return self._nothing_to_do(f"a bid of {amount} is not a positive amount")
        if self.balance < amount:
            raise RuleViolation(
                f"investor {self.id}: balance {self.balance} is less than the bid {amount}"
            )
        return self._raise(
            BidOnInvoicePlacedEvent(investor_id=self.id, invoice_id=invoice_id, bid_amount=amount)
        )

    def release_funds(self, amount: Decimal) -> list[DomainEvent]:
        self._must_exist()
        if amount <= ZERO:
            return self._nothing_to_do(f"releasing {amount} is not a positive amount")
        if self.reserved < amount:
            raise RuleViolation(
                f"investor {self.id}: cannot release {amount}, only {self.reserved} reserved"
            )
        return self._raise(InvestorFundsReleasedEvent(investor_id=self.id, amount=amount))

    def commit_funds(self, amount: Decimal) -> list[DomainEvent]:
        self._must_exist()
        if amount <= ZERO:
            return self._nothing_to_do(f"committing {amount} is not a positive amount")
        if self.reserved < amount:
            raise RuleViolation(
                f"investor {self.id}: cannot commit {amount}, only {self.reserved} reserved"
            )
        return self._raise(InvestorFundsCommittedEvent(investor_id=self.id, amount=amount))

    def _must_exist(self) -> None:
        if not self.exists:
            raise RuleViolation(f"investor {self.id} does not exist")

    def when(self, event: DomainEvent) -> None:
        match event:
            case InvestorFundsAddedEvent(amount=amount) if amount > ZERO:
                self.balance = add(self.balance, amount)
            case BidOnInvoicePlacedEvent(bid_amount=amount) if amount > ZERO:
                self.balance = subtract(self.balance, amount)
                self.reserved = add(self.reserved, amount)
            case InvestorFundsReleasedEvent(amount=amount) if amount > ZERO:
                self.balance = add(self.balance, amount)
                self.reserved = subtract(self.reserved, amount)
            case InvestorFundsCommittedEvent(amount=amount) if amount > ZERO:
                self.reserved = subtract(self.reserved, amount)
                self.committed = add(self.committed, amount)

    def snapshot(self) -> dict[str, Any]:
        return {
            "balance": canonical(self.balance),
            "reserved": canonical(self.reserved),
            "committed": canonical(self.committed),
        }

    @classmethod
    def restore(cls, aggregate_id: UUID, version: int, state: Mapping[str, Any]) -> Self:
        investor = cls(aggregate_id)
        investor.version = version
        investor.balance = Decimal(state["balance"])
        investor.reserved = Decimal(state["reserved"])
        investor.committed = Decimal(state["committed"])
        return investor


class InvoiceStatus(enum.Enum):
    AVAILABLE = "AVAILABLE"
    FINANCED = "FINANCED"
    APPROVED = "APPROVED"
    REVERSED = "REVERSED"


class Invoice(Aggregate):
    aggregate_type = "Invoice"

    def __init__(self, aggregate_id: UUID) -> None:
        super().__init__(aggregate_id)
        self.issuer_id: UUID | None = None
        self.asking_price = ZERO
        self.status = InvoiceStatus.AVAILABLE
        self.winning_bid: Bid | None = None

    def create(self, issuer_id: UUID, asking_price: Decimal) -> list[DomainEvent]:
        if self.exists:
            return self._nothing_to_do("already exists")
        if asking_price <= ZERO:
            return self._nothing_to_do(f"an asking price of {asking_price} is not positive")
        return self._raise(
            InvoiceCreatedEvent(invoice_id=self.id, issuer_id=issuer_id, asking_price=asking_price)
        )

    def bid(self, bid: Bid) -> list[DomainEvent]:
        """Finance the invoice with a bid covering its price, or reject the bid."""
        self._must_exist()
        if bid.amount <= ZERO:
            return self._nothing_to_do(f"a bid of {bid.amount} is not a positive amount")
        if self.status is InvoiceStatus.AVAILABLE and bid.amount >= self.asking_price:
            return self._raise(
                InvoiceFinancedEvent(invoice_id=self.id, asking_price=self.asking_price, bid=bid)
            )
        return self._raise(BidOnInvoiceRejectedEvent(invoice_id=self.id, bid=bid))

    def approve(self) -> list[DomainEvent]:
        self._must_exist()
        if self.status is not InvoiceStatus.FINANCED or self.winning_bid is None:
            return self._not_financed("approved")
        return self._raise(
            InvoiceApprovedEvent(
                invoice_id=self.id, sold_price=self.asking_price, bid=self.winning_bid
            )
        )

    def reverse(self) -> list[DomainEvent]:
        self._must_exist()
        if self.status is not InvoiceStatus.FINANCED or self.winning_bid is None:
            return self._not_financed("reversed")
        return self._raise(
            InvoiceReversedEvent(
                invoice_id=self.id, sold_price=self.asking_price, bid=self.winning_bid
            )
        )

    def _must_exist(self) -> None:
        if not self.exists:
            raise RuleViolation(f"invoice {self.id} does not exist")

    def _not_financed(self, action: str) -> list[DomainEvent]:
        return self._nothing_to_do(
            f"is {self.status.value}; only a FINANCED invoice can be {action}"
        )

    def when(self, event: DomainEvent) -> None:
        match event:
            case InvoiceCreatedEvent(issuer_id=issuer_id, asking_price=price):
                self.issuer_id = issuer_id
                self.asking_price = price
                self.status = InvoiceStatus.AVAILABLE
            case InvoiceFinancedEvent(bid=bid):
                self.status = InvoiceStatus.FINANCED
                self.winning_bid = bid
            case InvoiceApprovedEvent():
                self.status = InvoiceStatus.APPROVED
            case InvoiceReversedEvent():
                self.status = InvoiceStatus.REVERSED

    def snapshot(self) -> dict[str, Any]:
        bid = self.winning_bid
        return {
            "issuer_id": str(self.issuer_id) if self.issuer_id else None,
            "asking_price": canonical(self.asking_price),
            "status": self.status.value,
            "winning_bid": (
                {"investor_id": str(bid.investor_id), "amount": canonical(bid.amount)}
                if bid
                else None
            ),
        }

    @classmethod
    def restore(cls, aggregate_id: UUID, version: int, state: Mapping[str, Any]) -> Self:
        invoice = cls(aggregate_id)
        invoice.version = version
        invoice.issuer_id = UUID(state["issuer_id"]) if state["issuer_id"] else None
        invoice.asking_price = Decimal(state["asking_price"])
        invoice.status = InvoiceStatus(state["status"])
        bid = state["winning_bid"]
        invoice.winning_bid = (
            Bid(investor_id=UUID(bid["investor_id"]), amount=Decimal(bid["amount"]))
            if bid
            else None
        )
        return invoice


AGGREGATE_TYPES: dict[str, type[Aggregate]] = {
    cls.aggregate_type: cls for cls in (Issuer, Investor, Invoice)
}
