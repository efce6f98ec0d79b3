"""The message registry: name <-> type <-> JSON body (docs/contract.md section 2).

Bodies use the Go field names of the reference. Fields marked † in the
contract are not in the body: they travel in the `aggregateID` header. Money
is a JSON number, read exactly (`Decimal`) and written in plain decimal form.
A body is UTF-8 JSON (docs/contract.md section 2), as the reference's decoder
reads it: another encoding is poison.

A message as delivered (`decode_message`) is held to the range of the
Commands API (`money.within_range`: up to MAX_AMOUNT either side of zero), not
to its cents: float-based producers, the reference's among them, write sums
such as 0.30000000000000004, kept exactly. An event store's row (`decode`) is
read as it was recorded: events appended before messages were held to that
range may hold amounts of up to 1e16, and must stay readable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

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
from financing.domain.ids import parse_id
from financing.domain.money import InvalidAmount, canonical, shown, within_range

Kind = Literal["uuid", "money", "text", "bid"]

# What json.loads(body, parse_float=Decimal, ...) builds on every call, built once.
_JSON = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal, parse_constant=Decimal)


@dataclass(frozen=True)
class Field:
    attr: str
    key: str | None  # None: taken from the aggregateID header, not the body
    kind: Kind
    where: str  # how a PoisonMessage names the field
    member: str  # how the field's member of the body begins: its key in JSON and a colon


@dataclass(frozen=True)
class MessageType:
    cls: type[Any]
    fields: tuple[Field, ...]
    body: tuple[Field, ...]  # the fields the body holds (not the header-borne ones)

    @property
    def name(self) -> str:
        name: str = self.cls.name()
        return name


def _type(cls: type[Any], *fields: tuple[str, str | None, Kind]) -> MessageType:
    name = cls.name()
    made = tuple(
        Field(attr, key, kind, f"{name}.{key}", f"{json.dumps(key)}:")
        if key
        else Field(attr, key, kind, f"{name}: aggregateID header", "")
        for attr, key, kind in fields
    )
    return MessageType(cls, made, tuple(field for field in made if field.key))


REGISTRY: dict[str, MessageType] = {
    t.name: t
    for t in (
        # domain events
        _type(ev.IssuerCreatedEvent, ("issuer_id", "IssuerID", "uuid")),
        _type(ev.InvestorCreatedEvent, ("investor_id", "InvestorID", "uuid")),
        _type(
            ev.InvestorFundsAddedEvent, ("investor_id", None, "uuid"), ("amount", "Amount", "money")
        ),
        _type(
            ev.BidOnInvoicePlacedEvent,
            ("investor_id", None, "uuid"),
            ("invoice_id", "InvoiceID", "uuid"),
            ("bid_amount", "BidAmount", "money"),
        ),
        _type(
            ev.InvestorFundsReleasedEvent,
            ("investor_id", None, "uuid"),
            ("amount", "Amount", "money"),
        ),
        _type(
            ev.InvestorFundsCommittedEvent,
            ("investor_id", None, "uuid"),
            ("amount", "Amount", "money"),
        ),
        _type(
            ev.InvoiceCreatedEvent,
            ("invoice_id", "InvoiceID", "uuid"),
            ("issuer_id", "IssuerID", "uuid"),
            ("asking_price", "AskingPrice", "money"),
        ),
        _type(
            ev.InvoiceFinancedEvent,
            ("invoice_id", None, "uuid"),
            ("asking_price", "AskingPrice", "money"),
            ("bid", "Bid", "bid"),
        ),
        _type(ev.BidOnInvoiceRejectedEvent, ("invoice_id", None, "uuid"), ("bid", "Bid", "bid")),
        _type(
            ev.InvoiceApprovedEvent,
            ("invoice_id", None, "uuid"),
            ("sold_price", "SoldPrice", "money"),
            ("bid", "Bid", "bid"),
        ),
        _type(
            ev.InvoiceReversedEvent,
            ("invoice_id", None, "uuid"),
            ("sold_price", "SoldPrice", "money"),
            ("bid", "Bid", "bid"),
        ),
        # integration events
        _type(IssuerRegistered, ("id", "ID", "uuid"), ("name_", "Name", "text")),
        _type(
            InvestorRegistered,
            ("id", "ID", "uuid"),
            ("name_", "Name", "text"),
            ("balance", "Balance", "money"),
        ),
        # commands
        _type(
            SellInvoice,
            ("invoice_id", "InvoiceID", "uuid"),
            ("issuer_id", "IssuerID", "uuid"),
            ("asking_price", "AskingPrice", "money"),
        ),
        _type(
            BidOnInvoice,
            ("investor_id", "InvestorID", "uuid"),
            ("invoice_id", "InvoiceID", "uuid"),
            ("bid_amount", "BidAmount", "money"),
        ),
        _type(ApproveFinancing, ("invoice_id", "InvoiceID", "uuid")),
        _type(ReverseFinancing, ("invoice_id", "InvoiceID", "uuid")),
        _type(CreateInvestor, ("id", "ID", "uuid"), ("balance", "Balance", "money")),
        _type(CreateIssuer, ("id", "ID", "uuid")),
    )
}

# Bodies bigger than this are hostile or broken; nothing legitimate comes close.
MAX_BODY_BYTES = 64 * 1024
# What an event store row's amount may be (`decode`): an amount of at least 1e-15
# and less than 1e16, with at most 31 decimals (a double's shortest form has at most
# 17 significant digits). A delivered message's are also at most MAX_AMOUNT
# either side of zero (`decode_message`).
MAX_MONEY_PLACES = 31


def name_of(message: Message) -> str:
    name: str = type(message).name()
    return name


def encode(message: Message) -> bytes:
    """The JSON body of `message` (header-borne fields left out)."""
    return encode_text(message).encode()


def encode_text(message: Message) -> str:
    """`encode`, as text (what the event store keeps)."""
    members = ",".join(
        field.member + _encode_value(getattr(message, field.attr), field.kind)
        for field in REGISTRY[name_of(message)].body
    )
    return "{" + members + "}"


def _encode_value(value: Any, kind: Kind) -> str:
    # A UUID's text is hex digits and hyphens: quoted, it is its JSON string.
    if kind == "uuid":
        return f'"{value}"'
    if kind == "money":
        return canonical(value)
    if kind == "text":
        return json.dumps(value)
    bid: ev.Bid = value
    return f'{{"InvestorID":"{bid.investor_id}","Amount":{canonical(bid.amount)}}}'


def decode_message(name: str, body: bytes | str, aggregate_id: str | None = None) -> Message:
    """Rebuild a message as delivered from its name, JSON body and aggregateID header.

    Raises PoisonMessage, naming what is wrong, for anything that is not a
    well-formed message of a known type, an amount of a command or an integration
    event beyond the Commands API's range (`money.within_range`) included. A domain
    event's amounts are read as an event store row's: one of this service's store
    was taken by it, perhaps before that range held (relayed after an upgrade, or
    requeued from the dead letters), and a rebuild reads it so; a copy that is not
    the store's own is refused by its consumers anyway (`relayed_from_the_store`).
    """
    spec = REGISTRY.get(name)
    limited = spec is None or not issubclass(spec.cls, ev.DomainEvent)
    return _decode(name, body, aggregate_id, limited=limited)


def decode(name: str, body: bytes | str, aggregate_id: str | UUID | None = None) -> Message:
    """Rebuild a message from an event store row: its name, JSON body (as bytes, or as
    the text the row holds) and aggregate id (as text, or as the UUID the row holds).

    Amounts are read as they were recorded, within the range a row may hold
    (MAX_MONEY_PLACES); a delivered message goes through `decode_message`.
    Raises PoisonMessage, naming what is wrong, for anything that is not a
    well-formed message of a known type.
    """
    return _decode(name, body, aggregate_id, limited=False)


def _decode(
    name: str, body: bytes | str, aggregate_id: str | UUID | None, *, limited: bool
) -> Message:
    spec = REGISTRY.get(name)
    if spec is None:
        raise PoisonMessage(f"unknown message name {name!r}")
    if len(body) > MAX_BODY_BYTES:
        raise PoisonMessage(f"{name}: body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    text = body if isinstance(body, str) else _utf8(name, body)
    if nested_too_deep(text):
        raise PoisonMessage(f"{name}: body is not valid JSON: nested deeper than {MAX_NESTING}")
    try:
        # NaN and Infinity become non-finite decimals, refused by the field that holds them
        # so that the reason names it.
        data = _JSON.decode(text)
    except (ValueError, RecursionError) as exc:
        raise PoisonMessage(f"{name}: body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PoisonMessage(f"{name}: body must be a JSON object")
    values: dict[str, Any] = {}
    for field in spec.fields:
        if field.key is None:
            if aggregate_id is None:
                raise PoisonMessage(f"{name}: missing aggregateID header")
            values[field.attr] = (
                aggregate_id if isinstance(aggregate_id, UUID) else _uuid(aggregate_id, field.where)
            )
            continue
        if field.key not in data:
            raise PoisonMessage(f"{name}: missing field {field.key}")
        values[field.attr] = _decode_value(data[field.key], field.kind, field.where, limited)
    return spec.cls(**values)  # type: ignore[no-any-return]


# How deep the JSON of a message may nest: the messages of the contract nest 2 deep (a bid
# in an event). Deeper is refused before the JSON decoder reads it, whose recursion, on a
# process whose stack is small (`ulimit -s 128`), crashed it (SIGSEGV) at a few thousand
# levels, and again at every start while the message waited in its queue.
MAX_NESTING = 32


def nested_too_deep(text: str) -> bool:
    """Whether the JSON `text` nests arrays or objects deeper than MAX_NESTING (brackets
    within strings not counted); read only where it holds that many brackets at all."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _utf8(name: str, body: bytes) -> str:
    """The body's text: JSON on the bus is UTF-8 (RFC 8259 section 8.1), without a byte
    order mark, as the reference's Go decoder reads it. Python's `json.loads` would also
    read UTF-16 and UTF-32 (telling them by their zero bytes) and skip a UTF-8 BOM."""
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        found = "UTF-8 with a byte order mark" if encoding == "utf-8-sig" else encoding.upper()
        raise PoisonMessage(f"{name}: body is not valid JSON: it must be UTF-8, not {found}")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PoisonMessage(f"{name}: body is not valid JSON: it is not UTF-8 ({exc})") from exc


