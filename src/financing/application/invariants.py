"""The invariant checker: recompute every investor and invoice from the events alone.

Checks what must hold whatever failed and whenever:
- no investor's balance or reserved is ever negative, and funds are conserved
  (balance + reserved + committed = funds added);
- each invoice has at most one winning bid, which covers its asking price;
- every placed bid got exactly one answer from its invoice (financed or rejected);
- every saga step happened exactly once: each rejection released the whole bid,
  each financing released the excess, each approval committed the sold price,
  each reversal released it (compared as multisets of amounts per investor);
- an investor's reserved funds equal the asking prices of the invoices it won
  and that are still financed.
Saga steps still under way are reported as "in flight"; a settled system has none.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from financing.application.moments import moment
from financing.domain import events as ev
from financing.domain.aggregates import Investor, Invoice, InvoiceStatus
from financing.domain.money import ZERO, add, subtract


@dataclass
class Report:
    events: int = 0
    investors: int = 0
    invoices: int = 0
    violations: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.in_flight

    def lines(self) -> list[str]:
        out = [
            f"events checked: {self.events}",
            f"investors: {self.investors}, invoices: {self.invoices}",
            f"violations: {len(self.violations)}",
        ]
        out += [f"  VIOLATION {line}" for line in self.violations]
        out.append(f"saga steps in flight: {len(self.in_flight)}")
        out += [f"  in flight {line}" for line in self.in_flight]
        return out


@dataclass
class _Expected:
    """What the saga owes one investor, as multisets of amounts."""

    releases: Counter[Decimal] = field(default_factory=Counter)
    commits: Counter[Decimal] = field(default_factory=Counter)


def check(events: Iterable[ev.DomainEvent]) -> Report:
    """Check the invariants over every event of the store, in commit order."""
    checker = Checker()
    for event in events:
        checker.add(event)
    return checker.report()


class Checker:
    """`check`, fed one event at a time (in commit order), so that a store read in
    batches is checked without holding every event."""

    def __init__(self) -> None:
        self._report = Report()
        self._investors: dict[UUID, Investor] = {}
        self._invoices: dict[UUID, Invoice] = {}
        self._funds_added: defaultdict[UUID, Decimal] = defaultdict(Decimal)
        self._bids = _Bids()
        self._releases: dict[UUID, Counter[Decimal]] = {}
        self._commits: dict[UUID, Counter[Decimal]] = {}
        self._owed: dict[UUID, _Expected] = {}
        self._owed_at = _OwedAt()
        self._wins: Counter[UUID] = Counter()
        self._issuers: set[UUID] = set()
        self._mixed: set[UUID] = set()

    def add(
        self,
        event: ev.DomainEvent,
        recorded_at: datetime | None = None,
        *,
        message_id: str | None = None,
        caused_by: str | None = None,
    ) -> None:
        """Check one more event; `recorded_at`, when it was recorded, dates the saga steps
        it leaves in flight (one in flight for long has stopped half way); `message_id`,
        its own, and `caused_by`, the message that caused it, tell which step owed a
        step done answers."""
        report = self._report
        report.events += 1
        self._one_type_per_id(event)
        if isinstance(event, ev.IssuerEvent):
            self._issuers.add(event.issuer_id)
        if isinstance(event, ev.InvestorEvent):
            investor = self._investors.setdefault(event.investor_id, Investor(event.investor_id))
            investor.apply(event)
            if investor.balance < ZERO or investor.reserved < ZERO:
                report.violations.append(
                    f"investor {investor.id} went negative at version {investor.version}: "
                    f"balance {investor.balance}, reserved {investor.reserved}"
                )
            match event:
                case ev.InvestorFundsAddedEvent(amount=amount) if amount > ZERO:
                    added = self._funds_added
                    added[event.investor_id] = add(added[event.investor_id], amount)
                case ev.BidOnInvoicePlacedEvent(invoice_id=invoice_id, bid_amount=amount):
                    self._bids.placed((event.investor_id, invoice_id, amount), recorded_at)
                case ev.InvestorFundsReleasedEvent(amount=amount) if amount > ZERO:
                    self._releases.setdefault(event.investor_id, Counter())[amount] += 1
                    self._owed_at.done(caused_by, (event.investor_id, "released", amount))
                case ev.InvestorFundsCommittedEvent(amount=amount) if amount > ZERO:
                    self._commits.setdefault(event.investor_id, Counter())[amount] += 1
                    self._owed_at.done(caused_by, (event.investor_id, "committed", amount))
        elif isinstance(event, ev.InvoiceEvent):
            invoice = self._invoices.setdefault(event.invoice_id, Invoice(event.invoice_id))
            invoice.apply(event)
            _owe(event, invoice, self._owed, self._bids, self._wins, report)
            for step in _owed_by(event):
                self._owed_at.owed(message_id or f"event {report.events}", step, recorded_at)

    def _one_type_per_id(self, event: ev.DomainEvent) -> None:
        """An id names one aggregate: its stream holds the events of one type."""
        streams = {
            "Issuer": self._issuers,
            "Investor": self._investors.keys(),
            "Invoice": self._invoices.keys(),
        }
        aggregate_id = event.aggregate_id
        others = [
            kind
            for kind, ids in streams.items()
            if kind != event.aggregate_type and aggregate_id in ids
        ]
        if others and aggregate_id not in self._mixed:
            self._mixed.add(aggregate_id)
            self._report.violations.append(
                f"id {aggregate_id} names both an {others[0]} and an {event.aggregate_type}"
            )

    def report(self) -> Report:
        """What the events added so far say."""
        report = self._report
        investors, owed = self._investors, self._owed
        report.investors = len(investors)
        report.invoices = len(self._invoices)
        for invoice_id, count in self._wins.items():
            if count > 1:
                report.violations.append(f"invoice {invoice_id} has {count} winning bids")
        self._bids.report(report)
        for investor_id, investor in investors.items():
            _check_investor(investor, self._funds_added[investor_id], report)
            expected = owed.get(investor_id, _Expected())
            released = self._releases.get(investor_id, Counter())
            committed = self._commits.get(investor_id, Counter())
            for what, owes, done in (
                ("released", expected.releases, released),
                ("committed", expected.commits, committed),
            ):
                since = self._owed_at.oldest(investor_id, what)
                _compare(investor_id, what, owes, done, report, since)
        for investor_id in owed.keys() - investors.keys():
            report.violations.append(f"investor {investor_id} is owed saga steps but has no events")
        if not report.in_flight:
            _check_reservations(investors, self._invoices, report)
        return report


_Bid = tuple[UUID, UUID, Decimal]  # investor, invoice, amount


class _Bids:
    """Every bid placed is answered once by its invoice. Kept: the bids not answered
    yet, and a 64-bit digest of each answered one (enough to tell a second answer from
    an answer to a bid never placed). Kept whole, every bid of the store's history
    cost about 1 KB (`financing check` took 0.65 KB an event: 600 MB for 700,000)."""

    def __init__(self) -> None:
        self._waiting: Counter[_Bid] = Counter()  # placed, not answered yet: how many
        self._placed_at: dict[_Bid, datetime] = {}  # when each of those was last placed
        self._answered: set[int] = set()  # the digests of the bids answered
        self._unplaced: Counter[_Bid] = Counter()  # answers to bids never placed
        self._again: Counter[_Bid] = Counter()  # answers beyond the bid's placings

    def placed(self, bid: _Bid, at: datetime | None) -> None:
        self._waiting[bid] += 1
        if at is not None:
            self._placed_at[bid] = at

    def answered(self, bid: _Bid) -> None:
        """An invoice answered `bid` (in commit order, after its placing)."""
        if self._waiting[bid] > 0:
            self._waiting[bid] -= 1
            if not self._waiting[bid]:
                del self._waiting[bid]
                self._placed_at.pop(bid, None)
            self._answered.add(hash(bid))
            return
        if hash(bid) in self._answered:
            self._again[bid] += 1
        else:
            self._unplaced[bid] += 1

    def report(self, report: Report) -> None:
        for bid, times in self._again.items():
            report.violations.append(
                f"bid {_bid(bid)} answered {times} time(s) more than it was placed"
            )
        for bid, times in self._unplaced.items():
            report.violations.append(f"bid {_bid(bid)} answered {times} times, never placed")
        for bid in self._waiting:
            placed_at = self._placed_at.get(bid)
            since = f" (placed {moment(placed_at)})" if placed_at is not None else ""
            report.in_flight.append(f"bid {_bid(bid)} not yet answered by its invoice{since}")


def _owe(
    event: ev.InvoiceEvent,
    invoice: Invoice,
    owed: dict[UUID, _Expected],
    bids: _Bids,
    wins: Counter[UUID],
    report: Report,
) -> None:
    match event:
        case ev.InvoiceFinancedEvent(asking_price=price, bid=bid):
            bids.answered((bid.investor_id, event.invoice_id, bid.amount))
            wins[event.invoice_id] += 1
            if bid.amount < price:
                report.violations.append(
                    f"invoice {event.invoice_id} financed by bid {bid.amount} "
                    f"below its price {price}"
                )
        case ev.BidOnInvoiceRejectedEvent(bid=bid):
            bids.answered((bid.investor_id, event.invoice_id, bid.amount))
    for investor_id, what, amount in _owed_by(event):
        expected = owed.setdefault(investor_id, _Expected())
        (expected.releases if what == "released" else expected.commits)[amount] += 1
    if invoice.status is not InvoiceStatus.AVAILABLE and invoice.winning_bid is None:
        report.violations.append(f"invoice {invoice.id} is {invoice.status.value} without a winner")


_Step = tuple[UUID, str, Decimal]  # investor, "released" or "committed", amount


def _owed_by(event: ev.InvoiceEvent) -> list[_Step]:
    """The saga steps an invoice's event owes its winning investor (`_owe`'s)."""
    match event:
        case ev.InvoiceFinancedEvent(asking_price=price, bid=bid):
            excess = subtract(bid.amount, price)
            return [(bid.investor_id, "released", excess)] if excess > ZERO else []
        case ev.BidOnInvoiceRejectedEvent(bid=bid):
            return [(bid.investor_id, "released", bid.amount)]
        case ev.InvoiceApprovedEvent(sold_price=price, bid=bid):
            return [(bid.investor_id, "committed", price)]
        case ev.InvoiceReversedEvent(sold_price=price, bid=bid):
            return [(bid.investor_id, "released", price)]
    return []


class _OwedAt:
    """When each saga step still owed was owed (the event owing it recorded), by that
    event's message id; a step done is matched to the event that caused it (its
    causation id), or where it names none to the oldest owed step of its kind and amount.
    A step in flight says how long it has been owed. Dated by the last event owing
    anything, a step lost for minutes read as owed a moment ago under load."""

    def __init__(self) -> None:
        self._owed: dict[str, tuple[_Step, datetime | None]] = {}

    def owed(self, by: str, step: _Step, at: datetime | None) -> None:
        self._owed[by] = (step, at)

    def done(self, caused_by: str | None, step: _Step) -> None:
        if caused_by is not None and self._owed.get(caused_by, (None, None))[0] == step:
            del self._owed[caused_by]
            return
        for by, (owed_step, _) in self._owed.items():  # in the order owed
            if owed_step == step:
                del self._owed[by]
                return

    def oldest(self, investor_id: UUID, what: str) -> datetime | None:
        found = [
            at
            for (investor, kind, _), at in self._owed.values()
            if investor == investor_id and kind == what and at is not None
        ]
        return min(found, default=None)


def _check_investor(investor: Investor, added: Decimal, report: Report) -> None:
    total = add(add(investor.balance, investor.reserved), investor.committed)
    if total != added:
        report.violations.append(
            f"investor {investor.id} holds {total} (balance {investor.balance}, reserved "
            f"{investor.reserved}, committed {investor.committed}) but was given {added}"
        )


def _compare(
    investor_id: UUID,
    what: str,
    expected: Counter[Decimal],
    actual: Counter[Decimal],
    report: Report,
    since: datetime | None = None,
) -> None:
    missing = expected - actual
    extra = actual - expected
    if extra:
        report.violations.append(
            f"investor {investor_id} {what} more than the saga owes: {_amounts(extra)}"
        )
    if missing:
        owed = f" (the oldest owed since {moment(since)})" if since is not None else ""
        report.in_flight.append(f"investor {investor_id} not yet {what}: {_amounts(missing)}{owed}")


def _check_reservations(
    investors: dict[UUID, Investor], invoices: dict[UUID, Invoice], report: Report
) -> None:
    expected: defaultdict[UUID, Decimal] = defaultdict(Decimal)
    for invoice in invoices.values():
        if invoice.status is InvoiceStatus.FINANCED and invoice.winning_bid is not None:
            investor_id = invoice.winning_bid.investor_id
            expected[investor_id] = add(expected[investor_id], invoice.asking_price)
    for investor in investors.values():
        want = expected[investor.id]
        if investor.reserved != want:
            report.violations.append(
                f"investor {investor.id} reserves {investor.reserved} but its open winning "
                f"bids come to {want}"
            )


def _bid(bid: _Bid) -> str:
    investor, invoice, amount = bid
    return f"of {amount} by investor {investor} on invoice {invoice}"


def _amounts(amounts: Counter[Decimal]) -> str:
    return ", ".join(f"{amount} x{count}" for amount, count in sorted(amounts.items()))
