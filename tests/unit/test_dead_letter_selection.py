"""Which dead letters `--aggregate ID` selects: those concerning the aggregate, whether a
header says so (an event's `aggregateID`) or the body names it (a command's)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from uuid import uuid4

import pytest

from financing.adapters.rabbitmq.dead_letters import DeadLetter, Selection


def letter(body: object, headers: dict[str, str] | None = None) -> DeadLetter:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return DeadLetter("m-1", "SellInvoice", "SellInvoice", "why", headers or {}, raw)


def test_a_command_concerns_every_aggregate_its_body_names() -> None:
    """Regression: commands carry no `aggregateID` header, so `--aggregate` matched no
    dead-lettered command (the README's own example: requeue the invoices refused for
    an issuer once it is registered)."""
    invoice, issuer = uuid4(), uuid4()
    sale = letter({"InvoiceID": str(invoice), "IssuerID": str(issuer), "AskingPrice": 10})

    assert sale.concerned == (str(invoice), str(issuer))
    assert Selection(aggregate_id=str(issuer)).matches(sale)
    assert Selection(aggregate_id=str(invoice).upper()).matches(sale)
    assert not Selection(aggregate_id=str(uuid4())).matches(sale)


def test_an_event_concerns_its_header_aggregate_and_the_ids_nested_in_its_body() -> None:
    invoice, investor = uuid4(), uuid4()
    financed = letter(
        {"AskingPrice": 10, "Bid": {"InvestorID": str(investor), "Amount": 20}},
        {"aggregateID": str(invoice)},
    )

    assert financed.concerned == (str(invoice), str(investor))
    assert Selection(aggregate_id=str(investor)).matches(financed)


@pytest.mark.parametrize(
    "written", [str.upper, lambda id_: "{" + id_ + "}", lambda id_: "urn:uuid:" + id_]
)
def test_an_event_whose_header_writes_its_aggregate_in_another_form_concerns_that_aggregate(
    written: Callable[[str], str],
) -> None:
    """Regression: the service reads an `aggregateID` header written uppercase, braced or as
    a URN as the id it is, but `--aggregate` compared the header as written: no form of
    the id found the letter, and `discard --aggregate` discarded none of them."""
    investor = str(uuid4())
    poison = letter({"Amount": "ten"}, {"aggregateID": written(investor)})

    assert poison.concerned == (investor,)
    assert Selection(aggregate_id=investor).matches(poison)
    assert Selection(aggregate_id=written(investor)).matches(poison)


@pytest.mark.parametrize(
    "body", [b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"[" * 5000 + b"]" * 5000]
)
def test_a_body_that_names_no_id_concerns_only_the_header_aggregate(body: bytes) -> None:
    assert letter(body, {"aggregateID": "agg-1"}).concerned == ("agg-1",)
    assert letter(body).concerned == ()
    assert not Selection(aggregate_id="agg-1").matches(letter(body))


def test_a_letter_without_a_correlation_is_of_its_own_messages_correlation() -> None:
    """Regression: a foreign message without a `correlation_id` header starts a correlation
    of its own, its id, as its events and log lines say; its dead letter had none, so
    `financing trace` of that id did not find it."""
    foreign = letter({"ID": str(uuid4())})
    correlated = letter({"ID": str(uuid4())}, {"correlation_id": "saga-1"})

    assert foreign.correlation_id == "m-1"
    assert Selection(correlation_id="m-1").matches(foreign)
    assert correlated.correlation_id == "saga-1"
    assert not Selection(correlation_id="m-1").matches(correlated)


def test_a_letter_whose_time_has_no_offset_says_no_moment() -> None:
    """Regression: `requeue` stopped with a TypeError (naive and aware times compared) on
    a letter whose `x-dead-lettered-at` had no offset to UTC."""
    naive = replace(letter({}), dead_lettered_at="2026-01-01T10:00:00")
    aware = replace(letter({}), dead_lettered_at="2026-01-01T10:00:00+00:00")

    assert naive.dead_lettered is None
    assert Selection(since=datetime(2026, 6, 1, tzinfo=UTC)).matches(naive)
    assert not Selection(since=datetime(2026, 6, 1, tzinfo=UTC)).matches(aware)


@pytest.mark.parametrize("kept", ["", "line1\nline2", "x" * 300], ids=["empty", "newline", "long"])
def test_a_letter_whose_correlation_cannot_be_kept_is_of_its_own_messages_correlation(
    kept: str,
) -> None:
    """As the event store records it (Envelope.correlation_id): `trace` of the message id
    finds the letter."""
    assert letter({}, {"correlation_id": kept}).correlation_id == "m-1"
