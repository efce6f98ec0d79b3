from __future__ import annotations

import json
import re
import subprocess
import sys
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from financing.application import codec
from financing.application.errors import PoisonMessage
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    InvestorRegistered,
    IssuerRegistered,
    Message,
    ReverseFinancing,
    SellInvoice,
)
from financing.domain import events as ev

D = Decimal
INVESTOR = UUID("11111111-1111-4111-8111-111111111111")
INVOICE = UUID("22222222-2222-4222-8222-222222222222")
ISSUER = UUID("33333333-3333-4333-8333-333333333333")
INV = str(INVESTOR)
INO = str(INVOICE)
ISS = str(ISSUER)
BID = ev.Bid(INVESTOR, D("20.5"))
BID_JSON = {"InvestorID": INV, "Amount": 20.5}


class Case:
    """One message type: a message, its exact JSON body and its aggregateID header."""

    def __init__(self, message: Message, body: dict[str, Any], header: str | None) -> None:
        self.message = message
        self.body = body
        self.header = header


# Every message of docs/contract.md section 2. Fields marked † are absent from the
# body: they travel in the aggregateID header.
CASES: dict[str, Case] = {
    "IssuerCreatedEvent": Case(ev.IssuerCreatedEvent(ISSUER), {"IssuerID": ISS}, ISS),
    "InvestorCreatedEvent": Case(ev.InvestorCreatedEvent(INVESTOR), {"InvestorID": INV}, INV),
    "InvestorFundsAddedEvent": Case(
        ev.InvestorFundsAddedEvent(INVESTOR, D("100")), {"Amount": 100}, INV
    ),
    "BidOnInvoicePlacedEvent": Case(
        ev.BidOnInvoicePlacedEvent(INVESTOR, INVOICE, D("20.5")),
        {"InvoiceID": INO, "BidAmount": 20.5},
        INV,
    ),
    "InvestorFundsReleasedEvent": Case(
        ev.InvestorFundsReleasedEvent(INVESTOR, D("10.5")), {"Amount": 10.5}, INV
    ),
    "InvestorFundsCommittedEvent": Case(
        ev.InvestorFundsCommittedEvent(INVESTOR, D("10")), {"Amount": 10}, INV
    ),
    "InvoiceCreatedEvent": Case(
        ev.InvoiceCreatedEvent(INVOICE, ISSUER, D("10")),
        {"InvoiceID": INO, "IssuerID": ISS, "AskingPrice": 10},
        INO,
    ),
    "InvoiceFinancedEvent": Case(
        ev.InvoiceFinancedEvent(INVOICE, D("10"), BID), {"AskingPrice": 10, "Bid": BID_JSON}, INO
    ),
    "BidOnInvoiceRejectedEvent": Case(
        ev.BidOnInvoiceRejectedEvent(INVOICE, BID), {"Bid": BID_JSON}, INO
    ),
    "InvoiceApprovedEvent": Case(
        ev.InvoiceApprovedEvent(INVOICE, D("10"), BID), {"SoldPrice": 10, "Bid": BID_JSON}, INO
    ),
    "InvoiceReversedEvent": Case(
        ev.InvoiceReversedEvent(INVOICE, D("10"), BID), {"SoldPrice": 10, "Bid": BID_JSON}, INO
    ),
    "IssuerRegistered": Case(
        IssuerRegistered(ISSUER, "ACME Ltd"), {"ID": ISS, "Name": "ACME Ltd"}, None
    ),
    "InvestorRegistered": Case(
        InvestorRegistered(INVESTOR, 'Zoë "Z" Doe', D("100.25")),
        {"ID": INV, "Name": 'Zoë "Z" Doe', "Balance": 100.25},
        None,
    ),
    "SellInvoice": Case(
        SellInvoice(INVOICE, ISSUER, D("20")),
        {"InvoiceID": INO, "IssuerID": ISS, "AskingPrice": 20},
        None,
    ),
    "BidOnInvoice": Case(
        BidOnInvoice(INVESTOR, INVOICE, D("0.1")),
        {"InvestorID": INV, "InvoiceID": INO, "BidAmount": 0.1},
        None,
    ),
    "ApproveFinancing": Case(ApproveFinancing(INVOICE), {"InvoiceID": INO}, None),
    "ReverseFinancing": Case(ReverseFinancing(INVOICE), {"InvoiceID": INO}, None),
    "CreateInvestor": Case(CreateInvestor(INVESTOR, D("100")), {"ID": INV, "Balance": 100}, None),
    "CreateIssuer": Case(CreateIssuer(ISSUER), {"ID": ISS}, None),
}
NAMES = sorted(CASES)
HEADER_NAMES = sorted(name for name, case in CASES.items() if case.header is not None)
# The events whose aggregate id is marked † in the contract: header only.
DAGGER_NAMES = sorted(
    set(HEADER_NAMES) - {"IssuerCreatedEvent", "InvestorCreatedEvent", "InvoiceCreatedEvent"}
)
AGGREGATE_KEYS = {"Investor": "InvestorID", "Invoice": "InvoiceID", "Issuer": "IssuerID"}


