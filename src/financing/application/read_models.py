"""The read side: what the Queries server lists, and the port that keeps it.

The projector folds domain events into three read models (investors, invoices,
issuers). Every implementation of `ReadModelStore` follows the same rules,
checked by one contract test suite:

- A batch is applied atomically, and a message id already applied changes
  nothing, so redelivered events are harmless.
- Amounts <= 0 change nothing; `BidOnInvoiceRejectedEvent` changes no row.
- Lists come in creation order: the order in which rows were first projected.

Events normally arrive in commit order, but a foreign publisher on the
`events` exchange may deliver them out of order. Rather than crash or drop
information, the projection does not depend on order:

- An investor event for an unknown investor creates the row at zero before
  applying its amounts (additions commute, so the balances end up right);
  a late `InvestorCreatedEvent` then changes nothing.
- An invoice event for an unknown invoice creates a row from what the event
  carries (its price, status and bid). The issuer is only known from
  `InvoiceCreatedEvent`, so the invoice is not listed until that arrives,
  and a late `InvoiceCreatedEvent` fills in the issuer without resetting the
  status. Status only moves forward (AVAILABLE -> FINANCED -> APPROVED or
  REVERSED), so a stale event never undoes a later one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Protocol, TypeVar
from uuid import UUID

from financing.domain import events as ev
from financing.domain.aggregates import InvoiceStatus
from financing.domain.events import Bid, DomainEvent
from financing.domain.money import ZERO, add, negate

AVAILABLE = InvoiceStatus.AVAILABLE
FINANCED = InvoiceStatus.FINANCED
APPROVED = InvoiceStatus.APPROVED
REVERSED = InvoiceStatus.REVERSED

# Which statuses each invoice event may move an invoice out of (forward only).
ADVANCES_FROM: dict[InvoiceStatus, frozenset[InvoiceStatus]] = {
    FINANCED: frozenset({AVAILABLE}),
    APPROVED: frozenset({AVAILABLE, FINANCED}),
    REVERSED: frozenset({AVAILABLE, FINANCED}),
}

# The events the read models are built from; any other message is ignored.
PROJECTED_EVENTS: frozenset[str] = frozenset(cls.name() for cls in ev.EVENT_TYPES)

# Rows of a list converted between two turns of the event loop (about a millisecond), so
# that listing a large read model does not hold up the rest of the process.
ROWS_PER_TURN = 500

T = TypeVar("T")
U = TypeVar("U")


async def in_turns(items: Sequence[T], convert: Callable[[T], U]) -> list[U]:
    """`convert` applied to each of `items`, in order; the loop gets a turn every
    ROWS_PER_TURN items (and a call whose caller went away is cancelled there)."""
    converted: list[U] = []
    for start in range(0, len(items), ROWS_PER_TURN):
        if start:
            await asyncio.sleep(0)
        converted += [convert(item) for item in items[start : start + ROWS_PER_TURN]]
    return converted


@dataclass(frozen=True)
class InvestorRow:
    id: UUID
    balance: Decimal
    reserved: Decimal
    committed: Decimal


@dataclass(frozen=True)
class InvoiceRow:
    id: UUID
    issuer_id: UUID
    asking_price: Decimal
    status: InvoiceStatus
    winning_bid: Bid | None


@dataclass(frozen=True)
class IssuerRow:
    id: UUID


# No digests: the events of a batch are all of this service's store.
EMPTY: Mapping[str, str] = MappingProxyType({})
# No recording times: events of another relayer, or a replay that keeps none.
NOT_RECORDED: Mapping[str, datetime] = MappingProxyType({})


@dataclass(frozen=True)
class ForeignEvent:
    """An event of another relayer (in no event store of this service) that the read
    models projected, kept so that a rebuild and a check replay it too."""

    position: int  # in the order projected, from 1
    message_id: str
    event: DomainEvent
    digest: str


class ReadModelStore(Protocol):
    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        """Project (message id, event) pairs in order, all in one transaction; the
        message ids projected now. `digests` holds, by message id, the digest of each
        event of another relayer: such an event is kept (`foreign_events`), and a copy
        of one kept is not projected again, however long ago it was. `recorded` holds,
        by message id, when this service's event store recorded each of its events (the
        relayer's `recorded_at`): kept with the id's record (`recorded_at`).

        A message id already applied, in an earlier batch or earlier in this
        one, changes nothing (and is not among those returned). Raises
        Unavailable when the storage is down; nothing of the batch is applied then.
        """
        ...

    async def digests(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        """The digests of those of `message_ids` kept as events of another relayer."""
        ...

    async def recorded_at(self, message_ids: Sequence[str]) -> Mapping[str, datetime]:
        """When the event store recorded the events of those of `message_ids` projected
        with that time (`apply`'s `recorded`; none for another relayer's events, for
        records of earlier releases, and for records pruned)."""
        ...

    async def foreign_events(self, after: int = 0, limit: int = 1000) -> list[ForeignEvent]:
        """The events applied with a digest (another relayer's), in the order applied,
        from the one after position `after`, at most `limit`; kept for good."""
        ...

    async def investors(self) -> list[InvestorRow]:
        """Every investor, in creation order."""
        ...

    async def invoices(self) -> list[InvoiceRow]:
        """Every invoice whose creation was projected, in creation order."""
        ...

    async def issuers(self) -> list[IssuerRow]:
        """Every issuer, in creation order."""
        ...

    async def unlisted_invoices(self) -> list[UUID]:
        """The invoices whose later events made a row before their creation was
        projected (listed by none of the lists), in the order made."""
        ...


@dataclass(frozen=True)
class InvestorChange:
    """What an investor event does to the investor's amounts."""

    investor_id: UUID
    balance: Decimal
    reserved: Decimal
    committed: Decimal


def investor_change(event: DomainEvent) -> InvestorChange | None:
    """The amounts an investor event moves; None when it moves nothing."""
    match event:
        case ev.InvestorFundsAddedEvent(investor_id=investor, amount=a) if a > ZERO:
            return InvestorChange(investor, a, ZERO, ZERO)
        case ev.BidOnInvoicePlacedEvent(investor_id=investor, bid_amount=a) if a > ZERO:
            return InvestorChange(investor, negate(a), a, ZERO)
        case ev.InvestorFundsReleasedEvent(investor_id=investor, amount=a) if a > ZERO:
            return InvestorChange(investor, a, negate(a), ZERO)
        case ev.InvestorFundsCommittedEvent(investor_id=investor, amount=a) if a > ZERO:
            return InvestorChange(investor, ZERO, negate(a), a)
    return None


@dataclass(frozen=True)
class InvoiceAdvance:
    """An invoice event that moves the invoice's status forward."""

    invoice_id: UUID
    status: InvoiceStatus
    price: Decimal  # the price the event carries, for an invoice not seen yet
    bid: Bid


def invoice_advance(event: DomainEvent) -> InvoiceAdvance | None:
    match event:
        case ev.InvoiceFinancedEvent(invoice_id=invoice, asking_price=price, bid=bid):
            return InvoiceAdvance(invoice, FINANCED, price, bid)
        case ev.InvoiceApprovedEvent(invoice_id=invoice, sold_price=price, bid=bid):
            return InvoiceAdvance(invoice, APPROVED, price, bid)
        case ev.InvoiceReversedEvent(invoice_id=invoice, sold_price=price, bid=bid):
            return InvoiceAdvance(invoice, REVERSED, price, bid)
    return None


@dataclass(frozen=True)
class _Invoice:
    id: UUID
    issuer_id: UUID | None  # None until InvoiceCreatedEvent is projected
    asking_price: Decimal
    status: InvoiceStatus
    winning_bid: Bid | None


class InMemoryReadModels:
    """The read models in dictionaries (insertion order is creation order).

    `remember`: keep the message ids applied, to skip copies, and the events of another
    relayer; a replay of events known to be unique (`financing check`'s, which reads a
    whole event store) keeps neither, and holds only the rows."""

    def __init__(self, *, remember: bool = True) -> None:
        self._investors: dict[UUID, InvestorRow] = {}
        self._invoices: dict[UUID, _Invoice] = {}
        self._issuers: dict[UUID, IssuerRow] = {}
        self._remember = remember
        # Each message id applied, with when its event was recorded (`apply`'s `recorded`).
        self._processed: dict[str, datetime | None] = {}
        self._foreign: dict[str, ForeignEvent] = {}  # by message id, in the order kept

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        fresh: set[str] = set()
        for message_id, event in batch:
            if message_id in self._processed:  # the events kept are among them
                continue
            if self._remember:
                self._processed[message_id] = recorded.get(message_id)
                if (digest := digests.get(message_id)) is not None:
                    position = len(self._foreign) + 1
                    self._foreign[message_id] = ForeignEvent(position, message_id, event, digest)
            fresh.add(message_id)
            self._project(event)
        return fresh

    async def foreign_events(self, after: int = 0, limit: int = 1000) -> list[ForeignEvent]:
        return list(self._foreign.values())[after : after + limit]

    async def digests(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        return {
            message_id: kept.digest
            for message_id in message_ids
            if (kept := self._foreign.get(message_id)) is not None
        }

    async def recorded_at(self, message_ids: Sequence[str]) -> Mapping[str, datetime]:
        return {
            message_id: at
            for message_id in message_ids
            if (at := self._processed.get(message_id)) is not None
        }

    def _project(self, event: DomainEvent) -> None:
        match event:
            case ev.IssuerCreatedEvent(issuer_id=issuer):
                self._issuers.setdefault(issuer, IssuerRow(issuer))
            case ev.InvestorCreatedEvent(investor_id=investor):
                self._investors.setdefault(investor, InvestorRow(investor, ZERO, ZERO, ZERO))
            case ev.InvoiceCreatedEvent(invoice_id=invoice, issuer_id=issuer, asking_price=price):
                known = self._invoices.get(invoice)
                if known is None:
                    self._invoices[invoice] = _Invoice(invoice, issuer, price, AVAILABLE, None)
                elif known.issuer_id is None:
                    self._invoices[invoice] = replace(known, issuer_id=issuer, asking_price=price)
            case _:
                if (change := investor_change(event)) is not None:
                    self._change_investor(change)
                elif (advance := invoice_advance(event)) is not None:
                    self._advance_invoice(advance)

    def _change_investor(self, change: InvestorChange) -> None:
        row = self._investors.get(change.investor_id) or InvestorRow(
            change.investor_id, ZERO, ZERO, ZERO
        )
        self._investors[change.investor_id] = InvestorRow(
            row.id,
            add(row.balance, change.balance),
            add(row.reserved, change.reserved),
            add(row.committed, change.committed),
        )

    def _advance_invoice(self, advance: InvoiceAdvance) -> None:
        known = self._invoices.get(advance.invoice_id)
        if known is None:
            self._invoices[advance.invoice_id] = _Invoice(
                advance.invoice_id, None, advance.price, advance.status, advance.bid
            )
        elif known.status in ADVANCES_FROM[advance.status]:
            self._invoices[advance.invoice_id] = replace(
                known, status=advance.status, winning_bid=known.winning_bid or advance.bid
            )

    async def investors(self) -> list[InvestorRow]:
        return list(self._investors.values())

    async def invoices(self) -> list[InvoiceRow]:
        return [
            InvoiceRow(i.id, i.issuer_id, i.asking_price, i.status, i.winning_bid)
            for i in self._invoices.values()
            if i.issuer_id is not None
        ]

    async def issuers(self) -> list[IssuerRow]:
        return list(self._issuers.values())

    async def unlisted_invoices(self) -> list[UUID]:
        return [i.id for i in self._invoices.values() if i.issuer_id is None]


async def kept_foreign(
    source: ReadModelStore, batch_size: int
) -> AsyncIterator[list[ForeignEvent]]:
    """The events of another relayer that `source` keeps, in the order it projected
    them, `batch_size` at a time."""
    after = 0
    while kept := await source.foreign_events(after, batch_size):
        yield kept
        after = kept[-1].position


async def apply_foreign(target: ReadModelStore, kept: Sequence[ForeignEvent]) -> AbstractSet[str]:
    """Apply events of another relayer to `target`, each with its digest; the message
    ids `target` projected."""
    return await target.apply(
        [(foreign.message_id, foreign.event) for foreign in kept],
        {foreign.message_id: foreign.digest for foreign in kept},
    )
