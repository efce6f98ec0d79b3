"""How a failed message is treated: each error says whether retrying can help."""

from __future__ import annotations

from financing.domain.aggregates import RuleViolation

__all__ = [
    "ConcurrencyConflict",
    "MissingAggregate",
    "PoisonMessage",
    "RuleViolation",
]


class PoisonMessage(Exception):
    """A message that cannot be decoded: retrying cannot help; dead-letter it."""


class MissingAggregate(RuleViolation):
    """A command names an aggregate that does not exist (yet).

    The command that creates it may still be in flight on another queue, so the
    message is retried for a bounded time before it is dead-lettered.
    """


class ConcurrencyConflict(Exception):
    """Another transaction appended to the stream first: reload and retry."""
