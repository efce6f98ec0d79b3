"""Random and boundary input on the Commands gRPC API: only OK or INVALID_ARGUMENT comes back,
and a command is enqueued exactly when the answer is OK.

The service runs as `financing serve --components commands-api` on a vhost of
its own: nothing consumes the command queues, so after every call they hold
exactly what that call enqueued. The expected answer of each well-formed
request is computed here from docs/contract.md section 1 (an id must parse as a
UUID; an amount must be finite, > 0, at most 999999999999.99 and have at most
2 decimals in its shortest form), and must be the service's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import struct
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aio_pika
import betterproto
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from h2.exceptions import StreamClosedError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from financing.entrypoints.grpc.codec import MAX_REQUEST_BYTES
from financing.generated import (
    ApproveFinancingCommand,
    BidOnInvoiceCommand,
    Money,
    ReverseFinancingCommand,
    SellInvoiceCommand,
    Uuid,
)
from scripts.bench_common import process_rss_bytes
from tests.faults.conftest import CommandsApi
from tests.support.raw_h2 import HEALTH_CHECK, RawConnection

MAX_AMOUNT = Decimal("999999999999.99")
STRUCTURED_EXAMPLES = 300
RAW_EXAMPLES = 120
# Which command each method enqueues, and the order in which it validates its fields.
METHODS: dict[str, tuple[str, type[betterproto.Message], tuple[str, ...]]] = {
    "SellInvoice": ("SellInvoice", SellInvoiceCommand, ("issuer_id", "asking_price")),
    "BidOnInvoice": ("BidOnInvoice", BidOnInvoiceCommand, ("investor_id", "invoice_id", "bid")),
    "ApproveFinancing": ("ApproveFinancing", ApproveFinancingCommand, ("invoice_id",)),
    "ReverseFinancing": ("ReverseFinancing", ReverseFinancingCommand, ("invoice_id",)),
}
REPLY_TYPES: dict[str, type[betterproto.Message]] = {
    "SellInvoice": Uuid,
    "BidOnInvoice": Empty,
    "ApproveFinancing": Empty,
    "ReverseFinancing": Empty,
}
# Body fields of each enqueued command, by the gRPC field they come from.
BODY_KEYS = {
    "SellInvoice": {"issuer_id": "IssuerID", "asking_price": "AskingPrice"},
    "BidOnInvoice": {"investor_id": "InvestorID", "invoice_id": "InvoiceID", "bid": "BidAmount"},
    "ApproveFinancing": {"invoice_id": "InvoiceID"},
    "ReverseFinancing": {"invoice_id": "InvoiceID"},
}


# -- the oracle ---------------------------------------------------------------------------------


# The forms docs/contract.md section 1 accepts (those of Go's uuid.Parse), ASCII hex only.
_HEX = "[0-9a-fA-F]"
_DASHED = f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}"
_ID_FORMS = re.compile(f"{_DASHED}|(?i:urn:uuid:){_DASHED}|\\{{{_DASHED}\\}}|{_HEX}{{32}}")


def uuid_problem(value: Uuid | None) -> bool:
    return value is None or _ID_FORMS.fullmatch(value.value) is None


def money_problem(value: Money | None) -> bool:
    if value is None or not math.isfinite(value.amount):
        return True
    amount = Decimal(repr(value.amount))
    places = max(0, -amount.normalize().as_tuple().exponent)  # type: ignore[operator]
    return amount <= 0 or amount > MAX_AMOUNT or places > 2


def first_invalid_field(method: str, fields: dict[str, Any]) -> str | None:
    """The field the service must name, or None when the request is valid."""
    for name in METHODS[method][2]:
        value = fields.get(name)
        bad = money_problem(value) if name in ("asking_price", "bid") else uuid_problem(value)
        if bad:
            return name
    return None


# -- generation ---------------------------------------------------------------------------------

_VALID_UUID = st.uuids().map(str)
_UUID_TEXT = st.one_of(
    _VALID_UUID,
    _VALID_UUID.map(str.upper),
    _VALID_UUID.map(lambda u: "{" + u + "}"),
    _VALID_UUID.map(lambda u: "urn:uuid:" + u),
    _VALID_UUID.map(lambda u: u.replace("-", "")),
    _VALID_UUID.map(lambda u: u[:-1]),
    _VALID_UUID.map(lambda u: u + "0"),
    _VALID_UUID.map(lambda u: " " + u),
    # What int(..., 16) would read: a prefix, a sign, an underscore, whitespace.
    _VALID_UUID.map(lambda u: "0x" + u.replace("-", "")[2:]),
    _VALID_UUID.map(lambda u: "+" + u.replace("-", "")[1:]),
    _VALID_UUID.map(lambda u: u.replace("-", "")[:5] + "_" + u.replace("-", "")[6:]),
    _VALID_UUID.map(lambda u: " " + u.replace("-", "")[1:]),
    st.just(""),
    st.just("not-a-uuid"),
    st.text(max_size=40),
    st.text(min_size=1000, max_size=5000),
    st.text(max_size=10).map(lambda t: t + "\x00"),
)
_AMOUNT = st.one_of(
    st.floats(),
    st.floats(min_value=0.001, max_value=1e13),
    st.integers(1, 10**14).map(lambda cents: cents / 100),
    st.sampled_from(
        [
            0.0,
            -0.0,
            -1.0,
            0.01,
            0.1,
            0.005,
            10.001,
            0.1 + 0.2,
            5e-324,
            1e-7,
            999999999999.99,
            1000000000000.0,
            1e300,
            math.inf,
            -math.inf,
            math.nan,
        ]
    ),
)
_UUID_FIELD = st.one_of(st.none(), _UUID_TEXT.map(lambda text: Uuid(value=text)))
_MONEY_FIELD = st.one_of(st.none(), _AMOUNT.map(lambda amount: Money(amount=amount)))


@dataclass(frozen=True)
class Structured:
    method: str
    fields: dict[str, Any]

    def request(self) -> betterproto.Message:
        cls = METHODS[self.method][1]
        return cls(**{k: v for k, v in self.fields.items() if v is not None})


@dataclass(frozen=True)
class Raw:
    method: str
    data: bytes


@st.composite
def _structured(draw: st.DrawFn) -> Structured:
    method = draw(st.sampled_from(sorted(METHODS)))
    fields = {
        name: draw(_MONEY_FIELD if name in ("asking_price", "bid") else _UUID_FIELD)
        for name in METHODS[method][2]
    }
    return Structured(method, fields)


@st.composite
def _raw(draw: st.DrawFn) -> Raw:
    return Raw(draw(st.sampled_from(sorted(METHODS))), draw(st.binary(max_size=80)))


def drawn(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` values drawn by hypothesis; the calls happen afterwards, in the test's loop."""
    values: list[Any] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(value: Any) -> None:
        values.append(value)

    draw()
    return values


