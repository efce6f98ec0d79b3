"""What the service exposes to operators besides its APIs: metrics of every RPC and pool,
and the HTTP endpoint serving `/metrics` and `/health`."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gzip
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from grpclib.const import Cardinality, Handler, Status
from grpclib.events import RecvRequest, SendTrailingMetadata, listen
from grpclib.server import Server, Stream
from h2.connection import ConnectionState
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from financing.adapters.postgres.connection import sessions_allowed
from financing.entrypoints.connections import (
    OWN_DESCRIPTORS,
    Connections,
    descriptor_share,
    host_of,
)
from financing.entrypoints.grpc.calls import CallsInFlight
from financing.entrypoints.grpc.codec import Servable
from financing.entrypoints.grpc.queries import LISTS, QueriesService
from financing.entrypoints.listening import listening_at
from financing.logging import catch_up, get_logger, loop_turned, loop_unwatched
from financing.metrics import (
    EVENT_LOOP_LAG,
    GRPC_BUSY,
    GRPC_CALLS_WAITING,
    GRPC_HANDLED,
    GRPC_HANDLING,
    GRPC_STARTED,
    LIST_REPLY_BYTES,
    LIST_REPLY_BYTES_HELD,
    POOL_CONNECTIONS,
)

log = get_logger(__name__)


@dataclass(slots=True)
class _Call:
    """One RPC as the metrics see it, from its headers to its end."""

    kind: str
    service: str
    method: str
    started: float
    caller_gone: bool = False
    ended: bool = False

    def end(self, code: str) -> None:
        if self.ended:
            return
        self.ended = True
        GRPC_HANDLED.labels(self.kind, self.service, self.method, code).inc()
        GRPC_HANDLING.labels(self.kind, self.service, self.method).observe(
            time.perf_counter() - self.started
        )


_call: ContextVar[_Call | None] = ContextVar("grpc_call", default=None)


# grpc_type as go-grpc-prometheus names each kind of RPC.
GRPC_TYPES = {
    Cardinality.UNARY_UNARY: "unary",
    Cardinality.UNARY_STREAM: "server_stream",
    Cardinality.STREAM_UNARY: "client_stream",
    Cardinality.STREAM_STREAM: "bidi_stream",
}


class Metered:
    """`servable`'s methods, each call that its caller cancels counted `CANCELLED`, as
    gRPC's own servers count it: grpclib cancels the call of a caller that reset its
    stream or lost its connection, then ends it `UNKNOWN`, as if the service had failed,
    or, on a closed connection, sends no trailers at all (`observe_grpc` counts the rest)."""

    def __init__(self, servable: Servable) -> None:
        self._servable = servable

    def __mapping__(self) -> dict[str, Handler]:
        return {path: _metered(handler) for path, handler in self._servable.__mapping__().items()}


def _metered(handler: Handler) -> Handler:
    func: Callable[[Stream[Any, Any]], Awaitable[None]] = handler.func

    async def handle(stream: Stream[Any, Any]) -> None:
        try:
            await func(stream)
        except asyncio.CancelledError:
            call = _call.get()
            # Closed, or ended by the service (sent away at the edge): no trailers will
            # be sent.
            connection_over = (
                stream._stream._transport.is_closing()
                or stream._stream._h2_connection.state_machine.state is ConnectionState.CLOSED
            )
            if call is not None and (connection_over or not stream._stream.closable):
                call.caller_gone = True
                if connection_over:
                    call.end("CANCELLED")
            raise

    return handler._replace(func=handle)


def observe_grpc(server: Server, handlers: Iterable[Servable]) -> None:
    """Count and time every RPC of `server`, which serves `handlers`, each `Metered`
    (grpclib events run in the call's own task): started as its headers arrive, handled
    with the status of its trailers."""
    types = {
        path: GRPC_TYPES[method.cardinality]
        for handler in handlers
        for path, method in handler.__mapping__().items()
    }

    async def received(event: RecvRequest) -> None:
        _, service, method = event.method_name.split("/", 2)
        # Every method served is in `types`: an unknown one is answered at the edge.
        kind = types.get(event.method_name, "unary")
        _call.set(_Call(kind, service, method, time.perf_counter()))
        GRPC_STARTED.labels(kind, service, method).inc()

    async def answered(event: SendTrailingMetadata) -> None:
        call = _call.get()
        if call is not None:
            call.end("CANCELLED" if call.caller_gone else event.status.name)

    listen(server, RecvRequest, received)
    listen(server, SendTrailingMetadata, answered)
    for path, kind in types.items():
        _, service, method = path.split("/", 2)
        if service.startswith("grpc."):
            continue  # health's and reflection's: counted once called
        # The APIs' series exported from 0, every status of every method, as the gRPC
        # ecosystem's interceptors initialise them: a rule's `rate` or `increase` does
        # not count a series born at its first value (a process's first refusals).
        GRPC_STARTED.labels(kind, service, method)
        GRPC_BUSY.labels(service, method)
        for status in Status:
            GRPC_HANDLED.labels(kind, service, method, status.name)


def observe_turns(service: str, calls: CallsInFlight) -> None:
    """Report how many of `service`'s calls wait for their turn whenever metrics are
    scraped."""
    GRPC_CALLS_WAITING.labels(service).set_function(lambda: calls.waiting)


def observe_replies(queries: QueriesService) -> None:
    """Report the bytes of the list replies `queries` holds whenever metrics are scraped;
    their sizes exported from 0."""
    for method in LISTS:
        LIST_REPLY_BYTES.labels(method)
        LIST_REPLY_BYTES_HELD.labels(method).set_function(
            functools.partial(queries.bytes_held, method)
        )


def observe_pool(pool: asyncpg.Pool, database: str) -> None:
    """Report `pool`'s size and connections in use whenever metrics are scraped."""
    POOL_CONNECTIONS.labels(database, "open").set_function(pool.get_size)
    POOL_CONNECTIONS.labels(database, "in_use").set_function(
        lambda: pool.get_size() - pool.get_idle_size()
    )
    POOL_CONNECTIONS.labels(database, "max").set_function(pool.get_max_size)
    # Below "max" while a connection limit of the server holds the pool to fewer sessions.
    POOL_CONNECTIONS.labels(database, "allowed").set_function(lambda: sessions_allowed(pool))


# The connections the metrics endpoint holds at most: a sixteenth of the file descriptors
# the process may open beyond those it needs itself, this many at most. A scraper or a
# health check asks one question a connection and is answered at once; each silent
# connection held a descriptor for its 10 s, and a flood of them took every descriptor
# of the process (no gRPC caller, database session or broker connection could be opened).
METRICS_CONNECTIONS_MOST = 64
# Seconds a connection has to send its request's head (its line and headers), and the
# bytes that head may hold: a scraper's is a few hundred. 100 headers of 64 KiB each held
# 6.4 MB a connection.
REQUEST_HEAD_TIMEOUT = 10.0
REQUEST_HEAD_BYTES = 16 * 1024
# Seconds a client has to read its answer, and again for the connection to close: one
# that stops reading holds a connection no longer (it is not idle: no newer one can close
# it to make room).
ANSWER_WRITE_TIMEOUT = 5.0


class MetricsEndpoint:
    """`/metrics` (Prometheus text format) and `/health` (200 while `unhealthy()` names
    nothing, else 503 naming what it names) over HTTP, one request a connection; started
    and closed like the gRPC servers.

    It holds at most `Connections.limit` connections: a new one beyond them closes the one
    that has waited longest for its request, as the gRPC servers close their idle ones."""

    def __init__(
        self, unhealthy: Callable[[], Sequence[str]], *, own: int = OWN_DESCRIPTORS
    ) -> None:
        """`own`: the file descriptors the process needs itself (`descriptor_share`)."""
        self._unhealthy = unhealthy
        self._server: asyncio.Server | None = None
        self._connections: Connections[_Exchange] = Connections(
            "metrics endpoint", descriptor_share(16, most=METRICS_CONNECTIONS_MOST, own=own)
        )
        self._rendering = Rendering()

    async def start(self, host: str, port: int) -> None:
        """Listening on `host:port`; an unspecified host takes IPv4 and IPv6 alike."""
        self._server = await asyncio.start_server(
            self._answer, limit=REQUEST_HEAD_BYTES, **listening_at(host, port)
        )

    def go_away(self) -> None:
        """Nothing: `/health` and `/metrics` answer on while the calls in flight finish
        (`/health` 503), for whatever watches the shutdown."""

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = _Exchange(writer, host_of(writer.get_extra_info("peername")))
        if not self._connections.admit(exchange):
            writer.transport.abort()
            return
        try:
            try:
                async with asyncio.timeout(REQUEST_HEAD_TIMEOUT):
                    request, headers = await _request_head(reader)
            except _HeadTooLarge:
                answer = _Answer(
                    "431 Request Header Fields Too Large",
                    body=b"a request's head may hold %d bytes\n" % REQUEST_HEAD_BYTES,
                )
            else:
                answer = await _answer(request, headers, self._unhealthy, self._rendering)
            if writer.transport.is_closing():
                return  # closed to make room for a newer connection
            exchange.idle = False
            writer.write(answer.encode())
            async with asyncio.timeout(ANSWER_WRITE_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # a client that went away, never finished its request or never read
        except asyncio.CancelledError:
            writer.transport.abort()  # the service is stopping: what is unread is dropped
            raise
        finally:
            try:
                await _closed(writer)
            finally:
                self._connections.left(exchange)


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Close `writer`, dropping what its client has not read within ANSWER_WRITE_TIMEOUT
    (or at once when the service stops): a client that never reads would otherwise hold
    its connection, and keep the process from exiting, for good."""
    writer.close()
    try:
        async with asyncio.timeout(ANSWER_WRITE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise


@dataclass(eq=False)
class _Exchange:
    """One connection of the metrics endpoint: idle until its request has been read."""

    writer: asyncio.StreamWriter
    host: object  # its client's address
    idle: bool = True

    def make_room(self) -> None:
        self.writer.transport.abort()


class _HeadTooLarge(Exception):
    """A request's head longer than REQUEST_HEAD_BYTES."""


async def _request_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """The request line and the headers (names lowercased, the first 100) of a request;
    _HeadTooLarge beyond REQUEST_HEAD_BYTES, in one line or in many."""
    request = await _line(reader)
    size = len(request)
    headers: dict[str, str] = {}
    while line := (await _line(reader)).strip():
        size += len(line)
        if size > REQUEST_HEAD_BYTES:
            raise _HeadTooLarge
        if len(headers) < 100:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
    return request, headers


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # longer than the reader's limit, REQUEST_HEAD_BYTES
        raise _HeadTooLarge from None


@dataclass(frozen=True)
class _Answer:
    status: str
    content_type: str = "text/plain; charset=utf-8"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    head_only: bool = False  # a HEAD request: the headers GET would get, no body

    def encode(self) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers),
            "Connection: close",
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return head if self.head_only else head + self.body


class Rendering:
    """The metrics rendered in a thread, one rendering of each format at a time, which the
    scrapes that asked for that format before it began share.

    Rendered on the event loop, a scrape of the whole registry (about 60 KB) held the loop
    for 6 ms, and each scrape rendered it again: 50 scrapers at once held every call,
    delivery and `/health` for up to 2 s. In a thread (as the Prometheus client's own
    server renders) the loop goes on between the thread's turns at the interpreter; and
    the scrapes asking while one rendering is under way share the next one, which begins
    after they asked, so that none is answered with values older than its request."""

    def __init__(self) -> None:
        self._formats: dict[str, Renderings] = {}

    async def rendered(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format `accept` asks for (OpenMetrics or text), and its
        content type."""
        encoder, content_type = choose_encoder(accept)
        renderings = self._formats.setdefault(content_type, Renderings(encoder))
        return await renderings.next(), content_type


class Renderings:
    """The renderings of one format: the one under way, and the next, not begun."""

    def __init__(self, encoder: Callable[[Any], bytes]) -> None:
        self._encoder = encoder
        self._under_way = False
        self._next: asyncio.Future[bytes] | None = None

    async def next(self) -> bytes:
        """A rendering begun after this call: the next one, begun now if none is under way."""
        answered = self._next
        if answered is None:
            answered = self._next = asyncio.get_running_loop().create_future()
            if not self._under_way:
                self._begin()
        # Shielded: a scrape whose client went away leaves the others their rendering.
        return await asyncio.shield(answered)

    def _begin(self) -> None:
        assert self._next is not None
        answered, self._next = self._next, None
        self._under_way = True
        rendering = asyncio.ensure_future(asyncio.to_thread(self._encoder, REGISTRY))

        def done(rendering: asyncio.Future[bytes]) -> None:
            self._under_way = False
            if rendering.cancelled():
                answered.cancel()
            elif (error := rendering.exception()) is not None:
                answered.set_exception(error)
            else:
                answered.set_result(rendering.result())
            if self._next is not None:  # asked for while this one was under way
                self._begin()

        rendering.add_done_callback(done)


async def _answer(
    request: bytes,
    headers: dict[str, str],
    unhealthy: Callable[[], Sequence[str]],
    rendering: Rendering,
) -> _Answer:
    words = request.decode("latin-1").split()
    if len(words) < 2:
        return _Answer("400 Bad Request", body=b"not an HTTP request line\n")
    method, target = words[0], words[1]
    if method not in ("GET", "HEAD"):
        return _Answer(
            "405 Method Not Allowed",
            body=b"only GET and HEAD are served\n",
            headers=(("Allow", "GET, HEAD"),),
        )
    path = urlsplit(target).path  # an origin-form or an absolute-form target
    if path == "/metrics":
        # The format the scraper asks for (OpenMetrics or text), compressed if it takes gzip,
        # as prometheus_client's own server answers.
        body, content_type = await rendering.rendered(headers.get("accept", ""))
        extra: tuple[tuple[str, str], ...] = ()
        if _accepts_gzip(headers.get("accept-encoding", "")):
            body, extra = gzip.compress(body), (("Content-Encoding", "gzip"),)
        answer = _Answer("200 OK", content_type, body, extra)
    elif path == "/health":
        # What is not healthy, named: a probe's log (`kubectl describe`, `financing
        # health-check`) says what to look at, where "not healthy" sent the operator to
        # the gauges or the logs.
        if problems := unhealthy():
            said = "; ".join(problems).encode("utf-8", "replace")
            answer = _Answer("503 Service Unavailable", body=b"not healthy: %s\n" % said)
        else:
            answer = _Answer("200 OK", body=b"healthy\n")
    else:
        answer = _Answer("404 Not Found", body=b"not found: /metrics and /health are served\n")
    return dataclasses.replace(answer, head_only=method == "HEAD")


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip: named with a weight above 0, or not
    named and `*` is (RFC 9110 section 12.5.3; `gzip;q=0` refuses it)."""
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *parameters = (part.strip() for part in item.split(";"))
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights.setdefault(coding.lower(), weight)
    weight = weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0)))
    return weight > 0


