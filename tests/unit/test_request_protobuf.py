"""Requests read as the protobuf specification reads them (protobuf-go's and upb's
reading, the reference's clients' and servers'), not as betterproto alone would."""

from __future__ import annotations

import struct
from uuid import uuid4

import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from financing.entrypoints.grpc.codec import RequestCodec, as_specified
from financing.generated import (
    AllInvoicesReply,
    BidOnInvoiceCommand,
    Invoice,
    InvoiceStatus,
    Money,
    SellInvoiceCommand,
    Uuid,
)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def field(number: int, wire_type: int, value: bytes) -> bytes:
    """One field on the wire: its tag, then `value` as written."""
    return varint(number << 3 | wire_type) + value


def delimited(number: int, payload: bytes) -> bytes:
    return field(number, 2, varint(len(payload)) + payload)


def uuid_message(value: str) -> bytes:
    return delimited(1, value.encode())


def money_message(amount: float) -> bytes:
    return field(1, 1, struct.pack("<d", amount))


def decoded(data: bytes) -> SellInvoiceCommand:
    message = RequestCodec().decode(data, SellInvoiceCommand)
    assert isinstance(message, SellInvoiceCommand)
    return message


def test_a_message_field_sent_twice_is_merged_not_replaced() -> None:
    """Regression (a probe): `issuer_id{value: I}` then `issuer_id{}` was answered
    `issuer_id: is required`; protobuf merges the two (protobuf-go, upb)."""
    issuer = str(uuid4())
    data = (
        delimited(1, uuid_message(issuer))
        + delimited(2, money_message(5.0))
        + delimited(1, b"")
        + delimited(2, field(9, 0, b"\x01"))  # a part holding an unknown field alone
    )
    message = decoded(data)
    assert message.issuer_id.value == issuer
    assert message.asking_price.amount == 5.0


def test_a_scalar_sent_twice_keeps_its_last_value() -> None:
    first, last = str(uuid4()), str(uuid4())
    data = delimited(1, uuid_message(first) + uuid_message(last))
    assert decoded(data).issuer_id.value == last


@pytest.mark.parametrize(
    "unknown",
    [
        field(15, 3, field(1, 0, b"\x05") + field(15, 4, b"")),  # a group, numbered 15
        field(15, 3, field(16, 3, field(16, 4, b"")) + field(15, 4, b"")),  # groups nested
        field(9, 0, b"\x96\x01"),
        field(9, 1, b"\x00" * 8),
        field(9, 5, b"\x00" * 4),
        delimited(9, b"anything"),
    ],
    ids=["group", "groups-nested", "varint", "fixed64", "fixed32", "delimited"],
)
def test_unknown_fields_of_every_wire_type_are_skipped(unknown: bytes) -> None:
    """Regression (a probe): an unknown field of the group wire types (a newer client's,
    delimited encoding) made every request `not a valid ...`; other parsers skip it."""
    issuer = str(uuid4())
    message = decoded(unknown + delimited(1, uuid_message(issuer)) + unknown)
    assert message.issuer_id.value == issuer
    assert RequestCodec().decode(unknown, Empty) == Empty()


@pytest.mark.parametrize(
    ("data", "missing"),
    [
        (field(1, 0, b"\x01") + delimited(2, money_message(5.0)), "issuer_id"),
        (delimited(1, field(1, 1, b"\x00" * 8)) + delimited(2, money_message(5.0)), "issuer_id"),
        (
            delimited(1, uuid_message(str(uuid4()))) + delimited(2, field(1, 5, b"\x00" * 4)),
            "amount",
        ),
        (delimited(1, uuid_message(str(uuid4()))) + delimited(2, field(1, 0, b"\x05")), "amount"),
    ],
    ids=["issuer-id-a-varint", "uuid-value-fixed64", "amount-fixed32", "amount-varint"],
)
def test_a_known_field_of_another_wire_type_is_taken_for_an_unknown_one(
    data: bytes, missing: str
) -> None:
    """Regression (a probe): refused as `request: ... does not match the protobuf schema`,
    naming no field; skipped, as other parsers do, the field is missing, and the
    validation that follows names it."""
    message = decoded(data)
    if missing == "issuer_id":
        assert message.issuer_id.value == ""
    else:
        assert message.asking_price.amount == 0.0


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (field(0, 0, b"\x01"), "a field numbered 0"),
        (bytes([1 << 3 | 7]), "wire type 7 where a field begins"),
        (field(1, 4, b""), "wire type 4 where a field begins"),
        (delimited(1, b"\x0a\x05ab"), "a field cut short"),
        (b"\x0a\x10abc", "a field cut short"),
        (field(9, 0, b"\xff" * 10 + b"\x01"), "a varint cut short or longer than 10 bytes"),
        (field(15, 3, field(1, 0, b"\x05") + field(14, 4, b"")), "a group ended by another's end"),
    ],
    ids=[
        "number-0",
        "wire-type-7",
        "group-end-alone",
        "nested-cut",
        "cut",
        "long-varint",
        "group-end",
    ],
)
def test_bytes_no_parser_reads_are_refused_saying_why(data: bytes, said: str) -> None:
    with pytest.raises(GRPCError) as error:
        decoded(data)
    assert error.value.status is Status.INVALID_ARGUMENT
    assert error.value.message == f"request: not a valid SellInvoiceCommand: {said}"


def test_messages_as_protobuf_writes_them_read_the_same() -> None:
    bid = BidOnInvoiceCommand(
        investor_id=Uuid(str(uuid4())), invoice_id=Uuid(str(uuid4())), bid=Money(12.34)
    )
    assert as_specified(bytes(bid), BidOnInvoiceCommand) == bytes(bid)
    reply = AllInvoicesReply(
        invoices=[
            Invoice(Uuid(str(uuid4())), Uuid(str(uuid4())), Money(10.0), InvoiceStatus.FINANCED),
            Invoice(Uuid(str(uuid4())), Uuid(str(uuid4())), Money(20.0), InvoiceStatus.AVAILABLE),
        ]
    )
    # A repeated message field: each element kept apart, none merged.
    assert AllInvoicesReply().parse(as_specified(bytes(reply), AllInvoicesReply)) == reply
