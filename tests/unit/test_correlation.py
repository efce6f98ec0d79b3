"""Correlation and causation: every message carries the saga it belongs to and what caused it.

A message's `correlation_id` header names the saga (a message without one starts a
saga of its own, under its own id); whatever handling it produces (events appended,
commands sent) is caused by it: causation = its message id. What became of each
processed message is recorded with it (processed with n events, or unchanged and why).
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID, uuid4

import pytest

from financing.application import codec, handlers
from financing.application.memory import InMemoryEventStore
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    Message,
    SellInvoice,
)
from financing.application.pipeline import (
    Outcome,
    OutcomeKind,
    Step,
    StoreHandler,
    decoded,
    exactly_once,
    selected,
)
from financing.application.ports import (
    CAUSATION_HEADER,
    CORRELATION_HEADER,
    RECORDED_AT_HEADER,
    Cause,
    Envelope,
    StoredEvent,
)
from financing.domain import events as ev
from tests.unit.bus import InMemoryBus, MemoryDelivery, envelope_of

D = Decimal


def correlated(message: Message, message_id: UUID | str, correlation_id: str | None) -> Envelope:
    """`message` as it travels, with a `correlation_id` header when one is given."""
    envelope = envelope_of(message, message_id)
    if correlation_id is None:
        return envelope
    return dataclasses.replace(envelope, headers={CORRELATION_HEADER: correlation_id})


def store_step(store: InMemoryEventStore, name: str, handler: StoreHandler) -> Step:
    """The parts production composes for a command's consumer, without `retried`."""
    handling = exactly_once(store, handler.__name__, handler)
    return selected(frozenset({name}), OutcomeKind.DEAD_LETTERED)(decoded(handling))


def causes(events: list[StoredEvent]) -> set[tuple[str | None, str | None]]:
    return {(stored.correlation_id, stored.causation_id) for stored in events}


# The cause of a message


def test_a_message_without_a_correlation_id_starts_a_correlation_of_its_own() -> None:
    envelope = Envelope(message_id="message-1", name="IssuerRegistered", body=b"{}")
    assert envelope.correlation_id == "message-1"
    assert Cause.of(envelope) == Cause(correlation_id="message-1", causation_id="message-1")


def test_a_message_with_a_correlation_id_keeps_it_and_is_itself_the_cause() -> None:
    envelope = Envelope(
        message_id="message-2",
        name="BidOnInvoice",
        body=b"{}",
        headers={CORRELATION_HEADER: "saga-1", CAUSATION_HEADER: "earlier-message"},
    )
    # The message's own causation header says what caused *it*; what it causes is caused by it.
    assert Cause.of(envelope) == Cause(correlation_id="saga-1", causation_id="message-2")


def test_an_empty_correlation_id_header_starts_a_correlation_of_its_own() -> None:
    envelope = Envelope(
        message_id="message-3", name="CreateIssuer", body=b"{}", headers={CORRELATION_HEADER: ""}
    )
    assert Cause.of(envelope) == Cause(correlation_id="message-3", causation_id="message-3")


def test_a_cause_travels_as_two_string_headers() -> None:
    cause = Cause(correlation_id="saga-1", causation_id="message-2")
    assert cause.headers() == {"correlation_id": "saga-1", "causation_id": "message-2"}


def test_a_stored_event_travels_with_its_correlation_causation_and_recording_time() -> None:
    investor = uuid4()
    recorded_at = datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=UTC)
    stored = StoredEvent(
        position=1,
        aggregate_type="Investor",
        aggregate_id=investor,
        version=1,
        name="InvestorCreatedEvent",
        body=codec.encode_text(ev.InvestorCreatedEvent(investor)),
        correlation_id="saga-1",
        causation_id="message-2",
        recorded_at=recorded_at,
    )
    headers = stored.envelope().headers
    assert headers[CORRELATION_HEADER] == "saga-1"
    assert headers[CAUSATION_HEADER] == "message-2"
    assert headers[RECORDED_AT_HEADER] == "2026-03-01T12:30:05.123456+00:00"
    assert datetime.fromisoformat(headers[RECORDED_AT_HEADER]) == recorded_at
    assert all(isinstance(value, str) for value in headers.values())


def test_a_stored_event_without_them_travels_without_those_headers() -> None:
    investor = uuid4()
    stored = StoredEvent(
        position=1,
        aggregate_type="Investor",
        aggregate_id=investor,
        version=1,
        name="InvestorCreatedEvent",
        body=codec.encode_text(ev.InvestorCreatedEvent(investor)),
    )
    headers = stored.envelope().headers
    assert not {CORRELATION_HEADER, CAUSATION_HEADER, RECORDED_AT_HEADER} & set(headers)


# exactly_once: what a processed message leaves behind


