"""The metrics endpoint answers every request, a malformed one included."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, Metric

from financing.entrypoints import observability
from financing.entrypoints.observability import (
    REQUEST_HEAD_BYTES,
    REQUEST_HEAD_TIMEOUT,
    MetricsEndpoint,
    Renderings,
)
from tests.support.infra import wait_until


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX-Long: " + b"y" * 17_000 + b"\r\n\r\n",
    ],
    ids=["request line", "one header"],
)
async def test_a_line_longer_than_the_heads_limit_is_answered_431(head: bytes) -> None:
    """Regression: the reader's ValueError went unhandled: no answer, and an error with a
    traceback logged for each such request; then it was answered 400 where the contract
    says a head over its limit is answered 431, as one of many headers was."""
    endpoint = MetricsEndpoint(lambda: [])
    await endpoint.start("127.0.0.1", 0)
    try:
        assert endpoint._server is not None
        port = endpoint._server.sockets[0].getsockname()[1]
        answer = await _ask(port, head)
        healthy = await _ask(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        endpoint.close()
        await endpoint.wait_closed()
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:100]
    assert healthy.startswith(b"HTTP/1.1 200 OK\r\n") and healthy.endswith(b"healthy\n")


@contextlib.asynccontextmanager
async def _endpoint(healthy: bool = True) -> AsyncIterator[int]:
    endpoint = MetricsEndpoint(lambda: [] if healthy else ["query database unavailable"])
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
    assert (status, body) == (
        "HTTP/1.1 503 Service Unavailable",
        b"not healthy: query database unavailable\n",
    )


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


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("GZIP;q=0.5", True),
        ("*", True),
        ("gzip;q=0, identity", False),
        ("gzip; q=0.000", False),
        ("*;q=0", False),
        ("identity", False),
        ("deflate, *;q=0", False),
        ("gzip;q=0, *", False),
    ],
)
async def test_gzip_is_given_only_to_a_scraper_that_takes_it(
    accept_encoding: str, gzipped: bool
) -> None:
    """Regression: `gzip;q=0` (gzip refused, RFC 9110 section 12.5.3) was answered gzip."""
    async with _endpoint() as port:
        request = f"GET /metrics HTTP/1.1\r\nAccept-Encoding: {accept_encoding}\r\n\r\n"
        _, headers, body = _parts(await _ask(port, request.encode()))
    assert (headers.get("content-encoding") == "gzip") is gzipped
    assert b"# TYPE financing_" in (gzip.decompress(body) if gzipped else body)


async def test_a_request_head_beyond_its_bytes_is_refused() -> None:
    """Regression: 100 headers of up to 64 KiB each were read and held, 6.4 MB for each
    connection, for as long as it took to send the blank line (10 s)."""
    header = b"X-Filler-%d: " + b"y" * 1000 + b"\r\n"
    filler = b"".join(header % n for n in range(REQUEST_HEAD_BYTES // 1000 + 1))
    some = b"".join(header % n for n in range(3))
    async with _endpoint() as port:
        status, _, _ = _parts(await _ask(port, b"GET /metrics HTTP/1.1\r\n" + filler + b"\r\n"))
        small = _parts(await _ask(port, b"GET /health HTTP/1.1\r\n" + some + b"\r\n"))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert small[0] == "HTTP/1.1 200 OK"


async def test_silent_connections_beyond_the_limit_make_room_and_health_is_answered() -> None:
    """Regression: the endpoint held every connection that sent nothing for 10 s, however
    many: a flood of them took the process's last file descriptors (no gRPC caller,
    database session or broker connection could be opened), and /health went unanswered."""
    endpoint = MetricsEndpoint(lambda: [])
    await endpoint.start("127.0.0.1", 0)
    assert endpoint._server is not None
    port = endpoint._server.sockets[0].getsockname()[1]
    limit = endpoint._connections.limit
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(limit * 3):
            flood.append(await asyncio.open_connection("127.0.0.1", port))

        async def closed_by_the_server() -> bool:
            gone = sum(reader.at_eof() for reader, _ in flood)
            return gone >= limit * 2 and len(endpoint._connections) <= limit

        for reader, _ in flood:  # each read sees the end of a connection closed to make room
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.read(1), 0.01)
        # Closed as newer ones came, not when their time to send a request ran out.
        await wait_until(
            closed_by_the_server,
            timeout=REQUEST_HEAD_TIMEOUT / 2,
            what="the oldest silent connections closed",
        )
        status, _, body = _parts(await _ask(port, b"GET /health HTTP/1.1\r\n\r\n"))
        assert (status, body) == ("HTTP/1.1 200 OK", b"healthy\n")
        assert len(endpoint._connections) <= limit
    finally:
        for _, writer in flood:
            writer.close()
        endpoint.close()
        await endpoint.wait_closed()


class _Padding:
    """A collector making /metrics as large as a busy instance's (many labelled series)."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("padding", "padding", labels=["n"])
        for n in range(2000):
            family.add_metric([str(n)], n)
        yield family


