"""`financing dead-letters list | requeue | discard`: the operator's hands on dead letters.

`list` leaves them queued; `requeue` sends them back to their source queue
(after the cause is fixed, such as registering the issuer an invoice was
refused for); `discard` removes them for good. Asked for a queue the broker
does not have, or a message id no dead letter carries, a command says so and
exits 1 rather than report "0" as if all were well.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime

from financing.adapters.rabbitmq.connection import Broker, connected
from financing.adapters.rabbitmq.dead_letters import (
    EVERY,
    DeadLetter,
    Listing,
    Selection,
    Taken,
    dead_letters_listed,
    discard_dead_letters,
    requeue_dead_letters,
)
from financing.adapters.rabbitmq.queues import queue_exists
from financing.adapters.rabbitmq.topology import CLASSIC, DEAD_LETTER_QUEUE
from financing.application.moments import moment
from financing.config import Settings, said
from financing.entrypoints.cli.console import shown, table, write_lines

HEADINGS = ("DEAD-LETTERED AT", "SOURCE QUEUE", "NAME", "MESSAGE ID")


async def list_letters(settings: Settings, selection: Selection, limit: int, bodies: bool) -> int:
    async with connected(settings.amqp_urls, "dead-letters list", settings.queue_type) as broker:
        listing = await dead_letters_listed(broker, limit, selection=selection)
        letters = listing.letters
        if not letters and not await _queue_known(broker, selection, "list"):
            return 1
    rows = table(HEADINGS, (_columns(letter) for letter in letters))
    write_lines(rows[:1])
    for row, letter in zip(rows[1:], letters, strict=True):
        write_lines([row, *(f"    {shown(detail)}" for detail in _details(letter, bodies))])
    write_lines([_count(listing, selection, quorum=settings.queue_type != CLASSIC)])
    if listing.most_given_back >= GIVEN_BACK_SAID:
        _say(
            "list",
            f"letters have been read {listing.most_given_back} time(s) before;"
            f" {DEAD_LETTER_QUEUE} is a quorum queue, which counts each read as a delivery and"
            " drops a letter past its delivery limit (RabbitMQ 4: 20): keep it under a policy"
            ' that raises the limit (docs/scaling.md, "Brokers")',
        )
    return 0


# How many times a letter may have been read before a list says the reads count against a
# quorum queue's delivery limit (half RabbitMQ 4's default of 20).
GIVEN_BACK_SAID = 10


def _count(listing: Listing, selection: Selection, *, quorum: bool) -> str:
    """The last line: how many were listed, and, where the list stopped at its limit, that
    it is not all of them (the count read as the total: 100 of 125, or of 190,000); the
    oldest of them on a classic queue, not on a quorum queue, which puts each letter a
    list read back at its end (docs/scaling.md, "Brokers")."""
    shown_here = len(listing.letters)
    if listing.complete:
        return f"{shown_here} dead letter(s)"
    which = "" if selection == EVERY else " matching"
    if quorum:
        return (
            f"{shown_here}{which} dead letter(s) shown, of {listing.waiting} waiting in"
            f" {DEAD_LETTER_QUEUE}, not the oldest (a quorum queue puts the letters each"
            " list reads at its end): --limit N shows more"
        )
    return (
        f"the oldest {shown_here}{which} dead letter(s) shown, of {listing.waiting} waiting in"
        f" {DEAD_LETTER_QUEUE}: --limit N shows more"
    )


def _columns(letter: DeadLetter) -> tuple[str, ...]:
    at = moment(letter.dead_lettered) if letter.dead_lettered else letter.dead_lettered_at
    return at or "-", letter.source_queue or "-", letter.name or "-", letter.message_id or "-"


def _details(letter: DeadLetter, bodies: bool) -> list[str]:
    details = [f"reason: {letter.reason}"]
    if letter.changed:
        details.append(f"kept changed, not requeued: {'; '.join(letter.changed)}")
    if bodies:
        details.append(f"body: {letter.body.decode('utf-8', 'replace')}")
    details.append(
        f"concerns {', '.join(letter.concerned) or '-'}, correlation {letter.correlation_id or '-'}"
    )
    return details


async def requeue(settings: Settings, selection: Selection, *, any_age: bool = False) -> int:
    """Requeue the letters `selection` matches; unless `any_age`, only those younger than
    the deduplication records' retention: an older one's message may have been applied
    since (a rebuild, another copy) and its record pruned, so it could apply twice."""
    kept_since = datetime.now(UTC) - settings.dedup_retention
    old = (
        f"older than FINANCING_DEDUP_RETENTION ({said(settings.dedup_retention)}): the records that"
        " would stop a second effect of their messages may be pruned; --any-age requeues"
        " them as well"
    )

    def too_old(letter: DeadLetter) -> str | None:
        when = letter.dead_lettered
        return old if not any_age and when is not None and when < kept_since else None

    taken = Taken()
    async with connected(settings.amqp_urls, "dead-letters requeue", settings.queue_type) as broker:
        if not await _queue_known(broker, selection, "requeue"):
            return 1
        async with _saying_how_far("requeued", taken):
            await requeue_dead_letters(broker, selection=selection, taken=taken, too_old=too_old)
    print(f"requeued {taken.count} dead letter(s)")
    for reason, count in sorted(taken.left.items()):
        print(f"left {count} dead letter(s): {reason}")
    if selection.message_id is not None and taken.left and not taken.count:
        return 1  # the letter named is there, and left: the lines above say why
    return _found(taken.count + sum(taken.left.values()), selection, "requeue")


async def discard(settings: Settings, selection: Selection) -> int:
    taken = Taken()
    async with (
        _saying_how_far("discarded", taken),
        connected(settings.amqp_urls, "dead-letters discard", settings.queue_type) as broker,
    ):
        await discard_dead_letters(broker, selection=selection, taken=taken)
        if not taken.count and not await _queue_known(broker, selection, "discard"):
            return 1
    print(f"discarded {taken.count} dead letter(s)")
    return _found(taken.count, selection, "discard")


@asynccontextmanager
async def _saying_how_far(done: str, taken: Taken) -> AsyncIterator[None]:
    """Stopped part way (a signal) or cut off (the broker's connection lost), the command
    says how far it got first, and which letter it had in hand when cut off: its copy may
    have been requeued and its letter still wait (requeued again later, a second copy,
    which the service drops as one), or a discarded one still wait. Cut off, it said the
    outage alone: an operator whose requeue had sent 905 letters could not tell."""
    try:
        yield
    except asyncio.CancelledError:
        _tell(f"{done} {taken.count} dead letter(s) before being stopped", taken, done)
        raise
    except Exception:
        _tell(
            f"{done} {taken.count} dead letter(s) before the command failed",
            taken,
            done,
            cut_off=True,
        )
        raise


def _tell(line: str, taken: Taken, done: str, *, cut_off: bool = False) -> None:
    lines = [line]
    if cut_off and (acked := taken.last_acked) is not None:
        # Counted, though its ack, written as the connection went, may not have reached
        # the broker (a discard counted 1,945 where 1,944 went).
        lines.append(
            f"the last counted, the dead letter {acked.message_id or '-'} from"
            f" {acked.source_queue or '-'}, may still wait: its ack may not have reached"
            " the broker"
        )
    if (letter := taken.in_hand) is not None:
        which = f"the dead letter {letter.message_id or '-'} from {letter.source_queue or '-'}"
        lines.append(
            f"{which} was in hand: its copy may have been requeued while it still waits"
            " (requeued again, the service drops the second copy)"
            if done == "requeued"
            else f"{which} was in hand: it may still wait, or be discarded"
        )
    with suppress(OSError, ValueError):
        print("\n".join(lines), flush=True)


async def _queue_known(broker: Broker, selection: Selection, verb: str) -> bool:
    """Whether the queue `selection` names exists (none named: each letter's). A queue
    that is gone may still have dead letters, which are listed and discarded; asked for
    a queue that never had any and does not exist (a typo), `list` and `discard` say so
    rather than report "0" as if all were well."""
    queue = selection.source_queue
    if queue is None or await queue_exists(broker, queue):
        return True
    _say(verb, f"the broker has no queue named {queue!r}")
    return False


def _found(count: int, selection: Selection, verb: str) -> int:
    """Exit code 1 when a message id was asked for and no dead letter carries it."""
    if count or selection.message_id is None:
        return 0
    _say(
        verb,
        f"no dead letter with message id {selection.message_id!r}"
        + (f" from queue {selection.source_queue!r}" if selection.source_queue else ""),
    )
    return 1


def _say(verb: str, text: str) -> None:
    """One line on stderr, begun with the command's whole name, as every command's are."""
    print(f"financing dead-letters {verb}: {text}", file=sys.stderr)
