"""Content headers pamqp cannot decode: decoded to markers, encoded back, judged poison."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from aio_pika import IncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands, frame, header

from financing.adapters.rabbitmq import frames
from financing.adapters.rabbitmq.envelopes import from_amqp
from financing.adapters.rabbitmq.frames import NotUtf8, OutOfRangeTimestamp, flaw
from financing.application.errors import PoisonMessage
from tests.support.rabbitmq import RawText

LATEST = 2**64 - 1
NEGATIVE = -(2**62) & LATEST  # -2**62 written as the unsigned 64 bits AMQP carries


def content_header(**properties: Any) -> bytes:
    """A content header frame carrying `properties`, as the broker delivers it."""
    return frame.marshal(header.ContentHeader(0, 2, commands.Basic.Properties(**properties)), 1)


def decoded(data: bytes) -> commands.Basic.Properties:
    _, _, value = frame.unmarshal(data)
    assert isinstance(value, header.ContentHeader)
    return value.properties


def headers_of(properties: commands.Basic.Properties) -> dict[str, Any]:
    assert properties.headers is not None
    return dict(properties.headers)


@pytest.mark.parametrize("raw", [LATEST, NEGATIVE, 2**63, 253402300800 * 1000])
def test_a_timestamp_out_of_range_decodes_to_its_raw_value_and_encodes_back_to_it(
    raw: int,
) -> None:
    data = content_header(
        headers={"ts": OutOfRangeTimestamp.of(raw), "in": {"list": [OutOfRangeTimestamp.of(raw)]}},
        timestamp=OutOfRangeTimestamp.of(raw),
    )
    properties = decoded(data)
    headers = headers_of(properties)

    for value in (
        headers["ts"],
        headers["in"]["list"][0],
        properties.timestamp,
    ):
        assert isinstance(value, OutOfRangeTimestamp)
        assert value.raw == raw
        assert str(value) == str(raw)
    assert frame.marshal(header.ContentHeader(0, 2, properties), 1) == data


def test_timestamps_in_range_decode_as_before() -> None:
    moment = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    properties = decoded(content_header(headers={"ts": moment}, timestamp=moment))
    assert properties.headers == {"ts": moment}
    assert properties.timestamp == moment
    assert type(properties.timestamp) is datetime.datetime


def test_text_that_is_not_utf8_decodes_with_replacement_characters_and_its_bytes() -> None:
    data = content_header(
        content_type=RawText(b"application/json\xff"),
        message_id=RawText(b"m-\xc3"),
        headers={RawText(b"k\xff\xfe"): "value", "nested": {RawText(b"\xff"): 1}},
    )
    properties = decoded(data)

    assert isinstance(properties.content_type, NotUtf8)
    assert properties.content_type == "application/json\ufffd"
    assert properties.content_type.raw == b"application/json\xff"
    assert isinstance(properties.message_id, NotUtf8)
    assert properties.message_id.raw == b"m-\xc3"
    headers = headers_of(properties)
    [key] = [key for key in headers if key != "nested"]
    assert isinstance(key, NotUtf8)
    assert key.raw == b"k\xff\xfe"
    assert headers[key] == "value"
    assert [*headers["nested"]] == ["\ufffd"]
    # Encoded again (a dead letter's copy), it is valid UTF-8, and decodes as plain text.
    again = decoded(frame.marshal(header.ContentHeader(0, 2, properties), 1))
    assert type(again.content_type) is str
    assert again.content_type == "application/json\ufffd"
    assert again.message_id == "m-\ufffd"
    assert again.headers == {"k\ufffd\ufffd": "value", "nested": {"\ufffd": 1}}


def test_valid_text_and_long_strings_decode_as_before() -> None:
    properties = decoded(
        content_header(
            content_type="application/json", headers={"ünï": "cödé", "bytes": RawText(b"\xff")}
        )
    )
    assert type(properties.content_type) is str
    assert properties.headers == {"ünï": "cödé", "bytes": b"\xff"}  # a long string: bytes
    assert all(type(key) is str for key in properties.headers)


def test_a_truncated_timestamp_is_still_an_error() -> None:
    with pytest.raises(ValueError, match="Could not unpack timestamp"):
        frames.timestamp(b"\xff\xff\xff")


def test_flaw_names_what_could_not_be_decoded_wherever_it_is() -> None:
    assert flaw(NotUtf8.of(b"\xff")) == "is not valid UTF-8"
    assert flaw(OutOfRangeTimestamp.of(LATEST)) == f"holds a timestamp out of range ({LATEST})"
    assert flaw({"a": [1, {NotUtf8.of(b"\xff"): 2}]}) == "holds text that is not valid UTF-8"
    assert flaw([OutOfRangeTimestamp.of(5)]) == "holds a timestamp out of range (5)"
    assert flaw({"a": "b", "c": [1, 2.0, b"\xff", None]}) is None
    assert flaw("text") is None


def incoming(**properties: Any) -> IncomingMessage:
    """A message as aio-pika delivers it, decoded from the frame the broker sends."""
    delivery = commands.Basic.Deliver("tag", 1, False, "", "queue")
    _, _, content = frame.unmarshal(content_header(**properties))
    assert isinstance(content, header.ContentHeader)
    return IncomingMessage(DeliveredMessage(delivery, content, b"{}", None))  # type: ignore[arg-type]


GOOD_HEADERS = {"_watermill_message_uuid": "m-1", "name": "CreateIssuer"}


@pytest.mark.parametrize(
    ("properties", "reason"),
    [
        (
            {"headers": {**GOOD_HEADERS, "ts": OutOfRangeTimestamp.of(LATEST)}},
            f"header 'ts' holds a timestamp out of range ({LATEST})",
        ),
        (
            {"headers": {**GOOD_HEADERS, "x-death": [{"time": OutOfRangeTimestamp.of(NEGATIVE)}]}},
            f"header 'x-death' holds a timestamp out of range ({NEGATIVE})",
        ),
        (
            {"headers": {**GOOD_HEADERS, RawText(b"k\xff\xfe"): "v"}},
            r"header name b'k\xff\xfe' is not valid UTF-8",
        ),
        (
            {"headers": GOOD_HEADERS, "content_type": RawText(b"text/\xff")},
            "property content_type is not valid UTF-8",
        ),
        (
            {"headers": GOOD_HEADERS, "message_id": RawText(b"m-\xff")},
            "property message_id is not valid UTF-8",
        ),
        (
            {"headers": GOOD_HEADERS, "correlation_id": RawText(b"c-\xff")},
            "property correlation_id is not valid UTF-8",
        ),
        (
            {"headers": GOOD_HEADERS, "timestamp": OutOfRangeTimestamp.of(LATEST)},
            f"property timestamp holds a timestamp out of range ({LATEST})",
        ),
    ],
    ids=["header", "broker-header", "header-name", "content-type", "message-id", "corr", "ts"],
)
def test_a_message_with_anything_pamqp_could_not_decode_is_poison(
    properties: dict[str, Any], reason: str
) -> None:
    message = incoming(**properties)
    with pytest.raises(PoisonMessage) as raised:
        from_amqp(message)
    assert str(raised.value) == reason


def test_a_message_pamqp_decoded_is_read_as_before() -> None:
    envelope = from_amqp(
        incoming(headers=GOOD_HEADERS, content_type="application/json", message_id="m-1")
    )
    assert (envelope.message_id, envelope.name) == ("m-1", "CreateIssuer")
