"""Every event on the bus carries a UUID message id of its own, the same on every copy."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.bus import EventLog, Observed
from tests.acceptance.driver import Financing
from tests.acceptance.expected import is_uuid

pytestmark = pytest.mark.acceptance


def content(message: Observed) -> tuple[object, ...]:
    return (message.name, message.aggregate_id, message.body)


def inconsistent_copies(events: EventLog, since: int = 0) -> list[str]:
    """Message ids whose copies are not one and the same event."""
    copies: dict[str, set[tuple[object, ...]]] = defaultdict(set)
    for message in events.messages[since:]:
        if message.message_id is not None:
            copies[message.message_id].add(content(message))
    return [message_id for message_id, seen in copies.items() if len(seen) > 1]


async def test_every_event_has_a_unique_uuid_message_id(financing: Financing) -> None:
    since = financing.events.mark()
    financed = await financing.finance_invoice(asking_price=10, bid=20)
    approved_since = financing.events.mark()
    await financing.approve(financed.invoice_id)
    await ex.expect_events(
        financing.events,
        [
            ex.invoice_approved(financed.invoice_id, 10, financed.investor_id, 20),
            ex.investor_funds_committed(financed.investor_id, 10),
        ],
        since=approved_since,
    )

    ids = {str(financed.investor_id), str(financed.invoice_id), str(financed.issuer_id)}
    copies = [m for m in financing.events.messages[since:] if m.aggregate_id in ids]
    ids_by_event: dict[tuple[object, ...], set[str]] = defaultdict(set)
    for message in copies:
        ids_by_event[content(message)].add(message.message_id or "")
    message_ids = [i for event_ids in ids_by_event.values() for i in event_ids]

    # Nine different events in this scenario, each under exactly one id.
    assert len(ids_by_event) == 9, "\n".join(m.describe() for m in copies)
    assert len(message_ids) == 9, f"an event arrived under several ids: {dict(ids_by_event)}"
    assert all(is_uuid(i) for i in message_ids), message_ids
    assert len(set(message_ids)) == 9, "two events share a message id"


async def test_copies_of_an_event_always_carry_the_same_message_id(
    financing: Financing,
) -> None:
    # Copies arrive on redelivery and after restarts; whichever tests ran before
    # this one, every copy seen so far must be the same event under the same id.
    await financing.finance_invoice()

    assert inconsistent_copies(financing.events) == []
