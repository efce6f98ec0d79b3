"""Envelope <-> AMQP message, watermill-compatible (docs/contract.md section 2).

Every header value on the wire is a string. pamqp decodes an AMQP long string
('S') to `str` when it is valid UTF-8 and leaves it as `bytes` otherwise; any
other field type (integers, booleans, tables, arrays, byte arrays 'x',
timestamps, decimals, void) arrives as a non-string Python value and makes the
message poison, as it does for the reference's consumers. So does anything pamqp
could not decode at all (`frames`): a header's name or a property that is not
UTF-8, a timestamp out of range.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.frames import NotUtf8, flaw
from financing.application.errors import PoisonMessage
from financing.application.ports import Envelope

MESSAGE_UUID_HEADER = "_watermill_message_uuid"
NAME_HEADER = "name"
AGGREGATE_ID_HEADER = "aggregateID"
CORE_HEADERS = (MESSAGE_UUID_HEADER, NAME_HEADER, AGGREGATE_ID_HEADER)
CONTENT_TYPE = "application/json"


def to_amqp(envelope: Envelope) -> aio_pika.Message:
    headers: dict[str, str] = {}
    for key, value in envelope.headers.items():
        if not isinstance(value, str):
            raise TypeError(f"header {key!r} must be a string, got {type(value).__name__}")
        headers[key] = value
    # The envelope's own fields are authoritative over same-named extra headers.
    headers[MESSAGE_UUID_HEADER] = envelope.message_id
    headers[NAME_HEADER] = envelope.name
    if envelope.aggregate_id:
        headers[AGGREGATE_ID_HEADER] = envelope.aggregate_id
    else:
        headers.pop(AGGREGATE_ID_HEADER, None)
    return aio_pika.Message(
        body=envelope.body,
        headers=dict(headers),
        message_id=envelope.message_id,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def from_amqp(message: AbstractIncomingMessage) -> Envelope:
    """The envelope of a delivered message; PoisonMessage names what is wrong."""
    _check_decoded(message)
    headers = string_headers(message.headers)
    # watermill's header first; a publisher that is not watermill usually sets
    # the AMQP message-id property instead. Without either, duplicates could
    # not be told apart, so the message cannot be processed exactly once.
    message_id = headers.pop(MESSAGE_UUID_HEADER, "") or (message.message_id or "")
    if not message_id:
        raise PoisonMessage(
            f"missing or empty header {MESSAGE_UUID_HEADER} and no message-id property"
        )
    _check_message_id(message_id)
    name = headers.pop(NAME_HEADER, "")
    if not name:
        raise PoisonMessage(f"missing or empty header {NAME_HEADER}")
    aggregate_id = headers.pop(AGGREGATE_ID_HEADER, "") or None
    return Envelope(
        message_id=message_id,
        name=name,
        body=bytes(message.body),
        aggregate_id=aggregate_id,
        headers=headers,
        redelivered=bool(message.redelivered),
    )


# The properties as aio-pika names them (`type` is AMQP's type, pamqp's message_type).
PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def _check_decoded(message: AbstractIncomingMessage) -> None:
    """PoisonMessage when a property or header (broker's included) holds a value pamqp
    could not decode (`frames`)."""
    found = undecodable(message)
    if found is not None:
        raise PoisonMessage(found)


def undecodable(message: AbstractIncomingMessage) -> str | None:
    """What of `message`'s properties and headers pamqp could not decode; None if nothing."""
    for name in PROPERTIES:
        found = flaw(getattr(message, name, None))
        if found:
            return f"property {name} {found}"
    for key, value in (message.headers or {}).items():
        if isinstance(key, NotUtf8):
            return f"header name {key.raw!r} is not valid UTF-8"
        found = flaw(value)
        if found:
            return f"header {key!r} {found}"
    return None


# Consumers record every message id in PostgreSQL (a text primary key): an id
# it cannot store, or index, would fail that message's processing for ever.
# 255 bytes is also the most an AMQP message-id property can hold.
MAX_MESSAGE_ID_BYTES = 255


def _check_message_id(message_id: str) -> None:
    if "\x00" in message_id:
        raise PoisonMessage(f"header {MESSAGE_UUID_HEADER} contains a NUL character")
    if len(message_id.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_ID_BYTES:
        raise PoisonMessage(
            f"header {MESSAGE_UUID_HEADER} is longer than {MAX_MESSAGE_ID_BYTES} bytes:"
            f" {_preview(message_id)}"
        )


# What a quorum queue adds to each delivery (how many times it was given back), not to
# the message it keeps.
DELIVERY_COUNT_HEADER = "x-delivery-count"
# Headers the broker itself adds to a delivery: a quorum queue counts redeliveries,
# dead-lettering records deaths, shovels and federation note where a message came
# from. They are not the publisher's (whose headers are all strings by contract), so
# they are neither checked nor carried.
BROKER_HEADERS = frozenset(
    {
        DELIVERY_COUNT_HEADER,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-received-from",
        "x-shovelled",
        "x-shovelled-timestamp",
    }
)


def string_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The publisher's headers as strings (BROKER_HEADERS left out); PoisonMessage when any
    value is not a string."""
    result: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if key in BROKER_HEADERS:
            continue
        text = header_string(value)
        if text is not None:
            result[key] = text
        elif isinstance(value, bytes):
            raise PoisonMessage(f"header {key!r} is not valid UTF-8")
        else:
            raise PoisonMessage(
                f"header {key!r} is not a string but {type(value).__name__}: {_preview(value)}"
            )
    return result


def header_string(value: Any) -> str | None:
    """A header value as the string it is (pamqp leaves a long string that is not UTF-8
    as bytes); None for any other value, which is no string."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def delivery_channel_open(message: AbstractIncomingMessage) -> bool:
    """Whether `message` can still be acked: once its channel closed, the broker redelivers it."""
    try:
        return not message.channel.is_closed
    except aiormq.exceptions.ChannelInvalidStateError:  # what aio-pika raises for a closed one
        return False


def readable_name(message: AbstractIncomingMessage) -> str | None:
    """The `name` header when it is a string, else None.

    A consumer reads the name first: a message it does not handle is acked and
    ignored whatever its other headers, so a malformed message is dead-lettered
    once, by the consumer of its name, not by every queue bound to `events`.
    """
    return header_string((message.headers or {}).get(NAME_HEADER)) or None


def shortened(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters (the last three `...`) when it is longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def header_text(value: Any) -> str:
    """Any header value as a string, for copies kept for inspection (dead letters)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, Mapping | list):
        return json.dumps(value, default=header_text)
    return str(value)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
