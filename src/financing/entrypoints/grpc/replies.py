"""The Queries API's list replies, written straight in protobuf's wire format.

A list reply holds every row of a read model: building one betterproto object per
row, per id and per amount, then serialising them, took about 130 µs a row, seconds
for a large read model, in one stretch of the event loop that every other call, every
delivery and every health probe of the process waits behind. Written here, a row
costs a few microseconds, and the loop is given a turn every ROWS_PER_TURN rows
(`read_models.in_turns`), so that a large reply delays others by milliseconds and a
call whose caller went away stops being built.

The bytes are those betterproto writes for the same reply (fields in number order,
proto3 defaults left out: an amount of 0, the status AVAILABLE, an absent winning
bid); tests/unit/test_replies.py compares them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar
from uuid import UUID

from financing.application.read_models import InvestorRow, InvoiceRow, IssuerRow, in_turns
from financing.domain.events import Bid
from financing.domain.money import to_double
from financing.generated import InvoiceStatus

Row = TypeVar("Row")

_double = struct.Struct("<d").pack


@dataclass(frozen=True)
class Encoded:
    """A reply message already in its wire format. A method that answers with it is
    served with `Encoded` as its reply type, which grpclib's codec serialises as any
    message: through `SerializeToString`."""

    data: bytes

    def SerializeToString(self) -> bytes:
        return self.data


def varint(value: int) -> bytes:
    """`value` (not negative) as a protobuf varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message, a string)."""
    return bytes(((number << 3) | 2,)) + varint(len(payload)) + payload


def _uuid(value: UUID) -> bytes:
    """A `UUID` message: its one string field."""
    return b"\x0a\x24" + str(value).encode()


def _money(amount: Decimal) -> bytes:
    """A `Money` message: its one double field, left out when 0."""
    double = to_double(amount)
    return b"\x09" + _double(double) if double != 0.0 else b""


def _bid(bid: Bid) -> bytes:
    return _field(1, _uuid(bid.investor_id)) + _field(2, _money(bid.amount))


_STATUS = {status.name: status.value for status in InvoiceStatus}


def investor(row: InvestorRow) -> bytes:
    return (
        _field(1, _uuid(row.id)) + _field(2, _money(row.balance)) + _field(3, _money(row.reserved))
    )


def invoice(row: InvoiceRow) -> bytes:
    parts = _field(1, _uuid(row.id)) + _field(2, _uuid(row.issuer_id))
    parts += _field(3, _money(row.asking_price))
    status = _STATUS[row.status.value]
    if status:
        parts += b"\x20" + varint(status)
    if row.winning_bid is not None:
        parts += _field(5, _bid(row.winning_bid))
    return parts


def issuer(row: IssuerRow) -> bytes:
    return _field(1, _uuid(row.id))


async def listed(rows: Sequence[Row], item: Callable[[Row], bytes]) -> Encoded:
    """A list reply (its repeated field 1) of `rows`, each written by `item`; the loop
    gets a turn every ROWS_PER_TURN rows."""
    return Encoded(b"".join(await in_turns(rows, lambda row: _field(1, item(row)))))
