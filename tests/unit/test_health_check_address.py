"""`financing health-check`: what it probes, and where."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from financing.config import Settings
from financing.entrypoints.cli import health_check as health_check_module
from financing.entrypoints.cli.health_check import health_check, reachable
from financing.entrypoints.listening import wildcard_socket
from financing.entrypoints.observability import MetricsEndpoint


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "::0", "0:0:0:0:0:0:0:0"])
async def test_a_listener_on_the_unspecified_address_however_written_is_reached(
    wildcard: str,
) -> None:
    """Regression: `::` was probed on 127.0.0.1, which a listener on `::` alone did not
    serve (asyncio and uvloop set IPV6_V6ONLY): the health check always failed; then,
    probed on `::1`, it said healthy while IPv4 clients were refused. The service's
    listeners on the unspecified address take both, and are asked on IPv4."""
    sock = wildcard_socket(wildcard, 0)
    assert sock is not None
    server = await asyncio.start_server(lambda _, writer: writer.close(), sock=sock)
    try:
        port = server.sockets[0].getsockname()[1]
        host, probed_port = reachable((wildcard, port))
        assert host == "127.0.0.1"
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, probed_port), 5)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_a_named_address_is_probed_as_it_is_and_no_host_on_the_ipv4_loopback() -> None:
    assert reachable(("10.1.2.3", 8080)) == ("10.1.2.3", 8080)
    assert reachable(("", 8080)) == ("127.0.0.1", 8080)  # every address of both families


async def test_a_process_with_nothing_to_check_is_not_reported_healthy() -> None:
    """Regression: with no gRPC component and no metrics endpoint, no check ran and the
    process was reported healthy whatever its state."""
    settings = Settings.from_env({"METRICS_ADDRESS": "", "FINANCING_COMPONENTS": "projector"})
    problems = await health_check(settings, settings.components)
    assert problems and problems[0].startswith("nothing to check"), problems


async def test_a_port_that_accepts_and_never_answers_is_said_to_give_no_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (an operator's probe): the probe said `TimeoutError: ` and nothing
    more of a port that took the connection and never answered."""
    monkeypatch.setattr(health_check_module, "TIMEOUT", 0.3)
    silent: list[asyncio.StreamWriter] = []  # held open, never answered

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        settings = Settings(
            command_address=("127.0.0.1", port), metrics_address=("127.0.0.1", port)
        )
        problems = await health_check(settings, ["commands-api"])
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()
    assert problems == [
        f"Commands at 127.0.0.1:{port}: no answer within 0.3 s",
        f"metrics endpoint at 127.0.0.1:{port}: no answer within 0.3 s",
    ], problems
    # One connection each: a port that does not answer is no question of TLS. Asked it
    # too, a frozen instance read a TLS handshake on its plaintext port once it ran
    # again, and logged a breach of HTTP/2 for every probe made meanwhile.
    assert len(silent) == 2


@contextlib.asynccontextmanager
async def metrics_endpoint(unhealthy: list[str]) -> AsyncIterator[int]:
    """The service's metrics endpoint on a port of its own, saying `unhealthy`."""
    endpoint = MetricsEndpoint(lambda: unhealthy)
    await endpoint.start("127.0.0.1", 0)
    try:
        assert endpoint._server is not None
        yield endpoint._server.sockets[0].getsockname()[1]
    finally:
        endpoint.close()
        await endpoint.wait_closed()


async def test_the_probe_says_what_the_metrics_endpoint_names_not_healthy() -> None:
    """Regression: /health answered 503 "not healthy" whatever was down, and the probe
    said only the status line: an operator had to find the gauges or the logs."""
    async with metrics_endpoint(
        ["query database unavailable", "queue events_query not consumed"]
    ) as port:
        problems = await health_check(Settings(metrics_address=("127.0.0.1", port)), ["projector"])
    assert problems == [
        f"metrics endpoint at 127.0.0.1:{port}: HTTP/1.1 503 Service Unavailable: query"
        " database unavailable; queue events_query not consumed"
    ]


@pytest.mark.parametrize("healthy", [True, False])
async def test_the_probe_tells_the_services_answer_from_another_programs(healthy: bool) -> None:
    """Regression (a probe): whatever HTTP server answered at METRICS_ADDRESS was taken
    for the service: `status` judged another program's 404, and a 200 of any server
    passed the probe."""
    async with metrics_endpoint([] if healthy else ["broker unavailable"]) as port:
        answer = await health_check_module.health_answer(("127.0.0.1", port))
    assert answer.ours

    port, problems = await answered_by_another_program(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html></html>\n"
    )
    assert problems == [
        f"metrics endpoint at 127.0.0.1:{port}: not the service's answer (HTTP/1.0 200 OK)"
    ]


async def answered_by_another_program(answer: bytes) -> tuple[int, list[str]]:
    """The port of another program that answers any request with `answer`, and what the
    probe says of it as the metrics endpoint."""

    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answering, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        problems = await health_check(Settings(metrics_address=("127.0.0.1", port)), ["relayer"])
    finally:
        server.close()
        await server.wait_closed()
    return port, problems


async def test_another_programs_answer_that_is_no_text_is_shown_escaped() -> None:
    """Regression (a probe): METRICS_ADDRESS pointed at a gRPC port printed the HTTP/2
    frames it answered raw onto the terminal."""
    port, problems = await answered_by_another_program(
        b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\xff\xfe@d"
    )
    assert problems == [
        f"metrics endpoint at 127.0.0.1:{port}: not the service's answer"
        " (\\x00\\x00\\x06\\x04\\x00\\x00\\x00\\x00\\x00\\xff\\xfe@d)"
    ]
