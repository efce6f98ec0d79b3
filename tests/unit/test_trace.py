"""The trace of a correlation: what a command caused, as a tree by causation, in time order."""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from financing.application.ports import StoredEvent, derived_message_id
from financing.application.trace import Fate, Handling, Step, trace
from financing.entrypoints.cli.trace import drawing_for, render

CORRELATION = "saga-1"
START = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
INVESTOR, INVOICE = uuid4(), uuid4()


def at(milliseconds: int) -> datetime:
    return START + timedelta(milliseconds=milliseconds)


def event(
    aggregate_id: UUID, version: int, name: str, caused_by: str, when: int, position: int = 0
) -> StoredEvent:
    return StoredEvent(
        position=position or when,
        aggregate_type="Investor" if aggregate_id == INVESTOR else "Invoice",
        aggregate_id=aggregate_id,
        version=version,
        name=name,
        body='{"Amount":5}',
        correlation_id=CORRELATION,
        causation_id=caused_by,
        recorded_at=at(when),
    )


def applied(message_id: str, name: str, by: str, when: int, events: int = 1) -> Handling:
    return Handling(message_id, name, Fate.APPLIED, by, at(when), events=events)


COMMAND = "command-1"
PLACED = event(INVESTOR, 3, "BidOnInvoicePlacedEvent", COMMAND, 10)
FINANCED = event(INVOICE, 2, "InvoiceFinancedEvent", str(PLACED.message_id), 20)
RELEASED = event(INVESTOR, 4, "InvestorFundsReleasedEvent", str(FINANCED.message_id), 30)
SAGA_HANDLINGS = [
    applied(str(FINANCED.message_id), "InvoiceFinancedEvent", "financing_releases_excess_bid", 30),
    applied(COMMAND, "BidOnInvoice", "bid_on_invoice", 10),
    applied(str(PLACED.message_id), "BidOnInvoicePlacedEvent", "bid_placed_offers", 20),
]


def shape(steps: list[Step], depth: int = 0) -> list[tuple[int, str]]:
    return [
        pair
        for step in steps
        for pair in [(depth, step.name or step.message_id), *shape(step.caused, depth + 1)]
    ]


def test_each_event_hangs_under_the_message_that_caused_it() -> None:
    story = trace(CORRELATION, [RELEASED, PLACED, FINANCED], SAGA_HANDLINGS)

    assert shape(story.steps) == [
        (0, "BidOnInvoice"),
        (1, "BidOnInvoicePlacedEvent"),
        (2, "InvoiceFinancedEvent"),
        (3, "InvestorFundsReleasedEvent"),
    ]
    [command] = story.steps
    assert [h.by for h in command.handlings] == ["bid_on_invoice"]
    assert command.caused[0].event == PLACED


def test_a_command_that_came_without_a_correlation_is_the_cause_of_its_events() -> None:
    """Regression: its correlation is its own id, and the events it caused (causation:
    its id) were drawn beside it rather than under it."""
    created = dataclasses.replace(
        event(INVOICE, 1, "InvoiceCreatedEvent", COMMAND, 10), correlation_id=COMMAND
    )
    story = trace(COMMAND, [created], [applied(COMMAND, "SellInvoice", "sell_invoice", 10)])

    assert shape(story.steps) == [(0, "SellInvoice"), (1, "InvoiceCreatedEvent")]


def test_events_caused_by_the_correlation_itself_are_roots_not_under_an_unknown_message() -> None:
    started = event(INVOICE, 1, "InvoiceCreatedEvent", CORRELATION, 10)

    assert shape(trace(CORRELATION, [started], []).steps) == [(0, "InvoiceCreatedEvent")]


def test_what_one_message_caused_is_in_time_order() -> None:
    later = event(INVOICE, 3, "BidOnInvoiceRejectedEvent", COMMAND, 50)
    earlier = event(INVOICE, 2, "InvoiceFinancedEvent", COMMAND, 40)

    story = trace(CORRELATION, [later, earlier], [applied(COMMAND, "X", "x", 40, events=2)])

    assert [step.name for step in story.steps[0].caused] == [
        "InvoiceFinancedEvent",
        "BidOnInvoiceRejectedEvent",
    ]


def test_a_dead_letter_is_what_became_of_the_message_it_copies() -> None:
    refused = Handling(
        str(PLACED.message_id),
        "BidOnInvoicePlacedEvent",
        Fate.DEAD_LETTERED,
        "events_BidOnInvoicePlacedEvent",
        at(25),
        "invoice does not exist",
    )

    story = trace(CORRELATION, [PLACED], [applied(COMMAND, "BidOnInvoice", "bid", 10), refused])

    [placed] = story.steps[0].caused
    assert placed.handlings == [refused]


