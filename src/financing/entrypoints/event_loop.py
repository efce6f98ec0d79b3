"""The event loop every command runs on: uvloop's, connecting to a host name as libpq
does, one address after another without waiting on any for long.

A name may resolve to several addresses: a database's or a broker's fail-over pair,
`localhost` as `::1` and `127.0.0.1`. The loop's own connect tries them in turn,
each for as long as the system lets a connection attempt last: an address that
answers nothing (a host gone, a firewall dropping what reaches it) held every
attempt until the caller's timeout, and the next address, which answered, was
never tried: the database and the broker stayed out for good. Here a new attempt
starts each `NEXT_ADDRESS_AFTER` seconds while none has connected, the others go on,
and the first to connect is used (RFC 8305's "Happy Eyeballs", which uvloop's
connect lacks). The addresses are tried one family after the other (IPv6, IPv4, IPv6,
...: RFC 8305 section 4), the one that answered last time first: a name whose first
address is gone no longer costs each new connection `NEXT_ADDRESS_AFTER`.

Names are looked up in threads of their own, not in libuv's, which a few slow lookups
abandoned by their callers held: every other lookup of the process waited behind
them; nor in the default executor's, which the process's stop waits for: a SIGTERM
while a DNS server did not answer waited until the C library gave up (3-16 s). A
lookup under way is shared by whoever asks for the same name, and goes on when they
give up (`Loop.addresses`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import asyncpg
import uvloop

# How long an attempt to connect to one address of a name goes on alone before the next
# address is tried beside it (RFC 8305 section 5 recommends 250 ms).
NEXT_ADDRESS_AFTER = 0.25
# How long the addresses a name was found at serve new connections before it is looked up
# again: a name moved to a new address (a fail-over by DNS) is followed this much later.
FRESH_FOR = 5.0

AddressInfo = tuple[Any, ...]  # what socket.getaddrinfo gives for one address


class Loop(uvloop.Loop):
    def __init__(self) -> None:
        super().__init__()
        # Of each name looked up: its lookup under way, or done less than FRESH_FOR ago
        # (with when it was done).
        self._lookups: dict[tuple[Any, ...], tuple[asyncio.Future[list[AddressInfo]], float]] = {}
        # Of each name and port: the address of the last connection made to it.
        self._answered: dict[tuple[str, Any], Any] = {}
        self.set_exception_handler(_transport_tasks_demoted)

    async def create_connection(
        self, protocol_factory: Any, host: str | None = None, port: Any = None, **options: Any
    ) -> Any:
        if options.get("sock") or options.get("local_addr") or host is None or _literal(host):
            return await super().create_connection(protocol_factory, host, port, **options)
        family, proto, flags = (options.pop(key, 0) for key in ("family", "proto", "flags"))
        found = await self.addresses(host, port, family, proto, flags)
        sock = await first_connected(self, ordered(found, self._answered.get((host, port))))
        self._answered[(host, port)] = sock.getpeername()
        options["sock"] = sock
        if options.get("ssl") and options.get("server_hostname") is None:
            options["server_hostname"] = host  # the name the certificate must bear
        return await super().create_connection(protocol_factory, **options)

    async def addresses(
        self, host: str, port: Any, family: int, proto: int, flags: int
    ) -> list[AddressInfo]:
        """The addresses of `host`, looked up in a thread of its own. A lookup
        under way is shared, and goes on when its callers give up (a health check given
        a second, a lookup taking five): the next caller takes it where it is, where a
        lookup of its own would have been given up again. One done serves FRESH_FOR
        seconds more; one that failed, nobody after it. The error names the host."""
        key = (host, port, family, proto, flags)
        now = self.time()
        kept = self._lookups.get(key)
        if kept is None or (
            kept[0].done()
            and (kept[0].cancelled() or kept[0].exception() or now - kept[1] > FRESH_FOR)
        ):
            lookup = self._looked_up_apart(host, port, family, socket.SOCK_STREAM, proto, flags)
            self._lookups[key] = (lookup, now)
            lookup.add_done_callback(lambda done: self._looked_up(key, done))
        else:
            lookup = kept[0]
        try:
            return await asyncio.shield(lookup)
        except socket.gaierror as error:
            raise socket.gaierror(error.errno, f"{error.strerror} ({host})") from None

    def _looked_up_apart(self, host: str, *args: Any) -> asyncio.Future[list[AddressInfo]]:
        """`socket.getaddrinfo(host, *args)` in a daemon thread: one that hangs does not hold
        the process's stop, where the default executor's threads are waited for."""
        lookup: asyncio.Future[list[AddressInfo]] = self.create_future()

        def look_up() -> None:
            try:
                answer: tuple[Any, BaseException | None] = (socket.getaddrinfo(host, *args), None)
            except BaseException as error:  # handed to the caller
                answer = (None, error)
            # RuntimeError: the loop closed meanwhile, and nobody waits for the answer.
            with contextlib.suppress(RuntimeError):
                self.call_soon_threadsafe(_settle, lookup, *answer)

        threading.Thread(target=look_up, name=f"lookup of {host}", daemon=True).start()
        return lookup

    def _looked_up(self, key: tuple[Any, ...], done: asyncio.Future[list[AddressInfo]]) -> None:
        if not done.cancelled() and done.exception() is not None:  # retrieved: said by callers
            self._lookups.pop(key, None)
        elif self._lookups.get(key, (None,))[0] is done:
            self._lookups[key] = (done, self.time())


def new_event_loop() -> asyncio.AbstractEventLoop:
    return Loop()


# Where the transport libraries' code lies, whose own tasks fail as their connections close.
_TRANSPORTS = tuple(
    str(Path(library.__file__ or "").parent) + "/" for library in (aio_pika, aiormq, asyncpg)
)
# What such a task fails with as its connection closes or is gone.
_CLOSING = (TimeoutError, OSError, aiormq.exceptions.AMQPError)


def _transport_tasks_demoted(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A task of a transport library's own that failed as its connection closed, and that
    the library never awaited, logged at DEBUG as their other records are: aiormq's
    channel reader, closing a channel after a SIGSTOP on a connection already gone, timed
    out, and asyncio logged "Task exception was never retrieved" at ERROR with three
    tracebacks, where the outage's own lines (`retry.Outages`) had said it all. Anything
    else goes to asyncio's own handler."""
    task, error = context.get("future"), context.get("exception")
    code = getattr(task.get_coro(), "cr_code", None) if isinstance(task, asyncio.Task) else None
    if (
        code is not None
        and code.co_filename.startswith(_TRANSPORTS)
        and isinstance(error, _CLOSING)
    ):
        logging.getLogger("asyncio").debug(context.get("message"), exc_info=error)
        return
    loop.default_exception_handler(context)


