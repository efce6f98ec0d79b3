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
- A connection that sends frames which make no call faster than it makes calls (PING,
  SETTINGS, PRIORITY, frames of types HTTP/2 does not define, a WINDOW_UPDATE of less
  than SMALL_WINDOW_UPDATE bytes, a DATA frame of less than SMALL_DATA bytes) is sent
  GOAWAY ENHANCE_YOUR_CALM and closed, as gRPC's own servers do with too many pings:
  one connection flooding any of them kept the process busy and starved every other
  caller.
- A connection that resets the calls it opens faster than RESETS_PER_SECOND, after a
  burst of RESETS_BURST (nghttp2's defaults), is sent GOAWAY ENHANCE_YOUR_CALM and
  closed: the "rapid reset" of CVE-2023-44487, 14,000 calls opened and reset a second
  on one connection, froze the process for minutes (every call of every caller timed
  out, the broker and the database were taken for gone) and grew it by gigabytes.
- A connection that has not sent the HTTP/2 preface and its SETTINGS within
  PREFACE_TIMEOUT (and, over TLS, its handshake within as long before) is closed:
  each silent one held a file descriptor and memory for good, and so did one that
  sent a single byte.
- A server holds at most `connection_limit()` connections (a quarter of the file
  descriptors the process may open beyond those it needs itself): a new one beyond
  them closes the one idle longest (no call open; GOAWAY NO_ERROR, which clients take
  as "connect again"), or is closed itself when every one has a call open.
  Connections that sent their SETTINGS and then nothing reached the descriptor limit:
  then no call, no database session and no broker connection could be opened any more.
  One host holds at most half of them (`Connections`): one that held them all, a
  health `Watch` open on each, kept every other client out.
- A connection that announces a frame longer than SETTINGS_MAX_FRAME_SIZE is sent
  GOAWAY FRAME_SIZE_ERROR and closed as the frame's header arrives: h2 refused it only
  once its whole payload had arrived, up to 16 MiB held for each connection.
- A call opened beyond SETTINGS_MAX_CONCURRENT_STREAMS (100) is refused alone
  (RST_STREAM REFUSED_STREAM): h2 closed the whole connection, every call on it.
- An empty DATA frame within a request (RFC 9113 allows one anywhere) is read as
  nothing: grpclib took it for the request's end, and refused the call.
- A connection error (an HTTP/2 protocol violation) is told to the peer with the GOAWAY
  frame h2 writes for it, before the connection is closed.
- A call whose content type is `application/grpc` followed by `+` or `;` and anything
  (`application/grpc; charset=utf-8`, as some proxies and clients write it) is served
  as protobuf, as grpc-go (the reference's server) serves it; grpclib took only `+proto`
  after it and answered the others HTTP 415, which their clients report as UNKNOWN.
- While the server is busy (the Commands API queueing as many commands as it may, the
  Queries API holding as many list replies as it may), a connection with
  BUSY_CALLS_MOST calls begun meanwhile and open has the calls it opens put aside, read
  but not begun, until its calls end (`_Handler`).
- A call to a method neither server has is answered UNIMPLEMENTED, and every answer
  given here carries `content-type: application/grpc`, as gRPC asks of an answer of
  trailers only; grpclib's lacked it, and its clients reported UNKNOWN.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import base64
import binascii
import contextlib
import contextvars
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpclib.protocol
import grpclib.server
import hpack
import structlog
from grpclib.const import Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE
from grpclib.metadata import Deadline, decode_timeout, encode_grpc_message
from grpclib.server import request_handler
from h2.config import H2Configuration
from h2.connection import H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.events import DataReceived, RemoteSettingsChanged, RequestReceived
from h2.exceptions import (
    DenialOfServiceError,
    H2Error,
    ProtocolError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.stream import StreamClosedBy
from h2.utilities import SizeLimitDict
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from financing import metrics
from financing.entrypoints.connections import (
    OWN_DESCRIPTORS,
    Connections,
    descriptor_share,
    host_of,
)
from financing.entrypoints.grpc.pushback import advised
from financing.entrypoints.listening import listening_at, shown
from financing.logging import get_logger

log = get_logger(__name__)

# A call with less time than this left when it arrives cannot be answered in time.
LEAST_TIME_LEFT = 0.001
# Seconds a new connection has to send the HTTP/2 preface and its SETTINGS frame.
PREFACE_TIMEOUT = 10.0
# Frames that make no call a connection may send: a burst, then so many a second, and
# so many more for each call it makes (clients measure a busy connection with pings).
CONTROL_FRAMES_BURST = 100
CONTROL_FRAMES_PER_SECOND = 10.0
CONTROL_FRAMES_PER_CALL = 4
# A DATA frame shorter than this counts among the frames that make no call: a call's
# request comes in one or two of them, and its end in an empty one; a flood of them, a
# byte or none each, costs the parser what a flood of PINGs does and grpclib 420 bytes
# of memory each.
SMALL_DATA = 1024
# A WINDOW_UPDATE smaller than this makes no call: clients grant windows by the
# kilobyte at least (half the window they keep, as a rule).
SMALL_WINDOW_UPDATE = 1024
# The metadata a call may send (bytes as HTTP/2 counts a header list), which the servers
# advertise (SETTINGS_MAX_HEADER_LIST_SIZE), and what is read of a call's headers at
# most: a call whose metadata lies between the two is answered RESOURCE_EXHAUSTED, its
# connection's other calls untouched (clients send beyond the advertised size: cut off
# there, the headers left the connection's header compression unreadable, and h2 closed
# it, every call on it). Beyond the larger, the connection is closed.
MAX_HEADER_LIST = H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE
HEADERS_READ_MOST = 4 * MAX_HEADER_LIST
# The ended calls of a connection it remembers (a frame that comes for one later is
# answered as for an ended call, not a reset of an unknown one): h2 remembers 65,536, at
# 120 bytes each, and a client's connection that lived long held 7.9 MB for them.
CLOSED_CALLS_KEPT = 1024
# The most connections a server holds (`connection_limit`).
MAX_CONNECTIONS = 65536
# Seconds a connection sent away is read (and what it sends dropped) before it is closed.
LINGER = 1.0
# Seconds the connections sent away at shutdown have to be gone before they are aborted.
SHUT_DOWN_WAIT = LINGER + 1.0
# Calls a connection may have begun and open while the server is busy; those it opens
# beyond are put aside (`_Handler`).
BUSY_CALLS_MOST = 8
# Calls never put aside: a container's or a balancer's probe.
HEALTH_PATH = "/grpc.health.v1.Health/"
# Calls a connection may reset: a burst, then so many a second.
RESETS_BURST = 1000
RESETS_PER_SECOND = 33.0

_Headers = list[tuple[str, str]]


class GrpcServer(grpclib.server.Server):
    """grpclib's server, with its connections and requests kept at the edge above."""

    def __init__(
        self,
        *args: Any,
        connections: int | None = None,
        busy: Callable[[], bool] = lambda: False,
        tls: Callable[[], ssl.SSLContext] | None = None,
        **kwargs: Any,
    ) -> None:
        """grpclib's server, holding at most `connections` connections (by default the
        share of a process that needs OWN_DESCRIPTORS); `busy`: whether a call begun now
        would wait for room (the Commands API queueing as many commands as it may, the
        Queries API holding as many list replies as it may);
        `tls`: what a new connection is served with, asked at each (None: plaintext)."""
        super().__init__(*args, **kwargs)
        self._busy = busy
        self._tls = tls
        self._forgetting: set[asyncio.Future[None]] = set()
        self._h2_config = H2Configuration(
            client_side=False,
            header_encoding="latin-1",  # any byte is a character: nothing to fail on
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._edge_connections: Connections[_Protocol] = Connections(
            "gRPC", connection_limit() if connections is None else connections
        )

    async def start(self, host: str, port: int) -> None:  # type: ignore[override]
        """Listening on `host:port`; an unspecified host takes IPv4 and IPv6 alike
        (`listening.wildcard_socket`). TLS, when served, is not the listener's: each
        connection is counted first and shakes hands after (`_Protocol`)."""
        await super().start(**listening_at(host, port))

    def go_away(self) -> None:
        """The first step of shutting down, before the calls in flight are let finish:
        the listener closed, and every connection told that it takes no new call
        (GOAWAY NO_ERROR naming the last call it took), its calls in flight answered
        on. Told only once those calls were over, clients went on sending new calls to
        a server that answered each UNAVAILABLE, where they would have gone to
        another instance: about a third of a client's calls failed for as long as the
        longest call in flight lasted (up to 5 s)."""
        listener = getattr(self, "_server", None)  # grpclib's asyncio server
        if listener is not None:
            listener.close()
        for connection in self._edge_connections.held():
            connection.go_away()

    def renew_trust(self) -> None:
        """The client CAs changed: each connection opened with other TLS files than the
        newest is told to connect again (GOAWAY NO_ERROR naming the last call it took,
        its calls in flight answered on), its next handshake judged by the CAs read
        now. Connections kept the trust they were opened with for as long as their
        clients kept them: a CA removed to cut its clients off left those connected
        served."""
        if self._tls is None:
            return
        current = self._tls()
        told = 0
        for connection in self._edge_connections.held():
            if connection.tls is not None and connection.tls is not current:
                connection.go_away()
                told += 1
        if told:
            log.info(
                "gRPC connections opened before the client CAs changed: each told to connect again",
                connections=told,
            )

    def close(self) -> None:
        """grpclib's close (the listener closed, every call cancelled), and every
        connection sent away (GOAWAY NO_ERROR: connect again) and closed, one accepted
        meanwhile refused: grpclib left them open until the process ended, its clients
        then reset by the kernel, not told, and each a ResourceWarning of a transport
        never closed."""
        super().close()
        for connection in self._edge_connections.close():
            connection.shut_down()

    async def wait_closed(self) -> None:
        """grpclib's, and the connections gone: those still open SHUT_DOWN_WAIT after
        they were sent away (a client that reads nothing, its answers unwritten) are
        aborted."""
        await super().wait_closed()
        try:
            async with asyncio.timeout(SHUT_DOWN_WAIT):
                await self._edge_connections.emptied()
        except TimeoutError:
            held = self._edge_connections.held()
            log.warning(
                "gRPC connections still open at shutdown are aborted", connections=len(held)
            )
            for connection in held:
                connection.abort()

    def _protocol_factory(self) -> grpclib.protocol.H2Protocol:
        self.__gc_step__()
        handler = _Handler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        handler.busy = self._busy
        self._handlers.add(handler)
        protocol = _Protocol(handler, self._config, self._h2_config)
        protocol.connections = self._edge_connections
        protocol.forget = lambda: self._forget(handler)
        protocol.tls = None if self._tls is None else self._tls()
        return protocol

    def _forget(self, handler: grpclib.server.Handler) -> None:
        """A lost connection's handler let go once its calls have ended: grpclib looks for
        such handlers only at every tenth new connection, and a flood's last connections
        stayed, with every stream they had opened, until ten more came (45 MB held after
        2,000 list calls in flight over 30 connections)."""
        ended = asyncio.ensure_future(handler.wait_closed())
        self._forgetting.add(ended)
        ended.add_done_callback(self._forgetting.discard)
        ended.add_done_callback(lambda _: self._handlers.discard(handler))


def connection_limit(own: int = OWN_DESCRIPTORS, soft: int | None = None) -> int:
    """The connections a server holds at most: a quarter of the file descriptors the
    process may open beyond the `own` it needs itself (its pools' sessions, the broker's
    connection...), the rest left to the other server and the metrics endpoint."""
    return descriptor_share(4, most=MAX_CONNECTIONS, own=own, soft=soft)


class _Handler(grpclib.server.Handler):
    """grpclib's calls of one connection, each let go as soon as it ends: grpclib kept an
    ended call's task, and with it the stream and whatever its request had buffered
    (27 MB for a request sent a byte a frame), until ten more calls came.

    While the server is busy (`GrpcServer`'s `busy`), a connection with BUSY_CALLS_MOST
    calls begun meanwhile and still open has the calls it opens put aside, read but not
    begun, and begins them in the order they came as its calls end. Each call begun
    costs the process about a millisecond, and clients retrying busy answers at once,
    fifty connections with forty calls each, kept it that busy: the commands it had
    taken were confirmed too late, its broker and databases taken for gone (9 calls of
    36,000 answered OK in a minute, against 250-300 a second otherwise). A health check
    is never put aside."""

    busy: Callable[[], bool]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._aside: deque[_AsideCall] = deque()
        self._begun_busy: set[grpclib.protocol.Stream] = set()  # open, begun while busy

    def accept(
        self,
        stream: grpclib.protocol.Stream,
        headers: _Headers,
        release_stream: Callable[[], Any],
    ) -> None:
        self.__gc_step__()
        if (self._aside or self._crowded()) and not _is_health_check(headers):
            self._aside.append(_AsideCall(stream, headers, release_stream, time.monotonic()))
            return
        self._begin(stream, headers, release_stream)

    def _crowded(self) -> bool:
        return len(self._begun_busy) >= BUSY_CALLS_MOST and self.busy()

    def _begin(
        self, stream: grpclib.protocol.Stream, headers: _Headers, release_stream: Callable[[], Any]
    ) -> None:
        if self.busy():
            self._begun_busy.add(stream)
        task = self.loop.create_task(
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
        self._tasks[stream] = task
        task.add_done_callback(lambda _: self._ended(stream))

    def begin_aside(self, every: bool = False) -> None:
        """Begin the calls put aside, the first first, while the connection is not
        crowded (`every`: all of them), each with the time it waited taken off its
        deadline."""
        now = time.monotonic()
        while self._aside and (every or not self._crowded()):
            call = self._aside.popleft()
            headers = _less_time(call.headers, now - call.since)
            self._begin(call.stream, headers, call.release_stream)

    def _ended(self, stream: grpclib.protocol.Stream) -> None:
        task = self._tasks.pop(stream, None)
        if task is not None:
            self._cancelled.discard(task)
        self._begun_busy.discard(stream)
        self.begin_aside()

    def cancel(self, stream: grpclib.protocol.Stream) -> None:
        """A call its client reset: let go, put aside or begun."""
        for call in self._aside:
            if call.stream is stream:
                self._aside.remove(call)
                call.release_stream()
                return
        if stream in self._tasks:
            super().cancel(stream)

    def close(self) -> None:
        self._aside.clear()  # their connection is gone
        self._begun_busy.clear()
        super().close()


@dataclass(frozen=True)
class _AsideCall:
    """A call put aside while its connection is crowded (`_Handler`)."""

    stream: grpclib.protocol.Stream
    headers: _Headers
    release_stream: Callable[[], Any]
    since: float  # time.monotonic() when it came


def _is_health_check(headers: _Headers) -> bool:
    paths = [value for name, value in headers if name == ":path"]
    return len(paths) == 1 and paths[0].startswith(HEALTH_PATH)


# The pseudo-header fields of a request (RFC 9113 8.3.1), and the fields of a connection
# HTTP/2 has no place for (8.2.2).
_REQUEST_PSEUDO_HEADERS = frozenset({":method", ":scheme", ":authority", ":path"})
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"}
)


def _malformed(headers: _Headers) -> bool:
    """Whether a request's header block is malformed (RFC 9113 8.2, 8.3), which h2 is not
    asked to tell (any byte may stand in a value): a pseudo-header unknown, repeated or
    after a regular field, `:method` or `:path` missing, a field name with capitals, a
    field of the connection. grpclib served such requests by the last `:path`, which
    let a call whose first `:path` was the health service's pass for a health check
    (never put aside), and ignored `Idempotency-Key` as no `idempotency-key`: a
    client's retry applied twice."""
    seen: set[str] = set()
    regular = False
    for name, value in headers:
        if name.startswith(":"):
            if regular or name not in _REQUEST_PSEUDO_HEADERS or name in seen:
                return True
            seen.add(name)
            continue
        regular = True
        if name.lower() != name or name in _CONNECTION_SPECIFIC:
            return True
        if name == "te" and value != "trailers":
            return True
    return not {":method", ":path"} <= seen


def _less_time(headers: _Headers, waited: float) -> _Headers:
    """`headers` with `waited` seconds taken off the call's deadline (`grpc-timeout`), if
    it has one: it counts from when the call came, not from when it is begun."""
    less = []
    for name, value in headers:
        if name == "grpc-timeout":
            try:
                left = max(0.0, decode_timeout(value) - waited)
            except ValueError:
                pass  # answered as grpclib answers it
            else:
                # At most 8 digits (the gRPC spec): microseconds up to 100 s.
                value = (
                    f"{int(left * 1e6)}u" if left < 99.0 else f"{min(int(left * 1e3), 10**8 - 1)}m"
                )
        less.append((name, value))
    return less


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
    if _malformed(headers):
        try:
            stream.reset_nowait(ErrorCodes.PROTOCOL_ERROR)
        except H2Error:
            pass  # the stream ended meanwhile
        finally:
            release_stream()
        return
    headers = _served_as_protobuf(headers)
    answer = _refusal(headers, mapping)
    if answer is not None:
        try:
            await _trailers_only(stream, *answer)
        except H2Error:
            pass
        finally:
            release_stream()
        return
    # An error's trailers carry the retry advice the call's handler gave (`pushback`).
    stream.send_headers = advised(stream.send_headers)  # type: ignore[method-assign]
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


def _served_as_protobuf(headers: _Headers) -> _Headers:
    """`headers` with a gRPC content type of any subtype or parameters as the plain one,
    the only codec served: grpc-go takes what follows `application/grpc` after `+` or
    `;` for a codec's name, and serves an unknown one as protobuf."""
    for at, (name, value) in enumerate(headers):
        if (
            name == "content-type"
            and value.startswith(GRPC_CONTENT_TYPE)
            and value[len(GRPC_CONTENT_TYPE) : len(GRPC_CONTENT_TYPE) + 1] in ("+", ";")
        ):
            return [*headers[:at], (name, GRPC_CONTENT_TYPE), *headers[at + 1 :]]
    return headers


def _refusal(headers: _Headers, mapping: Mapping[str, Any]) -> tuple[Status, str] | None:
    """The status a request gets before any method sees it, if it gets one."""
    size = sum(len(name) + len(value) + 32 for name, value in headers)  # RFC 9113 6.5.2
    if size > MAX_HEADER_LIST:
        return (
            Status.RESOURCE_EXHAUSTED,
            f"request metadata: {size:,} bytes, more than the {MAX_HEADER_LIST:,} taken",
        )
    fields = dict(headers)
    if (
        fields.get(":method") == "POST"
        and fields.get("content-type") == GRPC_CONTENT_TYPE
        and fields[":path"] not in mapping
    ):
        path = fields[":path"]
        shown = path if path.isascii() and path.isprintable() else "the method asked for"
        return Status.UNIMPLEMENTED, f"{shown}: no such method"
    for name, value in headers:
        if name == "grpc-timeout":
            if not _TIMEOUT.fullmatch(value):  # grpclib answered UNKNOWN, took 9 digits
                shown = value if value.isascii() and value.isprintable() else "its value"
                return (
                    Status.INVALID_ARGUMENT,
                    f"metadata grpc-timeout: {shown!r} is not a timeout (1 to 8 digits, then"
                    " H, M, S, m, u or n)",
                )
            deadline = Deadline.from_headers([(name, value)])
            if deadline is not None and deadline.time_remaining() < LEAST_TIME_LEFT:
                return Status.DEADLINE_EXCEEDED, "the deadline passed before the call arrived"
        elif (
            name.endswith("-bin") and not name.startswith((":", "grpc-")) and not _is_base64(value)
        ):
            shown = name if name.isascii() and name.isprintable() else "a -bin key"
            return Status.INVALID_ARGUMENT, f"metadata {shown}: the value is not base64"
    return None


# A `grpc-timeout` as the gRPC protocol writes it: at most 8 digits, then its unit.
_TIMEOUT = re.compile(r"[0-9]{1,8}[HMSmun]")


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


class _HeaderDecoder(hpack.Decoder):
    """h2's header decoder, reading header lists of up to HEADERS_READ_MOST whatever h2
    sets (it sets the size it advertises, once the client has read it)."""

    @property
    def max_header_list_size(self) -> int:
        return HEADERS_READ_MOST

    @max_header_list_size.setter
    def max_header_list_size(self, size: int) -> None:
        pass


class _Protocol(grpclib.protocol.H2Protocol):
    """A connection: closed when it has not begun in time, or when it floods frames that
    make no call or resets its calls too fast."""

    _silent: asyncio.TimerHandle | None = None
    _gone: asyncio.Handle | None = None  # sent away: what it sends is dropped
    _refused = False  # closed as it came: beyond the server's connections
    # Told that it takes no new call (`go_away`): the last call it took.
    _last_call: int | None = None
    connections: Connections[_Protocol]
    forget: Callable[[], None]  # its handler let go once its calls have ended
    tls: ssl.SSLContext | None = None  # what it is served with; None: plaintext
    host: object = None  # its client's address (`Connections`'s share of one host)
    _begun = False  # HTTP/2 begun: at once, or once its TLS handshake is over
    _left = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._early = bytearray()  # read before HTTP/2 was begun

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.host = host_of(transport.get_extra_info("peername"))
        if not self.connections.admit(self):
            self._refused = True
            metrics.GRPC_CONNECTIONS_CLOSED.labels("refused").inc()
            self.handler.close()  # so that the server lets it go
            # Closed without a word of HTTP/2: told why (SETTINGS, then GOAWAY
            # ENHANCE_YOUR_CALM), a grpcio client took the connection for made, and its
            # call waited for the next one until its deadline (DEADLINE_EXCEEDED), where
            # closed, it is answered UNAVAILABLE at once and may go elsewhere.
            transport.close()
            return
        if self.tls is None:
            self._begin(transport)
            return
        # The handshake takes the connection over at once, before anything is read:
        # asyncio's TLS protocol, put in by hand (its `start_tls`, a coroutine, swaps
        # protocols a turn of the loop later, and uvloop has read the client's first
        # bytes by then).
        loop = asyncio.get_running_loop()
        shaken = loop.create_future()
        handshake = _Handshake(
            loop,
            self,
            self.tls,
            shaken,
            server_side=True,
            call_connection_made=False,
            ssl_handshake_timeout=cast(int, PREFACE_TIMEOUT),  # any number of seconds
        )
        transport.set_protocol(handshake)
        handshake.connection_made(transport)
        self._securing = asyncio.ensure_future(self._secure(transport, handshake, shaken))

    async def _secure(
        self,
        plain: asyncio.BaseTransport,
        handshake: asyncio.sslproto.SSLProtocol,
        shaken: asyncio.Future[None],
    ) -> None:
        """HTTP/2 begun once the TLS handshake is over; a handshake that fails, or does
        not end within PREFACE_TIMEOUT, closes the connection, counted and said."""
        try:
            await shaken
        except Exception as error:  # whatever ended the handshake ends the connection
            # OpenSSL's words, not the client's.
            self._refuse(plain, plain, f"its TLS handshake failed ({_handshake(error)})")
            return
        secured = handshake._app_transport
        if secured is None or self._left or self._gone is not None:
            # Gone, or sent away, while it shook hands.
            if secured is not None:
                secured.close()
            self._leave(None)
            return
        chosen = cast(ssl.SSLObject | None, secured.get_extra_info("ssl_object"))
        if chosen is not None and chosen.selected_alpn_protocol() != "h2":
            # gRPC over TLS is HTTP/2 chosen by ALPN (RFC 9113, section 3.2), as grpc-go's
            # servers require: a client that chose another protocol, or none, held its
            # connection until its preface was due. OpenSSL has no alert for it here.
            self._refuse(
                secured,
                plain,
                "its client did not choose HTTP/2 by ALPN (h2), which gRPC over TLS requires",
            )
            return
        self._transport = secured
        self._begin(secured)

    def _refuse(
        self, transport: asyncio.BaseTransport, plain: asyncio.BaseTransport, why: str
    ) -> None:
        """Close a connection whose TLS handshake gave no HTTP/2 to serve, counted and
        said with its client's address (`plain`'s) unless it was gone or sent away
        meanwhile: each reason its own 10 s (under one kind, a CA taken out of the file
        hid behind clients without a certificate, counted as theirs)."""
        transport.close()
        if not self._left and self._gone is None:
            metrics.GRPC_CONNECTIONS_CLOSED.labels("tls_handshake").inc()
            # The last one's address, on a line counting several.
            _SENT_AWAY.warn(f"gRPC connection closed: {why}", peer=_peer(plain))
        self._leave(None)

    def _begin(self, transport: asyncio.BaseTransport) -> None:
        try:
            super().connection_made(transport)
        except Exception as error:  # a MemoryError under an address-space limit, say
            # Left counted and half made, the connection held its client's call until
            # its deadline, and at shutdown its GOAWAY failed: exit 1.
            transport.close()
            metrics.GRPC_CONNECTIONS_CLOSED.labels("failed").inc()
            _SENT_AWAY.warn(
                f"gRPC connection closed: HTTP/2 could not be begun on it ({error!r})",
                peer=_peer(transport),
            )
            self._leave(None)
            return
        self._begun = True
        h2 = self.connection._connection
        # h2 advertises MAX_HEADER_LIST (its default) and reads up to HEADERS_READ_MOST.
        h2.decoder = _HeaderDecoder()
        h2._closed_streams = SizeLimitDict(size_limit=CLOSED_CALLS_KEPT)
        self._frames = _FrameCounter(h2.max_inbound_frame_size)
        self._control = _Allowance(CONTROL_FRAMES_BURST, CONTROL_FRAMES_PER_SECOND)
        self._resets = _Allowance(RESETS_BURST, RESETS_PER_SECOND)
        _refuse_calls_beyond_the_limit(h2, self._refusing)
        self._silent = asyncio.get_running_loop().call_later(PREFACE_TIMEOUT, self._not_begun)
        early, self._early = bytes(self._early), bytearray()
        if early:
            self.data_received(early)

    def _refusing(self) -> bool:
        """Whether one more call beyond the limit may be refused: a reset, counted as the
        client's own; the credit its HEADERS earned as a call taken back, so that such
        calls make no room for PINGs and their like."""
        self._control.allows(CONTROL_FRAMES_PER_CALL)  # said at the next read if spent
        return self._resets.allows(1)

    def _not_begun(self) -> None:
        metrics.GRPC_CONNECTIONS_CLOSED.labels("no_preface").inc()
        self._transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            self.forget()
            return
        self._leave(exc)

    def _leave(self, exc: BaseException | None) -> None:
        """Gone: no longer counted, its calls cancelled, its handler let go (once)."""
        if self._left:
            return
        self._left = True
        self.connections.left(self)
        for timer in (self._silent, self._gone):
            if timer is not None:
                timer.cancel()
        if self._begun:
            super().connection_lost(exc)  # its calls cancelled
        self.forget()

    @property
    def idle(self) -> bool:
        """Whether it has no call open, and is not being sent away already."""
        return (not self._begun or not self.processor.streams) and self._gone is None

    def data_received(self, data: bytes) -> None:
        if self._refused or self._gone is not None:
            return
        if not self._begun:
            # Read over TLS as its handshake ended, before HTTP/2 is begun (a turn of
            # the loop later): kept for then.
            self._early += data
            return
        self.connections.active(self)
        # Counted before h2 parses them: a flood costs no more than its frames' headers.
        calls, control, resets = self._frames.count(data)
        if self._frames.tls:
            metrics.GRPC_CONNECTIONS_CLOSED.labels("tls_on_plaintext").inc()
            _SENT_AWAY.warn(
                "gRPC connection closed: it began a TLS handshake on a port that serves"
                " plaintext (a client set up for TLS)",
                kind="TLS on a plaintext port",
            )
            self._closed_as("TLS on a plaintext port")
            return
        if self._frames.oversized:
            self._send_away(
                "it announced a frame longer than the server takes (SETTINGS_MAX_FRAME_SIZE)",
                b"frame_too_large",
                code=ErrorCodes.FRAME_SIZE_ERROR,
            )
            return
        if not self._control.allows(control, credit=calls * CONTROL_FRAMES_PER_CALL):
            self._send_away("it sent frames that make no call too fast", b"too_many_pings")
            return
        if not self._resets.allows(resets):
            self._send_away("it reset its calls too fast", b"too_many_resets")
            return
        try:
            events = self.connection.feed(data)
        except _RefusedTooFast:
            self._send_away(
                "it opened calls beyond the limit, each refused, too fast", b"too_many_resets"
            )
            return
        except ProtocolError as error:
            # Said and counted, as every other connection the edge closes.
            reason = "headers_too_large" if isinstance(error, DenialOfServiceError) else None
            metrics.GRPC_CONNECTIONS_CLOSED.labels(reason or "protocol_error").inc()
            # The error's text holds what the client sent (a table index, an address); its
            # class says what (h2's text is a stream id alone for some).
            _SENT_AWAY.warn(
                f"gRPC connection closed: it broke HTTP/2 ({type(error).__name__}: {error})",
                kind=f"broke HTTP/2: {type(error).__name__}",
            )
            self.connection.flush()  # the GOAWAY h2 wrote for it
            self._closed_as("Protocol error")
            return
        if self._silent is not None and any(
            isinstance(event, RemoteSettingsChanged) for event in events
        ):
            self._silent.cancel()  # the preface and the SETTINGS that must follow it
            self._silent = None
        self.connection.flush()
        # grpclib raises on an event it has no processor for, which the transport then
        # logs as a fatal error, with a traceback, and closes: a frame of a type HTTP/2
        # does not define (which a receiver must ignore, RFC 9113 section 5.5), an ALTSVC,
        # a PRIORITY_UPDATE. Those are ignored; after a close it has none at all.
        processed = getattr(self.processor, "processors", {})
        for event in events:
            if self._refused_call(event):
                continue
            if isinstance(event, DataReceived) and not event.flow_controlled_length:
                # An empty DATA frame (RFC 9113 allows one anywhere) carries nothing, and
                # grpclib's buffer took it for the end of the request: the call was
                # refused "a message is required", or "the stream ended inside a message
                # frame" (its end, END_STREAM, is an event of its own).
                continue
            if type(event) in processed:
                self.processor.process(event)
        self.connection.flush()

    def _closed_as(self, reason: str) -> None:
        """Closed by grpclib, for `reason`, and gone from then on: taken for an idle one
        until its transport said it was lost, it was chosen to make room for a new
        connection of its host, whose GOAWAY then raised on the transport grpclib had
        let go, and the new connection, never counted, was never closed (under `ulimit -n
        64`, 35 sockets held for 20 s and every port refused)."""
        self.processor.close(reason)
        self._gone = asyncio.get_running_loop().call_soon(self._transport.close)

    def go_away(self) -> None:
        """Told that it takes no new call (GOAWAY NO_ERROR naming the last it took), its
        calls in flight answered on: a call it opens after is refused (RST_STREAM
        REFUSED_STREAM, which clients retry elsewhere by themselves). The frame is
        written past h2, whose GOAWAY ends the connection at once."""
        if self._refused or self._gone is not None or self._last_call is not None:
            return
        if not self._begun:  # still shaking hands: it has no call to be answered
            self._close_unbegun("shutdown")
            return
        self._last_call = self.connection._connection.highest_inbound_stream_id
        # Begun, to be told at once that the service is shutting down.
        cast(_Handler, self.handler).begin_aside(every=True)
        self.connection.flush()  # what h2 has to send first
        frame = GoAwayFrame(stream_id=0, last_stream_id=self._last_call, error_code=0)
        _stream(self._transport).write(frame.serialize())

    def _refused_call(self, event: object) -> bool:
        """Whether `event` belongs to a call opened after the connection was told to take
        no new one; the call is refused the first time."""
        stream_id = getattr(event, "stream_id", 0)
        if self._last_call is None or stream_id <= self._last_call:
            return False
        if isinstance(event, RequestReceived):
            with contextlib.suppress(H2Error):  # the client reset it first
                self.connection._connection.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        return True

    def shut_down(self) -> None:
        """Closed as the server stops (GOAWAY NO_ERROR: connect again), once the client
        closed its side or LINGER later: it may still be sending (its calls were just
        cut), and a close at once would have the kernel reset what it sends, the GOAWAY
        lost."""
        if self._gone is None:
            self._send_away("shutdown", b"", code=ErrorCodes.NO_ERROR, at_once=False)

    def abort(self) -> None:
        _stream(self._transport).abort()

    def make_room(self) -> None:
        """Closed, idle, for a new connection (GOAWAY NO_ERROR: connect again), at once:
        it sends nothing to be read first."""
        self._send_away("made_room", b"", code=ErrorCodes.NO_ERROR, at_once=True)

    def _send_away(
        self,
        why: str,
        debug: bytes,
        *,
        code: ErrorCodes = ErrorCodes.ENHANCE_YOUR_CALM,
        at_once: bool = False,
    ) -> None:
        """GOAWAY (`code`), its calls ended, the end of what it is sent, and the
        connection closed: LINGER later unless `at_once` (one that sends nothing). Closed
        at once, with its frames still arriving, the kernel would answer them with a
        reset that can destroy the GOAWAY before its client reads why. Counted under its
        debug data (`why` without any); a warning unless the code is NO_ERROR."""
        if not self._begun:
            self._close_unbegun(debug.decode() or why)
            return
        metrics.GRPC_CONNECTIONS_CLOSED.labels(debug.decode() or why).inc()
        if code != ErrorCodes.NO_ERROR:
            _SENT_AWAY.warn(f"gRPC connection closed: {why}")
        try:
            self.connection._connection.close_connection(
                code, additional_data=debug or None, last_stream_id=self._last_call
            )
            self.connection.flush()
        except H2Error:
            pass  # the connection was closing already: nothing more to tell it
        # Its calls are cancelled now: an answer could no longer be sent on it. One
        # that ends all the same (its deadline passed as it was cancelled: grpclib
        # answers DEADLINE_EXCEEDED) finds its stream closed, which grpclib lets go; on
        # the closed connection, h2 refused it and grpclib logged an error for each.
        self.handler.close()
        self.connection._connection.streams.clear()
        loop = asyncio.get_running_loop()
        if at_once:
            self._gone = loop.call_soon(self.processor.close, why)
            return
        transport = _stream(self._transport)
        if transport.can_write_eof():
            with contextlib.suppress(OSError):  # the client has gone already
                transport.write_eof()
        self._gone = loop.call_later(LINGER, self.processor.close, why)

    def _close_unbegun(self, reason: str) -> None:
        """Closed before its TLS handshake was over: nothing to tell it over HTTP/2."""
        metrics.GRPC_CONNECTIONS_CLOSED.labels(reason).inc()
        self._gone = asyncio.get_running_loop().call_soon(self._transport.close)


class _RefusedTooFast(Exception):
    """A connection opened calls beyond the limit faster than it may be refused them."""


def _refuse_calls_beyond_the_limit(h2: H2Connection, refusing: Callable[[], bool]) -> None:
    """A call opened beyond SETTINGS_MAX_CONCURRENT_STREAMS refused alone (RST_STREAM
    REFUSED_STREAM, which clients retry by themselves), as RFC 9113 section 5.1.2 has it:
    h2 took it for a connection error, and a client that opened more than 100 calls in
    its first flight, before it read the server's SETTINGS (gRPC's servers advertise no
    limit of their own), had its connection closed with all of them (GOAWAY
    PROTOCOL_ERROR), none answered.

    Each refusal is a reset the server sends, counted as the client's own resets are
    (`refusing`: whether one more may be; _RefusedTooFast when not): refused without
    bound, 200,000 six-byte HEADERS frames on one connection kept the process from
    running for 5 s, a million for 40 s. A frame of a call already ended, or of an id a
    client may not open, is what h2 makes of it below the limit."""
    receive = h2._frame_dispatch_table[HeadersFrame]

    def headers(frame: HeadersFrame) -> tuple[list[Frame], list[object]]:
        try:
            result: tuple[list[Frame], list[object]] = receive(frame)
        except TooManyStreamsError:
            _decode_headers(h2.decoder, frame.data)  # the header table kept in step
            highest = h2.highest_inbound_stream_id
            if frame.stream_id <= highest:
                raise StreamIDTooLowError(frame.stream_id, highest) from None
            if frame.stream_id % 2 != 1:
                raise ProtocolError("Invalid stream ID for peer.") from None
            if not refusing():
                raise _RefusedTooFast from None
            h2.highest_inbound_stream_id = frame.stream_id
            h2._closed_streams[frame.stream_id] = StreamClosedBy.SEND_RST_STREAM
            refused = RstStreamFrame(frame.stream_id)
            refused.error_code = ErrorCodes.REFUSED_STREAM
            _SENT_AWAY.warn(
                "gRPC calls refused: opened beyond the calls a connection may have open at"
                f" once ({h2.local_settings.max_concurrent_streams})",
                kind="calls beyond the limit",
            )
            return [refused], []
        return result

    h2._frame_dispatch_table[HeadersFrame] = headers


class _Handshake(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol, which tells a client why its handshake failed: it closed
    the connection with OpenSSL's alert unsent, and a client refused for its
    certificate (none, or one of another CA) read only that the connection was lost."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            with contextlib.suppress(Exception):  # the alert is a courtesy
                self._process_outgoing()  # type: ignore[attr-defined]
        super()._on_handshake_complete(handshake_exc)


def _peer(transport: asyncio.BaseTransport) -> str:
    """`host:port` of the client at the other end of `transport`, as a client writes it."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return shown(str(peer[0]), int(peer[1]))
    return "unknown"


def _handshake(error: Exception) -> str:
    """Why a TLS handshake failed, in a few words (OpenSSL's reason where it gives one)."""
    # asyncio's TLS protocol ends a handshake past its timeout with a ConnectionAbortedError
    # saying so: it was said as "ConnectionAbortedError" alone.
    if isinstance(error, TimeoutError) or (
        isinstance(error, ConnectionAbortedError) and "taking longer than" in str(error)
    ):
        return f"not over within {PREFACE_TIMEOUT:g} s"
    reason = getattr(error, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    if isinstance(error, ConnectionResetError):
        # What a grpcio client does when it does not trust the server's certificate: no
        # alert, the connection reset. It was said as "ConnectionResetError" alone.
        return "the client reset the connection, as one that does not trust the certificate does"
    return type(error).__name__


def _stream(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """A connection's transport, which streams both ways: uvloop's transports do all that
    asyncio's stream transport does, but are not its class (taken for a transport that
    could not write, a connection sent away was never told why, nor aborted)."""
    return cast(asyncio.Transport, transport)


# Frame types (RFC 9113 section 6) and the flag that ends a stream.
_DATA, _HEADERS, _RST_STREAM, _WINDOW_UPDATE, _CONTINUATION = 0x0, 0x1, 0x3, 0x8, 0x9
_FRAME_HEADER = 9
# The client's connection preface, before its first frame.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TLS_HANDSHAKE = 0x16  # the first byte of a TLS record that begins a handshake


class _FrameCounter:
    """A connection's frames counted by what they do, from their 9-byte headers alone
    (RFC 9113 section 4.1), as its bytes arrive: calls (HEADERS), resets (RST_STREAM),
    and frames that make no call (PING, SETTINGS, PRIORITY, GOAWAY, types HTTP/2 does
    not define, a WINDOW_UPDATE of less than SMALL_WINDOW_UPDATE bytes, a DATA frame
    of less than SMALL_DATA bytes). Counted from the bytes rather
    than from h2's events, for h2 says nothing of frames it drops (those of a stream it
    has reset), and a flood of them costs as much to parse."""

    __slots__ = ("_largest", "_pending", "_preface", "_skip", "not_http2", "oversized", "tls")

    def __init__(self, largest: int) -> None:
        """`largest`: the longest frame payload the server takes (its
        SETTINGS_MAX_FRAME_SIZE)."""
        self._largest = largest
        self._preface = _PREFACE  # what is still to come of the client's preface
        self._skip = 0  # bytes to pass over: frames' payloads
        self._pending = b""  # the start of a frame header cut by the end of a read
        # Whether a frame announced a payload longer than `largest`: h2 says so only once
        # the whole payload has arrived, up to 16 MiB buffered for each connection.
        self.oversized = False
        # Whether the client began with something else than HTTP/2's preface (nothing
        # more is counted: h2 refuses it), and whether that was a TLS handshake. Read as
        # frames, a TLS client's first bytes announced one too long: it was said to have
        # sent a frame longer than the server takes.
        self.not_http2 = False
        self.tls = False

    def count(self, data: bytes) -> tuple[int, int, int]:
        """(calls, frames that make no call, resets) of the frames that begin in `data`."""
        calls = control = resets = 0
        if self.not_http2:
            return calls, control, resets
        if self._preface:
            came = data[: len(self._preface)]
            if not self._preface.startswith(came):
                self.not_http2 = True
                self.tls = self._preface == _PREFACE and came[0] == _TLS_HANDSHAKE
                return calls, control, resets
            self._preface = self._preface[len(came) :]
            data = data[len(came) :]
        if self._pending:
            data, self._pending = self._pending + data, b""
        at, end = 0, len(data)
        while at < end:
            if self._skip:
                step = min(self._skip, end - at)
                at += step
                self._skip -= step
                continue
            if end - at < _FRAME_HEADER:
                self._pending = data[at:]
                break
            length = int.from_bytes(data[at : at + 3], "big")
            kind = data[at + 3]
            if kind == _WINDOW_UPDATE and length == 4 and end - at < _FRAME_HEADER + 4:
                # Its increment cut by the end of a read: counted with the next one (split
                # so, 1-byte updates passed uncounted, 1,300 a second).
                self._pending = data[at:]
                break
            at += _FRAME_HEADER
            self.oversized = self.oversized or length > self._largest
            if kind == _HEADERS:
                calls += 1
            elif kind == _RST_STREAM:
                resets += 1
            elif kind == _DATA:
                control += length < SMALL_DATA
            elif kind == _WINDOW_UPDATE:
                increment = data[at : at + 4] if length == 4 else b""  # whole (above)
                small = int.from_bytes(increment, "big") & 0x7FFFFFFF < SMALL_WINDOW_UPDATE
                control += len(increment) == 4 and small
            elif kind != _CONTINUATION:  # h2 bounds those of a header block
                control += 1
            self._skip = length
        return calls, control, resets


class Warnings:
    """A warning written at most once every `interval` seconds for each kind (its text,
    unless told), those left out meanwhile counted on a line of their own when the
    interval is over: clients that connect again each time they are sent away would
    otherwise write a line for every connection.

    A line stands for many, so it is written outside the context of the call or
    connection that happened to write it: it carried one call's message and correlation
    ids (`commands answered UNAVAILABLE ... busy`, 162 more since the last line), as if
    it were about that command. What it names, it names in its own fields."""

    def __init__(
        self, interval: float, logger: structlog.typing.FilteringBoundLogger | None = None
    ) -> None:
        self._interval = interval
        self._log = log if logger is None else logger
        self._next: dict[str, float] = {}  # by kind: when the next line may be written
        # By kind: how many were left out since its last line, and the last one's text
        # and fields.
        self._left_out: dict[str, tuple[int, str, dict[str, object]]] = {}

    def warn(self, text: str, *, kind: str | None = None, **fields: object) -> None:
        """`text` with `fields`, unless one of its `kind` was written less than `interval`
        seconds ago: a kind, not the text, where the text holds what a client chose (one
        line per connection otherwise). Left out, it is counted on the line that ends the
        interval (the last one left out's text and fields): the count was written only
        with the next warning of its kind, however much later, or never."""
        key = text if kind is None else kind
        now = time.monotonic()
        if now < (due := self._next.get(key, 0.0)):
            count, _, _ = self._left_out.get(key, (0, text, fields))
            if not count:
                asyncio.get_running_loop().call_later(
                    due - now, self._counted, key, context=contextvars.Context()
                )
            self._left_out[key] = (count + 1, text, fields)
            return
        self._next[key] = now + self._interval
        # Come before the line that counts those left out, which the loop has yet to
        # write (it was due as this one came): this one counts them, so that two lines
        # are not written a moment apart.
        count, _, _ = self._left_out.pop(key, (0, text, fields))
        if count:
            fields = {"more_since_the_last_line": count, **fields}
        contextvars.Context().run(self._log.warning, text, **fields)

    def _counted(self, key: str) -> None:
        """The line that counts the warnings of `key` left out since its last one."""
        count, text, fields = self._left_out.pop(key, (0, "", {}))
        if count:
            self._next[key] = time.monotonic() + self._interval
            self._log.warning(text, more_since_the_last_line=count, **fields)


# The warnings of connections sent away, 10 s apart at most for each reason.
_SENT_AWAY = Warnings(10.0)


class _Allowance:
    """How many frames of a kind a connection may still send: a token bucket refilled
    with time (and with credit, for the calls it makes)."""

    __slots__ = ("_at", "_burst", "_left", "_per_second")

    def __init__(self, burst: int, per_second: float) -> None:
        self._burst = float(burst)
        self._per_second = per_second
        self._left = self._burst
        self._at = time.monotonic()

    def allows(self, spent: int, credit: float = 0.0) -> bool:
        """Whether `spent` frames may come now, with `credit` for the calls that came
        with them (one read can bring many calls and their frames together)."""
        now = time.monotonic()
        refilled = self._left + (now - self._at) * self._per_second
        self._left = min(self._burst, refilled + credit - spent)
        self._at = now
        return self._left >= 0
