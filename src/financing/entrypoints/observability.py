"""What the service exposes to operators besides its APIs: metrics of every RPC and pool,
and the HTTP endpoint serving `/metrics` and `/health`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar

import asyncpg
from grpclib.const import Cardinality
from grpclib.events import RecvRequest, SendTrailingMetadata, listen
from grpclib.server import Server
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from financing.entrypoints.grpc.codec import Servable
from financing.metrics import GRPC_HANDLED, GRPC_HANDLING, POOL_CONNECTIONS

_call: ContextVar[tuple[str, str, str, float] | None] = ContextVar("grpc_call", default=None)


# grpc_type as go-grpc-prometheus names each kind of RPC.
GRPC_TYPES = {
    Cardinality.UNARY_UNARY: "unary",
    Cardinality.UNARY_STREAM: "server_stream",
    Cardinality.STREAM_UNARY: "client_stream",
    Cardinality.STREAM_STREAM: "bidi_stream",
}


def observe_grpc(server: Server, handlers: Iterable[Servable]) -> None:
    """Count and time every RPC of `server`, which serves `handlers` (grpclib events run
    in the call's own task)."""
    types = {
        path: GRPC_TYPES[method.cardinality]
        for handler in handlers
        for path, method in handler.__mapping__().items()
    }

    async def received(event: RecvRequest) -> None:
        _, service, method = event.method_name.split("/", 2)
        kind = types.get(event.method_name, "unary")  # an unknown method: answered at once
        _call.set((kind, service, method, time.perf_counter()))

    async def answered(event: SendTrailingMetadata) -> None:
        call = _call.get()
        if call is None:
            return
        kind, service, method, started = call
        GRPC_HANDLED.labels(kind, service, method, event.status.name).inc()
        GRPC_HANDLING.labels(kind, service, method).observe(time.perf_counter() - started)

    listen(server, RecvRequest, received)
    listen(server, SendTrailingMetadata, answered)


def observe_pool(pool: asyncpg.Pool, database: str) -> None:
    """Report `pool`'s size and connections in use whenever metrics are scraped."""
    POOL_CONNECTIONS.labels(database, "open").set_function(pool.get_size)
    POOL_CONNECTIONS.labels(database, "in_use").set_function(
        lambda: pool.get_size() - pool.get_idle_size()
    )
    POOL_CONNECTIONS.labels(database, "max").set_function(pool.get_max_size)


class MetricsEndpoint:
    """`/metrics` (Prometheus text format) and `/health` (200 while `healthy()`, else 503)
    over HTTP; started and closed like the gRPC servers."""

    def __init__(self, healthy: Callable[[], bool]) -> None:
        self._healthy = healthy
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._answer, host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(10):
                    request = await reader.readline()
                    while (await reader.readline()).strip():
                        pass  # the headers: nothing in them matters here
            except ValueError:  # a line longer than the reader's limit (64 KiB)
                status, content_type, body = "400 Bad Request", "text/plain", b"line too long\n"
            else:
                words = request.split()
                path = words[1].decode("ascii", "replace").split("?", 1)[0] if words[1:] else ""
                status, content_type, body = _response(path, self._healthy)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError):
            pass  # a client that went away, or never finished its request
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _response(path: str, healthy: Callable[[], bool]) -> tuple[str, str, bytes]:
    if path == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
    if path == "/health":
        if healthy():
            return "200 OK", "text/plain", b"healthy\n"
        return "503 Service Unavailable", "text/plain", b"not healthy\n"
    return "404 Not Found", "text/plain", b"not found: /metrics and /health are served\n"
