"""Stored events as they leave the store: deterministic ids and string headers."""

from __future__ import annotations

import uuid
from decimal import Decimal
from uuid import UUID

from financing.application import codec
from financing.application.ports import (
    MESSAGE_NAMESPACE,
    StoredEvent,
    derived_message_id,
    event_message_id,
)
from financing.domain import events as ev

INVESTOR = UUID("11111111-1111-4111-8111-111111111111")
OTHER = UUID("44444444-4444-4444-8444-444444444444")


def stored(event: ev.DomainEvent, version: int, position: int = 1) -> StoredEvent:
    return StoredEvent(
        position=position,
        aggregate_type=event.aggregate_type,
        aggregate_id=event.aggregate_id,
        version=version,
        name=event.name(),
        body=codec.encode_text(event),
    )


def test_an_event_message_id_is_the_same_every_time_it_is_derived() -> None:
    # docs/domain.md defect 4: a fresh random UUID per publish made duplicates undetectable
    assert event_message_id(INVESTOR, 3) == event_message_id(INVESTOR, 3)
    added = ev.InvestorFundsAddedEvent(INVESTOR, Decimal("10"))
    assert stored(added, 3, position=7).message_id == stored(added, 3, position=9).message_id
    assert stored(added, 3).envelope().message_id == str(event_message_id(INVESTOR, 3))


def test_message_ids_are_the_name_based_uuids_every_version_of_the_service_derived() -> None:
    # A relayer of a newer version publishing an event again after an upgrade must give
    # it the id it had: consumers deduplicate by it.
    assert event_message_id(INVESTOR, 3) == "73789ded-10eb-52c8-b924-d64058c69b86"
    assert derived_message_id("m-1", "CreateIssuer") == UUID("7cd5be53-a55e-510a-9761-0e1757cd56d5")
    for aggregate_id in (INVESTOR, OTHER, *(uuid.uuid4() for _ in range(200))):
        for version in (1, 2, 9, 10, 2**31 - 1):
            expected = uuid.uuid5(MESSAGE_NAMESPACE, f"event/{aggregate_id}/{version}")
            assert event_message_id(aggregate_id, version) == str(expected)
    for source in ("m-1", "é/∑", str(uuid.uuid4())):
        expected = uuid.uuid5(MESSAGE_NAMESPACE, f"command/{source}/CreateIssuer")
        assert derived_message_id(source, "CreateIssuer") == expected


def test_different_events_have_different_message_ids() -> None:
    ids = {event_message_id(a, v) for a in (INVESTOR, OTHER) for v in range(1, 50)}
    assert len(ids) == 98


def test_a_stored_event_travels_with_its_aggregate_id_and_string_headers() -> None:
    added = ev.InvestorFundsAddedEvent(INVESTOR, Decimal("10"))
    envelope = stored(added, 2).envelope()
    assert envelope.name == "InvestorFundsAddedEvent"
    assert envelope.aggregate_id == str(INVESTOR)
    assert envelope.body == b'{"Amount":10}'
    assert all(isinstance(v, str) for v in envelope.headers.values())
    assert envelope.headers["aggregateVersion"] == "2"
    assert envelope.headers["aggregateType"] == "Investor"


def test_a_stored_event_decodes_back_to_the_domain_event() -> None:
    rejected = ev.BidOnInvoiceRejectedEvent(OTHER, ev.Bid(INVESTOR, Decimal("0.1")))
    assert stored(rejected, 3).event == rejected
