"""The HTTP/2 edge of both gRPC servers: what grpclib (0.4.9, pinned) lets one caller do
to the whole process, and the answer that caller gets instead.

- A call whose deadline has passed when it arrives is answered DEADLINE_EXCEEDED.
  grpclib answered UNKNOWN and logged a traceback, which any loaded moment (the loop
  late by a millisecond) turned into errors in the log.
- A request without `:method` or `:path` is reset (RST_STREAM PROTOCOL_ERROR, RFC 9113
  section 8.1.1): grpclib logged a traceback and left its stream open, one of the
  connection's 100 for good. A `-bin` metadata value that is not base64 is answered
  INVALID_ARGUMENT, where grpclib did the same.
- Header values are read as Latin-1, in which every byte is a character: RFC 9113
  allows bytes 0x80-0xFF in them, and grpclib, reading ASCII, dropped the whole
  connection, every call on it, at the first such byte. A correlation id is taken in
  only when it is ASCII (`commands.correlate`).
- A connection that sends PING and SETTINGS frames faster than it makes calls is sent
  GOAWAY ENHANCE_YOUR_CALM and closed, as gRPC's own servers do with too many pings:
  one connection flooding them kept the process busy and starved every other caller.
- A connection that sends nothing within PREFACE_TIMEOUT is closed: each silent one
  held a file descriptor and memory for good.
- A connection error (an HTTP/2 protocol violation) is told to the peer with the GOAWAY
  frame h2 writes for it, before the connection is closed.
- A call to a method neither server has is answered UNIMPLEMENTED, and every answer
  given here carries `content-type: application/grpc`, as gRPC asks of an answer of
  trailers only; grpclib's lacked it, and its clients reported UNKNOWN.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpclib.protocol
import grpclib.server
from grpclib.const import Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE
from grpclib.metadata import Deadline, encode_grpc_message
from grpclib.server import request_handler
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import PingReceived, RemoteSettingsChanged, RequestReceived
from h2.exceptions import H2Error, ProtocolError

from financing.logging import get_logger

log = get_logger(__name__)

# A call with less time than this left when it arrives cannot be answered in time.
LEAST_TIME_LEFT = 0.001
# Seconds a new connection has to send its first bytes (the HTTP/2 preface).
PREFACE_TIMEOUT = 10.0
# PING and SETTINGS frames a connection may send: a burst, then so many a second, and
# so many more for each call it makes (clients measure a busy connection with pings).
CONTROL_FRAMES_BURST = 100
CONTROL_FRAMES_PER_SECOND = 10.0
CONTROL_FRAMES_PER_CALL = 2

_Headers = list[tuple[str, str]]


class GrpcServer(grpclib.server.Server):
    """grpclib's server, with its connections and requests kept at the edge above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h2_config = H2Configuration(
            client_side=False,
            header_encoding="latin-1",  # any byte is a character: nothing to fail on
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )

    def _protocol_factory(self) -> grpclib.protocol.H2Protocol:
        self.__gc_step__()
        handler = _Handler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        self._handlers.add(handler)
        return _Protocol(handler, self._config, self._h2_config)


class _Handler(grpclib.server.Handler):
    def accept(
        self,
        stream: grpclib.protocol.Stream,
        headers: _Headers,
        release_stream: Callable[[], Any],
    ) -> None:
        self.__gc_step__()
        self._tasks[stream] = self.loop.create_task(
            _request(
                self.mapping,
                stream,
                headers,
                self.codec,
                self.status_details_codec,
                self.dispatch,
                release_stream,
            )
        )


async def _request(
    mapping: Any,
    stream: grpclib.protocol.Stream,
    headers: _Headers,
    codec: Any,
    status_details_codec: Any,
    dispatch: Any,
    release_stream: Callable[[], Any],
) -> None:
    """grpclib's request handling, for a request it can handle; the answer above for
    one it cannot."""
    names = {name for name, _ in headers}
    if ":method" not in names or ":path" not in names:
        try:
            stream.reset_nowait(ErrorCodes.PROTOCOL_ERROR)
        except H2Error:
            pass  # the stream ended meanwhile
        finally:
            release_stream()
        return
    answer = _refusal(headers, mapping)
    if answer is not None:
        try:
            await _trailers_only(stream, *answer)
        except H2Error:
            pass
        finally:
            release_stream()
        return
    await request_handler(
        mapping, stream, headers, codec, status_details_codec, dispatch, release_stream
    )


