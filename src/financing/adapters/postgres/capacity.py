"""How many sessions a pool may hand out at once: its size, or fewer while a connection
limit of the server holds it below that.

A role's or a database's `CONNECTION LIMIT`, or `max_connections`, can leave a pool
unable to open the sessions its size allows (53300, "too many connections"); several
instances of the service sharing one role meet it at run time, whatever start-up saw.
Each attempt to grow failed a unit of work with an outage of the whole database, which
the next check ended: under load the outage began and ended every few seconds, health
went NOT_SERVING with it, and the work ran at a fraction of its pace. A pool that meets
the limit while sessions of its own are open is held to those sessions instead: units
of work wait for one of them, as they wait for a pool at its size, and the pool tries to
grow again HELD_FOR later. A pool without any session of its own is out: that is an
outage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from financing.logging import get_logger

log = get_logger(__name__)

# How long a pool held below its size by a connection limit stays so before its next
# attempt to open a session beyond those it has (one refused attempt each time at most).
HELD_FOR = 30.0
# How long a unit of work refused one more session waits at most for one given back
# before it tries again.
REFUSAL_PAUSE = 0.1


class Capacity:
    """The sessions of one pool that units of work may take at once (`limit`): the pool's
    size, or fewer while a connection limit holds it (`hold_to`)."""

    __slots__ = (
        "_dependency",
        "_held",
        "_returned",
        "_said",
        "_waiting",
        "limit",
        "size",
        "taken",
    )

    def __init__(self, size: int, dependency: str) -> None:
        self.size = size
        self.limit = size
        self.taken = 0
        self._dependency = dependency
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        # The timer that ends the hold of the moment; the lowest limit said (each hold is
        # said once, not again each time the pool tries to grow and is held again).
        self._held: asyncio.TimerHandle | None = None
        self._said = size
        # Set at the next session given back, for units of work refused one more session.
        self._returned: asyncio.Event | None = None

    async def take(self, opened: Callable[[], int]) -> None:
        """Wait for a session of the limit to be free, and take it (`give_back` after)."""
        if self.taken < self.limit and not self._waiting:
            self.taken += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._hand_on()  # at once where there is room behind turns given up
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # given, then cancelled: hand it on
                self.give_back(opened)
            else:
                self._waiting.remove(turn)
            raise

    @property
    def queued(self) -> int:
        """Units of work waiting for a session."""
        return sum(not turn.done() for turn in self._waiting)

    def give_back(self, opened: Callable[[], int]) -> None:
        """A session taken is given back; `opened`: how many sessions the pool holds. A
        hold set while other sessions were being opened takes those in once they are."""
        self.taken -= 1
        if self.limit < self.size:
            self.limit = max(self.limit, min(opened(), self.size))
        if self._returned is not None:
            self._returned.set()
            self._returned = None
        self._hand_on()

    async def after_refusal(self) -> None:
        """Wait, after the server refused one more session, for a session to be given
        back, REFUSAL_PAUSE at most: where sessions are held outside the units of work
        (a migration's), the next attempt would otherwise be refused at once, again and
        again."""
        if self._returned is None:
            self._returned = asyncio.Event()
        returned = self._returned
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REFUSAL_PAUSE):
                await returned.wait()

    def _hand_on(self) -> None:
        while self._waiting and self.taken < self.limit:
            turn = self._waiting.popleft()
            if not turn.done():
                self.taken += 1
                turn.set_result(None)

    def hold_to(self, sessions: int, why: str) -> None:
        """The server refused the pool a session beyond the `sessions` it has open (`why`):
        let units of work take those only, for HELD_FOR seconds."""
        if sessions < self._said:
            self._said = sessions
            log.warning(
                "database sessions held below the pool's size by a connection limit",
                dependency=self._dependency,
                sessions_open=sessions,
                pool_max_conns=self.size,
                retry_in_seconds=HELD_FOR,
                error=why,
            )
        self.limit = sessions
        if self._held is not None:
            self._held.cancel()
        self._held = asyncio.get_running_loop().call_later(HELD_FOR, self._release)

    def resize(self, size: int) -> None:
        """Hand out at most `size` sessions from now on, for good."""
        self.size = size
        self.limit = min(self.limit, size)
        self._said = min(self._said, size)

    def _release(self) -> None:
        self._held = None
        self.limit = self.size
        self._hand_on()
