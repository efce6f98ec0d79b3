"""The relayer: publishes committed events from the event store to every consumer of events.

In commit order, with publisher confirms, advancing its checkpoint only past
events the broker confirmed (never past an unpublished one). It reads on from
the last event it relayed and moves the checkpoint past what it relayed once
that is `MARK_EVERY` events or `MARK_AFTER` seconds old, and as it stops, not
after every batch: a statement less between an event's commit and its
publish whenever the event before it was relayed just before. It wakes when
events commit and polls as a fallback. Only the holder of the relayer lock
relays, so one relayer runs per event store however many instances start.

Its dependencies are ports (outbox, publisher, lock, wake-up signal): the
relayer knows nothing of PostgreSQL or RabbitMQ. An outage of either is
retried without limit; anything else, such as the outbox refusing to skip an
event, is a broken invariant and stops the relayer, and with it the service,
loudly.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from financing import metrics
from financing.application.errors import Unavailable, summary
from financing.application.grace import SHUTDOWN_GRACE, finish_on_cancel
from financing.application.ports import (
    EventPublisher,
    Outbox,
    PreparedTransaction,
    RelayerLock,
    StoredEvent,
    WakeUp,
)
from financing.application.retry import NO_BUG_RETRIES, Outages, RetryPolicy, retry_or_raise
from financing.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")

POLL_INTERVAL = 0.1
BATCH_SIZE = 256
LAG_INTERVAL = 5.0
# Seconds an event may wait to be relayed before the relayer says what it waits for.
HELD_BACK_SAID = 10.0
RECHECK_FIRST = 0.002
# The checkpoint moves once this many events were relayed past it, or once the oldest of
# them was relayed this many seconds ago, not after every batch: a relayer that stops
# without moving it (a crash, its lock lost) leaves those to be relayed again.
MARK_EVERY = 1024
MARK_AFTER = 0.5
# The events last relayed that a relayer elected again looks for in the store.
RECENT_KEPT = 1024


@dataclass
class _Relayed:
    """What the relayer of one term published and the broker confirmed: the last of it,
    which the next read starts after, and what the checkpoint has not moved past yet."""

    last: StoredEvent | None = None
    unmarked: list[StoredEvent] = field(default_factory=list)
    # When the batch of the oldest of `unmarked` began to be published (time.monotonic()).
    # Counted from its confirm, a batch that took longer than MARK_AFTER to publish was
    # not due before the next: under load the checkpoint trailed by two batches' time
    # (moved every 2.8-3.9 s), and a relayer that died had that much relayed again.
    since: float = 0.0

    def add(self, events: list[StoredEvent], began: float) -> None:
        if not self.unmarked:
            self.since = began
        self.unmarked += events
        self.last = events[-1]

    def due(self, every: int, after: float) -> bool:
        """Whether the checkpoint should move now."""
        return len(self.unmarked) >= every or bool(
            self.unmarked and time.monotonic() - self.since >= after
        )

    def marked(self) -> None:
        self.unmarked = []


class LostHistory(Exception):
    """The event store no longer holds events this relayer relayed: it lost part of its
    history after they were relayed, and its new events take their stream versions."""

    def __init__(self, lost: list[StoredEvent]) -> None:
        first = lost[0]
        super().__init__(
            f"the event store no longer holds {len(lost)} of the events this relayer"
            f" relayed last (positions {', '.join(str(event.position) for event in lost[:10])}"
            f"{', ...' if len(lost) > 10 else ''}; the first {first.name} {first.message_id},"
            f" recorded at {first.recorded_at}): the command database lost what was"
            " committed after a point, as a fail-over to a standby that was behind or a"
            " restore from an older backup does. Its new events would take the stream"
            " versions, and so the message ids, of the lost ones, which consumers take for"
            " copies; relaying stops here. Bring the parts back in line as"
            ' docs/deployment.md "Restoring a database" says before the service starts'
            " again"
        )
        self.lost = lost


class Relayer:
    def __init__(
        self,
        outbox: Outbox,
        publisher: EventPublisher,
        lock: RelayerLock,
        wake_up: WakeUp,
        outages: Outages,
        *,
        batch_size: int = BATCH_SIZE,
        mark_every: int = MARK_EVERY,
        mark_after: float = MARK_AFTER,
        poll_interval: float = POLL_INTERVAL,
        policy: RetryPolicy = NO_BUG_RETRIES,
        store: str | None = None,
        stand_by: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`stand_by`: what lets go of the publisher's resources while another instance
        relays (its own connection to the broker)."""
        self._stand_by = stand_by
        self._outbox = outbox
        self._store = store  # the event store's name, on each event it relays
        self._publisher = publisher
        self._lock = lock
        self._wake_up = wake_up
        self._outages = outages
        self._batch_size = batch_size
        self._mark_every = mark_every
        self._mark_after = mark_after
        self._poll_interval = poll_interval
        self._policy = policy
        self._elected = False  # this instance holds the lock and relays
        self._lock_lost = False  # in this term: what it was publishing is not finished
        self._held_by: str | None = None  # the name of what was said to hold relaying back
        self._held_since = 0.0  # when the oldest event it held back was recorded (monotonic)
        # The events this process relayed last, in any of its terms: looked for in the
        # store as it is elected again (`_still_held`).
        self._recent: deque[StoredEvent] = deque(maxlen=RECENT_KEPT)

    async def run(self) -> None:
        """Relay until cancelled; stands for election again whenever the lock is lost."""
        while True:
            # Before it stands for election again too: at a fail-over another instance may
            # win it, with nothing of its own to compare, and relay on.
            await self._retry(self._still_held, "checking what was relayed")
            await self._retry(
                lambda: self._lock.acquire(self._outages.answered), "taking the relayer lock"
            )
            log.info("relayer elected")
            self._elected, self._lock_lost = True, False
            relaying = asyncio.create_task(self._relay())
            lost = asyncio.create_task(self._lock.lost())
            try:
                done, _ = await asyncio.wait({relaying, lost}, return_when=asyncio.FIRST_COMPLETED)
                # A broken invariant in either, or a bug in watching the lock, propagates
                # to the supervisor.
                for task in done:
                    task.result()
                # What it was publishing is given up, not finished as at a stop: another
                # instance may relay those events already. Finished, they went out after
                # this line, after later versions of their aggregates.
                self._lock_lost = True
                log.warning("relayer lost its lock, standing for election again")
            finally:
                self._elected = False
                for task in (relaying, lost):
                    task.cancel()
                await asyncio.gather(relaying, lost, return_exceptions=True)
                await self._lock.release()  # an outage is let go of there; a bug is raised
                if self._stand_by is not None:
                    await self._stand_by()

    async def _relay(self) -> None:
        relayed = _Relayed()
        recheck = 0.0  # after a wake-up that found nothing: how soon to look again
        await self._retry(self._still_held, "checking what was relayed")
        try:
            while True:
                self._wake_up.clear()
                count = await self._retry(lambda: self._relay_batch(relayed), "relaying")
                if count >= self._batch_size:
                    continue
                if count == 0 and recheck:
                    # Events committed (we were woken) but are not relayable yet: a
                    # transaction that may write events, still running, holds the commit
                    # horizon back. It ends within milliseconds; waiting for the next
                    # poll would add up to a whole poll interval to every hop of a saga.
                    # Another commit meanwhile ends the pause at once.
                    await self._wake_up.wait(recheck)
                    recheck = recheck * 2 if recheck * 2 < self._poll_interval else 0.0
                    continue
                woken = await self._wake_up.wait(self._poll_interval)
                recheck = RECHECK_FIRST if woken else 0.0
        except asyncio.CancelledError:
            # Stopped, or the lock lost: what was relayed is marked, so that whoever
            # relays next does not relay it again (if this fails, it does).
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await self._mark(relayed)
            except (TimeoutError, Unavailable) as error:
                log.warning(
                    "relayer could not mark what it relayed; it will be relayed again",
                    error=summary(error),
                )
            except Exception as error:  # a broken invariant, as while relaying: said whole
                log.error(
                    "relayer could not mark what it relayed; it will be relayed again",
                    exc_info=error,
                )
            raise

    async def _still_held(self) -> None:
        """That the store still holds the events this process relayed last, as they were
        when relayed; LostHistory if not. A command database that failed over to a
        standby behind it (asynchronous replication) lost what it committed last, the
        checkpoint's moves and the query database's records with it when that is on
        the same server: nothing else tells, and the new events went out under the
        message ids of lost ones, which consumers dropped as copies."""
        if self._recent:
            lost = await self._outbox.missing(list(self._recent))
            if lost:
                raise LostHistory(lost)

    async def _relay_batch(self, relayed: _Relayed) -> int:
        """Move the checkpoint if it is due, then relay the events that follow the last
        relayed; how many it read."""
        if relayed.due(self._mark_every, self._mark_after):
            await self._mark(relayed)
        events = await self._outbox.pending(self._batch_size, relayed.last)
        if events:
            publishing = self._publish(events, relayed)
            await finish_on_cancel(publishing, may_finish=lambda: not self._lock_lost)
        return len(events)

    async def _publish(self, events: list[StoredEvent], relayed: _Relayed) -> None:
        began = time.monotonic()
        await self._publisher.publish_events([event.envelope(self._store) for event in events])
        relayed.add(events, began)
        self._recent.extend(events)
        metrics.EVENTS_RELAYED.inc(len(events))
        log.debug("relayed", count=len(events), last_position=events[-1].position)

    async def _mark(self, relayed: _Relayed) -> None:
        """Move the checkpoint past every event relayed so far."""
        if relayed.unmarked:
            await self._outbox.mark_relayed(relayed.unmarked)
            relayed.marked()

    async def report_lag(self, interval: float = LAG_INTERVAL) -> None:
        """Keep the lag metrics current, on every instance (a standby too), until cancelled."""
        while True:
            try:
                count, age = await self._outbox.lag()
            except Unavailable:
                pass  # the outage is logged by whoever relays; the gauges keep their last value
            else:
                metrics.RELAYER_LAG_EVENTS.set(count)
                metrics.RELAYER_LAG_SECONDS.set(age)
                await self._tell_what_holds_back(age)
            await asyncio.sleep(interval)  # the reporting period

    async def _tell_what_holds_back(self, age: float) -> None:
        """While this instance relays and an event has waited HELD_BACK_SAID to be
        relayed, the transaction it waits for (commit order: any session of the
        database that writes, left open, holds every event committed after it began),
        said once, and once more when it no longer does. Relaying waited silently
        before, its health and every gauge but the lag's saying nothing was wrong."""
        holder = None
        if self._elected and age >= HELD_BACK_SAID:
            try:
                holder = await self._outbox.held_back_by(HELD_BACK_SAID)
            except Unavailable:
                return  # the outage is logged by whoever relays
        if holder is not None and holder.name != self._held_by:
            log.warning(
                "relaying waits for a prepared transaction: the events committed after it"
                " began are relayed once it is committed or rolled back"
                if isinstance(holder, PreparedTransaction)
                else "relaying waits for the transaction of another session: the events"
                " committed after it began are relayed once it ends",
                holder=holder.describe(),
                waited_seconds=round(age, 1),
            )
            self._held_by = holder.name
            self._held_since = time.monotonic() - age
        elif holder is None and self._held_by is not None:
            # At the warning's level, as an outage's end is: a log kept at WARNING
            # showed relaying held back and never that it went on.
            log.warning(
                "relaying no longer waits for that transaction",
                holder=self._held_by,
                waited_seconds=round(time.monotonic() - self._held_since, 1),
            )
            self._held_by = None

    async def _retry(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        return await retry_or_raise(
            operation, policy=self._policy, outages=self._outages, what=what
        )