# -- calling and observing ----------------------------------------------------------------------


class RawRequest:
    """Bytes sent as they are, as a request message of any type."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data

    @classmethod
    def FromString(cls, data: bytes) -> RawRequest:
        return cls(data)


async def call(channel: Channel, method: str, request: Any) -> tuple[Status, str]:
    request_type = type(request)
    reply = REPLY_TYPES[method]
    try:
        async with channel.request(
            f"/Commands/{method}", Cardinality.UNARY_UNARY, request_type, reply, timeout=10
        ) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_message()
            await stream.recv_trailing_metadata()
    except GRPCError as exc:
        return exc.status, exc.message or ""
    return Status.OK, ""


async def take_enqueued(channel: aio_pika.abc.AbstractChannel) -> dict[str, list[dict[str, Any]]]:
    """Every command now waiting on the command queues, taken from them."""
    taken: dict[str, list[dict[str, Any]]] = {}
    for queue_name in METHODS:
        queue = await channel.declare_queue(queue_name, durable=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.setdefault(queue_name, []).append(json.loads(message.body))
    return taken


# -- the tests ----------------------------------------------------------------------------------


async def test_fuzzed_commands_are_answered_ok_or_invalid_argument_and_enqueued_only_when_ok(
    commands_api: CommandsApi, fault_figures: dict[str, Any]
) -> None:
    cases: list[Structured | Raw] = [
        *drawn(_structured(), STRUCTURED_EXAMPLES),
        *drawn(_raw(), RAW_EXAMPLES),
    ]
    statuses: dict[Status, int] = {}
    failures: list[str] = []
    grpc = Channel(*commands_api.address)
    connection = await aio_pika.connect(commands_api.amqp_url)
    try:
        broker = await connection.channel()
        assert await take_enqueued(broker) == {}
        for case in cases:
            request = case.request() if isinstance(case, Structured) else RawRequest(case.data)
            status, message = await call(grpc, case.method, request)
            statuses[status] = statuses.get(status, 0) + 1
            enqueued = await take_enqueued(broker)
            failures += _judge(case, status, message, enqueued)
    finally:
        grpc.close()
        await connection.close()

    assert not failures, f"{len(failures)} of {len(cases)} calls misanswered:\n" + "\n".join(
        failures[:20]
    )
    assert commands_api.service.running
    assert statuses.get(Status.OK, 0) > 0 and statuses.get(Status.INVALID_ARGUMENT, 0) > 0
    fault_figures["gRPC fuzz cases"] = fault_figures.get("gRPC fuzz cases", 0) + len(cases)
    for status, count in statuses.items():
        key = f"gRPC fuzz cases answered {status.name}"
        fault_figures[key] = fault_figures.get(key, 0) + count


def _judge(
    case: Structured | Raw, status: Status, message: str, enqueued: dict[str, list[Any]]
) -> list[str]:
    where = f"{case!r}"[:300]
    if status not in (Status.OK, Status.INVALID_ARGUMENT):
        return [f"{where}: answered {status.name} {message!r}"]
    if status is Status.INVALID_ARGUMENT:
        if enqueued:
            return [f"{where}: INVALID_ARGUMENT ({message}) yet enqueued {enqueued}"]
    else:
        queue = METHODS[case.method][0]
        if list(enqueued) != [queue] or len(enqueued[queue]) != 1:
            return [f"{where}: OK but enqueued {enqueued}"]
    if not isinstance(case, Structured):
        return []
    invalid = first_invalid_field(case.method, case.fields)
    if invalid is None and status is not Status.OK:
        return [f"{where}: a valid request answered {status.name} {message!r}"]
    if invalid is not None and status is Status.OK:
        return [f"{where}: {invalid} is invalid, yet answered OK"]
    if invalid is not None and not message.startswith(f"{invalid}:"):
        return [f"{where}: INVALID_ARGUMENT should name {invalid}, says {message!r}"]
    if status is Status.OK:
        [body] = enqueued[METHODS[case.method][0]]
        for field_name, key in BODY_KEYS[case.method].items():
            value = case.fields[field_name]
            want: Any = (
                Decimal(repr(value.amount))
                if isinstance(value, Money)
                else str(uuid.UUID(value.value))
            )
            got = Decimal(str(body[key])) if isinstance(value, Money) else body[key]
            if got != want:
                return [f"{where}: enqueued {key}={body[key]!r}, expected {want}"]
    return []


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a",  # a length-delimited field cut short
        b"\x08\x01",  # the id message sent as a varint
        b"\x15\x00\x00\x00\x00",  # a message field sent as fixed32
        b"\x0a\x05\x0a\x03\xff\xfe\xfd",  # an id that is not UTF-8
    ],
    ids=["truncated", "varint-for-message", "fixed32-for-message", "not-utf8"],
)
async def test_a_request_that_is_not_valid_protobuf_is_answered_invalid_argument(
    commands_api: CommandsApi, data: bytes
) -> None:
    # It was answered UNKNOWN ("Internal Server Error"), with a traceback in the log.
    grpc = Channel(*commands_api.address)
    try:
        for method in METHODS:
            status, message = await call(grpc, method, RawRequest(data))
            assert status is Status.INVALID_ARGUMENT, f"{method}: {status.name} {message!r}"
    finally:
        grpc.close()
    assert commands_api.service.running


MiB = 1024 * 1024


def frame(flag: int, length: int, body: bytes) -> bytes:
    """A gRPC message frame: its compressed flag, its length prefix, then `body`."""
    return bytes([flag]) + struct.pack(">I", length) + body


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        (frame(1, 2, b"\x0a\x00"), Status.UNIMPLEMENTED, "compressed messages"),
        (frame(7, 0, b""), Status.UNIMPLEMENTED, "compressed messages"),
        (frame(0, 100, b"\x0a\x00"), Status.INVALID_ARGUMENT, "the stream ended inside"),
        (b"\x00\x00\x00", Status.INVALID_ARGUMENT, "the stream ended inside"),
    ],
    ids=["compressed", "flag-7", "length-beyond-the-data", "prefix-cut-short"],
)
async def test_a_request_frame_that_cannot_be_read_is_answered_with_what_is_wrong(
    commands_api: CommandsApi, data: bytes, status: Status, says: str
) -> None:
    """Regression: grpclib's own framing errors were answered UNKNOWN ("Internal Server
    Error"), with a traceback logged as an error."""
    logged = commands_api.service.log_size()
    grpc = Channel(*commands_api.address)
    try:
        for method in METHODS:
            async with grpc.request(
                f"/Commands/{method}", Cardinality.UNARY_UNARY, RawRequest, Empty, timeout=10
            ) as stream:
                await stream.send_request()
                # The bytes as they are, ending the request, below grpclib's own framing
                # (which is then told that the request was ended).
                await stream._stream.send_data(data, end_stream=True)
                stream._end_done = True
                with pytest.raises(GRPCError) as answered:
                    await stream.recv_message()
                    await stream.recv_trailing_metadata()  # where it has headers of its own
            assert answered.value.status is status, f"{method}: {answered.value}"
            assert says in (answered.value.message or ""), f"{method}: {answered.value}"
    finally:
        grpc.close()
    assert commands_api.service.running
    written = commands_api.service.log_tail(since=logged)
    assert '"level": "error"' not in written, written