def _settle(
    lookup: asyncio.Future[list[AddressInfo]], found: Any, error: BaseException | None
) -> None:
    if lookup.cancelled():
        return
    if error is not None:
        lookup.set_exception(error)
    else:
        lookup.set_result(found)


def ordered(found: list[AddressInfo], answered: Any = None) -> list[AddressInfo]:
    """The addresses `found` in the order to try them: families interleaved, beginning
    with the first's, as RFC 8305 section 4 says (a name whose IPv6 addresses are all
    unreachable reaches its IPv4 ones at the second attempt); `answered`, the address
    the last connection was made to, first."""
    by_family: dict[int, list[AddressInfo]] = {}
    for info in found:
        by_family.setdefault(info[0], []).append(info)
    interleaved: list[AddressInfo] = []
    while any(by_family.values()):
        for addresses in by_family.values():
            if addresses:
                interleaved.append(addresses.pop(0))
    if answered is not None:
        interleaved.sort(key=lambda info: info[4][:2] != answered[:2])  # stable
    return interleaved


def _literal(host: str) -> bool:
    """Whether `host` is an address, not a name (one address: nothing to choose from)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 address may name its zone
    except ValueError:
        return False
    return True


async def first_connected(
    loop: asyncio.AbstractEventLoop, found: list[AddressInfo], *, after: float = NEXT_ADDRESS_AFTER
) -> socket.socket:
    """A socket connected to the first of the addresses `found` to take a connection, an
    attempt started on the next each `after` seconds while none has (or at once when one
    fails); OSError naming each address's failure when every one failed."""
    if not found:
        raise OSError(f"the name resolves to no address of a stream: {found!r}")
    attempts: dict[asyncio.Task[socket.socket], AddressInfo] = {}
    failures: list[str] = []
    waiting = list(found)
    try:
        while waiting or attempts:
            if waiting:
                info = waiting.pop(0)
                attempts[asyncio.ensure_future(_connected(loop, info))] = info
            done, _ = await asyncio.wait(
                attempts,
                timeout=after if waiting else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for attempt in done:
                info = attempts.pop(attempt)
                error = attempt.exception()
                if error is None:
                    return attempt.result()
                failures.append(f"{info[4][0]} port {info[4][1]}: {error}")
        raise OSError("; ".join(failures))
    finally:
        for attempt in attempts:  # the others: cancelled, or closed once connected
            attempt.cancel()
            attempt.add_done_callback(_closed)


def _closed(attempt: asyncio.Task[socket.socket]) -> None:
    """Close the socket of an attempt given up on that connected all the same."""
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().close()


async def _connected(loop: asyncio.AbstractEventLoop, info: AddressInfo) -> socket.socket:
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