def test_a_refused_command_is_known_from_its_dead_letter_alone() -> None:
    refused = Handling(COMMAND, "SellInvoice", Fate.DEAD_LETTERED, "SellInvoice", at(3000), "no")

    story = trace(CORRELATION, [], [refused])

    assert shape(story.steps) == [(0, "SellInvoice")]
    assert story.handlings() == [refused]


def test_events_whose_cause_left_no_record_hang_under_its_id() -> None:
    # The command's deduplication record was pruned after the retention window.
    story = trace(CORRELATION, [PLACED], [])

    assert shape(story.steps) == [(0, COMMAND), (1, "BidOnInvoicePlacedEvent")]
    assert story.steps[0].name == ""


def test_nothing_known_of_a_correlation_is_an_empty_trace() -> None:
    assert trace(CORRELATION, [], []).steps == []


def test_the_rendering_draws_the_tree_and_says_what_became_of_each_message() -> None:
    unchanged = Handling(
        str(RELEASED.message_id), "InvestorFundsReleasedEvent", Fate.UNCHANGED, "p", at(40), "why"
    )
    story = trace(CORRELATION, [PLACED, FINANCED, RELEASED], [*SAGA_HANDLINGS, unchanged])

    lines = render(story)

    assert lines[0] == f"correlation {CORRELATION}"
    assert lines[1] == f"└─ BidOnInvoice  command {COMMAND}"
    assert lines[2] == "   │ 2025-06-01T12:00:00.010Z  applied by bid_on_invoice: 1 event"
    assert lines[3] == (
        f"   └─ BidOnInvoicePlacedEvent  Investor {INVESTOR} v3  2025-06-01T12:00:00.010Z"
    )
    assert lines[4] == '      │ {"Amount":5}'
    assert "changed nothing at p: why" in lines[-2]
    assert lines[-1] == "3 applied, 1 changed nothing, 0 refused, 0 dead-lettered, 0 deferred"


def test_an_output_that_cannot_carry_the_boxes_gets_the_tree_in_ascii() -> None:
    """Regression: under a C locale, or PYTHONIOENCODING=ascii, every branch of the tree
    was written as escapes (`\\u2514\\u2500`)."""
    story = trace(CORRELATION, [PLACED, FINANCED, RELEASED], SAGA_HANDLINGS)
    ascii_output = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    lines = render(story, drawing=drawing_for(ascii_output))
    assert all(line.isascii() for line in lines), lines
    assert lines[1] == f"`- BidOnInvoice  command {COMMAND}"
    assert lines[2] == "   | 2025-06-01T12:00:00.010Z  applied by bid_on_invoice: 1 event"
    utf8_output = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    assert render(story, drawing=drawing_for(utf8_output)) == render(story)


def test_a_registration_is_shown_as_an_integration_event_not_a_command() -> None:
    """Regression: a dead-lettered InvestorRegistered was drawn as `InvestorRegistered
    command ...`."""
    refused = Handling("reg-1", "InvestorRegistered", Fate.DEAD_LETTERED, "q", at(5), "bad")
    lines = render(trace(CORRELATION, [], [refused]))
    assert lines[1] == "└─ InvestorRegistered  integration event reg-1"


def test_a_registration_applied_begins_at_its_integration_event_as_one_dead_lettered_does() -> None:
    """Regression (an operator's probe): a registration dead-lettered was shown as the
    integration event it is, one applied began at the command it sent, with nothing
    above it: the same story told two ways."""
    registered = "registration-1"  # a message without a correlation starts its own
    command = str(derived_message_id(registered, "CreateInvestor"))
    created = dataclasses.replace(
        event(INVESTOR, 1, "InvestorCreatedEvent", command, 10), correlation_id=registered
    )
    story = trace(registered, [created], [applied(command, "CreateInvestor", "create", 10)])

    assert shape(story.steps) == [
        (0, "InvestorRegistered"),
        (1, "CreateInvestor"),
        (2, "InvestorCreatedEvent"),
    ]
    lines = render(story)
    assert lines[1] == f"└─ InvestorRegistered  integration event {registered}"
    assert lines[2].endswith(f"CreateInvestor  command {command}")


def test_a_command_not_sent_on_the_correlations_registration_keeps_its_place() -> None:
    """A CreateInvestor whose id does not derive from the correlation (sent by another
    client) has no integration event made up above it."""
    created = event(INVESTOR, 1, "InvestorCreatedEvent", COMMAND, 10)
    story = trace(CORRELATION, [created], [applied(COMMAND, "CreateInvestor", "create", 10)])

    assert shape(story.steps) == [(0, "CreateInvestor"), (1, "InvestorCreatedEvent")]
