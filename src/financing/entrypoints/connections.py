"""The connections a listening server holds: at most a share of the process's file
descriptors, so that no one server's callers can take the descriptors the others, the
databases and the broker need."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from financing.logging import get_logger

log = get_logger(__name__)


def host_of(peername: object) -> object:
    """The host of a socket's peer name (`get_extra_info("peername")`): its address, None
    where it has none (a Unix socket)."""
    return peername[0] if isinstance(peername, tuple) else None


class Held(Protocol):
    """One connection as its server's `Connections` sees it."""

    @property
    def host(self) -> object:
        """The address of the host at its other end (None where there is none)."""
        ...

    @property
    def idle(self) -> bool:
        """Whether closing it now would cut nothing short (no call open, no answer
        being written)."""
        ...

    def make_room(self) -> None:
        """Close it, at once, for a new connection."""
        ...


H = TypeVar("H", bound=Held)


# The file descriptors the process needs besides its database pools' sessions and its
# servers' connections: the broker's connections (the relayer has one of its own), its
# listeners, its dedicated database sessions (the relayer's, the commit bell's), the
# event loop's and the runtime's own (about 27 at rest, the pools' first sessions
# included), with room to spare.
OWN_DESCRIPTORS = 32


def descriptors_needed(*pool_sizes: int) -> int:
    """The file descriptors a process with pools of `pool_sizes` needs itself."""
    return OWN_DESCRIPTORS + sum(pool_sizes)