def loads_exact(body: bytes) -> Any:
    return json.loads(body, parse_float=Decimal)


def test_the_registry_knows_exactly_the_messages_of_the_contract() -> None:
    assert set(codec.REGISTRY) == set(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_a_message_is_registered_under_its_type_name(name: str) -> None:
    assert codec.name_of(CASES[name].message) == name
    assert codec.REGISTRY[name].cls is type(CASES[name].message)


@pytest.mark.parametrize("name", NAMES)
def test_the_body_has_exactly_the_go_field_names(name: str) -> None:
    case = CASES[name]
    assert json.loads(codec.encode(case.message)) == case.body


@pytest.mark.parametrize("name", NAMES)
def test_the_body_is_written_as_go_writes_it_compact_in_field_order(name: str) -> None:
    case = CASES[name]
    written = json.dumps(case.body, separators=(",", ":"))
    assert codec.encode(case.message) == written.encode()
    assert codec.encode_text(case.message) == written


@pytest.mark.parametrize("name", DAGGER_NAMES)
def test_header_borne_ids_are_left_out_of_the_body(name: str) -> None:
    message = CASES[name].message
    assert isinstance(message, ev.DomainEvent)
    assert AGGREGATE_KEYS[message.aggregate_type] not in json.loads(codec.encode(message))


@pytest.mark.parametrize("name", NAMES)
def test_decoding_an_encoded_message_gives_it_back(name: str) -> None:
    case = CASES[name]
    assert codec.decode(name, codec.encode(case.message), case.header) == case.message


@pytest.mark.parametrize("name", DAGGER_NAMES)
def test_header_borne_ids_are_taken_from_the_aggregate_id_header(name: str) -> None:
    case = CASES[name]
    assert case.header is not None
    decoded = codec.decode(name, json.dumps(case.body).encode(), case.header)
    assert decoded == case.message
    assert isinstance(decoded, ev.DomainEvent)
    assert decoded.aggregate_id == UUID(case.header)


@pytest.mark.parametrize("name", DAGGER_NAMES)
def test_an_aggregate_id_given_as_a_uuid_is_taken_as_it_is(name: str) -> None:
    case = CASES[name]
    assert case.header is not None
    aggregate_id = UUID(case.header)

    decoded = codec.decode(name, json.dumps(case.body).encode(), aggregate_id)

    assert decoded == case.message
    assert isinstance(decoded, ev.DomainEvent)
    assert decoded.aggregate_id is aggregate_id


def test_money_is_written_as_a_json_number_in_plain_decimal_form() -> None:
    body = codec.encode(ev.BidOnInvoicePlacedEvent(INVESTOR, INVOICE, D("0.1")))
    assert re.search(rb'"BidAmount":0\.1[,}]', body)
    body = codec.encode(ev.InvestorFundsAddedEvent(INVESTOR, D("1E+2")))
    assert body == b'{"Amount":100}'
    body = codec.encode(ev.BidOnInvoiceRejectedEvent(INVOICE, ev.Bid(INVESTOR, D("5.25"))))
    assert loads_exact(body)["Bid"]["Amount"] == D("5.25")


@pytest.mark.parametrize(
    ("number", "expected"),
    [("0.1", "0.1"), ("100", "100"), ("1e2", "1E+2"), ("10.25", "10.25"), ("0.30", "0.30")],
)
def test_a_json_number_is_read_as_the_exact_decimal_it_spells(number: str, expected: str) -> None:
    body = f'{{"Amount":{number}}}'.encode()
    decoded = codec.decode("InvestorFundsAddedEvent", body, INV)
    assert isinstance(decoded, ev.InvestorFundsAddedEvent)
    assert decoded.amount == D(expected)
    assert str(decoded.amount) == expected


def test_a_tenth_stays_exactly_a_tenth_through_the_codec() -> None:
    decoded = codec.decode("CreateInvestor", f'{{"ID":"{INV}","Balance":0.1}}'.encode())
    assert isinstance(decoded, CreateInvestor)
    assert decoded.balance == D("0.1")
    assert decoded.balance + D("0.2") == D("0.3")


def test_a_reference_double_with_a_long_tail_is_read_exactly() -> None:
    # What a float64 producer writes for 0.1 + 0.2.
    decoded = codec.decode("InvestorFundsAddedEvent", b'{"Amount":0.30000000000000004}', INV)
    assert isinstance(decoded, ev.InvestorFundsAddedEvent)
    assert decoded.amount == D("0.30000000000000004")


def test_unknown_body_fields_and_extra_headers_are_ignored() -> None:
    body = json.dumps({"InvoiceID": INO, "Note": [1, {"x": None}], "InvestorID": INV}).encode()
    assert codec.decode("ApproveFinancing", body, aggregate_id=ISS) == ApproveFinancing(INVOICE)


def test_uppercase_ids_are_read_and_written_back_in_lowercase() -> None:
    decoded = codec.decode("CreateIssuer", f'{{"ID":"{ISS.upper()}"}}'.encode())
    assert decoded == CreateIssuer(ISSUER)
    assert json.loads(codec.encode(decoded)) == {"ID": ISS}


@settings(max_examples=100, deadline=None)
@given(
    cents=st.integers(min_value=-(10**14), max_value=10**14),
    name=st.text(max_size=30),
)
def test_any_amount_and_name_survive_the_codec(cents: int, name: str) -> None:
    message = InvestorRegistered(INVESTOR, name, Decimal(cents).scaleb(-2))
    assert codec.decode("InvestorRegistered", codec.encode(message)) == message


# Poison messages: PoisonMessage naming what is wrong.


def poison(name: str, body: bytes | str, aggregate_id: str | None = None) -> str:
    raw = body.encode() if isinstance(body, str) else body
    with pytest.raises(PoisonMessage) as caught:
        codec.decode(name, raw, aggregate_id)
    return str(caught.value)


def test_an_unknown_message_name_is_poison() -> None:
    assert "'InvoicePaidEvent'" in poison("InvoicePaidEvent", b"{}")


@pytest.mark.parametrize("body", [b"", b"{", b"{'ID': 1}", b"\xff\xfe{}", b"[" * 60_000])
def test_a_body_that_is_not_json_is_poison(body: bytes) -> None:
    reason = poison("CreateIssuer", body)
    assert reason.startswith("CreateIssuer: body is not valid JSON")


@pytest.mark.parametrize("body", [b"[]", b"null", b'"x"', b"1", b"true"])
def test_a_body_that_is_not_a_json_object_is_poison(body: bytes) -> None:
    assert "must be a JSON object" in poison("CreateIssuer", body)


def test_a_huge_body_is_poison() -> None:
    body = json.dumps({"ID": ISS, "Name": "x" * (codec.MAX_BODY_BYTES + 1)}).encode()
    assert "exceeds" in poison("IssuerRegistered", body)


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("SellInvoice", {"InvoiceID": INO, "AskingPrice": 10}, "IssuerID"),
        ("BidOnInvoice", {"InvestorID": INV, "InvoiceID": INO}, "BidAmount"),
        ("CreateInvestor", {"ID": INV}, "Balance"),
        ("IssuerRegistered", {"ID": ISS}, "Name"),
        ("InvoiceFinancedEvent", {"AskingPrice": 10}, "Bid"),
        ("InvoiceFinancedEvent", {"AskingPrice": 10, "Bid": {"Amount": 5}}, "Bid.InvestorID"),
        ("InvoiceApprovedEvent", {"SoldPrice": 10, "Bid": {"InvestorID": INV}}, "Bid.Amount"),
    ],
)
def test_a_missing_field_is_poison_naming_the_field(
    name: str, body: dict[str, Any], field: str
) -> None:
    reason = poison(name, json.dumps(body), INO)
    assert "missing field" in reason
    assert field.rsplit(".", 1)[-1] in reason
    assert name in reason


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("CreateInvestor", {"ID": INV, "Balance": "100"}, "CreateInvestor.Balance"),
        ("CreateInvestor", {"ID": INV, "Balance": True}, "CreateInvestor.Balance"),
        ("CreateInvestor", {"ID": INV, "Balance": None}, "CreateInvestor.Balance"),
        ("CreateInvestor", {"ID": INV, "Balance": [100]}, "CreateInvestor.Balance"),
        ("CreateIssuer", {"ID": 42}, "CreateIssuer.ID"),
        ("CreateIssuer", {"ID": True}, "CreateIssuer.ID"),
        ("CreateIssuer", {"ID": None}, "CreateIssuer.ID"),
        ("IssuerRegistered", {"ID": ISS, "Name": 7}, "IssuerRegistered.Name"),
        ("IssuerRegistered", {"ID": ISS, "Name": False}, "IssuerRegistered.Name"),
        ("BidOnInvoiceRejectedEvent", {"Bid": [INV, 5]}, "BidOnInvoiceRejectedEvent.Bid"),
        ("BidOnInvoiceRejectedEvent", {"Bid": "5"}, "BidOnInvoiceRejectedEvent.Bid"),
        (
            "BidOnInvoiceRejectedEvent",
            {"Bid": {"InvestorID": INV, "Amount": "5"}},
            "BidOnInvoiceRejectedEvent.Bid.Amount",
        ),
        (
            "BidOnInvoiceRejectedEvent",
            {"Bid": {"InvestorID": 5, "Amount": 5}},
            "BidOnInvoiceRejectedEvent.Bid.InvestorID",
        ),
    ],
)
def test_a_field_of_the_wrong_type_is_poison_naming_the_field(
    name: str, body: dict[str, Any], field: str
) -> None:
    assert field in poison(name, json.dumps(body), INO)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_amount_is_poison_naming_the_field(constant: str) -> None:
    reason = poison("CreateInvestor", f'{{"ID":"{INV}","Balance":{constant}}}')
    assert "CreateInvestor.Balance" in reason
    assert "finite" in reason
    bid = f'{{"InvestorID":"{INV}","Amount":{constant}}}'
    reason = poison("InvoiceFinancedEvent", f'{{"AskingPrice":10,"Bid":{bid}}}', INO)
    assert "InvoiceFinancedEvent.Bid.Amount" in reason