def _decode_value(value: Any, kind: Kind, where: str, limited: bool) -> Any:
    if kind == "uuid":
        return _uuid(value, where)
    if kind == "money":
        return _money(value, limited, where)
    if kind == "text":
        if value is None:  # as the reference's decoder reads null into a string
            return ""
        if not isinstance(value, str):
            raise PoisonMessage(f"{where}: must be a string")
        return value
    if not isinstance(value, dict):  # what the JSON decoder makes of an object
        raise PoisonMessage(f"{where}: must be an object")
    for key in ("InvestorID", "Amount"):
        if key not in value:
            raise PoisonMessage(f"{where}: missing field {key}")
    return ev.Bid(
        investor_id=_uuid(value["InvestorID"], where, ".InvestorID"),
        amount=_money(value["Amount"], limited, where, ".Amount"),
    )


# `where` and `part` name the field in a PoisonMessage; they are joined only for one.


def _uuid(value: Any, where: str, part: str = "") -> UUID:
    if not isinstance(value, str):
        raise PoisonMessage(f"{where}{part}: must be a UUID string")
    try:
        return parse_id(value)
    except ValueError as exc:
        raise PoisonMessage(f"{where}{part}: {value[:64]!r} is not a UUID") from exc


def _money(value: Any, limited: bool, where: str, part: str = "") -> Decimal:
    """`value` as money; `limited`: held to the Commands API's range, not just to what
    an event store row may hold."""
    if not isinstance(value, Decimal) or not value.is_finite():
        raise PoisonMessage(f"{where}{part}: must be a finite JSON number")
    adjusted = value.adjusted()
    if adjusted > 15:
        raise PoisonMessage(f"{where}{part}: {shown(value)} is out of range for money")
    if adjusted < -15 and value != 0:
        raise PoisonMessage(
            f"{where}{part}: {shown(value)} is too small for money: an amount other than"
            " 0 is at least 1E-15 either side of zero"
        )
    if limited:
        try:
            within_range(value)
        except InvalidAmount as exc:
            raise PoisonMessage(f"{where}{part}: {exc}") from exc
    # A zero's exponent is unbounded by the check above: 0e-99999999 would be
    # written back as a hundred million digits.
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -MAX_MONEY_PLACES:
        raise PoisonMessage(f"{where}{part}: more than {MAX_MONEY_PLACES} decimal places")
    return value
