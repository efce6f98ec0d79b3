"""Appending kept to the relayer's pace.

Every event a handler appends is published in commit order, behind every event
appended before it. Handlers that appended faster than the relayer published (a
backlog of queued registrations drained after a restart: about 500 events a second
appended, 250 relayed, the two sharing one process) let the relay lag grow for as
long as the backlog lasted, to 123,000 events and 288 s, and a bid made meanwhile
waited 236 s for its saga, each of its steps behind the whole lag.

While more than MOST_WAITING events wait to be relayed, each consumer that appends
(of a command queue, of a policy's events) handles one delivery at a time instead of
up to its prefetch, until at most RESUME_AT events wait: a backlog's queue then
appends at the pace of one unit of work after another, the rest of it waiting in
the queue, and a live saga's commands and events, on other queues, are still taken
at once. The lag is looked at every LOOK_EVERY seconds; one line says when appending
is paced, one when it is no longer. A lag that cannot be read (the database down)
leaves the pace as it is: the handlers' own units of work meet the outage.

Once the oldest event waiting has waited RELAYER_MISSED_AFTER seconds, the pace also
looks whether any instance runs the relayer: where none does (every instance started
without the `relayer` component), nothing else in the log said why sagas and read
models stood still, and appending, paced, slowed down without a word of the cause. One
warning says it, one line says when a relayer runs again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from financing import metrics
from financing.application.errors import Unavailable
from financing.application.pipeline import Decoded, Handler, Outcome
from financing.application.ports import OtherSession
from financing.logging import get_logger

log = get_logger(__name__)

# Events waiting to be relayed beyond which appending waits; the lag counts those the
# relayer published and has yet to mark (up to 1,024), so it rises well above that.
MOST_WAITING = 4096
# And at most how many may wait for appending to go on.
RESUME_AT = 2048
# Seconds between two looks at the lag.
LOOK_EVERY = 2.0
# How long the oldest event may wait to be relayed before the pace looks whether a
# relayer runs (seconds): longer than a relayer's failover and its broker's hiccups.
RELAYER_MISSED_AFTER = 10.0
# And how long no session may have held the relayer lock, at every look, before it is said
# that none runs (seconds): an instance whose relayer lost its lock stands for election
# again, and for half a second none held it; one look said no instance ran the relayer.
RELAYER_ABSENT_FOR = 5.0


class RelayPace:
    """Whether appending is paced, from the number of events waiting to be relayed."""

    def __init__(
        self,
        lag: Callable[[], Awaitable[tuple[int, float]]],
        *,
        relayer: Callable[[], Awaitable[OtherSession | None]] | None = None,
        most_waiting: int | None = None,
        resume_at: int | None = None,
    ) -> None:
        """`lag`: how many events wait to be relayed, and how long the oldest has waited
        (seconds); `relayer`: the session holding the relayer lock, None where no instance
        runs the relayer (not looked at unless given); the bounds are MOST_WAITING and
        RESUME_AT unless given."""
        self._lag = lag
        self._relayer = relayer
        self._relayer_missed = False  # said that no relayer runs
        self._absent_since: float | None = None  # when a look first found none running
        self._most = MOST_WAITING if most_waiting is None else most_waiting
        self._resume_at = RESUME_AT if resume_at is None else resume_at
        self._going = asyncio.Event()  # set: not paced
        self._going.set()

    @property
    def holding(self) -> bool:
        """Whether appending is paced: one delivery at a time for each consumer."""
        return not self._going.is_set()

    async def run(self, every: float | None = None) -> None:
        """Until cancelled: the lag looked at every `every` seconds (LOOK_EVERY)."""
        while True:
            await self.look()
            await asyncio.sleep(LOOK_EVERY if every is None else every)  # the period

    async def look(self) -> None:
        """The lag read, and appending paced or no longer by it."""
        try:
            waiting, oldest = await self._lag()
            await self._look_for_relayer(waiting, oldest)
        except Unavailable:
            return  # said by the outage; the handlers meet it themselves
        if not self.holding and waiting > self._most:
            self._going.clear()
            log.warning(
                "appending is paced, one delivery at a time for each queue: more events"
                " wait to be relayed than the handlers may run ahead of the relayer",
                waiting_events=waiting,
                most=self._most,
            )
        elif self.holding and waiting <= self._resume_at:
            self._going.set()
            log.info("appending is no longer paced: the relayer caught up", waiting_events=waiting)
        metrics.APPENDING_PACED.set(int(self.holding))

    async def _look_for_relayer(self, waiting: int, oldest: float) -> None:
        """Say once that events wait and no relayer runs, and once that one runs again."""
        if self._relayer is None:
            return
        if not self._relayer_missed:
            if not (waiting and oldest >= RELAYER_MISSED_AFTER and await self._relayer() is None):
                self._absent_since = None
                return
            now = time.monotonic()
            if self._absent_since is None:
                self._absent_since = now
            if now - self._absent_since >= RELAYER_ABSENT_FOR:
                self._relayer_missed = True
                self._absent_since = None
                log.warning(
                    "events wait to be relayed and no instance runs the relayer (no session"
                    " holds the relayer lock): sagas and read models wait until one runs",
                    waiting_events=waiting,
                    oldest_waited_seconds=round(oldest, 1),
                )
        elif not waiting or await self._relayer() is not None:
            self._relayer_missed = False
            log.info("a relayer runs again", waiting_events=waiting)

    def paced(self, handler: Handler) -> Handler:
        """`handler` (of one consumer), handling one delivery at a time while paced."""
        one_at_a_time = asyncio.Lock()

        async def paced(decoded: Decoded) -> Outcome:
            if not self.holding:
                return await handler(decoded)
            async with one_at_a_time:
                return await handler(decoded)

        return paced
