"""Where the servers listen (an unspecified address takes IPv4 and IPv6 clients alike, as
the reference's Go listeners do), and what a connection they take holds."""

from __future__ import annotations

import asyncio
import socket

import pytest
from grpclib.health.service import Health

from financing.entrypoints.grpc.edge import CLOSED_CALLS_KEPT, GrpcServer
from financing.entrypoints.listening import shown
from financing.entrypoints.observability import MetricsEndpoint
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
    grpc, metrics = GrpcServer([Health()]), MetricsEndpoint(healthy=lambda: True)
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
