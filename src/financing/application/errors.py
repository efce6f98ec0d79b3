"""The one classification of failures: what each error says, and whether retrying can help.

Every loop that retries anything (a delivery, the relayer, the projector, an
enqueue from the Commands API, start-up) asks `classify`; what it does with each of
the four faults is its `retry.RetryPolicy`. For deliveries (`retry.DELIVERIES`):

- UNAVAILABLE: a dependency (database, broker) cannot be reached now. Retried
  without limit, with capped backoff and quietly: one warning when the outage
  starts, one info line when it is over (`retry.Outages`).
- CONFLICT: the work lost a race (another writer appended first) or ran ahead
  of what it needs (the aggregate does not exist yet). Retried soon, a bounded
  number of times.
- PERMANENT: the message can never succeed (undecodable, a domain rule says
  no). Dead-lettered with its reason at once.
- BUG: anything else, a programming error. Logged with its traceback, retried
  a few times (it may depend on a race), then dead-lettered; never reported as
  an outage.

The relayer, the Commands API, start-up, the consumers' opening of their queues and
retention (`retry.NO_BUG_RETRIES`) wait out an outage the same way but give up on
anything else at once: the relayer stops the service, the Commands API answers
INTERNAL (UNAVAILABLE for a queue the broker refuses), start-up fails.

Adapters translate their drivers' errors into these types at their boundary,
so nothing above them needs to know asyncpg's or aiormq's exceptions.
"""

from __future__ import annotations

import enum
import errno
import traceback
from typing import ClassVar

from financing.domain.aggregates import RuleViolation

__all__ = [
    "AwaitingOperator",
    "ConcurrencyConflict",
    "EventNotInStore",
    "Fault",
    "MissingAggregate",
    "PoisonMessage",
    "ReadAfterWrite",
    "Refused",
    "ReusedMessageId",
    "RuleViolation",
    "Unavailable",
    "Unconfirmed",
    "UnrelayedEvent",
    "classify",
    "summary",
]


class Fault(enum.Enum):
    UNAVAILABLE = "unavailable"
    CONFLICT = "conflict"
    PERMANENT = "permanent"
    BUG = "bug"


class Unavailable(Exception):
    """A dependency cannot be reached now; the same work succeeds once it is back."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} unavailable: {detail}")
        self.dependency = dependency
        self.detail = detail


class Unconfirmed(Unavailable):
    """A message handed to a dependency that may hold it all the same: it may have been
    written, and the answer that says whether it was taken never came (the connection
    lost before it, its timeout run out). Where the message is known never to have
    left (no channel, a refusal, a broker's nack), the error is a plain Unavailable."""


class AwaitingOperator(Unavailable):
    """An outage only an operator ends, whose detail says how (a database's tables gone:
    what builds them again). Said as an outage begins, as any; and said once more when
    an outage under way turns out to be one: a database dropped after the service found
    it unreachable, then made again empty, was said only not to exist."""


class Refused(Exception):
    """A dependency answered but refuses the service (credentials, missing database).

    Waiting does not cure it, so start-up fails at once instead of after its
    whole budget.
    """

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} refused the service: {detail}")
        self.dependency = dependency
        self.detail = detail


class PoisonMessage(Exception):
    """A message that cannot be decoded: retrying cannot help; dead-letter it."""


class UnrelayedEvent(PoisonMessage):
    """A domain event whose message id is not the one this service's event store derives
    for it from its aggregate id and version: a copy published again under a new id, or
    another store's event. Its copies cannot be told apart, so a saga policy acting on
    it could apply one event twice (answer a bid twice, release its funds twice)."""


class EventNotInStore(UnrelayedEvent):
    """A domain event under the message id this service's event store derives for it,
    which the store does not hold (no event at its version, or another one): published
    by someone else under a computed id, or relayed by a store since restored without
    it. Acted on, it would change this service's aggregates for an event that never
    happened, and its record would take the id of the event the store appends there."""


class ReusedMessageId(PoisonMessage):
    """A message whose id its consumer already processed for a different message (another
    body). Dropping it as a copy would lose it unseen, and processing it would let its
    copies through twice: it is dead-lettered, for its producer to send it again under
    an id of its own."""


class ConcurrencyConflict(Exception):
    """Another transaction appended to the stream first: reload and retry.

    `loaded_at`: the (aggregate id, version) of each stream the unit of work that lost
    had loaded, where known. A conflict of a retry that loaded them at other versions
    lost to writers that made progress meanwhile (`retry` does not count it against the
    conflict limit); one at the same versions again is a conflict that nothing ends.
    """

    def __init__(self, text: str, *, loaded_at: tuple[tuple[object, int], ...] | None = None):
        super().__init__(text)
        self.loaded_at = loaded_at


class AlreadyProcessed(ConcurrencyConflict):
    """The unit of work records a message its consumer has already processed.

    Raised as the unit of work ends, when none of its writes took effect: the
    message is a duplicate, and there is nothing to retry.
    """


class MissingAggregate(RuleViolation):
    """A message names an aggregate that does not exist (yet).

    The command that creates it may still be in flight on another queue, so
    the message is retried as a conflict, for 15 to 30 ms (3 attempts), then
    deferred (pipeline.retried), off the consumer's slot, until it has waited
    RetryPolicy.aggregate_wait, and only then dead-lettered.
    """

    retry_attempts: ClassVar[int] = 3


class ReadAfterWrite(RuntimeError):
    """A unit of work read after it wrote: a bug in the handler, never retried into success.

    Events are ordered by the id of the transaction that appended them, which
    keeps causes before effects only if everything a transaction read was
    read before its first write. Retrying runs the same code again, so a
    delivery that raises it is dead-lettered at once.
    """

    retry_attempts: ClassVar[int] = 1


def classify(error: BaseException) -> Fault:
    if isinstance(error, Unavailable):
        return Fault.UNAVAILABLE
    if isinstance(error, ConcurrencyConflict | MissingAggregate):
        return Fault.CONFLICT
    if isinstance(error, PoisonMessage | RuleViolation | Refused):
        return Fault.PERMANENT
    return Fault.BUG


def attempts_allowed(error: BaseException) -> int | None:
    """The attempts an error type allows itself, when fewer than its fault's default."""
    allowed = getattr(type(error), "retry_attempts", None)
    return allowed if isinstance(allowed, int) else None


def summary(error: BaseException) -> str:
    """One line: the error and, for a bug, where it was raised (for dead-letter reasons)."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if classify(error) is not Fault.BUG:
        return text
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return text
    last = frames[-1]
    return f"{text} (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"


def said_of(error: BaseException) -> str:
    """What an outage line says of a driver's `error`: its type and text, and first, when
    it is the process's own limit on open files (EMFILE, or the system's, ENFILE) rather
    than anything the dependency it was connecting to did, that it is."""
    said = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        return (
            "this process may open no more files or connections (its file descriptor"
            f" limit, ulimit -n): {said}"
        )
    return said