def raise_descriptor_limit() -> None:
    """Raise the files the process may open (its soft limit, `ulimit -n`) to the most it
    may be let (its hard limit), as Go's runtime has done for every program since 1.19:
    the reference did, so under systemd's default (1,024 soft, 524,288 hard) it could
    hold many more connections than this service did. Nothing of the process uses
    select(), which numbers above 1,023 would break; it starts no other program."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):  # a platform that refuses: left so
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def descriptor_limit() -> int | None:
    """How many files the process may open now (ulimit -n); None where unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def descriptor_share(part: int, *, most: int, own: int, soft: int | None = None) -> int:
    """`1/part` of the file descriptors the process may open (`soft`: its limit now) beyond
    the `own` it needs itself, `most` at most and 1 at least. Shares of all it may open,
    at least 16 connections for each gRPC server, took more than a process limited to 64
    descriptors had: its busy callers took the last ones, and `/health` failed."""
    if soft is None and (soft := descriptor_limit()) is None:
        return most
    return max(1, min(most, (soft - own) // part))


# How long after a limit's line the line saying there is room again may come, and the
# limit's line again after it; a host's share's line likewise.
SAID_AGAIN_AFTER = 10.0
# How many hosts reaching their share are said in SAID_AGAIN_AFTER at most.
CROWDED_LINES_MOST = 5


class Connections(Generic[H]):
    """The connections of one server, the one active last at the end: at most `limit`,
    and at most half of them of one host (`host_limit`).

    A new one beyond `limit` closes the one idle longest, or is refused when none is
    idle. One closed to make room counts until it is gone (a moment, its socket's), so
    that the descriptors held stay bounded however fast connections come: beyond a
    quarter more than `limit`, a new one is refused until some are gone. Being full is
    logged once, with the limit, and having room again once it is three quarters full
    or less and SAID_AGAIN_AFTER has passed: a flood of connections coming and going
    at a small limit (1 to 3, where three quarters of it is none or one) wrote the two
    lines 150 times a second.

    A host's new connection beyond its share closes that host's own connection idle
    longest, or is refused when none of them is idle, whatever room the others leave:
    one host that held every connection with a call open (a health `Watch` on each, or
    a list it never reads) had every other client's connection refused, an
    orchestrator's health probe among them, for as long as it stayed. A host reaching its
    share is logged once, until it holds three quarters of it or less; and at most
    CROWDED_LINES_MOST hosts reaching theirs are logged in SAID_AGAIN_AFTER, the next
    line saying how many were not."""

    def __init__(
        self, kind: str, limit: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.kind = kind  # what the log lines call them: "gRPC", "metrics endpoint"
        self.limit = limit
        self.host_limit = max(1, limit // 2)
        self._clock = clock
        self._open: OrderedDict[H, None] = OrderedDict()
        self._hosts: Counter[object] = Counter()  # connections open, by host
        self._crowding: set[object] = set()  # hosts said (or left out) to be at their share
        # When hosts at their share were said, in the last SAID_AGAIN_AFTER seconds, and
        # the hosts at theirs since, not said: a flood from thousands of addresses wrote a
        # line for each.
        self._crowding_said: deque[float] = deque()
        self._crowding_unsaid = 0
        self._full = False
        self._full_said = 0.0  # when being full was said
        self._recheck: asyncio.TimerHandle | None = None  # for room again, said late
        self._closed = False
        self._none_open = asyncio.Event()
        self._none_open.set()

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, new: H) -> bool:
        """Whether `new` may be served, having closed the one idle longest (its host's,
        where its host holds its share) if need be."""
        if self._closed:
            return False
        host = new.host
        if host is not None and self._hosts[host] >= self.host_limit:
            if host not in self._crowding:
                self._crowding.add(host)
                self._say_crowded(host)
            if not self._made_room(
                self.host_limit, self._hosts[host], lambda held: held.host == host
            ):
                return False
        elif len(self._open) >= self.limit:
            if not self._full:
                self._full = True
                self._full_said = self._clock()
                log.warning(
                    f"{self.kind} connections at their limit: a new one closes the one"
                    " idle longest, or is closed when none is idle",
                    limit=self.limit,
                )
            if not self._made_room(self.limit, len(self._open), lambda _: True):
                return False
        self._open[new] = None
        self._hosts[host] += 1
        self._none_open.clear()
        return True

    def _made_room(self, limit: int, held: int, whose: Callable[[H], bool]) -> bool:
        """Whether room was made for a new connection beyond `limit`, where `held` are
        open: the one idle longest of those `whose` closed, unless those closed so and not
        yet gone already make up a quarter more than `limit` (one, for a small one)."""
        if held >= limit + max(1, limit // 4):
            return False
        idle = next((one for one in self._open if whose(one) and one.idle), None)
        if idle is None:
            return False
        idle.make_room()
        return True

    def held(self) -> list[H]:
        """The connections open now."""
        return list(self._open)

    def close(self) -> list[H]:
        """The server stops: a new connection is refused from now on. The ones open."""
        self._closed = True
        return self.held()

    async def emptied(self) -> None:
        """Return once no connection is open."""
        await self._none_open.wait()

    def active(self, held: H) -> None:
        if held in self._open:
            self._open.move_to_end(held)

    def left(self, held: H) -> None:
        if held in self._open:
            del self._open[held]
            host = held.host
            self._hosts[host] -= 1
            if not self._hosts[host]:
                del self._hosts[host]
            if host in self._crowding and self._hosts[host] <= self.host_limit * 3 // 4:
                self._crowding.discard(host)
        if not self._open:
            self._none_open.set()
        self._room_again()

    def _say_crowded(self, host: object) -> None:
        """Say that `host` reached its share, unless CROWDED_LINES_MOST hosts were said to
        in the last SAID_AGAIN_AFTER seconds: then it is counted, and said with the next
        line."""
        now = self._clock()
        said = self._crowding_said
        while said and now - said[0] >= SAID_AGAIN_AFTER:
            said.popleft()
        if len(said) >= CROWDED_LINES_MOST:
            self._crowding_unsaid += 1
            return
        more = {"more_hosts_since_the_last_line": self._crowding_unsaid}
        log.warning(
            f"{self.kind} connections of one host at its share: a new one of it"
            " closes its own idle longest, or is closed when none is idle",
            host=str(host),
            share=self.host_limit,
            **(more if self._crowding_unsaid else {}),
        )
        said.append(now)
        self._crowding_unsaid = 0

    def _room_again(self) -> None:
        """Say that there is room again, once three quarters full or less, and not sooner
        than SAID_AGAIN_AFTER after being full was said (a turn of the loop then looks
        again, where no connection leaves to make it look)."""
        if not self._full or len(self._open) > self.limit * 3 // 4:
            return
        wait = self._full_said + SAID_AGAIN_AFTER - self._clock()
        if wait > 0:
            # RuntimeError, no loop: the next connection to leave looks again.
            with contextlib.suppress(RuntimeError):
                if self._recheck is None:
                    self._recheck = asyncio.get_running_loop().call_later(wait, self._rechecked)
            return
        self._full = False
        log.info(f"{self.kind} connections below their limit again", limit=self.limit)

    def _rechecked(self) -> None:
        self._recheck = None
        self._room_again()
