"""The metrics endpoint answers every request, a malformed one included."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator

import pytest

from financing.entrypoints.observability import MetricsEndpoint


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_request_line_longer_than_the_limit_is_answered_bad_request() -> None:
    """Regression: the reader's ValueError went unhandled: no answer, and an error with a
    traceback logged for each such request."""
    endpoint = MetricsEndpoint(lambda: True)
    await endpoint.start("127.0.0.1", 0)
    try:
        assert endpoint._server is not None
        port = endpoint._server.sockets[0].getsockname()[1]
        answer = await _ask(port, b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n")
        healthy = await _ask(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        endpoint.close()
        await endpoint.wait_closed()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:100]
    assert healthy.startswith(b"HTTP/1.1 200 OK\r\n") and healthy.endswith(b"healthy\n")


@contextlib.asynccontextmanager
async def _endpoint(healthy: bool = True) -> AsyncIterator[int]:
    endpoint = MetricsEndpoint(lambda: healthy)
    await endpoint.start("127.0.0.1", 0)
    try:
        assert endpoint._server is not None
        yield endpoint._server.sockets[0].getsockname()[1]
    finally:
        endpoint.close()
        await endpoint.wait_closed()


def _parts(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    """An HTTP answer's status line, headers (names lowercased) and body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def test_head_is_answered_with_the_headers_of_get_and_no_body() -> None:
    """Regression: HEAD was answered with the whole body."""
    async with _endpoint() as port:
        for path in ("/health", "/metrics"):
            got = _parts(await _ask(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
            head = _parts(await _ask(port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
            assert head[0] == got[0] == "HTTP/1.1 200 OK"
            assert head[1]["content-type"] == got[1]["content-type"]
            assert int(head[1]["content-length"]) > 0
            assert head[2] == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_methods_other_than_get_and_head_are_not_allowed(method: str) -> None:
    """Regression: any method was answered 200 with the metrics."""
    async with _endpoint() as port:
        request = f"{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        status, headers, _ = _parts(await _ask(port, request.encode()))
    assert status == "HTTP/1.1 405 Method Not Allowed"
    assert headers["allow"] == "GET, HEAD"


async def test_an_absolute_form_target_is_served_as_its_path() -> None:
    """Regression: `GET http://host/metrics` (as sent to a proxy) was answered 404."""
    async with _endpoint(healthy=False) as port:
        status, _, body = _parts(await _ask(port, b"GET http://x:9/health?a=1 HTTP/1.1\r\n\r\n"))
    assert (status, body) == ("HTTP/1.1 503 Service Unavailable", b"not healthy\n")


async def test_a_scraper_gets_the_format_and_the_encoding_it_asks_for() -> None:
    """Regression: OpenMetrics and gzip, which Prometheus asks for, were never given."""
    async with _endpoint() as port:
        plain = _parts(await _ask(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        open_metrics = _parts(
            await _ask(
                port,
                b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;"
                b"version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n"
                b"Accept-Encoding: gzip\r\n\r\n",
            )
        )
    assert plain[1]["content-type"].startswith("text/plain")
    assert "content-encoding" not in plain[1]
    assert b"# TYPE financing_" in plain[2]
    assert open_metrics[1]["content-type"].startswith("application/openmetrics-text")
    assert open_metrics[1]["content-encoding"] == "gzip"
    body = gzip.decompress(open_metrics[2])
    assert body.endswith(b"# EOF\n") and b"# TYPE financing_" in body
