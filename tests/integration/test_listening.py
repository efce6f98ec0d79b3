"""Where the servers listen (an unspecified address takes IPv4 and IPv6 clients alike, as
the reference's Go listeners do), and what a connection they take holds."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from grpclib.health.service import Health
from structlog.testing import capture_logs

from financing.entrypoints.grpc import edge
from financing.entrypoints.grpc.edge import CLOSED_CALLS_KEPT, GrpcServer
from financing.entrypoints.listening import shown
from financing.entrypoints.observability import MetricsEndpoint
from tests.support.infra import wait_until
from tests.support.raw_h2 import EMPTY_MESSAGE, HEALTH_CHECK, RawConnection
from tests.support.service import free_port

LOOPBACKS = ("127.0.0.1", "::1")


async def accepts(address: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(address, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


needs_ipv6 = pytest.mark.skipif(
    not socket.has_ipv6, reason="this host has no IPv6: only IPv4 can be listened on"
)


@needs_ipv6
@pytest.mark.parametrize("host", ["::", "0.0.0.0", "::0", "0:0:0:0:0:0:0:0"])
async def test_an_unspecified_address_takes_ipv4_and_ipv6_clients(host: str) -> None:
    """Regression: `[::]:PORT` listened on IPv6 alone and `0.0.0.0:PORT` on IPv4 alone,
    where the reference takes both: carried over from it, `[::]:8080` refused every
    IPv4 client."""
    grpc, metrics = GrpcServer([Health()]), MetricsEndpoint(lambda: [])
    grpc_port, metrics_port = free_port(), free_port()
    await grpc.start(host, grpc_port)
    await metrics.start(host, metrics_port)
    try:
        for loopback in LOOPBACKS:
            assert await accepts(loopback, grpc_port), (loopback, "gRPC")
            assert await accepts(loopback, metrics_port), (loopback, "metrics")
    finally:
        grpc.close()
        metrics.close()
        await grpc.wait_closed()
        await metrics.wait_closed()


@needs_ipv6
async def test_a_specified_address_is_listened_on_alone() -> None:
    grpc = GrpcServer([Health()])
    port = free_port()
    await grpc.start("127.0.0.1", port)
    try:
        assert await accepts("127.0.0.1", port)
        assert not await accepts("::1", port)
    finally:
        grpc.close()
        await grpc.wait_closed()


def test_an_ipv6_address_is_shown_as_a_client_writes_it() -> None:
    assert shown("::", 8080) == "[::]:8080"
    assert shown("0.0.0.0", 8080) == "0.0.0.0:8080"


async def test_a_long_lived_connection_remembers_a_bounded_number_of_ended_calls() -> None:
    """Regression: h2 remembered the last 65,536 ended calls of each connection, 120
    bytes each: a client's connection that lived long held 7.9 MB for them."""
    server = GrpcServer([Health()])
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        async with RawConnection.open(("127.0.0.1", port)) as connection:
            calls = CLOSED_CALLS_KEPT + 500
            for _ in range(calls):
                answer = await connection.answered(
                    connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE)
                )
                assert answer.get(b"grpc-status") == b"0", answer
            [held] = server._edge_connections.held()
            remembered = len(held.connection._connection._closed_streams)
    finally:
        server.close()
        await server.wait_closed()
    assert remembered <= CLOSED_CALLS_KEPT, remembered


def _indexed_field(index: int) -> bytes:
    """An HPACK indexed header field (RFC 7541 section 6.1) naming table entry `index`."""
    if index < 127:
        return bytes((0x80 | index,))
    encoded, rest = bytearray((0xFF,)), index - 127
    while rest >= 128:
        encoded.append(0x80 | rest % 128)
        rest //= 128
    encoded.append(rest)
    return bytes(encoded)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


async def test_connections_breaking_http2_each_their_own_way_are_warned_of_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): the warning of a connection closed for breaking HTTP/2 was
    written once every 10 s for each text, which holds what the client sent: 300
    connections naming 300 header table indexes wrote 300 lines in 3 s."""
    monkeypatch.setattr(edge, "_SENT_AWAY", edge.Warnings(1.0))
    server = GrpcServer([Health()])
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        with capture_logs() as logs:
            for n in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                    + _frame(0x4, 0, 0, b"")  # SETTINGS
                    + _frame(0x1, 0x4, 1, _indexed_field(1000 + n))  # HEADERS, END_HEADERS
                )
                await writer.drain()
                await reader.read()  # until the server closes it
                writer.close()

            def broke() -> list[dict[str, Any]]:
                return [line for line in logs if "it broke HTTP/2" in line["event"]]

            # The others, counted when the interval ends.
            async def counted() -> bool:
                return len(broke()) == 2

            await wait_until(counted, what="the line counting the others")
    finally:
        server.close()
        await server.wait_closed()
    first, counted = broke()
    assert "Invalid table index 1000" in first["event"]
    assert counted["more_since_the_last_line"] == 19