@pytest.mark.parametrize("number", ["1e16", "-1e300", "1e-16", "1e999999999"])
def test_an_amount_out_of_range_for_money_is_poison_naming_the_field(number: str) -> None:
    assert "CreateInvestor.Balance" in poison(
        "CreateInvestor", f'{{"ID":"{INV}","Balance":{number}}}'
    )


def test_a_zero_with_a_huge_exponent_is_poison_rather_than_a_huge_body() -> None:
    # Written back in plain form it would take a hundred million digits.
    reason = poison("CreateInvestor", f'{{"ID":"{INV}","Balance":0e-99999999}}')
    assert "CreateInvestor.Balance" in reason


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not-a-uuid",
        "11111111-1111-4111-8111-11111111111",
        "z" * 10_000,
        " 1111111-1111-4111-8111-111111111111",  # Python's UUID() would read this one
    ],
)
def test_a_bad_uuid_is_poison_naming_the_field(value: str) -> None:
    reason = poison(
        "SellInvoice", json.dumps({"InvoiceID": INO, "IssuerID": value, "AskingPrice": 1})
    )
    assert "SellInvoice.IssuerID" in reason
    assert len(reason) < 200


@pytest.mark.parametrize("name", DAGGER_NAMES)
def test_a_missing_aggregate_id_header_is_poison_when_the_body_relies_on_it(name: str) -> None:
    assert "aggregateID" in poison(name, codec.encode(CASES[name].message), None)


