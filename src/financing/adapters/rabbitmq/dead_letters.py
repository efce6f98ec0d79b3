"""Dead letters: messages that cannot be processed, kept with their reason.

A message is dead-lettered by publishing a copy (confirmed) to our own durable
queue with the reason and the source queue as string headers, and only then
acking the original (docs/contract.md section 2, "Queue arguments"): no queue
arguments are needed on the reference's queues, and the reason is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.connection import Broker, close_channel, translated
from financing.adapters.rabbitmq.envelopes import (
    CORE_HEADERS,
    MAX_MESSAGE_ID_BYTES,
    MESSAGE_UUID_HEADER,
    NAME_HEADER,
    delivery_channel_open,
    header_text,
)
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology import DEAD_LETTER_QUEUE, DEAD_LETTERS
from financing.application.retry import Abandoned, Outages, RetryPolicy, retry
from financing.logging import get_logger

log = get_logger(__name__)

REASON_HEADER = "x-death-reason"
SOURCE_QUEUE_HEADER = "x-source-queue"
DEAD_LETTERED_AT_HEADER = "x-dead-lettered-at"
DEAD_LETTER_HEADERS = frozenset({REASON_HEADER, SOURCE_QUEUE_HEADER, DEAD_LETTERED_AT_HEADER})

# Headers must fit in one frame; an exception text can be arbitrarily long.
MAX_REASON_CHARS = 2000
# The copy's headers are the original ones as text, which can be several times
# larger (a boolean becomes "true", a byte that is not UTF-8 three bytes): a copy
# whose header frame exceeds the broker's frame size makes it close the whole
# connection. Far below RabbitMQ's default frame size of 128 KiB.
MAX_HEADER_CHARS = 1024
MAX_COPIED_HEADERS_BYTES = 32 * 1024


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    name: str
    source_queue: str
    reason: str
    headers: Mapping[str, str]  # the original headers, as strings
    body: bytes
    dead_lettered_at: str = field(default="")


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
            await self._publisher.declare_command_queue(DEAD_LETTER_QUEUE)
            self._declared = True
        headers, left_out = _copied_headers(message.headers or {})
        if left_out:
            reason = f"{reason} [{left_out} header(s) too large to keep were left out]"
        headers[REASON_HEADER] = _shortened(reason, MAX_REASON_CHARS)
        headers[SOURCE_QUEUE_HEADER] = source_queue
        headers[DEAD_LETTERED_AT_HEADER] = datetime.now(UTC).isoformat()
        message_id = message.message_id or headers.get(MESSAGE_UUID_HEADER)
        if message_id and len(message_id.encode()) > MAX_MESSAGE_ID_BYTES:
            message_id = None  # too long for the AMQP message-id property: the header keeps it
        copy = aio_pika.Message(
            body=bytes(message.body),
            headers=dict(headers),
            message_id=message_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._publisher.send_message_to_queue(DEAD_LETTER_QUEUE, copy)

    async def keep(
        self, message: AbstractIncomingMessage, *, reason: str, source_queue: str
    ) -> bool:
        """`send`, retried while the broker cannot take it; whether the copy is kept.

        True: confirmed, the caller acks the original. False: the original's
        channel closed first, so it cannot be acked; the broker delivers it
        again and it is dead-lettered then. A bug gives up (GaveUp).
        """
        try:
            await retry(
                lambda: self.send(message, reason=reason, source_queue=source_queue),
                policy=self._policy,
                outages=self._outages,
                what="dead-lettering",
                wanted=lambda: delivery_channel_open(message),
            )
        except Abandoned:
            return False
        return True


def _copied_headers(original: Mapping[str, Any]) -> tuple[dict[str, str], int]:
    """The original headers as strings, bounded in size; and how many were left out.

    The headers that identify the message come first, so they are the last to go.
    """
    keys = [key for key in CORE_HEADERS if key in original]
    keys += [key for key in original if key not in CORE_HEADERS]
    copied: dict[str, str] = {}
    size = 0
    left_out = 0
    for key in keys:
        if key in DEAD_LETTER_HEADERS:
            continue
        text = _shortened(header_text(original[key]), MAX_HEADER_CHARS)
        # key (short string) + type octet + length + UTF-8 text
        entry = 1 + len(key.encode()) + 1 + 4 + len(text.encode())
        if size + entry > MAX_COPIED_HEADERS_BYTES:
            left_out += 1
            continue
        copied[key] = text
        size += entry
    return copied, left_out


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_dead_letter_header(key: str) -> bool:
    # `x-death` (and any `x-death-*`) is the broker's own dead-lettering record.
    return key in DEAD_LETTER_HEADERS or key == "x-death" or key.startswith("x-death-")


def _dead_letter(message: AbstractIncomingMessage) -> DeadLetter:
    raw = message.headers or {}
    headers = {
        key: header_text(value) for key, value in raw.items() if not _is_dead_letter_header(key)
    }
    return DeadLetter(
        message_id=headers.get(MESSAGE_UUID_HEADER) or message.message_id or "",
        name=headers.get(NAME_HEADER, ""),
        source_queue=header_text(raw.get(SOURCE_QUEUE_HEADER, "")),
        reason=header_text(raw.get(REASON_HEADER, "")),
        headers=headers,
        body=bytes(message.body),
        dead_lettered_at=header_text(raw.get(DEAD_LETTERED_AT_HEADER, "")),
    )


async def list_dead_letters(broker: Broker, limit: int = 100) -> list[DeadLetter]:
    """The oldest `limit` dead letters, oldest first; the queue is left unchanged.

    Each is fetched without being acked; closing the channel returns every
    one of them to the queue in its original position.
    """
    letters: list[DeadLetter] = []
    channel = await broker.channel()
    try:
        queue = await DEAD_LETTERS.declare(channel)
        while len(letters) < limit:
            with translated():
                message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letters.append(_dead_letter(message))
    finally:
        await close_channel(channel)
    return letters


async def requeue_dead_letters(
    broker: Broker,
    *,
    source_queue: str | None = None,
    message_id: str | None = None,
) -> int:
    """Send matching dead letters back to their source queue; returns how many.

    Each is republished (confirmed) with its original headers, then acked in
    the dead-letter queue; the ones that do not match stay where they are.
    """
    requeued = 0
    publisher = Publisher(broker)
    channel = await broker.channel()
    try:
        queue = await DEAD_LETTERS.declare(channel)
        # Only what is there now: letters added meanwhile wait for the next run.
        waiting = queue.declaration_result.message_count or 0
        for _ in range(waiting):
            with translated():
                message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = _dead_letter(message)
            if not letter.source_queue:
                continue
            if source_queue is not None and letter.source_queue != source_queue:
                continue
            if message_id is not None and letter.message_id != message_id:
                continue
            original = aio_pika.Message(
                body=letter.body,
                headers=dict(letter.headers),
                message_id=message.message_id,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await publisher.send_message_to_queue(letter.source_queue, original)
            with translated():
                await message.ack()
            requeued += 1
    finally:
        # Letters fetched but not requeued go back to the queue, in place.
        await close_channel(channel)
        await publisher.close()
    return requeued
