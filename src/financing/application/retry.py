"""The one retry primitive, and the outage log every retrying loop shares.

`retry` runs an operation until it succeeds or its failure is not worth
another attempt, sleeping a capped, jittered exponential backoff in between.
What is worth retrying, and how often, follows the classification of
`errors.classify` and a `RetryPolicy`. Every loop in the service that tries
again (deliveries, relayer, projector, Commands API, dead-lettering, start-up)
uses it, so "transient" means the same thing everywhere.

`Outages` keeps the log of a dependency's outage to two lines however many
loops are retrying: a warning when the first failure is seen and one info line,
with how long it lasted, when it is over. `Outages.watch` checks every
dependency that is down once a second and ends its outage when its check
passes. A successful operation ends it only for a dependency without a check:
it may succeed where other work still fails (a read on a database that takes
no writes), and the loop that met an outage may end without succeeding at all
(its delivery given back when the broker's channel closed, or its caller's
deadline passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from financing import metrics
from financing.application.errors import (
    AwaitingOperator,
    Fault,
    Unavailable,
    attempts_allowed,
    classify,
    summary,
)
from financing.logging import get_logger

T = TypeVar("T")

log = get_logger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Exponential delays from `first`, doubling, capped at `cap`, jittered in [d/2, d]."""

    first: float
    cap: float

    def delay(self, attempt: int) -> float:
        """The pause before retry number `attempt` (from 1)."""
        ceiling = min(self.cap, self.first * 2.0 ** min(attempt - 1, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class Limit:
    """How a fault is retried: its backoff, and at most how many attempts (None: no limit)."""

    backoff: Backoff
    attempts: int | None


# Bounds of the time a deferred delivery is put aside, each time it is.
MIN_DEFERRAL_DELAY = 0.1
MAX_DEFERRAL_DELAY = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    """A limit per fault; a fault without one (PERMANENT by default) is not retried."""

    unavailable: Limit | None = Limit(Backoff(0.1, 2.0), None)
    conflict: Limit | None = Limit(Backoff(0.01, 0.5), 50)
    permanent: Limit | None = None
    bug: Limit | None = Limit(Backoff(0.2, 2.0), 3)
    # How long in all a delivery may wait for an aggregate that another message creates
    # (MissingAggregate): once its conflict attempts are spent it is deferred, put aside
    # and delivered again `deferral_delay` later, until it has waited this long; then it
    # is dead-lettered. 0: dead-lettered once its attempts are spent.
    aggregate_wait: float = 60.0
    # How long a delivery is put aside the first time it is deferred (seconds).
    first_deferral: float = 0.25

    def deferral_delay(self, waited: float) -> float:
        """How long a deferred delivery that has waited `waited` seconds since its first
        deferral is put aside again: `first_deferral` at first, then as long as it has
        waited, so that the delay about doubles each time, up to a quarter of
        `aggregate_wait` and MAX_DEFERRAL_DELAY (a message that comes back soon finds
        an aggregate created just after its first attempts; one that waits long costs
        a deferral every few seconds only)."""
        ceiling = min(MAX_DEFERRAL_DELAY, max(self.aggregate_wait / 4, MIN_DEFERRAL_DELAY))
        return min(ceiling, max(self.first_deferral, waited))

    def limit(self, fault: Fault) -> Limit | None:
        limit: Limit | None = getattr(self, fault.value)
        return limit

    def without(self, *faults: Fault) -> RetryPolicy:
        """This policy, retrying none of `faults`."""
        limits: dict[str, Any] = {fault.value: None for fault in faults}  # Limit fields
        return replace(self, **limits)


# Deliveries: every fault as classified.
DELIVERIES = RetryPolicy()
# Work that must stop loudly on a bug rather than try again (relayer, API calls, start-up).
NO_BUG_RETRIES = RetryPolicy().without(Fault.BUG)


class GaveUp(Exception):
    """`retry` stopped: the error's fault is not retried, or its limit or deadline is reached."""

    def __init__(self, error: Exception, fault: Fault, attempts: int) -> None:
        super().__init__(f"{summary(error)} ({fault.value}, after {attempts} attempt(s))")
        self.error = error
        self.fault = fault
        self.attempts = attempts


class Abandoned(Exception):
    """`retry` stopped because the work is no longer wanted (its delivery channel closed)."""


# How often `Outages.watch` checks the dependencies that are down.
OUTAGE_CHECK_INTERVAL = 1.0
# Seconds without an operation failing on a dependency after which its check passing ends
# its outage, where none of its failed operations has succeeded since: longer than the
# pause of a loop retrying it (at most 2 s).
OUTAGE_QUIET = 5.0


@dataclass
class Outages:
    """Which dependencies are down since when; logs the start and the end of each outage."""

    _since: dict[str, float] = field(default_factory=dict)
    # How to tell that a dependency is back: returns if it is, raises Unavailable if not.
    _checks: dict[str, Callable[[], Awaitable[object]]] = field(default_factory=dict)
    # When an operation on each dependency last failed, and when one that had failed
    # last succeeded (time.monotonic()).
    _failed_at: dict[str, float] = field(default_factory=dict)
    _worked_at: dict[str, float] = field(default_factory=dict)
    # Attempts under way of operations whose last attempt failed on each dependency
    # (each attempt's start), and how long an attempt on each may take to fail.
    _trying: dict[str, dict[object, float]] = field(default_factory=dict)
    _attempts_within: dict[str, float] = field(default_factory=dict)
    # How long each dependency's operations are given to answer (`answer_within`).
    _answers_within: dict[str, float] = field(default_factory=dict)
    # The dependencies whose connection was lost during their outage of the moment: its
    # end is a reconnection. An outage of a connection kept open (a broker's memory
    # alarm, publishes refused) ends "recovered".
    _disconnected: set[str] = field(default_factory=set)
    # Of the dependencies whose outage of the moment was said to await an operator, what
    # it was said to await (each reason once: one mended into another is said too).
    _awaiting: dict[str, set[str]] = field(default_factory=dict)
    # When the last outage of each dependency ended (time.monotonic()).
    _ended_at: dict[str, float] = field(default_factory=dict)

    def check_with(
        self,
        dependency: str,
        check: Callable[[], Awaitable[object]],
        *,
        attempts_within: float | None = None,
        answers_within: float | None = None,
    ) -> None:
        """`check` tells whether `dependency` is back. `attempts_within`: how long an
        operation on it may take to fail (a statement's timeout); an operation that
        failed on it and is trying again for less than that keeps its outage open.
        `answers_within`: how long its operations are given to answer (a statement's
        timeout, a publish's confirm): its check and its health probe are given as long."""
        self._checks[dependency] = check
        if attempts_within is not None:
            self._attempts_within[dependency] = attempts_within
        if answers_within is not None:
            self._answers_within[dependency] = answers_within
        if dependency not in self._since:
            metrics.DEPENDENCY_UP.labels(dependency).set(1)

    def answer_within(self, dependency: str, at_least: float) -> float:
        """How long a look at `dependency` may wait for its answer: as long as its
        operations are given, `at_least` where that is shorter or not known. Given less,
        a dependency slow but working (200 ms each way: every command answered in
        0.4 s) was said down for as long as it stayed slow, `/health` at 503."""
        return max(at_least, self._answers_within.get(dependency, 0.0))

    def checks(self) -> dict[str, Callable[[], Awaitable[object]]]:
        """The check of each dependency watched (`check_with`), by dependency."""
        return dict(self._checks)

    async def watch(
        self, interval: float = OUTAGE_CHECK_INTERVAL, quiet: float = OUTAGE_QUIET
    ) -> None:
        """Until cancelled, every `interval` seconds: `check_once`."""
        while True:
            await asyncio.sleep(interval)  # the checking period
            await self.check_once(within=interval, quiet=quiet)

    async def check_once(self, *, within: float, quiet: float = OUTAGE_QUIET) -> None:
        """End the outage of each dependency that is down and whose check passes within
        `within` seconds, whether or not a loop that met the outage is still there to
        succeed; but not while its operations still fail (one failed within `quiet`
        seconds, or one is trying again) and none has succeeded since.

        A check cannot try everything the service does. A database whose sessions time
        out every write (`statement_timeout`) or that refuses the service's writes (its
        privileges revoked, a lock held beyond `lock_timeout`), or a broker that refuses
        publishes to one queue, passes it: their outages were logged as over, and as
        starting again, every second."""
        # Side by side: a silent dependency, given its operations' time, held the others'.
        await asyncio.gather(*(self._check(each, within, quiet) for each in list(self._since)))

    async def _check(self, dependency: str, within: float, quiet: float) -> None:
        check = self._checks.get(dependency)
        if check is None:
            return
        try:
            async with asyncio.timeout(self.answer_within(dependency, within)):
                await check()
        except AwaitingOperator as error:
            self._said_awaiting(error)
            return  # still down
        except (Unavailable, TimeoutError):
            return  # still down
        except Exception:
            log.exception("checking a dependency failed with a bug", dependency=dependency)
            return
        if dependency in self._since and not self._still_failing(dependency, quiet):
            self._ended(dependency)

    def _still_failing(self, dependency: str, quiet: float) -> bool:
        failed_at = self._failed_at.get(dependency)
        if failed_at is None or self._worked_at.get(dependency, failed_at - 1) > failed_at:
            return False
        now = time.monotonic()
        # An operation trying again may take longer than `quiet` to fail (a statement
        # waiting on a lock until FINANCING_DB_TIMEOUT): its outage is not over before its
        # attempt says so, or has taken longer than an attempt fails in (one that waits
        # for something else, as a standby relayer for the lock). The outage was logged
        # as over, and starting again, every 10 s.
        within = self._attempts_within.get(dependency, 0.0)
        if any(now - began < within for began in self._trying.get(dependency, {}).values()):
            return True
        return now - failed_at < quiet

    @contextlib.contextmanager
    def trying(self, dependency: str | None) -> Iterator[None]:
        """An attempt of an operation whose last attempt failed on `dependency` is
        under way (None: there was no such failure)."""
        if dependency is None:
            yield
            return
        attempt = object()
        under_way = self._trying.setdefault(dependency, {})
        under_way[attempt] = time.monotonic()
        try:
            yield
        finally:
            del under_way[attempt]

    def failed(self, error: Unavailable, *, connection_lost: bool = False) -> None:
        self._failed_at[error.dependency] = time.monotonic()
        if connection_lost:
            self._disconnected.add(error.dependency)
        if error.dependency in self._since:
            if isinstance(error, AwaitingOperator):
                self._said_awaiting(error)
            return
        if isinstance(error, AwaitingOperator):
            self._awaiting[error.dependency] = {error.detail}
        self._since[error.dependency] = time.monotonic()
        metrics.DEPENDENCY_UP.labels(error.dependency).set(0)
        log.warning(
            f"{error.dependency} unavailable", dependency=error.dependency, error=error.detail
        )

    def _said_awaiting(self, error: AwaitingOperator) -> None:
        """An outage under way found to await an operator (AwaitingOperator), said once
        with what ends it; and once more for each other thing it is found to await (a
        broker certificate replaced by one refused for another reason was said to be
        the first one still)."""
        said = self._awaiting.setdefault(error.dependency, set())
        if error.detail not in said:
            said.add(error.detail)
            log.warning(
                f"{error.dependency} still unavailable",
                dependency=error.dependency,
                error=error.detail,
            )

    def succeeded(self, dependency: str, *, checked: bool = False) -> None:
        """An operation on `dependency` that had failed succeeded (`checked`: a check such
        as the watch's own passed, which tells the watch nothing new). That ends its
        outage only when nothing better can tell: where the dependency has a check, the
        check decides (at the watch's next round), for an operation can succeed on a
        dependency that is still out for others, as a read does on a database that takes
        no writes."""
        if not checked:
            self._worked_at[dependency] = time.monotonic()
        if dependency not in self._checks:
            self._ended(dependency)

    def answered(self, dependency: str) -> None:
        """`dependency` answered an operation that waits for something else meanwhile (a
        standby relayer for the lock): no attempt of it is failing. Ends nothing by
        itself; an outage under way ends at the check that passes next."""
        if dependency in self._since:
            self._worked_at[dependency] = time.monotonic()

    def _ended(self, dependency: str) -> None:
        since = self._since.pop(dependency, None)
        self._awaiting.pop(dependency, None)
        if since is None:
            return
        self._ended_at[dependency] = time.monotonic()
        metrics.DEPENDENCY_UP.labels(dependency).set(1)
        reconnected = dependency in self._disconnected
        self._disconnected.discard(dependency)
        word = "reconnected" if reconnected else "recovered"
        # At the start's level: a log kept at WARNING must show where each outage ended.
        log.warning(
            f"{dependency} {word}",
            dependency=dependency,
            outage_seconds=round(time.monotonic() - since, 3),
        )

    def down(self) -> frozenset[str]:
        return frozenset(self._since)

    def down_within(self, seconds: float) -> bool:
        """Whether a dependency was out at some moment of the last `seconds` seconds:
        one is now, or an outage ended since."""
        now = time.monotonic()
        return bool(self._since) or any(now - end < seconds for end in self._ended_at.values())


def _always() -> bool:
    return True


def _nothing() -> Mapping[str, object]:
    return {}


async def retry_or_raise(
    operation: Callable[[], Awaitable[T]], *, policy: RetryPolicy, outages: Outages, what: str
) -> T:
    """`retry` for work that has nothing to give up into: once it stops retrying, the
    last error itself is raised (a bug, with NO_BUG_RETRIES, at its first occurrence)."""
    try:
        return await retry(operation, policy=policy, outages=outages, what=what)
    except GaveUp as gave_up:
        raise gave_up.error from None


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    outages: Outages,
    what: str,
    wanted: Callable[[], bool] = _always,
    deadline: float | None = None,
    on_retry: Callable[[Fault], None] | None = None,
    attempts_of: Callable[[BaseException], int | None] = attempts_allowed,
    about: Callable[[], Mapping[str, object]] = _nothing,
) -> T:
    """`await operation()` until it succeeds; raises GaveUp or Abandoned when it stops.

    `wanted` is asked before each pause and after it: once it says no, the
    work is abandoned. `deadline` (time.monotonic()) bounds the whole loop.
    `on_retry` is told of every retry (for metrics). `attempts_of` says how many
    attempts an error allows itself, when fewer than its fault's limit. `about`
    gives the fields a retry's line names (the messages retried), asked only then.
    """
    attempts: Counter[Fault] = Counter()  # those counted against the fault's limit
    tries: Counter[Fault] = Counter()  # every one, for the backoff
    loaded_at: object = None  # what the last conflict had loaded (ConcurrencyConflict)
    down: set[str] = set()
    failed_on: str | None = None  # the dependency the last attempt found unavailable
    while True:
        try:
            with outages.trying(failed_on):
                result = await operation()
        except Exception as error:  # classified below; cancellation is not an Exception
            fault = classify(error)
            # A conflict of streams loaded at other versions than the last one's lost
            # to writers that made progress: not counted. Counted, 3,000 bids of one
            # investor sent at once to five instances dead-lettered one or two of them
            # as 50 conflicts, each with its stream moved on.
            seen, loaded_at = loaded_at, getattr(error, "loaded_at", None)
            if not (loaded_at is not None and seen is not None and loaded_at != seen):
                attempts[fault] += 1
            tries[fault] += 1
            count = attempts[fault]
            limit = policy.limit(fault)
            failed_on = None
            if isinstance(error, Unavailable):
                down.add(error.dependency)
                outages.failed(error)
                failed_on = error.dependency
            allowed = None if limit is None else limit.attempts
            if (own := attempts_of(error)) is not None:
                allowed = own if allowed is None else min(own, allowed)
            if limit is None or (allowed is not None and count >= allowed):
                raise GaveUp(error, fault, tries[fault]) from error  # the caller reports it
            pause = limit.backoff.delay(tries[fault])
            if deadline is not None and time.monotonic() + pause > deadline:
                raise GaveUp(error, fault, tries[fault]) from error
            if fault is Fault.BUG:
                log.error(
                    f"{what} failed with a bug; retrying",
                    attempt=tries[fault],
                    exc_info=error,
                    **about(),
                )
            elif fault is not Fault.UNAVAILABLE:
                log.debug(
                    f"{what} failed; retrying",
                    fault=fault.value,
                    attempt=tries[fault],
                    error=summary(error),
                    **about(),
                )
            if not wanted():
                raise Abandoned(what) from error
            if on_retry is not None:
                on_retry(fault)
            await asyncio.sleep(pause)
            if not wanted():
                raise Abandoned(what) from error
        else:
            for dependency in down:
                outages.succeeded(dependency)
            return result