@pytest.mark.parametrize(
    "name", ["IssuerCreatedEvent", "InvestorCreatedEvent", "InvoiceCreatedEvent"]
)
def test_a_creation_event_needs_no_aggregate_id_header(name: str) -> None:
    assert codec.decode(name, codec.encode(CASES[name].message)) == CASES[name].message


def test_a_bad_aggregate_id_header_is_poison_naming_the_header() -> None:
    assert "aggregateID" in poison("InvestorFundsAddedEvent", b'{"Amount":1}', "nope")


# Money in a message: the Commands API's range (money.within_range), whatever the message;
# float-based producers' digits beyond cents are kept.


# Every money field of every message type, as (name, body with the amount at "__amount__",
# aggregateID header, where the reason names it).
def checked(name: str) -> bool:
    """Whether a message of this name is held to the range: commands and integration
    events; a domain event is read as the event store row it was."""
    return not issubclass(codec.REGISTRY[name].cls, ev.DomainEvent)


MONEY_FIELDS = [
    (name, {**case.body, key: "__amount__"}, case.header, f"{name}.{key}")
    for name, case in CASES.items()
    if checked(name)
    for field in codec.REGISTRY[name].body
    if field.kind == "money"
    for key in [field.key]
    if key is not None
] + [
    (name, {**case.body, "Bid": {**BID_JSON, "Amount": "__amount__"}}, case.header, f"{name}.Bid")
    for name, case in CASES.items()
    if checked(name) and "Bid" in case.body
]


