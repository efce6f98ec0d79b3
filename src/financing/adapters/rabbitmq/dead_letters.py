"""Dead letters: messages that cannot be processed, kept with their reason.

A message is dead-lettered by publishing a copy (confirmed) to our own durable
queue with the reason and the source queue as string headers, and only then
acking the original (docs/contract.md section 2, "Queue arguments"): no queue
arguments are needed on the reference's queues, and the reason is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from financing import metrics
from financing.adapters.rabbitmq.connection import BROKER, Broker, close_channel, translated
from financing.adapters.rabbitmq.envelopes import (
    AGGREGATE_ID_HEADER,
    BROKER_HEADERS,
    CORE_HEADERS,
    DELIVERY_COUNT_HEADER,
    MAX_MESSAGE_ID_BYTES,
    MESSAGE_UUID_HEADER,
    NAME_HEADER,
    delivery_channel_open,
    header_string,
    header_text,
    shortened,
    undecodable,
)
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.queues import existing_queue, queue_exists
from financing.adapters.rabbitmq.topology import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTERS,
    DEFERRALS,
    ROUTED_NAMES,
    UNROUTED,
)
from financing.application.codec import nested_too_deep
from financing.application.errors import Unavailable
from financing.application.grace import finish_on_cancel, stop_if_asked
from financing.application.ports import (
    CORRELATION_HEADER,
    REQUEUED_AT_HEADER,
    usable_correlation_id,
)
from financing.application.retry import Abandoned, Outages, RetryPolicy, retry
from financing.domain.ids import parse_id
from financing.logging import get_logger

log = get_logger(__name__)

REASON_HEADER = "x-death-reason"
SOURCE_QUEUE_HEADER = "x-source-queue"
DEAD_LETTERED_AT_HEADER = "x-dead-lettered-at"
# On a dead letter that is not the message refused, what its copy changed ("; "
# between): a header that was no string, or not UTF-8, or too long, kept as text, or
# left out; a header's name or a property the broker's client could not read; a
# message id it had to be given, the message having none (the AMQP client gives every
# publish one). Requeued, such a copy would be judged as a message its publisher never
# sent, and processed under an id it never gave: it is not requeued.
CHANGED_HEADER = "x-dead-letter-changed"
NO_MESSAGE_ID = "no message id"
DEAD_LETTER_HEADERS = frozenset(
    {REASON_HEADER, SOURCE_QUEUE_HEADER, DEAD_LETTERED_AT_HEADER, CHANGED_HEADER}
)
# When a deferred delivery was first deferred (ISO 8601, with its offset): shown to
# operators, and how long a copy of a release before 0.5.2 has waited.
DEFERRED_AT_HEADER = "x-deferred-at"
# How long a deferred delivery has waited is counted, not read off clocks that may
# disagree: measured from DEFERRED_AT_HEADER by the reading process's clock, a clock
# stepped forward 90 s (an NTP correction, a resumed virtual machine) or another
# instance's clock ahead dead-lettered every deferred bid at once. A copy carries the
# seconds its delivery had waited before it was put aside (DEFERRED_FOR_HEADER), how
# long it is put aside (DEFERRED_DELAY_HEADER), and when, by the host's monotonic clock
# with the host's boot id (DEFERRED_CLOCK_HEADER): a process of the same host (the same
# boot) measures how long the copy was really away, which is longer than its delay
# when it waited in the deferrals' queue behind a copy put aside for longer (the broker
# expires messages at the head of a queue only: counted by delays alone, bids deferred
# one after another waited 60 s of a 40 s wait); another host counts the delay.
DEFERRED_FOR_HEADER = "x-deferred-for"
DEFERRED_DELAY_HEADER = "x-deferred-delay"
DEFERRED_CLOCK_HEADER = "x-deferred-clock"
# On a copy put aside past its wait because it came back late (`came_back_late`): how
# long it had waited then. It may wait as long again (its one such pass), and a later
# return is not late.
DEFERRED_PAST_WAIT_HEADER = "x-deferred-past-wait"
# Why a copy waits (the aggregate it names that is missing): `financing trace` and
# `financing dead-letters` say it of a deferred message.
DEFERRED_REASON_HEADER = "x-deferred-reason"
DEFERRAL_HEADERS = frozenset(
    {
        DEFERRED_AT_HEADER,
        DEFERRED_FOR_HEADER,
        DEFERRED_DELAY_HEADER,
        DEFERRED_CLOCK_HEADER,
        DEFERRED_PAST_WAIT_HEADER,
        DEFERRED_REASON_HEADER,
    }
)

# Headers must fit in one frame; an exception text can be arbitrarily long.
MAX_REASON_CHARS = 2000
# The copy's headers are the original ones as text, which can be several times
# larger (a boolean becomes "true", a byte that is not UTF-8 three bytes): a copy
# whose header frame exceeds the broker's frame size makes it close the whole
# connection. Far below RabbitMQ's default frame size of 128 KiB.
MAX_HEADER_CHARS = 1024
MAX_COPIED_HEADERS_BYTES = 32 * 1024


class NotDeferrable(Exception):
    """A message that cannot be deferred (`DeadLetters.defer`), for the reason given."""


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    name: str
    source_queue: str
    reason: str
    headers: Mapping[str, str]  # the original headers, as strings
    body: bytes
    dead_lettered_at: str = field(default="")
    changed: tuple[str, ...] = ()  # what its copy changed (CHANGED_HEADER)

    @property
    def dead_lettered(self) -> datetime | None:
        """When it was dead-lettered; None when the header does not say (a time without
        its offset to UTC, which no service writes, says no moment either)."""
        try:
            at = datetime.fromisoformat(self.dead_lettered_at)
        except ValueError:
            return None
        return at if at.tzinfo is not None else None

    @property
    def aggregate_id(self) -> str:
        return self.headers.get(AGGREGATE_ID_HEADER, "")

    @property
    def concerned(self) -> tuple[str, ...]:
        """The aggregates the letter concerns: its `aggregateID` header (an event's) and
        every id its body names. A command carries no such header; its body names the
        aggregates it is about (a SellInvoice its invoice and its issuer)."""
        named = _ids_named(self.body)
        # As the service reads it (an uppercase, braced or `urn:uuid:` id is the same id).
        header = _as_id(self.aggregate_id)
        return named if not header or header in named else (header, *named)

    @property
    def correlation_id(self) -> str:
        """Its correlation: a message without one, or with one that cannot be kept, starts
        one of its own, its id (Envelope.correlation_id)."""
        value = self.headers.get(CORRELATION_HEADER)
        return value if usable_correlation_id(value) and value else self.message_id


@dataclass(frozen=True)
class Selection:
    """Which dead letters an operation applies to: those matching every criterion given."""

    source_queue: str | None = None
    message_id: str | None = None
    aggregate_id: str | None = None
    correlation_id: str | None = None
    # Dead-lettered at or after this time (a letter that does not say when matches).
    since: datetime | None = None

    def matches(self, letter: DeadLetter) -> bool:
        criteria = (
            (self.source_queue, letter.source_queue),
            (self.message_id, letter.message_id),
            (self.correlation_id, letter.correlation_id),
        )
        when = letter.dead_lettered
        if self.since is not None and when is not None and when < self.since:
            return False
        if self.aggregate_id is not None and _as_id(self.aggregate_id) not in letter.concerned:
            return False
        return all(wanted is None or wanted == actual for wanted, actual in criteria)


EVERY = Selection()


def _as_id(text: str) -> str:
    """An id as the service writes it (lower-case, hyphenated) when it is a UUID."""
    try:
        return str(parse_id(text))
    except ValueError:
        return text


def _ids_named(body: bytes) -> tuple[str, ...]:
    """Every UUID among the strings of a JSON body, at any depth, in order, once each."""
    try:
        text = body.decode()
        if nested_too_deep(text):
            return ()
        document = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
        return ()
    found: dict[str, None] = {}
    values = [document]
    while values:
        value = values.pop()
        if isinstance(value, dict):
            values.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            values.extend(reversed(value))
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                found[str(parse_id(value))] = None
    return tuple(found)


class DeadLetters:
    def __init__(self, publisher: Publisher, outages: Outages, policy: RetryPolicy) -> None:
        self._publisher = publisher
        self._outages = outages
        self._policy = policy
        self._declared = False

    async def send(
        self, message: AbstractIncomingMessage, *, reason: str, source_queue: str
    ) -> None:
        """Keep a copy of `message` with its reason; raises PublishFailed if not confirmed.

        The caller acks the original only after this returned.
        """
        if not self._declared:
            await self._publisher.declare_queue(DEAD_LETTERS)
            self._declared = True
        copy = dead_letter_of(message, reason=reason, source_queue=source_queue)
        # A queue deleted meanwhile is declared again as the publish meets it.
        await self._publisher.keep_dead_letter(copy)
        metrics.DEAD_LETTERS.labels(source_queue).inc()

    async def keep(
        self, message: AbstractIncomingMessage, *, reason: str, source_queue: str
    ) -> bool:
        """`send`, retried while the broker cannot take it; whether the copy is kept.

        True: confirmed, the caller acks the original. False: the original's
        channel closed first, so it cannot be acked; the broker delivers it
        again and it is dead-lettered then. A bug gives up (GaveUp).
        """
        return await self._persisted(
            message,
            "dead-lettering",
            lambda: self.send(message, reason=reason, source_queue=source_queue),
        )

    async def defer(
        self,
        message: AbstractIncomingMessage,
        *,
        source_queue: str,
        delay: float,
        past_wait_from: float | None = None,
        reason: str = "",
    ) -> bool:
        """Put a copy of `message` aside for `delay` seconds, after which the broker
        hands it back to `source_queue`; retried as `keep` is, and what it returns
        means the same.

        The copy keeps the original's headers and properties; DEFERRED_AT_HEADER says
        when it was first deferred, DEFERRED_REASON_HEADER why it waits (`reason`), the
        other DEFERRAL_HEADERS how long it has waited (`deferred_for`). The broker's own
        headers (its records of the expirations among them) are left out. NotDeferrable when the
        headers are too large to be sure the copy fits in a frame (a copy that does not
        makes the broker close the whole connection): dead-letter it instead."""
        headers = {
            key: value
            for key, value in (message.headers or {}).items()
            if key not in BROKER_HEADERS
        }
        size = sum(_header_bytes(key, header_text(value)) for key, value in headers.items())
        if size > MAX_COPIED_HEADERS_BYTES:
            raise NotDeferrable(
                f"its headers ({size} bytes) are too large to be copied whole"
                f" (at most {MAX_COPIED_HEADERS_BYTES})"
            )
        waited = deferred_for(message)
        if waited == 0.0:
            headers[DEFERRED_AT_HEADER] = datetime.now(UTC).isoformat()
        headers[DEFERRED_FOR_HEADER] = f"{waited:.3f}"
        headers[DEFERRED_DELAY_HEADER] = f"{delay:.3f}"
        if past_wait_from is not None:  # its one pass past its wait (`came_back_late`)
            headers[DEFERRED_PAST_WAIT_HEADER] = f"{past_wait_from:.3f}"
        headers.pop(DEFERRED_CLOCK_HEADER, None)  # an earlier copy's
        if reason:
            headers[DEFERRED_REASON_HEADER] = shortened(reason, MAX_HEADER_CHARS)
        if (clock := _host_clock()) is not None:
            headers[DEFERRED_CLOCK_HEADER] = clock
        copy = whole_copy_of(message, headers, expiration=delay)
        return await self._persisted(
            message, "deferring", lambda: self._publisher.defer(copy, source_queue)
        )

    async def _persisted(
        self,
        message: AbstractIncomingMessage,
        what: str,
        publish: Callable[[], Awaitable[None]],
    ) -> bool:
        try:
            await retry(
                publish,
                policy=self._policy,
                outages=self._outages,
                what=what,
                wanted=lambda: delivery_channel_open(message),
            )
        except Abandoned:
            return False
        return True


def deferred_for(message: AbstractIncomingMessage) -> float:
    """Seconds `message` has waited, deferred: what it had waited when its copy was put
    aside, and how long the copy was away (measured on the same host, else its delay);
    a copy of a release before 0.5.2: since DEFERRED_AT_HEADER. 0.0 if it never was
    deferred, or if the headers are not what the service writes (a foreign one's)."""
    headers = message.headers or {}
    if DEFERRED_FOR_HEADER in headers and DEFERRED_AT_HEADER in headers:
        # Written together, always: a count without its stamp is a requeued copy's that
        # a release before 0.5.2 left (it leaves out the stamp alone), and it waits anew.
        before = _seconds(headers.get(DEFERRED_FOR_HEADER))
        delay = _seconds(headers.get(DEFERRED_DELAY_HEADER))
        if before is None or delay is None:
            return 0.0
        away = _away_since(headers.get(DEFERRED_CLOCK_HEADER))
        return before + (delay if away is None else away)
    value = headers.get(DEFERRED_AT_HEADER)
    if value is None:  # most deliveries: asked of each one
        return 0.0
    try:
        since = datetime.fromisoformat(header_text(value))
    except ValueError:
        return 0.0
    if since.tzinfo is None:
        return 0.0
    return max((datetime.now(UTC) - since).total_seconds(), 0.0)


# How much later than its delay a deferred copy may come back and still count as back on
# time: the deferrals' queue hands a copy back only once those ahead of it expired (at
# most retry.MAX_DEFERRAL_DELAY later), and its own queue may hold it a moment.
LATE_BY = 10.0


def came_back_late(message: AbstractIncomingMessage) -> bool:
    """Whether `message`, back from a deferral, came back more than LATE_BY seconds after
    its delay, as measured on the host that deferred it: the service was stopped, or its
    queue's backlog held it, meanwhile. A copy of a release before 0.5.2, whose time
    away cannot be told, counts as late. Never a copy that had its pass past its wait
    (`past_wait_from`): under a backlog every return is late, and a flood of messages
    naming aggregates that never come went round for ever."""
    headers = message.headers or {}
    if past_wait_from(message) is not None:
        return False
    if DEFERRED_FOR_HEADER in headers and DEFERRED_AT_HEADER in headers:
        delay = _seconds(headers.get(DEFERRED_DELAY_HEADER))
        away = _away_since(headers.get(DEFERRED_CLOCK_HEADER))
        return delay is not None and away is not None and away > delay + LATE_BY
    return DEFERRED_AT_HEADER in headers


def past_wait_from(message: AbstractIncomingMessage) -> float | None:
    """How long `message` had waited when its pass past its wait began (it came back
    late: `came_back_late`); None if it had none. Read only on a copy this release
    deferred: one a release before 0.5.6 requeued keeps the header it does not know."""
    headers = message.headers or {}
    if DEFERRED_AT_HEADER not in headers:
        return None
    return _seconds(headers.get(DEFERRED_PAST_WAIT_HEADER))


def _seconds(value: object) -> float | None:
    """A count of seconds the service wrote (finite, not negative), else None."""
    if value is None:
        return None
    try:
        seconds = float(header_text(value))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0.0 else None


_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@functools.cache
def _boot_id() -> str | None:
    """This host's boot id: processes of the same boot share one monotonic clock."""
    try:
        with open(_BOOT_ID, encoding="ascii") as file:
            return file.read().strip() or None
    except OSError:
        return None


def _host_clock() -> str | None:
    """DEFERRED_CLOCK_HEADER's value now: the boot id and the monotonic clock."""
    boot = _boot_id()
    return None if boot is None else f"{boot} {time.monotonic():.3f}"


def _away_since(value: object) -> float | None:
    """Seconds since DEFERRED_CLOCK_HEADER's `value` was written, if it was written on
    this host since its boot; else None."""
    if value is None:
        return None
    boot, _, then = header_text(value).partition(" ")
    at = _seconds(then)
    if at is None or boot != _boot_id():
        return None
    return max(time.monotonic() - at, 0.0)


def copy_of(
    message: AbstractIncomingMessage, headers: Mapping[str, Any], **properties: Any
) -> aio_pika.Message:
    """A persistent copy of `message` under `headers`: its body, message id, content type
    and encoding, and correlation id, with `properties` added or put instead."""
    kept = {
        "message_id": message.message_id,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "correlation_id": message.correlation_id,
    }
    return aio_pika.Message(
        body=bytes(message.body),
        headers=dict(headers),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **(kept | properties),
    )


def dead_letter_of(
    message: AbstractIncomingMessage, *, reason: str, source_queue: str
) -> aio_pika.Message:
    """The copy of `message` kept as its dead letter: its headers as strings, bounded,
    with the reason, the queue it came from and when, and what the copy changed."""
    headers, changed, left_out = _copied_headers(message.headers or {})
    if left_out:
        reason = f"{reason} [{left_out} header(s) too large to keep were left out]"
        changed.append(f"{left_out} header(s) left out")
    if (flaw := undecodable(message)) is not None:
        changed.append(flaw)
    message_id = message.message_id or headers.get(MESSAGE_UUID_HEADER)
    if not message_id:
        changed.insert(0, NO_MESSAGE_ID)
    if changed:
        headers[CHANGED_HEADER] = shortened("; ".join(changed), MAX_REASON_CHARS)
    headers[REASON_HEADER] = shortened(reason, MAX_REASON_CHARS)
    headers[SOURCE_QUEUE_HEADER] = source_queue
    headers[DEAD_LETTERED_AT_HEADER] = datetime.now(UTC).isoformat()
    if message_id and len(message_id.encode()) > MAX_MESSAGE_ID_BYTES:
        message_id = None  # too long for the AMQP message-id property: the header keeps it
    return copy_of(message, headers, message_id=message_id)


def whole_copy_of(
    message: AbstractIncomingMessage, headers: Mapping[str, Any], **properties: Any
) -> aio_pika.Message:
    """`copy_of` with every property of `message` but `user_id`, which the broker checks
    against the publishing connection's user (a producer's other user would have the
    copy refused)."""
    return copy_of(
        message,
        headers,
        **{
            "reply_to": message.reply_to,
            "type": message.type,
            "app_id": message.app_id,
            "timestamp": message.timestamp,
            "priority": message.priority,
            **properties,
        },
    )


def _header_bytes(key: str, text: str) -> int:
    """What a string header takes in a frame: key (short string), type octet, length, text."""
    return 1 + len(key.encode()) + 1 + 4 + len(text.encode())


def _copied_headers(original: Mapping[str, Any]) -> tuple[dict[str, str], list[str], int]:
    """The original headers as strings, bounded in size; what changed of the publisher's
    (the broker's own are no strings and not carried: BROKER_HEADERS); and how many were
    left out.

    The headers that identify the message come first, so they are the last to go.
    """
    keys = [key for key in CORE_HEADERS if key in original]
    keys += [key for key in original if key not in CORE_HEADERS]
    copied: dict[str, str] = {}
    changed: list[str] = []
    size = 0
    left_out = 0
    for key in keys:
        if key in DEAD_LETTER_HEADERS:
            continue
        value = original[key]
        whole = header_text(value)
        text = shortened(whole, MAX_HEADER_CHARS)
        entry = _header_bytes(key, text)
        if size + entry > MAX_COPIED_HEADERS_BYTES:
            left_out += 1
            continue
        copied[key] = text
        size += entry
        if key in BROKER_HEADERS:
            continue
        if header_string(value) is None:
            changed.append(f"header {key!r} kept as text")
        elif text != whole:
            changed.append(f"header {key!r} cut to {MAX_HEADER_CHARS} characters")
    return copied, changed, left_out


def _is_dead_letter_header(key: str) -> bool:
    # `x-death` (and any `x-death-*`) is the broker's own dead-lettering record.
    return key in DEAD_LETTER_HEADERS or key == "x-death" or key.startswith("x-death-")


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    raw = message.headers or {}
    headers = {
        key: header_text(value) for key, value in raw.items() if not _is_dead_letter_header(key)
    }
    changed = header_text(raw.get(CHANGED_HEADER, ""))
    changes = tuple(changed.split("; ")) if changed else ()
    # The message id the copy was given for the publish is not the message's.
    given = None if NO_MESSAGE_ID in changes else message.message_id
    return DeadLetter(
        message_id=headers.get(MESSAGE_UUID_HEADER) or given or "",
        name=headers.get(NAME_HEADER, ""),
        source_queue=header_text(raw.get(SOURCE_QUEUE_HEADER, "")),
        reason=header_text(raw.get(REASON_HEADER, "")),
        headers=headers,
        body=bytes(message.body),
        dead_lettered_at=header_text(raw.get(DEAD_LETTERED_AT_HEADER, "")),
        changed=changes,
    )


@contextlib.asynccontextmanager
async def _dead_letter_queue(broker: Broker) -> AsyncIterator[AbstractQueue | None]:
    """The dead-letter queue, None when the broker has none yet, read by this command
    alone (`_read_alone`). Declared passively: reading the letters creates nothing, so
    an operator's command run before the service's first start cannot give the queue a
    type the service's FINANCING_QUEUE_TYPE would then refuse, and needs no queue type
    of its own."""
    async with _read_alone(broker), existing_queue(broker, DEAD_LETTER_QUEUE) as queue:
        yield queue


# An exclusive queue held while a command reads the dead letters: the broker lets one
# connection at a time declare it, and deletes it when that connection goes.
READER = "financing_dead_letters_reader"
# How long a command waits for another one reading the dead letters to be done, asking
# again every READER_POLL seconds.
READER_WAIT = 30.0
READER_POLL = 0.2


class ReaderBusy(Unavailable):
    """The dead letters are being read by another command: the broker answers, and the
    same command succeeds once that one is done (said as such, not as an outage)."""

    def __str__(self) -> str:
        return self.detail


@contextlib.asynccontextmanager
async def _read_alone(broker: Broker) -> AsyncIterator[None]:
    """While one command reads the dead letters, another cannot: a letter fetched is held
    unacked by its reader until it is done, so a second reader would not see it (a
    `discard --all` would leave it, a `list` or `status` miss it). Waits READER_WAIT for
    another reader, then raises Unavailable."""
    deadline = time.monotonic() + READER_WAIT
    while True:
        channel = await broker.channel()
        try:
            with translated():
                try:
                    await channel.declare_queue(READER, exclusive=True, auto_delete=True)
                    break
                except aiormq.exceptions.ChannelLockedResource:
                    pass
        except BaseException:
            await close_channel(channel)
            raise
        await close_channel(channel)
        if time.monotonic() > deadline:
            raise ReaderBusy(
                BROKER,
                "another command (dead-letters list, requeue or discard, or trace) has been"
                f" reading the dead letters for {READER_WAIT:.0f} s; try again once it is done",
            )
        await asyncio.sleep(READER_POLL)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # gone with the connection anyway
            await channel.queue_delete(READER)
        await close_channel(channel)


async def being_read(broker: Broker) -> bool:
    """Whether a command is reading the dead letters now: those it fetched are held by it,
    and not counted in the queue's depth."""
    channel = await broker.channel()
    try:
        with translated():
            try:
                await channel.declare_queue(READER, passive=True)
            except aiormq.exceptions.ChannelLockedResource:
                return True
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
        return True
    finally:
        await close_channel(channel)


async def _fetched(
    queue: AbstractQueue | None,
    read: Callable[[AbstractIncomingMessage], DeadLetter] | None = None,
) -> AsyncGenerator[tuple[AbstractIncomingMessage, DeadLetter], None]:
    """The letters of `queue` there when it was declared, oldest first, each fetched
    without being acked (and `read` as a dead letter, unless told otherwise).

    Those that arrive meanwhile wait for the next command: read too, a storm of dead
    letters kept a command reading (holding every letter, the other operators locked
    out) for as long as the storm lasted."""
    at_most = 0 if queue is None else queue.declaration_result.message_count or 0
    fetched = 0
    while queue is not None and fetched < at_most:
        stop_if_asked()
        with translated():
            message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return
        fetched += 1
        yield message, (read or _dead_letter)(message)


@dataclass
class Listing:
    """The dead letters a list found, how many waited in the queue in all, and whether
    every one of them was looked at (not when the list stopped at its limit)."""

    letters: list[DeadLetter]
    waiting: int
    complete: bool
    # The most times a letter read was given back to a quorum queue before
    # (`x-delivery-count`): each read counts against its delivery limit.
    most_given_back: int = 0


async def list_dead_letters(
    broker: Broker, limit: int = 100, *, selection: Selection = EVERY
) -> list[DeadLetter]:
    """The oldest `limit` dead letters `selection` matches; the queue is left unchanged."""
    return (await dead_letters_listed(broker, limit, selection=selection)).letters


async def dead_letters_listed(
    broker: Broker, limit: int = 100, *, selection: Selection = EVERY
) -> Listing:
    """`list_dead_letters`, saying how many wait and whether the list is all of them."""
    listing = Listing([], 0, complete=True)
    async with _dead_letter_queue(broker) as queue, contextlib.aclosing(_fetched(queue)) as found:
        listing.waiting = 0 if queue is None else queue.declaration_result.message_count or 0
        async for message, letter in found:
            if len(listing.letters) >= limit:
                listing.complete = False
                break
            count = (message.headers or {}).get(DELIVERY_COUNT_HEADER)
            if isinstance(count, int):
                listing.most_given_back = max(listing.most_given_back, count)
            if selection.matches(letter):
                listing.letters.append(letter)
    return listing


@dataclass
class Taken:
    """What an operation on dead letters did so far: how many it took (requeued or
    discarded), and how many it left, by reason. Kept up to date as it goes, so that
    one stopped part way can say what it did, and which letter it had in hand when it
    was cut off (`in_hand`: acted on, its ack not yet answered)."""

    count: int = 0
    left: Counter[str] = field(default_factory=Counter)
    in_hand: DeadLetter | None = None
    # The last letter acked: AMQP answers no ack, so one written as the connection was
    # lost may not have reached the broker, the letter still waiting (counted taken).
    last_acked: DeadLetter | None = None


# Where a message's dead letter cannot be requeued to: `financing_unrouted`'s consumer
# dead-letters what it cannot read and ignores the rest, so a requeued copy (its headers
# kept as text) would be ignored, lost. One whose name the service routes is routed
# again through `financing_events` instead (`Publisher.route_again`).
NOT_REQUEUEABLE = frozenset({UNROUTED})


async def list_deferred(broker: Broker, *, selection: Selection = EVERY) -> list[DeadLetter]:
    """The messages waiting in `financing_deferred` that `selection` matches, oldest first,
    each as a DeadLetter whose source queue is the one it goes back to, whose time is
    when it was first deferred, and whose reason is why it waits; the queue is left unchanged
    (each is fetched without being acked, and returned when the channel closes)."""
    deferred: list[DeadLetter] = []
    async with (
        existing_queue(broker, DEFERRALS) as queue,
        contextlib.aclosing(_fetched(queue, read=_waiting_in_deferrals)) as found,
    ):
        async for _, message in found:
            if selection.matches(message):
                deferred.append(message)
    return deferred


def _waiting_in_deferrals(message: AbstractIncomingMessage) -> DeadLetter:
    raw = message.headers or {}
    headers = {key: header_text(value) for key, value in raw.items() if key not in BROKER_HEADERS}
    return DeadLetter(
        message_id=headers.get(MESSAGE_UUID_HEADER) or message.message_id or "",
        name=headers.get(NAME_HEADER, ""),
        source_queue=message.routing_key or "",
        reason=headers.get(DEFERRED_REASON_HEADER, ""),
        headers=headers,
        body=bytes(message.body),
        dead_lettered_at=headers.get(DEFERRED_AT_HEADER, ""),
    )


async def requeue_dead_letters(
    broker: Broker,
    *,
    selection: Selection = EVERY,
    taken: Taken | None = None,
    too_old: Callable[[DeadLetter], str | None] = lambda letter: None,
) -> Taken:
    """Send the dead letters `selection` matches back to their source queue (those of
    `financing_unrouted` whose name the service routes: through `financing_events`).

    Each is republished (confirmed) with its original headers, then acked in
    the dead-letter queue; the ones that do not match stay where they are, and
    so do the ones whose source queue the broker no longer has (republished,
    they would be unroutable and dropped), that cannot be requeued at all
    (NOT_REQUEUEABLE) or that `too_old` gives a reason to leave: `Taken.left` says how
    many, and why.
    """
    taken = taken or Taken()
    publisher = Publisher(broker, keeps_topology=False)
    queues: dict[str, bool] = {}  # source queue: whether the broker has it

    async def requeue(message: AbstractIncomingMessage, letter: DeadLetter) -> str | None:
        queue = letter.source_queue
        if not queue:
            return "no source queue is named"
        if letter.changed:
            return (
                "their copies are not the messages refused (headers kept as text, or a"
                " message id given to them: `list` says what): requeued,"
                " they would be processed as messages their publishers never sent; their"
                " publishers must send them again"
            )
        if (old := too_old(letter)) is not None:
            return old
        if queue in NOT_REQUEUEABLE:
            if letter.name not in ROUTED_NAMES:
                return f"from {queue!r}, which routes a requeued message nowhere"
            await publisher.route_again(_requeued(message, letter))
            return None
        if queue not in queues:
            queues[queue] = await queue_exists(broker, queue)
        if not queues[queue]:
            return f"their queue {queue!r} does not exist"
        await publisher.send_message_to_queue(queue, _requeued(message, letter))
        return None

    try:
        await _take(broker, selection.matches, requeue, taken)
    finally:
        await publisher.close()
    return taken


def _requeued(message: AbstractIncomingMessage, letter: DeadLetter) -> aio_pika.Message:
    """The copy of a dead letter's message that is requeued: it may wait for its
    aggregate again as long as a new message may, and a rule that refused it judges it
    again (REQUEUED_AT_HEADER)."""
    headers = {k: v for k, v in letter.headers.items() if k not in DEFERRAL_HEADERS}
    headers[REQUEUED_AT_HEADER] = datetime.now(UTC).isoformat()
    return copy_of(message, headers)


async def discard_dead_letters(
    broker: Broker, *, selection: Selection = EVERY, taken: Taken | None = None
) -> Taken:
    """Remove the dead letters `selection` matches for good."""
    taken = taken or Taken()

    async def discard(message: AbstractIncomingMessage, letter: DeadLetter) -> str | None:
        return None  # acking it is all

    await _take(broker, selection.matches, discard, taken)
    return taken


async def _take(
    broker: Broker,
    wanted: Callable[[DeadLetter], bool],
    act: Callable[[AbstractIncomingMessage, DeadLetter], Awaitable[str | None]],
    taken: Taken,
) -> None:
    """`act` on every wanted letter, then ack it, unless `act` gives a reason to leave it.

    Only the letters there when it starts (`_fetched`): ones dead-lettered meanwhile (a
    requeued message failing again) wait for the next run. Cancelled part way,
    the letter in hand is finished first (`finish_on_cancel`): a requeued copy
    whose letter stayed would be a second copy of the message.
    """
    async with (
        _dead_letter_queue(broker) as queue,
        contextlib.aclosing(_fetched(queue)) as found,
    ):
        async for message, letter in found:
            if not wanted(letter):
                continue
            stop_if_asked()  # before the letter is taken in hand, not once it is
            await finish_on_cancel(_settled(message, letter, act, taken))


async def _settled(
    message: AbstractIncomingMessage,
    letter: DeadLetter,
    act: Callable[[AbstractIncomingMessage, DeadLetter], Awaitable[str | None]],
    taken: Taken,
) -> None:
    # In hand until its ack is answered: cut off before (the broker's connection lost),
    # a requeued copy may have been queued and its letter still wait, a discarded one
    # still wait or be gone. Said, the operator knows which letter went twice.
    taken.in_hand = letter
    left = await act(message, letter)
    if left is not None:
        taken.left[left] += 1
    else:
        with translated():
            await message.ack()
        taken.count += 1
        taken.last_acked = letter
    taken.in_hand = None
