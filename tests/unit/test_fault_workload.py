"""The fault workload tells a connection lost under a call from a failure of the call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpclib.client import Channel

from tests.faults.workload import lost_while_opening, transport_failure


@pytest.fixture
async def silent_listener() -> AsyncIterator[tuple[str, int]]:
    """A TCP listener that takes connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_stream_opened_on_a_closed_connection_is_a_transport_failure(
    silent_listener: tuple[str, int],
) -> None:
    # What grpclib's channel hands a call when the server closed the connection between
    # connecting and the call's first stream: the connection's transport is gone.
    channel = Channel(*silent_listener)
    try:
        protocol = await channel.__connect__()
        protocol.processor.close()
        with pytest.raises(AttributeError) as raised:
            protocol.processor.connection.create_stream()
    finally:
        channel.close()
    assert lost_while_opening(raised.value)
    assert transport_failure(raised.value)


def test_other_attribute_errors_are_not_transport_failures() -> None:
    with pytest.raises(AttributeError) as raised:
        _ = object()._transport  # type: ignore[attr-defined]
    assert not lost_while_opening(raised.value)
    assert not transport_failure(raised.value)
    assert transport_failure(ConnectionResetError())