@pytest.mark.parametrize("path", [b"/Commands/SellInvoice", HEALTH_CHECK.encode()])
async def test_a_compressed_request_is_told_which_encodings_the_server_takes(
    commands_api: CommandsApi, path: bytes
) -> None:
    """Regression: the refusal of a compressed message did not say which encodings the
    server takes (`grpc-accept-encoding`), which gRPC's compression protocol asks of it."""
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(connection.call(path, frame(1, 2, b"\x0a\x00")))
    assert answer.get(b"grpc-status") == str(Status.UNIMPLEMENTED.value).encode(), answer
    assert answer.get(b"grpc-accept-encoding") == b"identity", answer


async def test_a_request_message_over_the_size_limit_is_refused_before_it_is_taken_in(
    commands_api: CommandsApi,
) -> None:
    """Regression: grpclib reads a message of any announced length into memory; a call
    announcing 200 MiB and sending them grew the service by twice as much."""
    announced, sent = 200 * MiB, 32 * MiB
    rss_before = process_rss_bytes(commands_api.service.pid)
    grpc = Channel(*commands_api.address)
    try:
        with pytest.raises(GRPCError) as answered:
            async with grpc.request(
                "/Commands/SellInvoice", Cardinality.UNARY_UNARY, RawRequest, Empty, timeout=30
            ) as stream:
                await stream.send_request()
                # Sending stops when the service resets the stream once it has answered,
                # or blocks when it takes no more data in (the stream's flow-control
                # window is spent): either way the answer is read next.
                with contextlib.suppress(StreamClosedError, TimeoutError):
                    async with asyncio.timeout(10):
                        await stream._stream.send_data(frame(0, announced, b""))
                        for _ in range(sent // MiB):
                            await stream._stream.send_data(b"\x0a" * MiB)
                stream._end_done = True  # the rest will never be sent
                await stream.recv_message()
    finally:
        grpc.close()
    grown = process_rss_bytes(commands_api.service.pid) - rss_before
    assert answered.value.status is Status.RESOURCE_EXHAUSTED, answered.value
    assert str(MAX_REQUEST_BYTES) in (answered.value.message or ""), answered.value
    assert grown < sent // 2, f"the service grew by {grown} bytes"
    assert commands_api.service.running


def valid_request(method: str) -> betterproto.Message:
    """A request of `method` that the service accepts and enqueues when it comes alone."""
    return Structured(
        method,
        {
            name: Money(amount=100.0)
            if name in ("asking_price", "bid")
            else Uuid(str(uuid.uuid4()))
            for name in METHODS[method][2]
        },
    ).request()


@pytest.mark.parametrize("count", [0, 2, 3])
async def test_a_unary_call_without_exactly_one_request_message_is_refused_and_runs_nothing(
    commands_api: CommandsApi, count: int
) -> None:
    """Regression: grpclib ignored every request message after the first, which it carried
    out. (It hands a call that sends none `None`, which each method once had to check.)"""
    logged = commands_api.service.log_size()
    says = "a message is required" if count == 0 else "one message is allowed"
    grpc = Channel(*commands_api.address)
    connection = await aio_pika.connect(commands_api.amqp_url)
    try:
        broker = await connection.channel()
        assert await take_enqueued(broker) == {}
        # The Commands methods, and the health check served beside them.
        calls = [
            (f"/Commands/{method}", valid_request(method), REPLY_TYPES[method])
            for method in METHODS
        ]
        calls.append(("/grpc.health.v1.Health/Check", HealthCheckRequest(), HealthCheckResponse))
        for path, request, reply in calls:
            # A client-streaming call on the client's side lets it send any number of them.
            async with grpc.request(
                path, Cardinality.STREAM_UNARY, type(request), reply, timeout=10
            ) as stream:
                await stream.send_request(end=count == 0)
                for sent in range(count):
                    await stream.send_message(request, end=sent == count - 1)
                with pytest.raises(GRPCError) as answered:
                    await stream.recv_message()
            assert answered.value.status is Status.INVALID_ARGUMENT, f"{path}: {answered.value}"
            assert says in (answered.value.message or ""), f"{path}: {answered.value}"
        assert await take_enqueued(broker) == {}
        # The same call with one message is carried out (the refusal is not the method's).
        for method in METHODS:
            assert await call(grpc, method, valid_request(method)) == (Status.OK, "")
        assert sorted(await take_enqueued(broker)) == sorted(METHODS)
    finally:
        grpc.close()
        await connection.close()
    assert commands_api.service.running
    written = commands_api.service.log_tail(since=logged)
    assert '"level": "error"' not in written, written
