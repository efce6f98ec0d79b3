"""Poison messages are dead-lettered with their reason; they block nothing and crash nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.bus import EVENTS_EXCHANGE, MESSAGE_UUID, NAME
from tests.acceptance.driver import Financing, new_id

pytestmark = pytest.mark.acceptance

COMMAND_POISONS: dict[str, tuple[str, bytes]] = {
    "sell_invoice_bad_json": ("SellInvoice", b'{"InvoiceID": "'),
    "bid_missing_field": (
        "BidOnInvoice",
        json.dumps({"InvestorID": str(new_id()), "InvoiceID": str(new_id())}).encode(),
    ),
    "create_issuer_bad_uuid": ("CreateIssuer", json.dumps({"ID": "not-a-uuid"}).encode()),
    "approve_not_an_object": ("ApproveFinancing", b"[]"),
    "create_investor_money_as_string": (
        "CreateInvestor",
        json.dumps({"ID": str(new_id()), "Balance": "100"}).encode(),
    ),
}

# (name, body, extra headers, the queue whose consumer refuses it)
EVENT_POISONS: dict[str, tuple[str, bytes, dict[str, Any], str]] = {
    "non_string_header": (
        "IssuerRegistered",
        json.dumps({"ID": str(new_id()), "Name": "poison"}).encode(),
        {"attempt": 1},
        "events_IssuerRegistered",
    ),
    "bad_json": ("IssuerRegistered", b"{oops", {}, "events_IssuerRegistered"),
    "bad_uuid": (
        "InvestorRegistered",
        json.dumps({"ID": "nope", "Name": "poison", "Balance": 10}).encode(),
        {},
        "events_InvestorRegistered",
    ),
    "domain_event_without_aggregate_id": (
        "BidOnInvoicePlacedEvent",
        json.dumps({"InvoiceID": str(new_id()), "BidAmount": 10}).encode(),
        {},
        "events_BidOnInvoicePlacedEvent",
    ),
}


@pytest.mark.parametrize("case", COMMAND_POISONS)
async def test_poison_command_is_dead_lettered_with_its_reason(
    financing: Financing, case: str
) -> None:
    queue, body = COMMAND_POISONS[case]
    letters_since = financing.dead_letters.mark()

    message_id = await financing.broker.send_command(queue, body)

    letter = await financing.dead_letter(
        since=letters_since, source_queue=queue, message_id=message_id
    )
    assert letter.body == body
    assert letter.name == queue


@pytest.mark.parametrize("case", EVENT_POISONS)
async def test_poison_event_is_dead_lettered_with_its_reason(
    financing: Financing, case: str
) -> None:
    name, body, extra, queue = EVENT_POISONS[case]
    letters_since = financing.dead_letters.mark()

    message_id = await financing.broker.publish_event(name, body, extra_headers=extra)

    letter = await financing.dead_letter(
        since=letters_since, source_queue=queue, message_id=message_id
    )
    assert letter.body == body
    assert letter.name == name


async def test_issuer_registered_with_a_non_string_header_creates_no_issuer(
    financing: Financing,
) -> None:
    issuer_id = new_id()
    since = financing.events.mark()
    letters_since = financing.dead_letters.mark()

    message_id = await financing.broker.publish_event(
        "IssuerRegistered",
        {"ID": str(issuer_id), "Name": "poison"},
        extra_headers={"attempt": 1},
    )
    await financing.dead_letter(
        since=letters_since, source_queue="events_IssuerRegistered", message_id=message_id
    )
    await financing.register_issuer()  # a later registration through the same queue

    assert financing.events.concerning([str(issuer_id)], since) == []


async def test_service_keeps_working_after_poison_messages(financing: Financing) -> None:
    letters_since = financing.dead_letters.mark()
    sent = []
    for queue, body in COMMAND_POISONS.values():
        sent.append((queue, await financing.broker.send_command(queue, body)))
    for name, body, extra, queue in EVENT_POISONS.values():
        headers: dict[str, Any] = {MESSAGE_UUID: str(new_id()), NAME: name, **extra}
        await financing.broker.publish(EVENTS_EXCHANGE, "", body, headers)
        sent.append((queue, headers[MESSAGE_UUID]))
    for queue, message_id in sent:
        await financing.dead_letter(since=letters_since, source_queue=queue, message_id=message_id)

    financed = await financing.finance_invoice(asking_price=10, bid=20)
    since = financing.events.mark()
    await financing.approve(financed.invoice_id)

    await ex.expect_events(
        financing.events,
        [
            ex.invoice_approved(financed.invoice_id, 10, financed.investor_id, 20),
            ex.investor_funds_committed(financed.investor_id, 10),
        ],
        since=since,
    )