# The event loop's lag past which a line says the process did not run (seconds): beyond
# what a busy loop shows, within the 5 s a publish's confirm or an ack is given.
STALL_REPORTED = 2.0
LAG_PERIOD = 0.5


async def watch_event_loop(period: float = LAG_PERIOD, reported: float = STALL_REPORTED) -> None:
    """Until cancelled: observe how late the event loop runs a task due every `period`
    seconds, and log one line for a lag of `reported` seconds or more. A process that was
    stopped (SIGSTOP, a paused VM) or starved finds, on resuming, deadlines that ran out
    meanwhile (a statement's, a confirm's) and reports outages of dependencies that
    answered all along; this line says that the process itself did not run, and the
    warnings written before it as the process resumed carry `process_stalled_seconds`."""
    loop = asyncio.get_running_loop()
    loop_turned(period + reported)
    try:
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            lag = max(0.0, loop.time() - due)
            # The lines written from now on are not marked with the stall: this one says it.
            loop_turned(period + reported)
            EVENT_LOOP_LAG.observe(lag)
            catch_up()  # the log's lines dropped said once it takes lines again, idle or not
            if lag >= reported:
                log.warning(
                    "the process did not run for a while (stopped, starved of CPU, or"
                    " blocked): deadlines that ran out meanwhile may be reported as outages",
                    stalled_seconds=round(lag, 3),
                )
    finally:
        loop_unwatched()
