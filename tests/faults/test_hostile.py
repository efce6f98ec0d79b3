"""Hostile input on every queue the service consumes: dead-lettered with a reason, never a crash,
never a blocked queue.

Every message goes to the six command queues directly, or to the `events`
exchange, which reaches the seven `events_*` queues of the policies and
integration handlers and the projector's queue at once. Each one must be
dead-lettered by exactly the consumers that handle its name (all of them when
it has no readable name), with a reason and its source queue; a well-formed
message of a name nobody handles is acked and ignored. Afterwards the same
process is still running, every consumed queue is empty (nothing held
unacknowledged), and an ordinary financing story still completes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import random
import string
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from financing.adapters.rabbitmq.topology import PROJECTOR_QUEUE, UNROUTED
from financing.application import codec
from tests.acceptance import expected as ex
from tests.faults.hostile import (
    AGGREGATE_ID,
    CASE_HEADER,
    COMMAND_QUEUES,
    CONSUMED_QUEUES,
    DEAD_LETTER_QUEUE,
    EVENT_NAMES,
    EVENT_QUEUES,
    MESSAGE_UUID,
    NAME,
    Hostile,
    Observer,
    RawText,
    assert_well_formed,
    driving,
    expect_dead_letters,
    headers_for,
    money_keys,
    needs_aggregate_id,
    observing,
    publish,
    publish_all,
    to_json,
    valid_body,
    wait_drained,
)
from tests.faults.workload import Deployment, deployment, settle
from tests.support import infra
from tests.support.metrics import scrape, value
from tests.support.rabbitmq import publish_without_properties

MEGABYTE = 1024 * 1024
# Amounts that no money can be: beyond any range, too precise, or not numbers at all.
ABSURD_AMOUNTS = (
    "1e16",
    "-1e300",
    "1e400",
    "1e-40",
    "123456789012345678",
    "-0.00000000000000001",
    "0.1234567890123456789012345678901234",
    "0e-99999",
    "NaN",
    "Infinity",
    "-Infinity",
)
HYPOTHESIS_EXAMPLES = 150


@pytest.fixture(scope="module")
async def hostile_target() -> AsyncIterator[tuple[Deployment, Observer]]:
    async with deployment("hostile") as target, observing(target) as observer:
        yield target, observer


# -- the catalogue: every kind of hostility on every consumed queue ---------------------------


def _with_raw_money(name: str, literal: str) -> bytes:
    """A valid body of `name` whose first amount is the JSON text `literal` (NaN, 1e400...)."""
    body = valid_body(name)
    key = money_keys(name)[0]
    marker = "__amount__"
    if isinstance(body[key], dict):
        body[key]["Amount"] = marker
    else:
        body[key] = marker
    return to_json(body).replace(json.dumps(marker).encode(), literal.encode())


def _header_variants(name: str) -> dict[str, dict[str, Any]]:
    """Headers that break the contract (every value a non-empty string, id and name present)."""
    aggregate = str(uuid.uuid4()) if name in codec.REGISTRY and needs_aggregate_id(name) else None
    good = headers_for(name, aggregate_id=aggregate)
    without_name = {k: v for k, v in good.items() if k != NAME}
    # A message without the id header is not hostile when its message-id
    # property stands in (aio-pika always sets one): that case has its own test.
    return {
        "no name": without_name,
        "empty name": {**good, NAME: ""},
        "int name": {**good, NAME: 7},
        "bool message id": {**good, MESSAGE_UUID: True},
        "table header": {**good, "attempt": {"count": 1, "nested": {"deep": [1, 2]}}},
        "array header": {**good, "path": ["a", 1, False]},
        "float header": {**good, "ratio": 0.5},
        "decimal header": {**good, "amount": Decimal("10.25")},
        "timestamp header": {**good, "at": datetime.datetime(2020, 1, 1)},
        "void header": {**good, "nothing": None},
        "byte-array header": {**good, "blob": bytearray(b"\x00\x01\xff")},
        "non-UTF-8 header": {**good, "junk": RawText(b"caf\xe9 \xff\xfe")},
        "non-UTF-8 name": {**good, NAME: RawText(b"\xc3\x28" + name.encode())},
        "message id of 300 bytes": {**good, MESSAGE_UUID: "m" * 300},
        "message id with NUL": {**good, MESSAGE_UUID: "id\x00with-nul"},
    }


def _body_variants(name: str) -> dict[str, bytes]:
    """Bodies that no consumer of `name` can decode (headers left good)."""
    body = valid_body(name)
    full = to_json(body)
    first = next(iter(body))
    # A number where a string belongs, or a string where a number belongs.
    mistyped = "12345" if first in money_keys(name) else 12345
    uuid_keys = [f.key for f in codec.REGISTRY[name].fields if f.key and f.kind == "uuid"]
    variants = {
        "random bytes": random.randbytes(64),
        "truncated JSON": full[: len(full) // 2],
        "empty body": b"",
        "JSON array": b"[]",
        "JSON string": b'"hello"',
        "huge body (1 MB)": to_json({**body, "padding": "x" * MEGABYTE}),
        "deeply nested": b"[" * 30_000 + b"]" * 30_000,
        "missing field": to_json({k: v for k, v in body.items() if k != first}),
        "no fields": b"{}",
        "wrong type (number or string)": to_json({**body, first: mistyped}),
        "wrong type (list)": to_json({**body, first: [body[first]]}),
        "wrong type (null)": to_json({**body, first: None}),
        "wrong type (bool)": to_json({**body, first: True}),
        "not a UUID": to_json({**body, **{k: "not-a-uuid" for k in uuid_keys[:1]}})
        if uuid_keys
        else b"{",
        "invalid UTF-8 body": b'{"ID": "\xff\xfe"}',
    }
    for literal in ABSURD_AMOUNTS if money_keys(name) else ():
        variants[f"amount {literal}"] = _with_raw_money(name, literal)
    if money_keys(name):
        key = money_keys(name)[0]
        if not isinstance(body[key], dict):
            variants["amount as a string"] = to_json({**body, key: "100"})
    return variants


def catalogue() -> list[Hostile]:
    hostiles: list[Hostile] = []
    for queue in COMMAND_QUEUES:
        for label, body in _body_variants(queue).items():
            hostiles.append(Hostile(f"{queue}: {label}", body, headers_for(queue), queue))
        for label, headers in _header_variants(queue).items():
            hostiles.append(
                Hostile(f"{queue}: {label}", to_json(valid_body(queue)), headers, queue)
            )
        other = next(name for name in COMMAND_QUEUES if name != queue)
        hostiles.append(
            Hostile(
                f"{queue}: a valid {other} misrouted here",
                to_json(valid_body(other)),
                headers_for(other),
                queue,
            )
        )
        hostiles.append(
            Hostile(f"{queue}: unknown name", b"{}", headers_for("NoSuchCommand"), queue)
        )
    hostiles.append(
        Hostile(
            "CreateInvestor: negative balance",
            to_json({"ID": str(uuid.uuid4()), "Balance": -5}),
            headers_for("CreateInvestor"),
            "CreateInvestor",
        )
    )
    for name in EVENT_NAMES:
        aggregate = str(uuid.uuid4()) if needs_aggregate_id(name) else None
        for label, body in _body_variants(name).items():
            headers = headers_for(name, aggregate_id=aggregate)
            hostiles.append(Hostile(f"{name}: {label}", body, headers))
        if aggregate is not None:
            hostiles.append(
                Hostile(
                    f"{name}: no aggregateID",
                    to_json(valid_body(name)),
                    headers_for(name),
                )
            )
            hostiles.append(
                Hostile(
                    f"{name}: aggregateID not a UUID",
                    to_json(valid_body(name)),
                    headers_for(name, aggregate_id="nope"),
                )
            )
    # Header faults on events, once per consumer kind (policy, integration, projected only).
    for name in ("BidOnInvoicePlacedEvent", "IssuerRegistered", "InvestorCreatedEvent"):
        for label, headers in _header_variants(name).items():
            hostiles.append(Hostile(f"{name}: {label}", to_json(valid_body(name)), headers))
    # Names no consumer of `events` handles: acked and ignored, whatever the body.
    for name, body in (
        ("UnknownEvent", b"not json at all"),
        ("SellInvoice", to_json(valid_body("SellInvoice"))),
        ("InvoiceCreated", b"{}"),
        ("x" * 1000, b"[]"),
    ):
        hostiles.append(Hostile(f"events: unhandled name {name[:20]}", body, headers_for(name)))
    return hostiles


# -- generated with hypothesis --------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
# AMQP field values other than strings (pamqp writes floats in 32 bits, integers in 64).
_INT64 = st.integers(-(2**63), 2**63 - 1)
_NON_STRING_HEADER = st.one_of(
    _INT64,
    st.booleans(),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=8), _INT64, max_size=3),
    st.lists(st.integers(0, 100), max_size=3),
    st.binary(max_size=16).map(bytearray),
    st.binary(min_size=1, max_size=32).map(lambda raw: RawText(b"\xff" + raw)),
    st.none(),
)
_UNKNOWN_NAME = st.text(min_size=1, max_size=30).filter(lambda n: n not in codec.REGISTRY)


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


def _wrong_value(kind: str) -> st.SearchStrategy[Any]:
    if kind == "uuid":
        return _JSON.filter(lambda v: not _is_uuid(v))
    if kind == "text":
        # null is no wrong type for a text field: read as an empty name, as the
        # reference's decoder reads it (docs/contract.md, section 2).
        return _JSON.filter(lambda v: v is not None and not isinstance(v, str))
    if kind == "money":
        return _JSON.filter(lambda v: isinstance(v, bool) or not isinstance(v, int | float))
    return _JSON.filter(lambda v: not isinstance(v, dict))


@st.composite
def _broken_body(draw: st.DrawFn, name: str) -> tuple[str, bytes]:
    body = valid_body(name)
    full = to_json(body)
    how = draw(
        st.sampled_from(
            ["random bytes", "truncated", "wrong type", "missing fields", "absurd amount", "array"]
        )
    )
    if how == "random bytes":
        return how, draw(st.binary(max_size=200))
    if how == "truncated":
        return how, full[: draw(st.integers(0, len(full) - 1))]
    if how == "array":
        return how, json.dumps(draw(st.lists(_JSON, max_size=4))).encode()
    spec = [f for f in codec.REGISTRY[name].fields if f.key is not None]
    if how == "missing fields":
        keys = [f.key for f in spec]
        dropped = draw(st.sets(st.sampled_from(keys), min_size=1))
        return how, to_json({k: v for k, v in body.items() if k not in dropped})
    if how == "absurd amount" and money_keys(name):
        return how, _with_raw_money(name, draw(st.sampled_from(ABSURD_AMOUNTS)))
    target = draw(st.sampled_from(spec))
    body[str(target.key)] = draw(_wrong_value(target.kind))
    return "wrong type", to_json(body)


@st.composite
def _hostile(draw: st.DrawFn) -> Hostile:
    queue = draw(st.sampled_from([None, *COMMAND_QUEUES]))
    if queue is None:
        name = draw(st.one_of(st.sampled_from(EVENT_NAMES), _UNKNOWN_NAME))
    else:
        name = draw(st.one_of(st.just(queue), st.sampled_from(COMMAND_QUEUES), _UNKNOWN_NAME))
    shape = name if name in codec.REGISTRY else draw(st.sampled_from(sorted(codec.REGISTRY)))
    how, body = draw(_broken_body(shape))
    aggregate = str(uuid.uuid4()) if needs_aggregate_id(shape) else None
    headers = headers_for(name, aggregate_id=aggregate)
    fault = draw(st.sampled_from(["none", "non-string", "no id", "no name"]))
    if fault == "non-string":
        key = draw(st.sampled_from([NAME, MESSAGE_UUID, AGGREGATE_ID, "x-extra"]))
        headers[key] = draw(_NON_STRING_HEADER)
    elif fault == "no id":
        del headers[MESSAGE_UUID]
    elif fault == "no name":
        del headers[NAME]
    return Hostile(f"generated: {how}, header fault {fault}", body, headers, queue)


def generated(count: int) -> list[Hostile]:
    """`count` hostile messages drawn by hypothesis (generation only: no I/O in the loop)."""
    drawn: list[Hostile] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(_hostile())
    def draw(hostile: Hostile) -> None:
        drawn.append(hostile)

    draw()
    return drawn


# -- the tests ----------------------------------------------------------------------------------


async def _story_still_completes(target: Deployment, observer: Observer) -> None:
    """Scenario 5 then 8: the queues hostile messages went through still serve valid ones."""
    async with driving(target, observer) as financing:
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


async def test_hostile_messages_on_every_consumed_queue_are_dead_lettered_without_harm(
    hostile_target: tuple[Deployment, Observer], fault_figures: dict[str, Any]
) -> None:
    target, observer = hostile_target
    hostiles = catalogue() + generated(HYPOTHESIS_EXAMPLES)
    since = observer.dead_letters.mark()

    await publish_all(observer.broker, hostiles)
    letters = await expect_dead_letters(observer, hostiles, since=since, within=60)

    # Every message settled, and every dead letter taken by the observer: the
    # dead letters seen now are all there will ever be.
    await wait_drained(target.vhost, CONSUMED_QUEUES)
    await wait_drained(target.vhost, [DEAD_LETTER_QUEUE])
    letters = await expect_dead_letters(observer, hostiles, since=since, within=0)
    for case_letters in letters.values():
        for letter in case_letters:
            assert_well_formed(letter)
    assert target.service.running, f"the service died:\n{target.log_tail()}"
    await _story_still_completes(target, observer)
    await settle(target)

    ignored = [h for h in hostiles if not h.expected_dead_letters()]
    queues = {q for h in hostiles for q in h.expected_dead_letters()}
    assert queues == set(CONSUMED_QUEUES), f"queues never tried: {set(CONSUMED_QUEUES) - queues}"
    _add(fault_figures, "hostile inputs tried", len(hostiles))
    _add(fault_figures, "hostile inputs generated by hypothesis", HYPOTHESIS_EXAMPLES)
    _add(fault_figures, "hostile inputs dead-lettered", len(hostiles) - len(ignored))
    _add(fault_figures, "hostile inputs acked and ignored (unhandled names)", len(ignored))
    _add(fault_figures, "dead letters from hostile inputs", sum(map(len, letters.values())))


# -- regressions: each of these once broke the service ------------------------------------------


async def test_a_header_too_large_to_copy_as_text_is_dead_lettered_without_dropping_the_connection(
    hostile_target: tuple[Deployment, Observer],
) -> None:
    # Copied as text, 50 kB of bytes that are not UTF-8 become 150 kB of U+FFFD and
    # 12 000 booleans 170 kB of "true": past the broker's frame size, which made it
    # close the service's connection and the service stop.
    target, observer = hostile_target
    booleans: dict[str, Any] = {f"b{i}": True for i in range(12_000)}
    hostiles = [
        Hostile(
            "50 kB header not UTF-8",
            to_json(valid_body("CreateIssuer")),
            {**headers_for("CreateIssuer"), "junk": RawText(b"\xff" * 50_000)},
            "CreateIssuer",
        ),
        Hostile(
            "12 000 boolean headers",
            to_json(valid_body("BidOnInvoicePlacedEvent")),
            {**headers_for("BidOnInvoicePlacedEvent", aggregate_id=str(uuid.uuid4())), **booleans},
        ),
    ]
    since = observer.dead_letters.mark()

    await publish_all(observer.broker, hostiles)

    letters = await expect_dead_letters(observer, hostiles, since=since)
    for hostile in hostiles:
        for letter in letters[hostile.case]:
            assert_well_formed(letter)
            assert letter.message_id == hostile.headers[MESSAGE_UUID]
            assert letter.name == hostile.name
    [booleans_letter, _] = letters[hostiles[1].case]
    assert "left out" in str(booleans_letter.reason)
    assert target.service.running, f"the service died:\n{target.log_tail()}"
    await _story_still_completes(target, observer)


async def test_a_message_id_the_database_cannot_store_is_dead_lettered_not_retried_for_ever(
    hostile_target: tuple[Deployment, Observer],
) -> None:
    # A NUL character or a 3000-character id fails the INSERT of the processed
    # message id: the projector retried such an event for ever, blocking its queue.
    target, observer = hostile_target
    issuer = str(uuid.uuid4())
    unstorable = ["nul\x00inside", "".join(random.choices(string.ascii_letters, k=3000))]
    hostiles = [
        Hostile(
            f"IssuerCreatedEvent with message id {message_id[:12]!r}",
            to_json({"IssuerID": issuer}),
            {MESSAGE_UUID: message_id, NAME: "IssuerCreatedEvent", AGGREGATE_ID: issuer},
        )
        for message_id in unstorable
    ] + [
        Hostile(
            f"CreateIssuer with message id {message_id[:12]!r}",
            to_json({"ID": issuer}),
            {MESSAGE_UUID: message_id, NAME: "CreateIssuer"},
            "CreateIssuer",
        )
        for message_id in unstorable
    ]
    since = observer.dead_letters.mark()

    await publish_all(observer.broker, hostiles)

    letters = await expect_dead_letters(observer, hostiles, since=since, within=10)
    assert all("_watermill_message_uuid" in str(ls[0].reason) for ls in letters.values())
    assert [h.expected_dead_letters() for h in hostiles[:2]] == [frozenset({PROJECTOR_QUEUE})] * 2
    await wait_drained(target.vhost, [PROJECTOR_QUEUE, "CreateIssuer"], within=10)
    await _story_still_completes(target, observer)


async def test_a_valid_command_misrouted_to_another_command_queue_is_dead_lettered(
    hostile_target: tuple[Deployment, Observer],
) -> None:
    # It used to be acked and ignored: a command lost without a trace.
    target, observer = hostile_target
    issuer = uuid.uuid4()
    misrouted = Hostile(
        "CreateIssuer on the SellInvoice queue",
        to_json({"ID": str(issuer)}),
        headers_for("CreateIssuer"),
        "SellInvoice",
    )
    since = observer.dead_letters.mark()

    await publish(observer.broker, misrouted)

    [letter] = (await expect_dead_letters(observer, [misrouted], since=since))[misrouted.case]
    assert_well_formed(letter)
    assert "CreateIssuer" in str(letter.reason) and "SellInvoice" in str(letter.reason)
    assert letter.body == misrouted.body
    assert observer.events.concerning([str(issuer)]) == []
    assert target.service.running


async def test_unhandled_event_names_are_acked_and_ignored_by_every_consumer(
    hostile_target: tuple[Deployment, Observer],
) -> None:
    target, observer = hostile_target
    unhandled = [
        Hostile("unknown event, bad body", b"\x00\x01", headers_for("SomethingElseHappened")),
        Hostile(
            "a command name on events",
            to_json(valid_body("CreateIssuer")),
            headers_for("CreateIssuer"),
        ),
    ]
    since = observer.dead_letters.mark()
    address = "{}:{}".format(*target.metrics_address)
    labels = {"queue": UNROUTED, "outcome": "ignored"}
    ignored = value(await asyncio.to_thread(scrape, address), "financing_messages_total", **labels)

    await publish_all(observer.broker, unhandled)

    # Routed by no name of ours, both reach the unrouted queue's consumer, which ignores them.
    async def both_ignored() -> bool:
        samples = await asyncio.to_thread(scrape, address)
        return value(samples, "financing_messages_total", **labels) == ignored + len(unhandled)

    await infra.wait_until(both_ignored, what="the unrouted consumer to ignore both")
    await wait_drained(target.vhost, EVENT_QUEUES)
    await wait_drained(target.vhost, [DEAD_LETTER_QUEUE])
    await expect_dead_letters(observer, unhandled, since=since, within=0)
    assert target.service.running


def _add(figures: dict[str, Any], name: str, amount: int) -> None:
    figures[name] = figures.get(name, 0) + amount


async def test_amounts_beyond_the_range_of_money_are_dead_lettered_naming_their_field(
    hostile_target: tuple[Deployment, Observer],
) -> None:
    # Amounts on the bus were taken up to 1e16: a registration balance of
    # 9999999999999999.99 was projected as 1e+16. A message is held to the Commands
    # API's range, at most 999,999,999,999.99 either side of zero.
    target, observer = hostile_target
    amounts = ["999999999999999.9999999999999999", "9999999999999999.99", "1000000000000"]
    hostiles = [
        Hostile(
            f"balance {amount}",
            to_json({"ID": str(uuid.uuid4()), "Balance": "balance"}).replace(
                b'"balance"', amount.encode()
            ),
            headers_for("CreateInvestor"),
            "CreateInvestor",
        )
        for amount in amounts
    ]
    since = observer.dead_letters.mark()

    await publish_all(observer.broker, hostiles)

    letters = await expect_dead_letters(observer, hostiles, since=since)
    for hostile in hostiles:
        [letter] = letters[hostile.case]
        assert "Balance" in str(letter.reason), letter.reason
    assert target.service.running, f"the service died:\n{target.log_tail()}"
    await _story_still_completes(target, observer)


async def test_a_poison_message_without_amqp_properties_and_a_long_id_is_dead_lettered(
    hostile_target: tuple[Deployment, Observer],
) -> None:
    # A publisher other than aio-pika may set no message-id property: the dead
    # letter's copy then took it from the header, and a header of more than 255
    # bytes cannot be a message-id property, so the copy could never be sent.
    target, observer = hostile_target
    host, port = infra.AMQP_HOST, infra.AMQP_PORT
    poison = Hostile(
        "bad JSON, 300-byte id, no properties",
        b"{oops",
        {MESSAGE_UUID: "p" * 300, NAME: "CreateIssuer"},
        "CreateIssuer",
    )
    issuer = uuid.uuid4()
    since = observer.dead_letters.mark()
    events_since = observer.events.mark()

    await publish_without_properties(
        host,
        port,
        target.vhost,
        exchange="",
        routing_key="CreateIssuer",
        body=poison.body,
        headers={**poison.headers, CASE_HEADER: poison.case},
    )
    # A reference publisher's valid message: the two headers, no property at all.
    await publish_without_properties(
        host,
        port,
        target.vhost,
        exchange="events",
        routing_key="",
        body=to_json({"ID": str(issuer), "Name": "bare"}),
        headers={MESSAGE_UUID: str(uuid.uuid4()), NAME: "IssuerRegistered"},
    )

    [letter] = (await expect_dead_letters(observer, [poison], since=since))[poison.case]
    assert_well_formed(letter)
    await ex.expect_events(observer.events, [ex.issuer_created(issuer)], since=events_since)
    assert target.service.running


async def test_a_message_without_any_id_is_dead_lettered_and_the_property_stands_in_for_the_header(
    hostile_target: tuple[Deployment, Observer],
) -> None:
    # Without the header and the property, duplicates could not be told apart:
    # the message cannot be processed exactly once, so it is dead-lettered.
    # With only the property (any publisher but watermill), it is processed.
    target, observer = hostile_target
    anonymous_issuer, property_issuer = uuid.uuid4(), uuid.uuid4()
    anonymous = Hostile(
        "CreateIssuer with neither id header nor message-id property",
        to_json({"ID": str(anonymous_issuer)}),
        {NAME: "CreateIssuer"},
        "CreateIssuer",
    )
    since = observer.dead_letters.mark()
    events_since = observer.events.mark()

    await publish_without_properties(
        infra.AMQP_HOST,
        infra.AMQP_PORT,
        target.vhost,
        exchange="",
        routing_key="CreateIssuer",
        body=anonymous.body,
        headers={**anonymous.headers, CASE_HEADER: anonymous.case},
    )
    await observer.broker.publish(
        "", "CreateIssuer", to_json({"ID": str(property_issuer)}), {NAME: "CreateIssuer"}
    )

    [letter] = (await expect_dead_letters(observer, [anonymous], since=since))[anonymous.case]
    assert_well_formed(letter)
    assert "no message-id property" in str(letter.reason)
    await ex.expect_events(
        observer.events, [ex.issuer_created(property_issuer)], since=events_since
    )
    assert target.service.running
