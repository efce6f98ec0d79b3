"""`financing health-check` reaches a listener on a wildcard address through the loopback."""

from __future__ import annotations

import asyncio

import pytest

from financing.entrypoints.cli.health_check import reachable


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
async def test_a_listener_on_every_address_is_reached_on_the_loopback_of_its_family(
    wildcard: str,
) -> None:
    """Regression: `::` was probed on 127.0.0.1, which a listener on `::` does not serve
    (asyncio and uvloop set IPV6_V6ONLY): the health check always failed."""
    server = await asyncio.start_server(lambda _, writer: writer.close(), wildcard, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        host, probed_port = reachable((wildcard, port))
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, probed_port), 5)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_a_named_address_is_probed_as_it_is_and_no_host_on_the_ipv4_loopback() -> None:
    assert reachable(("10.1.2.3", 8080)) == ("10.1.2.3", 8080)
    assert reachable(("", 8080)) == ("127.0.0.1", 8080)  # every address of both families
