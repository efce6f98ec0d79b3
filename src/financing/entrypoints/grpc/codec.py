"""How both gRPC servers read requests: their frames, and the protobuf in them."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import betterproto
from grpclib.const import Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from financing.entrypoints.grpc.calls import CallsInFlight
from financing.entrypoints.grpc.replies import varint

if TYPE_CHECKING:
    from grpclib._typing import IProtoMessage
    from grpclib.server import Stream


class RequestCodec(ProtoCodec):
    """Protobuf as grpclib decodes it, read as the protobuf specification reads it
    (`as_specified`), and a request that cannot be decoded is malformed input
    (INVALID_ARGUMENT), not an internal error (UNKNOWN)."""

    def decode(self, data: bytes, message_type: type[IProtoMessage]) -> IProtoMessage:
        try:
            if issubclass(message_type, betterproto.Message):
                data = as_specified(data, message_type)
            return super().decode(data, message_type)
        except Exception as exc:  # the parser raises anything on bytes it cannot read
            # The parser does not say which field it could not read; what it says, it says
            # of the caller's own bytes (its error's class is the parser's own business).
            said = str(exc)[:200] or type(exc).__name__
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"request: not a valid {message_type.__name__}: {said}"
            ) from None


# The wire type each kind of field is written with; the integer kinds (and bool, enum) are
# varints (0).
_WIRE_TYPES = {
    "double": 1,
    "fixed64": 1,
    "sfixed64": 1,
    "float": 5,
    "fixed32": 5,
    "sfixed32": 5,
    "string": 2,
    "bytes": 2,
    "message": 2,
    "map": 2,
}
_VARINT, _FIXED64, _DELIMITED, _GROUP_START, _GROUP_END, _FIXED32 = range(6)
# How deep messages may nest within a request (protobuf's own parsers stop at 100).
MAX_NESTING = 32


def as_specified(data: bytes, message_type: type[betterproto.Message], depth: int = 0) -> bytes:
    """`data`, a `message_type` on the wire, written again as betterproto reads what the
    protobuf specification says it holds (protobuf-go's and upb's reading, the
    reference's clients' and servers'): a message field sent more than once is merged
    (betterproto kept the last: `issuer_id{value: I}` then `issuer_id{}` was a request
    without an issuer), and a field of an unknown number, of the group wire types
    among them, or of a known number but another wire type than its kind's, is skipped
    as unknown (betterproto refused the whole request naming no field; skipped, the
    field is missing and named). ValueError for bytes no parser reads."""
    if depth > MAX_NESTING:
        raise ValueError(f"messages nested more than {MAX_NESTING} deep")
    meta: betterproto.ProtoClassMetadata = message_type._betterproto  # type: ignore[arg-type]
    out = bytearray()
    merged: dict[int, tuple[bytes, bytearray]] = {}  # by number: its tag, its parts
    at = 0
    while at < len(data):
        start = at
        tag, tag_end = _varint(data, at)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("a field numbered 0")
        at = _past_value(data, tag_end, wire_type, number)
        name = meta.field_name_by_number.get(number)
        if name is None:
            continue  # unknown: skipped
        kind = meta.meta_by_field_name[name].proto_type
        repeated = meta.default_gen[name] is list
        expected = _WIRE_TYPES.get(kind, _VARINT)
        packed = repeated and expected != _DELIMITED and wire_type == _DELIMITED
        if wire_type != expected and not packed:
            continue  # another wire type than its kind's: unknown
        if kind != "message":
            out += data[start:at]
            continue
        payload = data[_varint(data, tag_end)[1] : at]
        if repeated:
            nested = as_specified(payload, meta.cls_by_field[name], depth + 1)
            out += data[start:tag_end] + varint(len(nested)) + nested
        else:  # merged with its other parts, written once at the end
            merged.setdefault(number, (data[start:tag_end], bytearray()))[1].extend(payload)
    for number, (tag_bytes, parts) in merged.items():
        name = meta.field_name_by_number[number]
        nested = as_specified(bytes(parts), meta.cls_by_field[name], depth + 1)
        out += tag_bytes + varint(len(nested)) + nested
    return bytes(out)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and where it ends; at most 10 bytes, as protobuf writes them."""
    value = shift = 0
    for index in range(at, min(at + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, index + 1
        shift += 7
    raise ValueError("a varint cut short or longer than 10 bytes")


def _past_value(data: bytes, at: int, wire_type: int, number: int) -> int:
    """Where the value of a field of `wire_type` that begins at `at` ends (a group's:
    past its end, groups within it skipped as well)."""
    if wire_type == _VARINT:
        return _varint(data, at)[1]
    if wire_type in (_FIXED64, _FIXED32):
        end = at + (8 if wire_type == _FIXED64 else 4)
    elif wire_type == _DELIMITED:
        length, at = _varint(data, at)
        end = at + length
    elif wire_type == _GROUP_START:
        while True:
            tag, at = _varint(data, at)
            if tag & 7 == _GROUP_END:
                if tag >> 3 != number:
                    raise ValueError("a group ended by another's end")
                return at
            at = _past_value(data, at, tag & 7, tag >> 3)
    else:  # a group's end outside it, or wire types 6 and 7
        raise ValueError(f"wire type {wire_type} where a field begins")
    if end > len(data):
        raise ValueError("a field cut short")
    return end


# The largest request message a call may send. grpclib reads a message of any announced
# length into memory: one call could exhaust it. The largest request of either API is
# a few hundred bytes; at the 4 MiB of gRPC's own servers, 100 calls left unfinished on
# one connection held 400 MB.
MAX_REQUEST_BYTES = 64 * 1024
# Seconds a call that takes one request message has to send it whole and end its side.
REQUEST_TIMEOUT = 10.0


class _FramedStream:
    """A server stream whose request frames, when grpclib cannot read them, are the
    caller's error with a clear status rather than a bug of the service (UNKNOWN, with a
    traceback logged), and whose request messages are at most MAX_REQUEST_BYTES long.

    A method that takes one request (`unary`) gets it once the caller has ended its side
    of the call, and only if the call held exactly one: grpclib would hand the method
    `None` for none, and ignore any beyond the first after carrying the first out."""

    __slots__ = ("_stream", "_unary")

    def __init__(self, stream: Stream[Any, Any], *, unary: bool) -> None:
        self._stream = stream
        self._unary = unary
        # grpclib reads a message as two reads of the request's data: its 5-byte prefix,
        # then as many bytes as the prefix announces. The second is refused before a byte
        # of an oversized message is taken in (grpclib 0.4.9, pinned; tested).
        data = stream._stream
        read = data.recv_data

        async def bounded(size: int) -> bytes:
            if size > MAX_REQUEST_BYTES:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"request: a message of {size} bytes, more than the {MAX_REQUEST_BYTES}"
                    " a request may hold",
                )
            return await read(size)

        data.recv_data = bounded  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __aiter__(self) -> _FramedStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    async def recv_message(self) -> Any:
        if not self._unary:  # a stream of requests, as long as the caller likes
            return await self._received()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._received()
        except TimeoutError:
            raise GRPCError(
                Status.DEADLINE_EXCEEDED,
                f"request: not sent whole within {REQUEST_TIMEOUT:.0f} s",
            ) from None

    async def _accepted_encodings_told(self) -> None:
        """The headers of the answer, saying which encodings the server takes, as gRPC's
        compression protocol asks of an answer refusing a compressed message. grpclib
        refuses `grpc-` metadata of a method's own: the headers are its, with that one."""
        stream = self._stream
        if stream._send_initial_metadata_done:
            return
        headers = [(":status", "200"), ("content-type", stream._content_type), ACCEPTED_ENCODING]
        await stream._stream.send_headers(headers)
        stream._send_initial_metadata_done = True

    async def _received(self) -> Any:
        try:
            message = await self._stream.recv_message()
            if self._unary:
                if message is None:
                    raise GRPCError(
                        Status.INVALID_ARGUMENT,
                        "request: a message is required (the call sent none)",
                    )
                # What follows the message must be the end of the caller's side.
                if await self._stream._stream.recv_data(1):
                    raise GRPCError(
                        Status.INVALID_ARGUMENT,
                        "request: one message is allowed (the call sent more)",
                    )
            return message
        except NotImplementedError:  # the frame's compressed flag is set
            await self._accepted_encodings_told()
            raise GRPCError(
                Status.UNIMPLEMENTED,
                "request: compressed messages are not supported; send messages uncompressed",
            ) from None
        except (AssertionError, struct.error):  # fewer bytes than the frame announced
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                "request: the stream ended inside a message frame (fewer bytes than its"
                " length prefix announced)",
            ) from None


# The message encodings the servers take: none but the identity.
ACCEPTED_ENCODING = ("grpc-accept-encoding", "identity")


def _framed(handler: Handler, calls: CallsInFlight | None) -> Handler:
    func: Callable[[Stream[Any, Any]], Awaitable[None]] = handler.func
    unary = not handler.cardinality.client_streaming

    async def handle(stream: Stream[Any, Any]) -> None:
        with contextlib.nullcontext() if calls is None else calls.call():
            await func(_FramedStream(stream, unary=unary))  # type: ignore[arg-type]

    return handler._replace(func=handle)


class FramingChecked:
    """`servable`'s methods, each reading its request frames through `_FramedStream`, and
    each call counted in `calls` from its headers on (a request still arriving when the
    service drains is in flight too)."""

    def __init__(self, servable: Servable, *, calls: CallsInFlight | None = None) -> None:
        self._servable = servable
        self._calls = calls

    def __mapping__(self) -> dict[str, Handler]:
        return {
            path: _framed(handler, self._calls)
            for path, handler in self._servable.__mapping__().items()
        }


class Servable(Protocol):
    """What grpclib serves: a mapping of method paths to their handlers."""

    def __mapping__(self) -> Mapping[str, Handler]: ...