def with_amount(body: dict[str, Any], number: str) -> bytes:
    return json.dumps(body).replace('"__amount__"', number).encode()


def test_every_money_field_is_covered() -> None:
    kinds = [f.kind for n, t in codec.REGISTRY.items() if checked(n) for f in t.fields]
    assert len(MONEY_FIELDS) == kinds.count("money") + kinds.count("bid") > 0


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("9999999999999999.99", "must be at most 999999999999.99"),
        ("1000000000000", "must be at most 999999999999.99"),
        ("999999999999.991", "must be at most 999999999999.99"),
        ("-1000000000000", "must be at least -999999999999.99"),
    ],
)
@pytest.mark.parametrize(("name", "body", "header", "where"), MONEY_FIELDS)
def test_a_delivered_amount_the_commands_api_refuses_is_poison_naming_the_field(
    number: str, reason: str, name: str, body: dict[str, Any], header: str | None, where: str
) -> None:
    """Regression: an InvestorRegistered Balance of 9999999999999999.99 was taken and
    read back as 1e+16, where the Commands API takes at most 999999999999.99."""
    with pytest.raises(PoisonMessage) as caught:
        codec.decode_message(name, with_amount(body, number), header)
    assert str(caught.value).startswith(f"{where}")
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("9999999999999999.99", "must be at most 999999999999.99, got 9999999999999999.99"),
        ("-1000000000000", "must be at least -999999999999.99"),
        ("1e16", "1E+16 is out of range for money"),
        ("1e-16", "1E-16 is too small for money: an amount other than 0 is at least 1E-15"),
        # What a float64 producer (Go's json.Marshal) writes for its smallest doubles.
        ("5e-324", "5E-324 is too small for money: an amount other than 0 is at least 1E-15"),
        ("1e999999999", "1E+999999999 is out of range for money"),
        ("0e-99999999", "more than 31 decimal places"),
        ("1" * 60_000, f"{'1' * 37}... is out of range for money"),
    ],
)
def test_a_registration_balance_that_is_not_money_is_poison_with_the_reason(
    number: str, reason: str
) -> None:
    body = f'{{"ID":"{INV}","Name":"Ann","Balance":{number}}}'.encode()
    with pytest.raises(PoisonMessage) as caught:
        codec.decode_message("InvestorRegistered", body)
    assert str(caught.value).startswith(f"InvestorRegistered.Balance: {reason}")
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    "number",
    [
        "999999999999.99",
        "0",
        "0.00",
        "-5",
        "-999999999999.99",
        "10.5",
        "1.50000",
        "0.001",
        "0.30000000000000004",  # a float64 producer's 0.1 + 0.2
        "999999999999.9899",
    ],
)
def test_a_delivered_amount_up_to_the_limit_is_read_exactly(number: str) -> None:
    # Whether it may be zero or negative is the domain's rule (an initial balance >= 0;
    # an amount <= 0 changes nothing), which names the aggregate it breaks.
    body = f'{{"ID":"{INV}","Name":"Ann","Balance":{number}}}'.encode()
    decoded = codec.decode_message("InvestorRegistered", body)
    assert decoded == InvestorRegistered(INVESTOR, "Ann", D(number))


