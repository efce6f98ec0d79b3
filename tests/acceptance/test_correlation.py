"""Every event on the bus says which saga it belongs to and which message caused it.

The Commands API answers each command with its `correlation-id` (the client's own
when it sent one); every event of the saga the command starts carries it in its
`correlation_id` header, and in `causation_id` the message id of the message that
caused it: the command for the first event, then the event before it. A message
from a publisher that knows nothing of correlation starts a saga of its own,
under its own message id.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID, uuid4

import pytest
from betterproto.lib.google.protobuf import Empty

from financing.application.ports import derived_message_id
from financing.generated import BidOnInvoiceCommand, Money, SellInvoiceCommand, Uuid
from tests.acceptance import expected as ex
from tests.acceptance.bus import Observed
from tests.acceptance.driver import Financing
from tests.acceptance.expected import is_uuid
from tests.support.answers import CORRELATION_METADATA, call, correlation_of

pytestmark = pytest.mark.acceptance

CORRELATION = "correlation_id"
CAUSATION = "causation_id"
RECORDED_AT = "recorded_at"


def correlation(event: Observed) -> object:
    return event.headers.get(CORRELATION)


def causation(event: Observed) -> object:
    return event.headers.get(CAUSATION)


def recorded_at(event: Observed) -> datetime:
    value = event.headers.get(RECORDED_AT)
    assert isinstance(value, str), f"{event.describe()}: {RECORDED_AT} is {value!r}"
    at = datetime.fromisoformat(value)
    assert at.utcoffset() is not None, f"{RECORDED_AT} {value!r} is not a point in time"
    return at


async def bid(
    financing: Financing, investor_id: UUID, invoice_id: UUID, amount: float, **metadata: str
) -> str:
    """BidOnInvoice through the Commands API with this request metadata; the answer's
    correlation id."""
    request = BidOnInvoiceCommand(
        investor_id=Uuid(str(investor_id)), invoice_id=Uuid(str(invoice_id)), bid=Money(amount)
    )
    _, answered = await call(
        financing.commands, "/Commands/BidOnInvoice", request, Empty, metadata=metadata
    )
    return correlation_of(answered)


async def financing_saga(
    financing: Financing, investor_id: UUID, invoice_id: UUID, since: int
) -> tuple[Observed, Observed, Observed]:
    """The three events of a bid of 20 on an invoice asking 10: placed, financed, released."""
    placed, financed, released = await ex.expect_events(
        financing.events,
        [
            ex.bid_on_invoice_placed(investor_id, invoice_id, 20),
            ex.invoice_financed(invoice_id, 10, investor_id, 20),
            ex.investor_funds_released(investor_id, 10),
        ],
        since=since,
    )
    return placed, financed, released


def assert_each_caused_by_the_one_before(
    placed: Observed, financed: Observed, released: Observed
) -> None:
    assert causation(financed) == placed.message_id
    assert causation(released) == financed.message_id
    assert recorded_at(placed) <= recorded_at(financed) <= recorded_at(released)


async def test_a_bid_saga_carries_the_clients_correlation_id_each_event_caused_by_the_last(
    financing: Financing,
) -> None:
    invoice_id, _ = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(100)
    chosen = f"saga-{uuid4()}"
    since = financing.events.mark()

    answered = await bid(financing, investor_id, invoice_id, 20, **{CORRELATION_METADATA: chosen})

    assert answered == chosen
    placed, financed, released = await financing_saga(financing, investor_id, invoice_id, since)
    assert [correlation(e) for e in (placed, financed, released)] == [chosen] * 3
    # The bid was caused by the BidOnInvoice command, whose message id only the
    # service knows: a UUID, neither the correlation id nor any event's id.
    command_id = causation(placed)
    assert isinstance(command_id, str) and is_uuid(command_id), command_id
    assert command_id not in {chosen, placed.message_id, financed.message_id, released.message_id}
    assert_each_caused_by_the_one_before(placed, financed, released)


async def test_a_command_sent_without_a_correlation_id_is_answered_a_new_one_its_events_carry(
    financing: Financing,
) -> None:
    issuer_id = await financing.register_issuer()
    investor_id = await financing.register_investor(100)
    since = financing.events.mark()

    reply, answered = await call(
        financing.commands,
        "/Commands/SellInvoice",
        SellInvoiceCommand(issuer_id=Uuid(str(issuer_id)), asking_price=Money(10)),
        Uuid,
    )
    sold = correlation_of(answered)
    invoice_id = UUID(reply.value)
    [created] = await ex.expect_events(
        financing.events, [ex.invoice_created(invoice_id, issuer_id, 10)], since=since
    )
    since = financing.events.mark()
    financed_by = await bid(financing, investor_id, invoice_id, 20)
    placed, financed, released = await financing_saga(financing, investor_id, invoice_id, since)

    assert is_uuid(sold) and is_uuid(financed_by) and sold != financed_by
    assert correlation(created) == sold
    assert [correlation(e) for e in (placed, financed, released)] == [financed_by] * 3
    assert_each_caused_by_the_one_before(placed, financed, released)


@pytest.mark.parametrize("correlated", [True, False], ids=["correlated", "uncorrelated"])
async def test_a_command_put_on_its_queue_causes_its_events_under_its_message_id(
    financing: Financing, correlated: bool
) -> None:
    # As another service (or an operator's tool) sends it: straight to the queue.
    invoice_id, _ = await financing.put_invoice_on_sale(10)
    investor_id = await financing.register_investor(100)
    since = financing.events.mark()
    message_id = str(uuid4())
    chosen = f"saga-{uuid4()}"

    await financing.broker.send_command(
        "BidOnInvoice",
        {"InvestorID": str(investor_id), "InvoiceID": str(invoice_id), "BidAmount": 20},
        message_id=message_id,
        extra_headers={CORRELATION: chosen} if correlated else {},
    )

    placed, financed, released = await financing_saga(financing, investor_id, invoice_id, since)
    # Without a correlation id the command starts a saga of its own: its message id.
    expected = chosen if correlated else message_id
    assert [correlation(e) for e in (placed, financed, released)] == [expected] * 3
    assert causation(placed) == message_id
    assert_each_caused_by_the_one_before(placed, financed, released)


async def test_a_foreign_issuer_registered_starts_a_correlation_under_its_message_id(
    financing: Financing,
) -> None:
    # Registering's events carry only watermill's three headers.
    issuer_id = uuid4()
    since = financing.events.mark()

    registered = await financing.publish_issuer_registered(issuer_id)

    [created] = await ex.expect_events(
        financing.events, [ex.issuer_created(issuer_id)], since=since
    )
    assert correlation(created) == registered
    # Caused by the CreateIssuer command the service sent for the event.
    assert causation(created) == str(derived_message_id(registered, "CreateIssuer"))
    recorded_at(created)


async def test_an_integration_event_with_a_correlation_id_keeps_it_for_what_it_causes(
    financing: Financing,
) -> None:
    investor_id = uuid4()
    chosen = f"registering-{uuid4()}"
    since = financing.events.mark()

    registered = await financing.broker.publish_event(
        "InvestorRegistered",
        {"ID": str(investor_id), "Name": "investor", "Balance": 100},
        extra_headers={CORRELATION: chosen},
    )

    created, added = await ex.expect_events(
        financing.events,
        [ex.investor_created(investor_id), ex.investor_funds_added(investor_id, 100)],
        since=since,
    )
    command_id = str(derived_message_id(registered, "CreateInvestor"))
    assert [(correlation(e), causation(e)) for e in (created, added)] == [
        (chosen, command_id),
        (chosen, command_id),
    ]
