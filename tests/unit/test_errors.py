"""One classification of failures: each error type has its fault, and a bug says where it was."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from financing.adapters.postgres import connection as postgres
from financing.adapters.rabbitmq import connection as rabbitmq
from financing.application.errors import (
    ConcurrencyConflict,
    Fault,
    MissingAggregate,
    PoisonMessage,
    ReadAfterWrite,
    Refused,
    RuleViolation,
    Unavailable,
    classify,
    summary,
)


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (Unavailable("database", "connection refused"), Fault.UNAVAILABLE),
        (Unavailable("broker", "connection reset"), Fault.UNAVAILABLE),
        (ConcurrencyConflict("Investor moved past version 3"), Fault.CONFLICT),
        (MissingAggregate("invoice 1 does not exist"), Fault.CONFLICT),
        (PoisonMessage("body is not valid JSON"), Fault.PERMANENT),
        (RuleViolation("balance 5 is less than the bid 10"), Fault.PERMANENT),
        (Refused("database", "password authentication failed"), Fault.PERMANENT),
        (ReadAfterWrite("load after a write in the same unit of work"), Fault.BUG),
        (ValueError("not a number"), Fault.BUG),
        (TypeError("unsupported operand"), Fault.BUG),
        (RuntimeError("anything else"), Fault.BUG),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.value,
)
def test_each_error_type_is_classified_as_its_fault(error: Exception, fault: Fault) -> None:
    assert classify(error) is fault


def test_a_missing_aggregate_is_a_conflict_though_it_is_a_rule_violation() -> None:
    # It is retried for a while: the command creating the aggregate may be in flight.
    assert issubclass(MissingAggregate, RuleViolation)
    assert classify(MissingAggregate("issuer 1 is not registered")) is Fault.CONFLICT


def _raise_a_bug() -> None:
    raise TypeError("boom")


def test_the_summary_of_a_bug_names_the_file_line_and_function_where_it_was_raised() -> None:
    with pytest.raises(TypeError) as caught:
        _raise_a_bug()
    line = _raise_a_bug.__code__.co_firstlineno + 1
    assert summary(caught.value) == f"TypeError: boom (at test_errors.py:{line} in _raise_a_bug)"


def test_the_summary_of_a_bug_never_raised_is_its_type_and_message() -> None:
    assert summary(ValueError("bad")) == "ValueError: bad"


def test_the_summary_of_a_bug_without_a_message_is_its_type_and_place() -> None:
    def fails() -> None:
        raise KeyError

    with pytest.raises(KeyError) as caught:
        fails()
    assert summary(caught.value).startswith("KeyError (at test_errors.py:")
    assert summary(caught.value).endswith(" in fails)")


def test_the_summary_of_an_expected_failure_does_not_say_where_it_was_raised() -> None:
    def unreachable() -> None:
        raise Unavailable("broker", "connection refused")

    with pytest.raises(Unavailable) as caught:
        unreachable()
    assert summary(caught.value) == "Unavailable: broker unavailable: connection refused"


@pytest.mark.parametrize("describe", [postgres.describe, rabbitmq.describe])
def test_a_connection_refused_for_the_process_own_file_limit_says_so(
    describe: Callable[[BaseException], str],
) -> None:
    """Regression: a pool growing past the process's descriptor limit was logged as an
    outage of the query database ("OSError: [Errno 24] Too many open files") alone."""
    said = describe(OSError(errno.EMFILE, "Too many open files"))
    assert said == (
        "this process may open no more files or connections (its file descriptor limit,"
        " ulimit -n): OSError: [Errno 24] Too many open files"
    )
    assert describe(ConnectionRefusedError(111, "Connection refused")).startswith(
        "ConnectionRefusedError"
    )
