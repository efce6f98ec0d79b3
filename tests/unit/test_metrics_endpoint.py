"""The metrics endpoint answers every request, a malformed one included."""

from __future__ import annotations

import asyncio

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