@pytest.mark.parametrize("correlation_id", ["saga-7", None], ids=["correlated", "uncorrelated"])
async def test_events_appended_for_a_message_keep_its_correlation_and_its_id_as_causation(
    correlation_id: str | None,
) -> None:
    store = InMemoryEventStore()
    step = store_step(store, "CreateInvestor", handlers.create_investor)
    message_id = str(uuid4())
    envelope = correlated(CreateInvestor(uuid4(), D("100")), message_id, correlation_id)

    assert await step(MemoryDelivery(envelope)) == Outcome.processed(2)

    # Without a correlation id of its own, the message starts one: its id.
    correlation = correlation_id if correlation_id is not None else message_id
    assert len(store.events) == 2
    assert causes(store.events) == {(correlation, message_id)}


def outcomes(store: InMemoryEventStore) -> dict[tuple[str, str], tuple[str, str, int]]:
    """What the store recorded of each processed message: outcome, detail, events."""
    return {key: (it.outcome, it.detail, it.events) for key, it in store.outcomes.items()}


async def test_a_processed_message_is_recorded_with_the_number_of_events_it_appended() -> None:
    store = InMemoryEventStore()
    step = store_step(store, "CreateInvestor", handlers.create_investor)
    message_id = str(uuid4())
    await step(MemoryDelivery(correlated(CreateInvestor(uuid4(), D("5")), message_id, "saga-2")))
    assert outcomes(store) == {("create_investor", message_id): ("processed", "", 2)}


async def test_a_message_that_changed_nothing_is_recorded_unchanged_with_the_rules_reason() -> None:
    bus = InMemoryBus()
    issuer, invoice = uuid4(), uuid4()
    await bus.run(CreateIssuer(issuer))
    await bus.run(SellInvoice(invoice, issuer, D("10")))
    events = list(bus.store.events)
    step = store_step(bus.store, "ApproveFinancing", handlers.approve_financing)
    message_id = str(uuid4())

    outcome = await step(MemoryDelivery(correlated(ApproveFinancing(invoice), message_id, "s")))

    assert outcome.kind is OutcomeKind.UNCHANGED
    assert "only a FINANCED invoice can be approved" in outcome.detail
    assert outcomes(bus.store)[("approve_financing", message_id)] == (
        "unchanged",
        outcome.detail,
        0,
    )
    assert bus.store.events == events


async def test_a_redelivered_message_keeps_the_record_and_the_causes_of_its_first_delivery() -> (
    None
):
    store = InMemoryEventStore()
    step = store_step(store, "CreateIssuer", handlers.create_issuer)
    message_id = str(uuid4())
    command = CreateIssuer(uuid4())
    await step(MemoryDelivery(correlated(command, message_id, "first-saga")))
    again = await step(MemoryDelivery(correlated(command, message_id, "another-saga")))
    assert again.kind is OutcomeKind.DUPLICATE
    assert outcomes(store) == {("create_issuer", message_id): ("processed", "", 1)}
    assert causes(store.events) == {("first-saga", message_id)}


async def test_a_whole_bid_saga_keeps_one_correlation_each_event_caused_by_the_message_before() -> (
    None
):
    # As the broker runs it: the command, then every event relayed to the saga policies.
    bus = InMemoryBus()
    issuer, investor, invoice = uuid4(), uuid4(), uuid4()
    await bus.run(CreateIssuer(issuer))
    await bus.run(CreateInvestor(investor, D("100")))
    await bus.run(SellInvoice(invoice, issuer, D("10")))
    start = len(bus.store.events)
    command_id = str(uuid4())

    await bus.commands["BidOnInvoice"].deliver(
        correlated(BidOnInvoice(investor, invoice, D("25")), command_id, "saga-42")
    )
    relayed = start
    while relayed < len(bus.store.events):
        await bus.publish(bus.store.events[relayed])
        relayed += 1

    placed, financed, released = bus.store.events[start:]
    assert (placed.name, financed.name, released.name) == (
        "BidOnInvoicePlacedEvent",
        "InvoiceFinancedEvent",
        "InvestorFundsReleasedEvent",
    )
    assert [(e.correlation_id, e.causation_id) for e in (placed, financed, released)] == [
        ("saga-42", command_id),
        ("saga-42", str(placed.message_id)),
        ("saga-42", str(financed.message_id)),
    ]
    assert outcomes(bus.store)[("bid_on_invoice", command_id)] == ("processed", "", 1)
    assert outcomes(bus.store)[("bid_placed_offers_bid_to_invoice", str(placed.message_id))] == (
        "processed",
        "",
        1,
    )
    assert outcomes(bus.store)[("financing_releases_excess_bid", str(financed.message_id))] == (
        "processed",
        "",
        1,
    )