@pytest.mark.parametrize("decode", [codec.decode, codec.decode_message])
def test_an_event_store_row_is_read_as_it_was_recorded(decode: Any) -> None:
    # Events appended before messages were held to the range must stay readable, from
    # the store (a rebuild) and on the bus (relayed after an upgrade, or requeued).
    body = '{"Amount":999999999999999.9999999999999999}'
    decoded = decode("InvestorFundsAddedEvent", body, INV)
    assert decoded == ev.InvestorFundsAddedEvent(INVESTOR, D("999999999999999.9999999999999999"))


# Encodings: JSON on the bus is UTF-8 (docs/contract.md section 2).

REGISTERED = f'{{"ID":"{INV}","Name":"Zoë","Balance":10}}'


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (REGISTERED.encode("utf-16"), "UTF-16"),
        (REGISTERED.encode("utf-16-le"), "UTF-16-LE"),
        (REGISTERED.encode("utf-16-be"), "UTF-16-BE"),
        (REGISTERED.encode("utf-32"), "UTF-32"),
        (REGISTERED.encode("utf-8-sig"), "UTF-8 with a byte order mark"),
    ],
)
@pytest.mark.parametrize("decode", [codec.decode_message, codec.decode])
def test_a_body_in_another_encoding_than_utf8_is_poison_naming_it(
    body: bytes, found: str, decode: Any
) -> None:
    """Regression: a UTF-16 JSON body was read (json.detect_encoding), where the
    contract's JSON is UTF-8 and the reference's decoder refuses it."""
    with pytest.raises(PoisonMessage) as caught:
        decode("InvestorRegistered", body)
    assert str(caught.value) == (
        f"InvestorRegistered: body is not valid JSON: it must be UTF-8, not {found}"
    )


@pytest.mark.parametrize(
    "body",
    [
        REGISTERED.encode("latin-1"),
        REGISTERED.encode().replace(b"Zo\xc3\xab", b"Zo\xed\xa0\x80"),  # a lone surrogate
    ],
)
def test_a_body_that_is_not_valid_utf8_is_poison(body: bytes) -> None:
    with pytest.raises(PoisonMessage, match="body is not valid JSON: it is not UTF-8"):
        codec.decode_message("InvestorRegistered", body)


def test_a_utf8_body_is_read() -> None:
    decoded = codec.decode_message("InvestorRegistered", REGISTERED.encode())
    assert decoded == InvestorRegistered(INVESTOR, "Zoë", D(10))


def test_a_null_name_is_read_as_an_empty_one_as_the_reference_reads_it() -> None:
    """A producer with a nullable name (Java's, Go's with a pointer) writes `null`; the
    reference reads it as an empty string, and the service never uses the name."""
    body = json.dumps({"ID": INV, "Name": None, "Balance": 100}).encode()
    decoded = codec.decode("InvestorRegistered", body, None)
    assert decoded == InvestorRegistered(UUID(INV), "", Decimal(100))


def deeply_nested(depth: int) -> bytes:
    return b'{"ID": ' + b"[" * depth + b"]" * depth + b', "Name": "x"}'


def test_a_body_nested_deeper_than_any_message_is_poison_before_it_is_read() -> None:
    with pytest.raises(PoisonMessage, match="nested deeper than"):
        codec.decode_message("IssuerRegistered", deeply_nested(codec.MAX_NESTING + 1))


def test_brackets_inside_strings_are_not_nesting() -> None:
    body = json.dumps({"ID": "00000000-0000-4000-8000-000000000001", "Name": "[{" * 500})
    message = codec.decode_message("IssuerRegistered", body.encode())
    assert message.name_ == "[{" * 500  # type: ignore[attr-defined]


def test_a_deeply_nested_body_is_refused_on_a_small_stack_without_crashing() -> None:
    """Regression: on a process whose stack is small (`ulimit -s 128`), a message nested a
    few thousand levels deep crashed it (SIGSEGV) as it was read, and again at every
    start while the message waited in its queue."""
    script = (
        "from financing.application import codec\n"
        "from financing.application.errors import PoisonMessage\n"
        "from tests.unit.test_codec import deeply_nested\n"
        "try:\n"
        "    codec.decode_message('IssuerRegistered', deeply_nested(30_000))\n"
        "except PoisonMessage as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        ["prlimit", "--stack=131072:131072", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "nested deeper than" in done.stdout
