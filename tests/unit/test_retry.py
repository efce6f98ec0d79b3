"""The one retry primitive: what is retried, how often, and what an outage logs."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing.application.errors import (
    AwaitingOperator,
    ConcurrencyConflict,
    Fault,
    MissingAggregate,
    PoisonMessage,
    ReadAfterWrite,
    Refused,
    RuleViolation,
    Unavailable,
)
from financing.application.retry import (
    DELIVERIES,
    NO_BUG_RETRIES,
    OUTAGE_QUIET,
    Abandoned,
    Backoff,
    GaveUp,
    Limit,
    Outages,
    RetryPolicy,
    retry,
)
from tests.support.infra import wait_until

# The default limits, with pauses of a few milliseconds so the tests are fast.
FAST = Backoff(0.001, 0.004)
POLICY = RetryPolicy(
    unavailable=Limit(FAST, None),
    conflict=Limit(FAST, 50),
    permanent=None,
    bug=Limit(FAST, 3),
)


class Failing:
    """An operation that raises `error()` for its first `failures` calls, then returns "done"."""

    def __init__(self, error: Callable[[], BaseException], failures: int) -> None:
        self.error = error
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()
        return "done"


def database_down() -> Unavailable:
    return Unavailable("database", "connection refused")


async def retried(operation: Callable[[], Awaitable[Any]], **kwargs: Any) -> Any:
    options: dict[str, Any] = {"policy": POLICY, "outages": Outages(), "what": "testing"}
    return await retry(operation, **(options | kwargs))


async def test_retry_returns_the_result_of_the_operation() -> None:
    operation = Failing(database_down, failures=0)
    assert await retried(operation) == "done"
    assert operation.calls == 1


async def test_an_unavailable_dependency_is_retried_beyond_any_attempt_limit_until_it_is_back() -> (
    None
):
    failures = 60  # more than the conflict (50) and bug (3) limits
    operation = Failing(database_down, failures)
    assert await retried(operation) == "done"
    assert operation.calls == failures + 1


async def test_an_outage_logs_one_warning_when_it_starts_and_one_when_it_ends() -> None:
    with capture_logs() as logs:
        await retried(Failing(database_down, failures=20))
    assert [(line["log_level"], line["event"]) for line in logs] == [
        ("warning", "database unavailable"),
        ("warning", "database recovered"),
    ]
    assert logs[0]["error"] == "connection refused"
    assert isinstance(logs[1]["outage_seconds"], float) and logs[1]["outage_seconds"] >= 0


async def test_the_end_of_an_outage_that_lost_the_connection_is_logged_as_a_reconnection() -> None:
    outages = Outages()
    with capture_logs() as logs:
        outages.failed(Unavailable("broker", "connection reset"), connection_lost=True)
        await retried(
            Failing(lambda: Unavailable("broker", "no answer"), failures=2), outages=outages
        )
    assert [line["event"] for line in logs] == ["broker unavailable", "broker reconnected"]
    assert "outage_seconds" in logs[1]


async def test_the_end_of_an_outage_that_kept_the_connection_is_not_called_a_reconnection() -> None:
    """Regression: a broker that refused publishes on a connection it kept open (a memory
    alarm, a permission revoked) was said to have "reconnected" when it took them again."""
    outages = Outages()
    with capture_logs() as logs:
        await retried(
            Failing(lambda: Unavailable("broker", "publish refused"), failures=2), outages=outages
        )
        # The next outage starts with a lost connection; only its end is a reconnection.
        outages.failed(Unavailable("broker", "connection reset"), connection_lost=True)
        await retried(
            Failing(lambda: Unavailable("broker", "no answer"), failures=1), outages=outages
        )
    assert [line["event"] for line in logs] == [
        "broker unavailable",
        "broker recovered",
        "broker unavailable",
        "broker reconnected",
    ]


async def test_an_outage_seen_by_several_loops_is_logged_once() -> None:
    outages = Outages()
    down = True
    calls = 0

    async def operation() -> str:
        nonlocal down, calls
        calls += 1
        if calls >= 30:
            down = False
        if down:
            raise database_down()
        return "done"

    with capture_logs() as logs:
        results = await asyncio.gather(
            *(retried(operation, outages=outages, what=f"loop {n}") for n in range(3))
        )
    assert results == ["done"] * 3
    assert [(line["log_level"], line["event"]) for line in logs] == [
        ("warning", "database unavailable"),
        ("warning", "database recovered"),
    ]
    assert outages.down() == frozenset()


async def test_a_dependency_stays_down_in_the_outage_log_until_an_operation_succeeds() -> None:
    outages = Outages()
    with pytest.raises(GaveUp):
        await retried(Failing(database_down, failures=99), outages=outages, deadline=0)
    assert outages.down() == frozenset({"database"})
    await retried(Failing(database_down, failures=1), outages=outages)
    assert outages.down() == frozenset()


async def test_an_operation_that_succeeds_leaves_the_outage_to_the_dependency_check() -> None:
    """Regression: a read that succeeded after a broken connection ended the outage of a
    database that took no writes; the next write began it again ("unavailable",
    "recovered", "unavailable"). Where a dependency has a check, the check decides."""
    outages = Outages()
    writable = False
    checks = 0

    async def check() -> None:
        nonlocal checks
        checks += 1
        if not writable:
            raise Unavailable("database", "the server takes no writes (read-only)")

    outages.check_with("database", check)
    with capture_logs() as logs:
        await retried(Failing(database_down, failures=1), outages=outages, what="a read")
        watching = asyncio.get_running_loop().create_task(outages.watch(interval=0.01))
        try:
            await wait_until(lambda: _now(checks >= 3), what="three failed checks")
            assert outages.down() == {"database"}
            writable = True
            await wait_until(lambda: _now(not outages.down()), what="the check to end it")
        finally:
            watching.cancel()
    assert [line["event"] for line in logs] == ["database unavailable", "database recovered"]


async def test_a_bug_is_retried_at_most_its_limit_then_given_up_as_a_bug() -> None:
    assert POLICY.bug is not None
    operation = Failing(lambda: TypeError("unsupported operand"), failures=99)
    with pytest.raises(GaveUp) as gave_up:
        await retried(operation)
    assert operation.calls == POLICY.bug.attempts == 3
    assert gave_up.value.fault is Fault.BUG
    assert gave_up.value.attempts == 3
    assert isinstance(gave_up.value.error, TypeError)


async def test_a_bug_that_goes_away_on_a_retry_succeeds() -> None:
    operation = Failing(lambda: ValueError("raced"), failures=2)
    assert await retried(operation) == "done"
    assert operation.calls == 3


async def test_each_retry_of_a_bug_is_logged_as_an_error_with_its_traceback() -> None:
    with capture_logs() as logs, pytest.raises(GaveUp):
        await retried(Failing(lambda: TypeError("boom"), failures=99))
    errors = [line for line in logs if line["log_level"] == "error"]
    assert [line["event"] for line in errors] == ["testing failed with a bug; retrying"] * 2
    assert all(isinstance(line["exc_info"], TypeError) for line in errors)


async def test_without_bug_retries_a_bug_is_attempted_once() -> None:
    operation = Failing(lambda: TypeError("boom"), failures=99)
    with pytest.raises(GaveUp) as gave_up:
        await retried(operation, policy=NO_BUG_RETRIES)
    assert (operation.calls, gave_up.value.fault) == (1, Fault.BUG)


async def test_a_read_after_write_is_attempted_exactly_once() -> None:
    operation = Failing(lambda: ReadAfterWrite("load after a write"), failures=99)
    with pytest.raises(GaveUp) as gave_up:
        await retried(operation)
    assert operation.calls == 1
    assert (gave_up.value.fault, gave_up.value.attempts) == (Fault.BUG, 1)


async def test_a_missing_aggregate_is_attempted_at_most_three_times() -> None:
    operation = Failing(lambda: MissingAggregate("invoice 1 does not exist"), failures=99)
    with pytest.raises(GaveUp) as gave_up:
        await retried(operation)
    assert operation.calls == 3
    assert (gave_up.value.fault, gave_up.value.attempts) == (Fault.CONFLICT, 3)


async def test_a_missing_aggregate_created_meanwhile_succeeds() -> None:
    operation = Failing(lambda: MissingAggregate("issuer 1 is not registered"), failures=2)
    assert await retried(operation) == "done"


async def test_a_concurrency_conflict_is_retried_up_to_the_conflict_limit() -> None:
    policy = RetryPolicy(conflict=Limit(FAST, 5))
    operation = Failing(lambda: ConcurrencyConflict("moved past version 1"), failures=99)
    with pytest.raises(GaveUp) as gave_up:
        await retried(operation, policy=policy)
    assert operation.calls == 5
    assert gave_up.value.fault is Fault.CONFLICT


@pytest.mark.parametrize(
    "error",
    [
        RuleViolation("balance 5 is less than the bid 10"),
        PoisonMessage("body is not valid JSON"),
        Refused("database", "password authentication failed"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_a_permanent_error_is_not_retried(error: Exception) -> None:
    operation = Failing(lambda: error, failures=99)
    with pytest.raises(GaveUp) as gave_up:
        await retried(operation)
    assert operation.calls == 1
    assert (gave_up.value.fault, gave_up.value.error) == (Fault.PERMANENT, error)


async def test_work_no_longer_wanted_is_abandoned() -> None:
    operation = Failing(database_down, failures=99)
    with pytest.raises(Abandoned):
        async with asyncio.timeout(5):  # fails, rather than hangs, if it kept retrying
            await retried(operation, wanted=lambda: False)
    assert operation.calls == 1


async def test_work_that_stops_being_wanted_during_a_pause_is_abandoned() -> None:
    answers = iter([True, False])
    operation = Failing(database_down, failures=99)
    with pytest.raises(Abandoned):
        async with asyncio.timeout(5):  # fails, rather than hangs, if it kept retrying
            await retried(operation, wanted=lambda: next(answers))
    assert operation.calls == 1


async def test_a_deadline_gives_up_on_an_outage() -> None:
    operation = Failing(database_down, failures=10**9)
    started = time.monotonic()
    with pytest.raises(GaveUp) as gave_up:
        async with asyncio.timeout(5):  # fails, rather than hangs, without the deadline
            await retried(operation, deadline=started + 0.05)
    assert gave_up.value.fault is Fault.UNAVAILABLE
    assert time.monotonic() - started < 1.0
    assert operation.calls > 1


async def test_a_cancelled_operation_is_not_retried() -> None:
    operation = Failing(asyncio.CancelledError, failures=99)
    with pytest.raises(asyncio.CancelledError):
        await retried(operation)
    assert operation.calls == 1


def test_deliveries_retry_every_fault_as_classified() -> None:
    assert DELIVERIES.unavailable is not None and DELIVERIES.unavailable.attempts is None
    assert DELIVERIES.conflict is not None and DELIVERIES.conflict.attempts == 50
    assert DELIVERIES.bug is not None and DELIVERIES.bug.attempts == 3
    assert DELIVERIES.permanent is None
    assert NO_BUG_RETRIES.bug is None
    assert NO_BUG_RETRIES.unavailable == DELIVERIES.unavailable


def test_a_deferral_starts_short_and_about_doubles_up_to_its_ceiling() -> None:
    """Regression: every deferral put a message aside for 5 s (a quarter of the wait, at
    most 5 s), so a message deferred a moment before its aggregate was created waited 5 s
    more, and its first delivery held a consumer's slot for about a second of attempts
    (8, now 3) to make that rare."""
    policy = RetryPolicy(aggregate_wait=60.0)
    assert policy.deferral_delay(0.0) == policy.first_deferral == 0.25
    assert [policy.deferral_delay(waited) for waited in (0.3, 0.7, 1.5, 3.1)] == [
        0.3,
        0.7,
        1.5,
        3.1,
    ]
    assert policy.deferral_delay(6.3) == policy.deferral_delay(59.0) == 5.0
    short = RetryPolicy(aggregate_wait=2.0)  # a quarter of the wait, when less than 5 s
    assert [short.deferral_delay(waited) for waited in (0.0, 0.3, 1.2)] == [0.25, 0.3, 0.5]
    tiny = RetryPolicy(aggregate_wait=0.2)  # never less than 0.1 s
    assert tiny.deferral_delay(0.0) == tiny.deferral_delay(0.15) == 0.1


def test_a_backoff_delay_is_between_half_and_all_of_its_doubling_ceiling() -> None:
    backoff = Backoff(0.1, 2.0)
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), attempt


def test_a_backoff_delay_is_capped_however_many_attempts() -> None:
    backoff = Backoff(0.1, 2.0)
    for attempt in (6, 10, 31, 1000, 10**6):
        assert 1.0 <= backoff.delay(attempt) <= 2.0


def test_a_backoff_delay_is_jittered() -> None:
    assert len({Backoff(0.1, 2.0).delay(3) for _ in range(20)}) > 1


async def test_an_outage_whose_loop_was_abandoned_ends_once_the_dependency_checks_out() -> None:
    outages = Outages()
    answers = itertools.chain([False, False], itertools.repeat(True))  # back at the third

    async def check() -> None:
        if not next(answers):
            raise Unavailable("database", "connection refused")

    outages.check_with("database", check)
    channel_open = True

    async def handling() -> None:
        nonlocal channel_open
        channel_open = False  # the delivery's channel closes during the pause
        raise Unavailable("database", "connection reset")

    with capture_logs() as logs:
        with pytest.raises(Abandoned):
            await retry(
                handling,
                policy=RetryPolicy(),
                outages=outages,
                what="handling",
                wanted=lambda: channel_open,
            )
        assert outages.down() == {"database"}  # nobody is left to succeed
        watching = asyncio.get_running_loop().create_task(outages.watch(interval=0.01, quiet=0.05))
        try:
            await wait_until(lambda: _now(not outages.down()), what="the outage to end")
        finally:
            watching.cancel()
    assert [line["event"] for line in logs] == ["database unavailable", "database recovered"]


async def test_an_outage_does_not_end_while_its_operations_fail_though_its_check_passes() -> None:
    """Regression: a database that refuses writes (privileges revoked, `statement_timeout`
    under a write's time) still answers the check's read: its outage was logged as over,
    then again as started, every second. It ends once one of the operations that failed
    succeeds, or once none has failed for a while."""
    outages = Outages()

    async def passes() -> None:
        return None

    outages.check_with("database", passes)
    with capture_logs() as logs:
        outages.failed(Unavailable("database", "permission denied"))
        await outages.check_once(within=1, quiet=60)
        outages.succeeded("database", checked=True)  # the health probe's read
        await outages.check_once(within=1, quiet=60)
        assert outages.down() == {"database"}
        outages.failed(Unavailable("database", "permission denied"))  # still down: no line
        outages.succeeded("database")  # a write that had failed went through
        await outages.check_once(within=1, quiet=60)
        assert outages.down() == frozenset()
        outages.failed(Unavailable("database", "permission denied"))
        await outages.check_once(within=1, quiet=60)
        assert outages.down() == {"database"}
        await outages.check_once(within=1, quiet=0)  # nothing failed since: quiet long enough
        assert outages.down() == frozenset()
    assert [line["event"] for line in logs] == ["database unavailable", "database recovered"] * 2


async def test_the_watch_leaves_alone_an_outage_it_has_no_check_for() -> None:
    outages = Outages()
    outages.failed(Unavailable("broker", "connection reset"))
    outages.failed(Unavailable("database", "connection refused"))
    checks = 0

    async def database_check() -> None:
        nonlocal checks
        checks += 1
        raise Unavailable("database", "connection refused")  # still down

    outages.check_with("database", database_check)
    watching = asyncio.get_running_loop().create_task(outages.watch(interval=0.01))
    try:
        await wait_until(lambda: _now(checks >= 3), what="three periods of the watch")
    finally:
        watching.cancel()
    assert outages.down() == {"broker", "database"}


async def _now(value: bool) -> bool:
    return value


def up(dependency: str) -> float | None:
    return REGISTRY.get_sample_value("financing_dependency_up", {"dependency": dependency})


async def test_a_dependency_is_exported_up_from_its_check_and_down_for_its_outage() -> None:
    """Regression: no metric showed a database's or a queue's outage (the broker's
    connection gauge stays 1 while it refuses publishes): only the log and /health did."""
    outages = Outages()
    name = f"database {uuid.uuid4()}"

    async def answers() -> None:
        return None  # the dependency's check passes

    outages.check_with(name, answers)
    assert up(name) == 1
    outages.failed(Unavailable(name, "connection refused"))
    assert up(name) == 0
    # Its operations' last failure is the one above: the check ends the outage once
    # none has failed for `quiet` seconds (5 by default, the wait's own deadline).
    watching = asyncio.create_task(outages.watch(interval=0.01, quiet=0.1))

    async def back() -> bool:
        return up(name) == 1

    try:
        await wait_until(back, timeout=5, what="the check to end the outage")
    finally:
        watching.cancel()
    queue = f"queue {uuid.uuid4()}"  # no check: the next success ends its outage
    outages.failed(Unavailable(queue, "access refused"))
    assert up(queue) == 0
    outages.succeeded(queue)
    assert up(queue) == 1


async def test_an_outage_does_not_end_while_an_operation_that_failed_is_trying_again() -> None:
    """Regression: a table locked for 60 s made each of the projector's attempts wait
    FINANCING_DB_TIMEOUT (10 s) and fail; for 5 s of every 10 nothing had failed, the
    check's read passed, and the outage was logged as over, and as starting again, five
    times (`/health` and `financing_dependency_up` flapping with it)."""
    outages = Outages()

    async def passes() -> None:
        return None

    outages.check_with("database", passes, attempts_within=60)
    released = asyncio.Event()
    attempts = 0

    async def write() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise Unavailable("database", "no answer in time")
        await released.wait()  # the lock is held: the attempt waits
        return "written"

    with capture_logs() as logs:
        writing = asyncio.create_task(
            retry(write, policy=DELIVERIES, outages=outages, what="writing")
        )
        await wait_until(lambda: _now(attempts == 2), what="the second attempt")
        await outages.check_once(within=1, quiet=0)  # nothing failed "lately"
        assert outages.down() == {"database"}
        released.set()
        assert await writing == "written"
        await outages.check_once(within=1, quiet=60)
        assert outages.down() == frozenset()
    assert [line["event"] for line in logs] == ["database unavailable", "database recovered"]


async def test_an_operation_trying_again_for_longer_than_an_attempt_fails_in_ends_nothing() -> None:
    """A standby relayer stands for election in one long attempt (it polls the lock until
    the instance holding it goes): once that attempt has lasted longer than an attempt
    on its database fails in, it holds the database's outage open no more."""
    outages = Outages()

    async def passes() -> None:
        return None

    outages.check_with("database", passes, attempts_within=0.05)
    outages.failed(Unavailable("database", "connection refused"))
    with outages.trying("database"):
        await outages.check_once(within=1, quiet=0)
        assert outages.down() == {"database"}
        began = time.monotonic()
        await wait_until(lambda: _now(time.monotonic() - began > 0.05), what="the bound")
        await outages.check_once(within=1, quiet=0)
        assert outages.down() == frozenset()


def test_the_pauses_between_attempts_are_those_the_documents_promise() -> None:
    """README: an outage is retried with backoff capped at 2 s; a conflict soon, from
    10 ms, doubling, capped at 0.5 s. An outage is over once nothing failed for
    OUTAGE_QUIET, longer than a loop retrying it pauses."""
    unavailable, conflict = DELIVERIES.unavailable, DELIVERIES.conflict
    assert unavailable is not None and conflict is not None

    def pauses(limit: Limit, attempt: int) -> list[float]:
        return [limit.backoff.delay(attempt) for _ in range(200)]  # jittered in [d/2, d]

    assert all(1.0 <= pause <= 2.0 for pause in pauses(unavailable, 30))
    assert all(0.005 <= pause <= 0.01 for pause in pauses(conflict, 1))
    assert all(0.01 <= pause <= 0.02 for pause in pauses(conflict, 2))
    assert all(0.25 <= pause <= 0.5 for pause in pauses(conflict, 30))
    assert max(pauses(unavailable, 30)) < OUTAGE_QUIET


async def test_an_outage_found_to_await_an_operator_says_what_ends_it_once() -> None:
    """Regression: a database dropped after the service found it unreachable, then made
    again empty, was said only not to exist: the line naming its missing tables and what
    builds them again was never written."""
    outages = Outages()
    tables_gone = AwaitingOperator("query database", "its tables do not exist: rebuild")

    async def check() -> None:
        raise tables_gone

    outages.check_with("query database", check)
    with capture_logs() as logs:
        outages.failed(Unavailable("query database", 'database "q" does not exist'))
        for _ in range(3):  # the watch's rounds, and the operations failing meanwhile
            await outages.check_once(within=1.0)
            outages.failed(tables_gone)
    assert [(line["event"], line["error"]) for line in logs] == [
        ("query database unavailable", 'database "q" does not exist'),
        ("query database still unavailable", "its tables do not exist: rebuild"),
    ]
    assert outages.down() == {"query database"}


async def test_an_outage_awaiting_an_operator_says_each_other_thing_it_awaits_once() -> None:
    """Regression: a broker restarted with an expired certificate, then with one for
    another host, was said to have an expired certificate for as long as it lasted."""
    outages = Outages()
    expired = AwaitingOperator("broker", "certificate verify failed: certificate has expired")
    elsewhere = AwaitingOperator("broker", "certificate verify failed: IP address mismatch")
    with capture_logs() as logs:
        outages.failed(Unavailable("broker", "CONNECTION_FORCED - shutdown"))
        for error in (expired, expired, elsewhere, expired, elsewhere):
            outages.failed(error)
    assert [(line["event"], line["error"]) for line in logs] == [
        ("broker unavailable", "CONNECTION_FORCED - shutdown"),
        ("broker still unavailable", expired.detail),
        ("broker still unavailable", elsewhere.detail),
    ]


class Contended:
    """An append that loses `losses` races, each to a writer that moved the stream on
    (its next attempt loads it at a later version), or, `moving=False`, each at the same
    version again (a conflict nothing ends)."""

    def __init__(self, losses: int, *, moving: bool = True) -> None:
        self.losses = losses
        self.moving = moving
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls > self.losses:
            return "appended"
        version = self.calls if self.moving else 1
        raise ConcurrencyConflict("moved past", loaded_at=(("investor", version),))


async def test_conflicts_lost_to_writers_that_moved_the_stream_on_do_not_count() -> None:
    """Regression: 3,000 bids of one investor sent at once to five instances: one or two
    were dead-lettered after 50 conflicts, every one lost to a writer that had moved the
    stream on: a bid refused for nothing but contention."""
    policy = RetryPolicy(conflict=Limit(FAST, 5))
    operation = Contended(losses=40)
    assert await retried(operation, policy=policy) == "appended"
    assert operation.calls == 41


async def test_conflicts_at_the_same_versions_again_count_up_to_the_limit() -> None:
    policy = RetryPolicy(conflict=Limit(FAST, 5))
    operation = Contended(losses=99, moving=False)
    with pytest.raises(GaveUp) as gave_up:
        await retried(operation, policy=policy)
    assert operation.calls == 5
    assert (gave_up.value.fault, gave_up.value.attempts) == (Fault.CONFLICT, 5)


async def test_an_operation_that_waits_on_a_dependency_that_answers_lets_its_outage_end() -> None:
    """Regression: a standby relayer's wait for the lock, begun as a database outage
    ended, was an attempt under way: its outage stayed open for its attempts' timeout
    (FINANCING_DB_TIMEOUT) more, `/health` at 503 over a database that answered."""
    outages = Outages()

    async def passes() -> None:
        return None

    outages.check_with("database", passes, attempts_within=10.0)
    outages.failed(database_down())
    with outages.trying("database"):  # the standby's wait, under way
        await outages.check_once(within=1.0, quiet=0.0)
        assert outages.down() == frozenset({"database"})
        outages.answered("database")  # a poll of the lock answered
        await outages.check_once(within=1.0, quiet=0.0)
        assert outages.down() == frozenset()
