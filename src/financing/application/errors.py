"""How a failed message is treated: each error says whether retrying can help."""

from __future__ import annotations

from financing.domain.aggregates import RuleViolation

__all__ = [
    "ConcurrencyConflict",
    "MissingAggregate",
    "PoisonMessage",
    "ReadAfterWrite",
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


class ReadAfterWrite(RuntimeError):
    """A unit of work read after it wrote: a bug in the handler, never retried into success.

    Events are ordered by the id of the transaction that appended them, which
    keeps causes before effects only if everything a transaction read was
    read before its first write.
    """
