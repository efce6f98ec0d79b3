"""The story of one correlation: every message a command caused, and what became of each.

A command starts a correlation. Every event appended while handling it, and
every message those events cause in turn, carries the correlation id; each
event also names the message that caused it. This module arranges what the
stores know of a correlation (its events, the records of the messages
consumers processed, its dead letters) into a tree by causation, each level
in time order. Pure: adapters fetch, the command line renders.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from financing.application.integration import SENT_ON
from financing.application.ports import StoredEvent, derived_message_id


class Fate(enum.Enum):
    APPLIED = "applied"
    UNCHANGED = "changed nothing"
    REFUSED = "refused"  # by a rule, and dead-lettered
    DEAD_LETTERED = "dead-lettered"
    DEFERRED = "deferred"  # waiting for an aggregate it names, to be delivered again


@dataclass(frozen=True)
class Handling:
    """What became of one message at one consumer, or in the dead-letter queue, or that
    it waits, deferred."""

    message_id: str
    message_name: str
    fate: Fate
    # The consumer (handler) that processed it, or the queue it was dead-lettered or
    # deferred from.
    by: str
    at: datetime | None
    detail: str = ""  # the rule behind an unchanged outcome; the reason of a dead letter
    events: int = 0  # events appended, when applied


@dataclass
class Step:
    """One message of the correlation: an event (`event` set) or a command."""

    message_id: str
    name: str  # "" when nothing but its id is known: the record of it was pruned
    at: datetime | None
    event: StoredEvent | None = None
    # A command's cause, where it is known: the integration event it was sent on.
    sent_on: str | None = None
    handlings: list[Handling] = field(default_factory=list)
    caused: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class Trace:
    correlation_id: str
    steps: list[Step]  # those no other step of the correlation caused, in time order

    def walk(self) -> Iterator[Step]:
        """Every step, depth first."""
        pending = list(reversed(self.steps))
        while pending:
            step = pending.pop()
            yield step
            pending.extend(reversed(step.caused))

    def handlings(self) -> list[Handling]:
        return [handling for step in self.walk() for handling in step.handlings]


def trace(
    correlation_id: str, events: Iterable[StoredEvent], handlings: Iterable[Handling]
) -> Trace:
    """The causation tree of a correlation's events and the handlings of its messages."""
    steps: dict[str, Step] = {}
    for event in events:
        message_id = event.message_id
        steps[message_id] = Step(message_id, event.name, event.recorded_at, event)
    for handling in sorted(handlings, key=lambda h: _instant(h.at)):
        step = steps.get(handling.message_id)
        if step is None:  # a command: known only from what became of it
            step = Step(handling.message_id, handling.message_name, handling.at)
            steps[handling.message_id] = step
        step.handlings.append(handling)
    _registration(correlation_id, steps)
    known = set(steps)
    roots = [step for step in steps.values() if _cause(step, correlation_id, known) is None]
    for step in list(steps.values()):
        cause = _cause(step, correlation_id, known)
        if cause is None:
            continue
        if cause not in steps:
            # Its record is gone (pruned after the retention window): only its id is known.
            steps[cause] = Step(cause, "", step.at)
            roots.append(steps[cause])
        steps[cause].caused.append(step)
    for step in steps.values():
        step.caused.sort(key=_order)
    return Trace(correlation_id, sorted(roots, key=_order))


def _registration(correlation_id: str, steps: dict[str, Step]) -> None:
    """The integration event a correlation began with, where a command it sent is known:
    nothing records its arrival but the command, whose message id derives from its id (a
    registration dead-lettered is known by its dead letter, and was shown alone as the
    story's beginning, where one applied began at its command)."""
    if correlation_id in steps:
        return
    for step in list(steps.values()):
        sent_on = SENT_ON.get(step.name)
        if (
            step.event is None
            and sent_on is not None
            and step.message_id == str(derived_message_id(correlation_id, step.name))
        ):
            steps.setdefault(correlation_id, Step(correlation_id, sent_on, step.at))
            step.sent_on = correlation_id


def _cause(step: Step, correlation_id: str, known: set[str]) -> str | None:
    """The id of the message that caused `step`, when it is a message of the correlation.

    Commands do not say what caused them (but one known to be sent on an integration
    event's arrival, `_registration`); the first command's cause is the
    correlation itself (the request that started it), unless the correlation is
    that command's own id (a message that came without one starts its own), and
    then the command is the cause.
    """
    cause = step.sent_on if step.event is None else step.event.causation_id
    if not cause or (cause == correlation_id and cause not in known):
        return None
    return cause


def _instant(at: datetime | None) -> datetime:
    return at or datetime.max.replace(tzinfo=UTC)  # what has no time goes last


def _order(step: Step) -> tuple[datetime, int]:
    return _instant(step.at), step.event.position if step.event else 0
