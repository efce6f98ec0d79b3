"""`financing trace CORRELATION_ID`: everything a command caused, and what became of it.

The command's correlation id is in the `correlation-id` metadata of the
Commands API's answer. The event store gives the events and the records of
processed messages; the dead-letter queue, browsed without taking anything,
gives the messages refused, and `financing_deferred` those waiting for an
aggregate they name. Printed as a tree by causation:

    correlation 7f0c…
    └─ BidOnInvoice  command 5e2a…
       │ 2025-06-01T12:00:01.123Z  applied by bid_on_invoice: 1 event
       └─ BidOnInvoicePlacedEvent  Investor 1b9d… v3  2025-06-01T12:00:01.123Z
            {"InvoiceID":"…","BidAmount":15}
            2025-06-01T12:00:01.201Z  applied by bid_placed_offers_bid_to_invoice: 1 event
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from typing import TextIO

from financing.adapters.postgres.connection import COMMAND_DATABASE
from financing.adapters.postgres.correlation import correlated
from financing.adapters.rabbitmq.connection import connected
from financing.adapters.rabbitmq.dead_letters import (
    DeadLetter,
    Selection,
    list_dead_letters,
    list_deferred,
)
from financing.application.errors import Refused, Unavailable
from financing.application.messages import COMMAND_TYPES, INTEGRATION_TYPES
from financing.application.moments import moment
from financing.application.trace import Fate, Handling, Step, Trace, trace
from financing.config import Settings
from financing.entrypoints.cli.console import database, shown, write_lines

# Every dead letter of the correlation, however many there are.
ALL_OF_THEM = sys.maxsize


async def run_trace(settings: Settings, correlation_id: str) -> int:
    """Print the trace; exit code 1 when nothing is known of the correlation, or when
    the dead letters could not be searched (what was found is printed all the same)."""
    async with database(settings.command_db, COMMAND_DATABASE, "trace", schema="commands") as pool:
        events, handlings = await correlated(pool, correlation_id)
    kept_aside, searched = await _kept_aside(settings.amqp_urls, correlation_id)
    handlings += kept_aside
    story = trace(correlation_id, events, handlings)
    if not story.steps:
        kinds = (
            "event, processed message, dead letter or deferred message"
            if searched
            else "event or processed message (the dead letters and deferred messages were"
            " not searched)"
        )
        print(
            f"financing trace: nothing is known of correlation id {correlation_id!r}:"
            f" no {kinds} carries it (a command still waiting in its queue, or being"
            " retried, shows once it is handled)",
            file=sys.stderr,
        )
        return 1
    write_lines(render(story, drawing=drawing_for(sys.stdout)))
    return 0 if searched else 1


async def _kept_aside(amqp_urls: list[str], correlation_id: str) -> tuple[list[Handling], bool]:
    """The correlation's dead letters, and its messages deferred to wait for an aggregate,
    and whether they could be searched; none, said on stderr, when the broker cannot
    tell."""
    selection = Selection(correlation_id=correlation_id)
    try:
        async with connected(amqp_urls, "trace") as broker:
            letters = await list_dead_letters(broker, ALL_OF_THEM, selection=selection)
            deferred = await list_deferred(broker, selection=selection)
    except (Unavailable, Refused) as error:
        print(f"financing trace: dead letters not searched: {error}", file=sys.stderr)
        return [], False
    found = [_handling(letter, Fate.DEAD_LETTERED) for letter in letters]
    return found + [_handling(message, Fate.DEFERRED) for message in deferred], True


def _handling(letter: DeadLetter, fate: Fate) -> Handling:
    return Handling(
        letter.message_id,
        letter.name,
        fate,
        letter.source_queue,
        letter.dead_lettered,
        letter.reason,
    )


# How the tree is drawn: its branches (the last one, another one) and the rail beside a
# step's details; in ASCII where the output cannot carry the box-drawing characters.
Drawing = tuple[str, str, str]
BOXES: Drawing = ("└─ ", "├─ ", "│")
ASCII: Drawing = ("`- ", "|- ", "|")


def drawing_for(output: TextIO) -> Drawing:
    """BOXES where `output`'s encoding carries them, else ASCII (a C locale, or
    PYTHONIOENCODING=ascii, wrote every branch as escapes)."""
    try:
        "".join(BOXES).encode(getattr(output, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return BOXES


def render(story: Trace, drawing: Drawing = BOXES) -> list[str]:
    lines = [f"correlation {story.correlation_id}"]
    _branch(story.steps, "", lines, drawing)
    fates = Counter(handling.fate for handling in story.handlings())
    lines.append(", ".join(f"{fates[fate]} {fate.value}" for fate in Fate))
    return [shown(line) for line in lines]


def _branch(steps: Sequence[Step], prefix: str, lines: list[str], drawing: Drawing) -> None:
    last_branch, branch, rail_ = drawing
    for index, step in enumerate(steps):
        last = index == len(steps) - 1
        lines.append(prefix + (last_branch if last else branch) + _heading(step))
        inner = prefix + ("   " if last else rail_ + "  ")
        rail = inner + (rail_ + " " if step.caused else "  ")
        lines.extend(rail + detail for detail in _details(step))
        _branch(step.caused, inner, lines, drawing)


def _heading(step: Step) -> str:
    event = step.event
    if event is not None:
        where = f"{event.aggregate_type} {event.aggregate_id} v{event.version}"
        return f"{event.name}  {where}  {moment(event.recorded_at)}"
    if not step.name:
        return f"message {step.message_id} (no record of it is left)"
    return f"{step.name}  {_KINDS.get(step.name, 'message')} {step.message_id}"


# What a message that is no event of the store is, by name (a registration from the
# Registering context was shown as a command).
_KINDS = {
    **{kind.name(): "command" for kind in COMMAND_TYPES},
    **{kind.name(): "integration event" for kind in INTEGRATION_TYPES},
}


def _details(step: Step) -> list[str]:
    details = [] if step.event is None else [step.event.body]
    return details + [f"{moment(h.at)}  {_fate(h)}" for h in step.handlings]


def _fate(handling: Handling) -> str:
    if handling.fate is Fate.APPLIED:
        return f"applied by {handling.by}: {_events(handling.events)}"
    if handling.fate is Fate.UNCHANGED:
        return f"changed nothing at {handling.by}: {handling.detail}"
    if handling.fate is Fate.REFUSED:
        return f"refused by {handling.by}: {handling.detail}"
    if handling.fate is Fate.DEFERRED:
        waits = handling.detail or "waiting for an aggregate it names"  # a copy before 0.6.10
        return f"deferred from {handling.by}: {waits} (since then)"
    return f"dead-lettered from {handling.by}: {handling.detail}"


def _events(count: int) -> str:
    return "1 event" if count == 1 else f"{count} events"
