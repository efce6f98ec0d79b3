"""The service's event loop connects to a name whose first address answers nothing
through the next one, as libpq does: the database and the broker are reached."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import aio_pika
import asyncpg
import pytest

from financing.entrypoints import event_loop
from financing.entrypoints.event_loop import Loop, first_connected, new_event_loop, ordered
from tests.support import infra

NAME = "two-addresses.financing.test"


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port of this host that takes no connection and refuses none: its listener's
    backlog is full, so the SYNs it is sent are dropped, as a host gone or a firewall
    dropping them would leave them."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())  # the one connection the backlog holds
        yield listener.getsockname()[1]
    finally:
        filler.close()
        listener.close()


def resolving(monkeypatch: pytest.MonkeyPatch, *ports: tuple[str, int]) -> None:
    """NAME resolves to the addresses `ports`, in that order."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", address)
            for address in ports
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def on_the_services_loop(within: float, coroutine: Any) -> Any:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coroutine, within))


def test_a_silent_first_address_is_passed_over_for_the_next() -> None:
    with black_hole() as silent, socket.create_server(("127.0.0.1", 0)) as server:
        found = [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))
            for port in (silent, server.getsockname()[1])
        ]

        async def connect() -> socket.socket:
            return await first_connected(asyncio.get_running_loop(), found)

        began = time.monotonic()
        connected = on_the_services_loop(5, connect())
        took = time.monotonic() - began
        try:
            assert connected.getpeername() == server.getsockname()
        finally:
            connected.close()
    assert took < 3, took  # the next address tried beside the first, not after it


def test_every_address_failing_is_one_error_naming_each() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as first,
        socket.create_server(("127.0.0.1", 0)) as second,
    ):
        ports = (first.getsockname()[1], second.getsockname()[1])
    found = [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))
        for port in ports  # closed now: each refuses
    ]

    async def connect() -> socket.socket:
        return await first_connected(asyncio.get_running_loop(), found)

    with pytest.raises(OSError) as refused:
        on_the_services_loop(5, connect())
    assert all(f"127.0.0.1 port {port}: " in str(refused.value) for port in ports)


def test_the_database_and_the_broker_are_reached_past_a_silent_first_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): a database's or a broker's name whose first address was
    black-holed never connected, at start-up or later, though its second answered:
    each attempt spent its whole timeout on the first (libpq goes on to the next)."""
    with black_hole() as silent:
        resolving(monkeypatch, ("127.0.0.1", silent), (infra.PG_HOST, infra.PG_PORT))

        async def database() -> int:
            conn = await asyncpg.connect(
                host=NAME, port=infra.PG_PORT, user=infra.PG_USER, database="postgres", timeout=5
            )
            try:
                answer: int = await conn.fetchval("SELECT 1")
                return answer
            finally:
                await conn.close()

        assert on_the_services_loop(10, database()) == 1

        resolving(monkeypatch, ("127.0.0.1", silent), (infra.AMQP_HOST, infra.AMQP_PORT))

        async def broker() -> bool:
            connection = await aio_pika.connect(
                f"amqp://guest:guest@{NAME}:{infra.AMQP_PORT}/", timeout=5
            )
            try:
                return not connection.is_closed
            finally:
                await connection.close()

        assert on_the_services_loop(10, broker())


def test_a_slow_lookup_given_up_on_goes_on_for_the_next_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): with name lookups taking 4-8 s, a database's outage never
    ended, or ended and began again: its check had a second, each check's lookup was
    given up and the next began anew; start-up made 16 lookups, two at a time."""
    real = socket.getaddrinfo
    lookups: list[float] = []
    answers = threading.Event()  # the resolver answers once three checks gave up on it

    def slow(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        lookups.append(time.monotonic())
        assert answers.wait(timeout=10), "the resolver was never let answer"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 1))]

    monkeypatch.setattr(socket, "getaddrinfo", slow)

    async def checks() -> tuple[list[Any], int]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, Loop)
        given_up = 0
        while True:  # each check given a moment, as an outage's check is given a second
            try:
                async with asyncio.timeout(0.2):
                    return await loop.addresses(NAME, 5432, 0, 0, 0), given_up
            except TimeoutError:
                given_up += 1
                if given_up == 3:
                    answers.set()

    found, given_up = on_the_services_loop(10, checks())
    assert [address[4] for address in found] == [("127.0.0.1", 1)]
    assert given_up >= 3 and len(lookups) == 1


def test_a_name_that_does_not_resolve_is_named_in_the_error() -> None:
    async def connect() -> None:
        await asyncio.open_connection("no-such-host.invalid", 5432)

    with pytest.raises(socket.gaierror, match=r"\(no-such-host\.invalid\)"):
        on_the_services_loop(20, connect())


def test_a_new_connection_tries_first_the_address_the_last_one_was_made_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): each new connection to a name whose first address was
    black-holed waited NEXT_ADDRESS_AFTER on it before trying the one that answered."""
    tried: list[Any] = []
    real = event_loop._connected

    async def connected(loop: asyncio.AbstractEventLoop, info: Any) -> socket.socket:
        tried.append(info[4])
        return await real(loop, info)

    monkeypatch.setattr(event_loop, "_connected", connected)
    with black_hole() as silent, socket.create_server(("127.0.0.1", 0)) as server:
        answering = server.getsockname()
        resolving(monkeypatch, ("127.0.0.1", silent), answering)

        async def twice() -> list[list[Any]]:
            attempts = []
            for _ in range(2):
                tried.clear()
                _, writer = await asyncio.open_connection(NAME, answering[1])
                writer.close()
                attempts.append(list(tried))
            return attempts

        first, second = on_the_services_loop(10, twice())
    assert first == [("127.0.0.1", silent), answering]
    assert second[0] == answering


def test_address_families_are_tried_in_turn() -> None:
    def info(family: int, host: str) -> tuple[Any, ...]:
        return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, 5432))

    v6, v4 = socket.AF_INET6, socket.AF_INET
    found = [info(v6, "::1"), info(v6, "::2"), info(v4, "10.0.0.1"), info(v4, "10.0.0.2")]
    assert [address[4][0] for address in ordered(found)] == ["::1", "10.0.0.1", "::2", "10.0.0.2"]
    assert [address[4][0] for address in ordered(found, ("10.0.0.2", 5432))] == [
        "10.0.0.2",
        "::1",
        "10.0.0.1",
        "::2",
    ]


def test_a_lookup_that_hangs_does_not_hold_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (a probe): a SIGTERM while a DNS server did not answer exited only once
    the C library gave up on it (3-16 s): the stop waited for the default executor's
    thread that ran the lookup."""
    real = socket.getaddrinfo
    began = threading.Event()
    released = threading.Event()
    answered: list[bool] = []

    def hanging(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        began.set()
        released.wait(timeout=30)
        answered.append(True)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", hanging)

    async def given_up() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, Loop)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await loop.addresses(NAME, 5432, 0, 0, 0)

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(given_up())
        # The loop closed, its stop done, while the lookup still hangs.
        assert began.is_set() and not answered
    finally:
        released.set()