async def _trailers_only(stream: grpclib.protocol.Stream, status: Status, message: str) -> None:
    """A gRPC answer of its status alone (Trailers-Only), with the `content-type` the
    protocol asks of it: grpclib's own left it out, and grpclib's clients then reported
    a missing content-type (UNKNOWN) instead of the status."""
    await stream.send_headers(
        [
            (":status", "200"),
            ("content-type", GRPC_CONTENT_TYPE),
            ("grpc-status", str(status.value)),
            ("grpc-message", encode_grpc_message(message)),
        ],
        end_stream=True,
    )
    if stream.closable:
        stream.reset_nowait()


def _refusal(headers: _Headers, mapping: Mapping[str, Any]) -> tuple[Status, str] | None:
    """The status a request gets before any method sees it, if it gets one."""
    fields = dict(headers)
    if (
        fields.get(":method") == "POST"
        and fields.get("content-type", "").split("+")[0] == GRPC_CONTENT_TYPE
        and fields[":path"] not in mapping
    ):
        path = fields[":path"]
        shown = path if path.isascii() and path.isprintable() else "the method asked for"
        return Status.UNIMPLEMENTED, f"{shown}: no such method"
    for name, value in headers:
        if name == "grpc-timeout":
            try:
                deadline = Deadline.from_headers([(name, value)])
            except ValueError:
                return None  # grpclib answers it
            if deadline is not None and deadline.time_remaining() < LEAST_TIME_LEFT:
                return Status.DEADLINE_EXCEEDED, "the deadline passed before the call arrived"
        elif (
            name.endswith("-bin") and not name.startswith((":", "grpc-")) and not _is_base64(value)
        ):
            shown = name if name.isascii() and name.isprintable() else "a -bin key"
            return Status.INVALID_ARGUMENT, f"metadata {shown}: the value is not base64"
    return None


def _is_base64(value: str) -> bool:
    """Whether a `-bin` metadata value is base64 as gRPC sends it: the standard alphabet,
    padded or not; several such values joined by commas, as a repeated key may be.
    grpclib's own decoding drops what is not of the alphabet rather than refuse it."""
    for part in value.split(","):
        unpadded = part.strip().rstrip("=")
        try:
            base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
        except (ValueError, binascii.Error):  # not ASCII, not the alphabet, a cut group
            return False
    return True


class _Protocol(grpclib.protocol.H2Protocol):
    """A connection: closed when silent from the start, or when it floods control frames."""

    _silent: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._control = _Allowance()
        self._silent = asyncio.get_running_loop().call_later(PREFACE_TIMEOUT, transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._silent is not None:
            self._silent.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._silent is not None:
            self._silent.cancel()
            self._silent = None
        try:
            events = self.connection.feed(data)
        except ProtocolError:
            log.debug("gRPC connection closed on a protocol error", exc_info=True)
            self.connection.flush()  # the GOAWAY h2 wrote for it
            self.processor.close("Protocol error")
            return
        calls = control = 0
        for event in events:
            if isinstance(event, RequestReceived):
                calls += 1
            elif isinstance(event, PingReceived | RemoteSettingsChanged):
                control += 1
        if not self._control.allows(control, calls):
            log.warning("gRPC connection closed: it sent PING or SETTINGS frames too fast")
            try:
                self.connection._connection.close_connection(
                    ErrorCodes.ENHANCE_YOUR_CALM, additional_data=b"too_many_pings"
                )
                self.connection.flush()
            except H2Error:
                pass  # the connection was closing already: nothing more to tell it
            self.processor.close("too many control frames")
            return
        self.connection.flush()
        for event in events:
            self.processor.process(event)
        self.connection.flush()


class _Allowance:
    """How many control frames a connection may still send: a token bucket refilled with
    time and with each call."""

    __slots__ = ("_at", "_left")

    def __init__(self) -> None:
        self._left = float(CONTROL_FRAMES_BURST)
        self._at = time.monotonic()

    def allows(self, control: int, calls: int) -> bool:
        now = time.monotonic()
        self._left = min(
            CONTROL_FRAMES_BURST,
            self._left
            + (now - self._at) * CONTROL_FRAMES_PER_SECOND
            + calls * CONTROL_FRAMES_PER_CALL,
        )
        self._at = now
        self._left -= control
        return self._left >= 0
