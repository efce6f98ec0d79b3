"""Content headers pamqp cannot decode, decoded anyway so that their message can be dead-lettered.

RabbitMQ passes on a few values that pamqp (4.0.1) raises on when it decodes a
content header: a timestamp ('T' header value, or the timestamp property) beyond
what `datetime` can hold, a short string (a header's name, the content_type,
message_id, correlation_id... properties) that is not UTF-8. aiormq reports that
as an invalid frame and closes the whole connection; the broker delivers the same
message again on the next one, and every consumer and publisher of the service
stalls for as long as the message stays queued.

`install` (done once, when the adapter is imported) makes those decoders return
marker values instead: `OutOfRangeTimestamp` and `NotUtf8`. Reading an envelope
(`envelopes.from_amqp`) finds them, with `flaw`, and judges the message poison;
it is then dead-lettered like any other. Both markers can be encoded again by
pamqp: the timestamp to its raw value, the text as its UTF-8 with U+FFFD where
the bytes were not UTF-8. A long string ('S' header value) that is not UTF-8
already decodes, to `bytes`, and is left as it is.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Mapping

from pamqp import common, decode

_short_str = decode.short_str
_timestamp = decode.timestamp


class NotUtf8(str):
    """A short string whose bytes (`raw`) are not UTF-8, decoded with U+FFFD for them."""

    raw: bytes

    @classmethod
    def of(cls, raw: bytes) -> NotUtf8:
        text = cls(raw.decode("utf-8", errors="replace"))
        text.raw = raw
        return text

    def __str__(self) -> str:
        return self  # aio-pika passes properties through str(): the marker stays one

    def __repr__(self) -> str:
        return repr(str.__str__(self))


class OutOfRangeTimestamp(datetime.datetime):
    """A timestamp `datetime` cannot hold: its raw 64-bit value in `raw`.

    As a datetime it is the latest one (datetime.max, UTC); pamqp encodes it
    back to `raw`, through `timestamp()`.
    """

    __slots__ = ("raw",)
    raw: int

    @classmethod
    def of(cls, raw: int) -> OutOfRangeTimestamp:
        latest = datetime.datetime.max
        stamp = cls(
            latest.year,
            latest.month,
            latest.day,
            latest.hour,
            latest.minute,
            latest.second,
            latest.microsecond,
            tzinfo=datetime.UTC,
        )
        stamp.raw = raw
        return stamp

    def timestamp(self) -> float:
        return self.raw  # an int: pamqp packs it exactly

    def __str__(self) -> str:
        return str(self.raw)

    def __repr__(self) -> str:
        return f"OutOfRangeTimestamp({self.raw})"


def short_str(value: bytes) -> tuple[int, str]:
    """pamqp's short string decoder, but `NotUtf8` for bytes that are not UTF-8."""
    try:
        return _short_str(value)
    except UnicodeDecodeError:
        length = value[0]
        return length + 1, NotUtf8.of(bytes(value[1 : length + 1]))


def timestamp(value: bytes) -> tuple[int, datetime.datetime]:
    """pamqp's timestamp decoder, but `OutOfRangeTimestamp` for one out of datetime's range."""
    try:
        return _timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < common.Struct.timestamp.size:
            raise  # truncated: not a timestamp at all
        return common.Struct.timestamp.size, OutOfRangeTimestamp.of(
            common.Struct.timestamp.unpack_from(value)[0]
        )


def field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's field table decoder (the same code), but a name that is not UTF-8 is `NotUtf8`."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, common.FieldValue] = {}
        field_table_end = offset + length
        if field_table_end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < field_table_end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > field_table_end:
                raise ValueError("Field table key length exceeds data")
            raw_key = bytes(value[offset : offset + key_length])
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                key = NotUtf8.of(raw_key)
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return field_table_end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install() -> None:
    """Make pamqp decode with the tolerant decoders above (idempotent).

    pamqp looks its decoders up in these two tables: properties and method
    arguments by type name, values inside tables and arrays by type octet.
    """
    decode.METHODS["shortstr"] = short_str
    decode.METHODS["timestamp"] = timestamp
    decode.METHODS["table"] = field_table
    decode.TABLE_MAPPING[b"T"] = timestamp
    decode.TABLE_MAPPING[b"F"] = field_table


def flaw(value: object) -> str | None:
    """What in `value` (a property or header value, searched through its tables and
    arrays) pamqp could not decode, to follow its name; None when nothing."""
    if value is None or type(value) is str:
        return None  # nearly every value of every delivery: nothing to walk
    if isinstance(value, NotUtf8):
        return "is not valid UTF-8"
    return _nested_flaw(value)


def _nested_flaw(value: object) -> str | None:
    if isinstance(value, NotUtf8):
        return "holds text that is not valid UTF-8"
    if isinstance(value, OutOfRangeTimestamp):
        return f"holds a timestamp out of range ({value.raw})"
    items: list[object] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            items += (key, item)
    elif isinstance(value, list):
        items = value
    for item in items:
        found = _nested_flaw(item)
        if found:
            return found
    return None