@contextlib.asynccontextmanager
async def _never_read() -> AsyncIterator[asyncio.Task[None]]:
    """A /metrics request answered on a connection whose client never reads."""
    padding = _Padding()
    REGISTRY.register(padding)
    served, client = socket.socketpair()
    try:
        served.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        endpoint = MetricsEndpoint(lambda: [])
        reader, writer = await asyncio.open_connection(sock=served)
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answering = asyncio.create_task(endpoint._answer(reader, writer))
        await wait_until(
            lambda: _stuck(writer), timeout=5, what="the answer waiting for its client"
        )
        yield answering
        assert len(endpoint._connections) == 0
    finally:
        REGISTRY.unregister(padding)
        client.close()


async def _stuck(writer: asyncio.StreamWriter) -> bool:
    return writer.transport.get_write_buffer_size() > 0


async def test_a_client_that_never_reads_its_answer_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the answer's write and the connection's close waited for the client
    without a bound: one that never read held its connection (not idle, so no newer one
    could close it to make room) for good; a few such took every place, /health included."""
    monkeypatch.setattr(observability, "ANSWER_WRITE_TIMEOUT", 0.2)
    async with _never_read() as answering:
        await asyncio.wait_for(answering, 5)


async def test_a_client_that_never_reads_does_not_hold_the_service_stopping() -> None:
    """Regression: cancelled as the process stopped, the answer still waited for the
    connection to close, which it never did: the process never exited."""
    async with _never_read() as answering:
        answering.cancel()
        with pytest.raises(asyncio.CancelledError):
            # At once: well before the time a client has to read its answer.
            await asyncio.wait_for(answering, observability.ANSWER_WRITE_TIMEOUT / 2)


class GatedEncoder:
    """An encoder that renders only once let through, counting its renderings and what
    `state` held as each began."""

    def __init__(self) -> None:
        self.began: list[int] = []
        self.state = 0
        self.gate = threading.Event()

    def __call__(self, registry: object) -> bytes:
        self.began.append(self.state)
        self.gate.wait(timeout=10)
        return b"state %d\n" % self.began[-1]


async def test_scrapes_asking_during_a_rendering_share_the_next_one_begun_after_they_asked() -> (
    None
):
    """Regression: each scrape rendered the registry again, on the event loop (about 6 ms
    each): 50 scrapers at once held every call and `/health` for up to 2 s."""
    encoder = GatedEncoder()
    renderings = Renderings(encoder)
    first = asyncio.ensure_future(renderings.next())

    async def begun() -> bool:
        return len(encoder.began) == 1

    await wait_until(begun, what="the first rendering under way")
    encoder.state = 1  # changed after the first rendering began
    later = [asyncio.ensure_future(renderings.next()) for _ in range(20)]
    # The loop runs on while the thread renders: these scrapes were taken meanwhile.
    assert len(encoder.began) == 1 and not first.done()
    encoder.gate.set()

    assert await first == b"state 0\n"
    assert set(await asyncio.gather(*later)) == {b"state 1\n"}
    assert encoder.began == [0, 1]  # one rendering for the twenty, begun after they asked


async def test_a_scrape_whose_client_went_away_leaves_the_others_their_rendering() -> None:
    encoder = GatedEncoder()
    renderings = Renderings(encoder)
    gone = asyncio.ensure_future(renderings.next())
    staying = asyncio.ensure_future(renderings.next())

    async def begun() -> bool:
        return len(encoder.began) == 1

    await wait_until(begun, what="the rendering under way")
    gone.cancel()
    encoder.gate.set()

    assert await staying == b"state 0\n"
    assert gone.cancelled()


async def test_many_scrapes_at_once_are_rendered_once_or_twice_and_health_answers_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoder = GatedEncoder()
    monkeypatch.setattr(
        observability, "choose_encoder", lambda accept: (encoder, "text/plain; version=0.0.4")
    )
    async with _endpoint() as port:
        scrape = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        scrapes = [asyncio.ensure_future(_ask(port, scrape)) for _ in range(20)]

        async def begun() -> bool:
            return len(encoder.began) == 1

        await wait_until(begun, what="a rendering under way")
        # Answered while the scrapes wait for their rendering.
        healthy = await _ask(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert healthy.startswith(b"HTTP/1.1 200 OK\r\n")
        encoder.gate.set()
        answers = await asyncio.gather(*scrapes)
    assert all(answer.startswith(b"HTTP/1.1 200 OK\r\n") for answer in answers)
    assert 1 <= len(encoder.began) <= 2, encoder.began
