"""Domain events as docs/contract.md says they look on the bus, and the checks against them.

Bodies use the Go field names; fields marked † in the contract travel only in
the `aggregateID` header, so they are absent here. Money is compared exactly
(bodies are parsed with Decimal numbers): 20 and 20.0 are equal, "20" (a
string) and 0.1000000000000000055 are not.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

from tests.acceptance.bus import (
    AGGREGATE_ID,
    DEFAULT_TIMEOUT,
    MESSAGE_UUID,
    NAME,
    EventLog,
    Match,
    Observed,
)
from tests.support import infra

Amount = int | str | Decimal


def money(amount: Amount) -> Decimal:
    return Decimal(str(amount))


@dataclass(frozen=True)
class Expected:
    name: str
    aggregate_id: str
    body: Mapping[str, Any]

    def describe(self) -> str:
        return f"{self.name} aggregateID={self.aggregate_id} body={dict(self.body)}"


def _bid(investor_id: UUID, amount: Amount) -> dict[str, Any]:
    return {"InvestorID": str(investor_id), "Amount": money(amount)}


def issuer_created(issuer_id: UUID) -> Expected:
    return Expected("IssuerCreatedEvent", str(issuer_id), {"IssuerID": str(issuer_id)})


def investor_created(investor_id: UUID) -> Expected:
    return Expected("InvestorCreatedEvent", str(investor_id), {"InvestorID": str(investor_id)})


def investor_funds_added(investor_id: UUID, amount: Amount) -> Expected:
    return Expected("InvestorFundsAddedEvent", str(investor_id), {"Amount": money(amount)})


def bid_on_invoice_placed(investor_id: UUID, invoice_id: UUID, amount: Amount) -> Expected:
    return Expected(
        "BidOnInvoicePlacedEvent",
        str(investor_id),
        {"InvoiceID": str(invoice_id), "BidAmount": money(amount)},
    )


def investor_funds_released(investor_id: UUID, amount: Amount) -> Expected:
    return Expected("InvestorFundsReleasedEvent", str(investor_id), {"Amount": money(amount)})


def investor_funds_committed(investor_id: UUID, amount: Amount) -> Expected:
    return Expected("InvestorFundsCommittedEvent", str(investor_id), {"Amount": money(amount)})


def invoice_created(invoice_id: UUID, issuer_id: UUID, asking_price: Amount) -> Expected:
    return Expected(
        "InvoiceCreatedEvent",
        str(invoice_id),
        {
            "InvoiceID": str(invoice_id),
            "IssuerID": str(issuer_id),
            "AskingPrice": money(asking_price),
        },
    )


def invoice_financed(
    invoice_id: UUID, asking_price: Amount, investor_id: UUID, bid: Amount
) -> Expected:
    return Expected(
        "InvoiceFinancedEvent",
        str(invoice_id),
        {"AskingPrice": money(asking_price), "Bid": _bid(investor_id, bid)},
    )


def bid_on_invoice_rejected(invoice_id: UUID, investor_id: UUID, bid: Amount) -> Expected:
    return Expected("BidOnInvoiceRejectedEvent", str(invoice_id), {"Bid": _bid(investor_id, bid)})


def invoice_approved(
    invoice_id: UUID, sold_price: Amount, investor_id: UUID, bid: Amount
) -> Expected:
    return Expected(
        "InvoiceApprovedEvent",
        str(invoice_id),
        {"SoldPrice": money(sold_price), "Bid": _bid(investor_id, bid)},
    )


def invoice_reversed(
    invoice_id: UUID, sold_price: Amount, investor_id: UUID, bid: Amount
) -> Expected:
    return Expected(
        "InvoiceReversedEvent",
        str(invoice_id),
        {"SoldPrice": money(sold_price), "Bid": _bid(investor_id, bid)},
    )


def contract_violations(event: Observed) -> list[str]:
    """What is wrong with a domain event's envelope (headers, persistence, JSON)."""
    problems = []
    for key, value in event.headers.items():
        if not isinstance(value, str):
            problems.append(f"header {key!r} is {type(value).__name__} {value!r}, not a string")
    message_id = event.message_id
    if message_id is None:
        problems.append(f"header {MESSAGE_UUID} is missing")
    elif not is_uuid(message_id):
        problems.append(f"header {MESSAGE_UUID} {message_id!r} is not a UUID")
    if event.name is None:
        problems.append(f"header {NAME} is missing")
    aggregate_id = event.aggregate_id
    if aggregate_id is None:
        problems.append(f"header {AGGREGATE_ID} is missing")
    elif not is_uuid(aggregate_id) or aggregate_id != aggregate_id.lower():
        problems.append(f"header {AGGREGATE_ID} {aggregate_id!r} is not a lowercase UUID")
    if event.delivery_mode != 2:
        problems.append(f"delivery mode is {event.delivery_mode}, not 2 (persistent)")
    if not isinstance(event.data, dict):
        problems.append("body is not a JSON object")
    return problems


def is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def _matches(event: Observed, expected: Expected) -> bool:
    return (
        event.name == expected.name
        and event.aggregate_id == expected.aggregate_id
        and event.data == dict(expected.body)
    )


async def expect_events(
    events: EventLog,
    expected: Sequence[Expected],
    *,
    since: int,
    among: Iterable[UUID | str] = (),
    within: float = DEFAULT_TIMEOUT,
) -> list[Observed]:
    """Assert that exactly `expected`, in this order, followed `since` on these aggregates.

    The aggregates looked at are those of `expected` plus `among`: an event on
    any of them that is not expected fails the check. Waits (with a deadline)
    until as many events arrived; returns them.
    """
    ids = {e.aggregate_id for e in expected} | {str(a) for a in among}

    async def enough() -> list[Observed]:
        found = events.concerning(ids, since)
        return found if len(found) >= len(expected) else []

    try:
        observed = await infra.wait_until(enough, timeout=within, what="events")
    except AssertionError:
        observed = events.concerning(ids, since)
        raise AssertionError(
            f"timed out after {within}s: {len(observed)} of {len(expected)} events arrived\n"
            + _comparison(expected, observed)
        ) from None
    if len(observed) != len(expected) or not all(
        _matches(o, e) for o, e in zip(observed, expected, strict=True)
    ):
        raise AssertionError(
            "events differ from the expected ones\n" + _comparison(expected, observed)
        )
    problems = [f"{o.describe()}: {p}" for o in observed for p in contract_violations(o)]
    assert not problems, "events break the wire contract:\n" + "\n".join(problems)
    return observed


def _comparison(expected: Sequence[Expected], observed: Sequence[Observed]) -> str:
    lines = ["expected:"]
    lines += [f"  {e.describe()}" for e in expected]
    lines.append("observed:")
    lines += [f"  {o.describe()}" for o in observed] or ["  (nothing)"]
    return "\n".join(lines)


def named(name: str, **body: Any) -> Match:
    """A predicate: an event of this name whose body has these values (exactly compared)."""

    def match(event: Observed) -> bool:
        if event.name != name or not isinstance(event.data, dict):
            return False
        return all(event.data.get(key) == value for key, value in body.items())

    return match
