"""The suite's side of RabbitMQ: what it observes on the bus and what it publishes there.

An `EventLog` records every message the service puts on the `events` exchange
(through a queue of the suite's own, bound before the service starts), a
`MessageLog` every dead letter. Both are waited on with deadlines, never with
bare sleeps. `Broker` publishes integration events, domain events and raw
messages as another context (or a misbehaving one) would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
)

from tests.support import infra

EVENTS_EXCHANGE = "events"
DEAD_LETTER_QUEUE = "financing_dead_letters"
MESSAGE_UUID = "_watermill_message_uuid"
NAME = "name"
AGGREGATE_ID = "aggregateID"
DEATH_REASON = "x-death-reason"
SOURCE_QUEUE = "x-source-queue"

# Long enough for a saga of three hops on a slow machine; scenarios take well under a second.
DEFAULT_TIMEOUT = 20.0
# A message naming an aggregate that does not exist waits FINANCING_AGGREGATE_WAIT for it
# (2 s in the deployments the tests start, a minute by default in one they are pointed at)
# before it is dead-lettered.
DEAD_LETTER_TIMEOUT = 90.0


def parse_json(body: bytes) -> Any:
    """JSON with every number as an exact Decimal: 0.1 stays 0.1, a string stays a string."""
    return json.loads(body, parse_float=Decimal, parse_int=Decimal)


@dataclass(frozen=True)
class Observed:
    """One message as it arrived: headers exactly as decoded, body raw and parsed."""

    seq: int
    queue: str
    headers: Mapping[str, Any]
    body: bytes
    data: Any  # the parsed JSON body, or None when it is not JSON
    delivery_mode: int | None
    redelivered: bool

    @property
    def name(self) -> str | None:
        return _text(self.headers.get(NAME))

    @property
    def message_id(self) -> str | None:
        return _text(self.headers.get(MESSAGE_UUID))

    @property
    def aggregate_id(self) -> str | None:
        return _text(self.headers.get(AGGREGATE_ID))

    @property
    def reason(self) -> str | None:
        return _text(self.headers.get(DEATH_REASON))

    @property
    def source_queue(self) -> str | None:
        return _text(self.headers.get(SOURCE_QUEUE))

    def describe(self) -> str:
        shown = self.body.decode("utf-8", "replace")
        return f"#{self.seq} {self.name} aggregateID={self.aggregate_id} body={shown}"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


Match = Callable[[Observed], bool]


class MessageLog:
    """Messages in arrival order, and waiting for some of them to arrive."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.messages: list[Observed] = []

    def mark(self) -> int:
        """A position: `since=mark` looks only at what arrives afterwards."""
        return len(self.messages)

    def record(self, message: AbstractIncomingMessage, queue: str) -> Observed:
        body = bytes(message.body)
        try:
            data = parse_json(body)
        except ValueError:
            data = None
        observed = Observed(
            seq=len(self.messages),
            queue=queue,
            headers=dict(message.headers or {}),
            body=body,
            data=data,
            delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
            redelivered=bool(message.redelivered),
        )
        self.messages.append(observed)
        return observed

    def view(self, since: int = 0) -> list[Observed]:
        return self.messages[since:]

    def select(self, match: Match, since: int = 0) -> list[Observed]:
        return [m for m in self.view(since) if match(m)]

    async def wait_for(
        self,
        match: Match | Sequence[Match],
        *,
        since: int = 0,
        count: int = 1,
        within: float = DEFAULT_TIMEOUT,
    ) -> list[Observed]:
        """Wait (at most `within` seconds) until the messages arrived; return them in order.

        With one predicate: every message matching it, once at least `count`
        did. With a list: one distinct message per predicate (each predicate
        takes the earliest message not taken by an earlier one).
        """
        if callable(match):
            single = match

            async def probe() -> list[Observed]:
                found = self.select(single, since)
                return found if len(found) >= count else []

        else:
            matches = list(match)

            async def probe() -> list[Observed]:
                return self._assign(matches, since)

        try:
            return await infra.wait_until(probe, timeout=within, what=f"{self.label} messages")
        except AssertionError:
            raise AssertionError(
                f"timed out after {within}s waiting for {self.label} messages;"
                f" arrived since #{since}:\n{self.render(since)}"
            ) from None

    def _assign(self, matches: Sequence[Match], since: int) -> list[Observed]:
        taken: dict[int, Observed] = {}
        for match in matches:
            found = next((m for m in self.view(since) if match(m) and m.seq not in taken), None)
            if found is None:
                return []
            taken[found.seq] = found
        return [taken[seq] for seq in sorted(taken)]

    def render(self, since: int = 0, limit: int = 60) -> str:
        shown = self.view(since)
        lines = [f"  {m.describe()}" for m in shown[-limit:]]
        if len(shown) > limit:
            lines.insert(0, f"  ... {len(shown) - limit} earlier")
        return "\n".join(lines) or "  (nothing)"


class EventLog(MessageLog):
    """Events seen on the `events` exchange, one per message id.

    Delivery is at least once, so the same message (same id) may arrive again
    after a restart or a redelivery: consumers deduplicate by id, and so does
    this view. `copies` keeps every arrival for the checks on the ids themselves.
    """

    def view(self, since: int = 0) -> list[Observed]:
        seen: set[str] = set()
        distinct: list[Observed] = []
        for message in self.messages:
            key = message.message_id
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            if message.seq >= since:
                distinct.append(message)
        return distinct

    def copies(self, message_id: str) -> list[Observed]:
        return [m for m in self.messages if m.message_id == message_id]

    def concerning(self, aggregate_ids: Iterable[str], since: int = 0) -> list[Observed]:
        ids = set(aggregate_ids)
        return self.select(lambda m: m.aggregate_id in ids, since)


class Broker:
    """A connection to the service's vhost, as other contexts and operators use it."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel

    @classmethod
    async def connect(cls, url: str) -> Broker:
        connection = await aio_pika.connect(url)
        # Confirms, and unroutable messages raise: a test never publishes into the void.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(connection, channel)

    async def close(self) -> None:
        await self.connection.close()

    async def declare_events_exchange(self) -> None:
        await self.channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )

    async def listen_to_events(self, queue_name: str) -> EventLog:
        """Bind a queue of the suite's own to `events`; it lives as long as this connection."""
        log = EventLog("events")
        queue = await self.channel.declare_queue(queue_name, exclusive=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key="")

        async def on_message(message: AbstractIncomingMessage) -> None:
            log.record(message, queue_name)
            await message.ack()

        await queue.consume(on_message)
        return log

    async def watch_dead_letters(self) -> MessageLog:
        """Observe the service's dead-letter queue without taking anything from it.

        Messages are never acked: closing the connection returns every one of
        them to the queue, so an operator's view of a deployment is unchanged.
        """
        log = MessageLog("dead letters")
        channel = await self.connection.channel()
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            log.record(message, DEAD_LETTER_QUEUE)

        await queue.consume(on_message, no_ack=False)
        return log

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any],
        *,
        delivery_mode: aio_pika.DeliveryMode = aio_pika.DeliveryMode.PERSISTENT,
    ) -> None:
        """A raw message, headers as given (a test may send a non-string one on purpose)."""
        message = aio_pika.Message(body=body, headers=dict(headers), delivery_mode=delivery_mode)
        target = (
            self.channel.default_exchange
            if exchange == ""
            else await self.channel.get_exchange(exchange, ensure=False)
        )
        await target.publish(message, routing_key=routing_key)

    async def publish_event(
        self,
        name: str,
        body: Mapping[str, Any] | bytes,
        *,
        message_id: str | None = None,
        aggregate_id: str | None = None,
        extra_headers: Mapping[str, Any] | None = None,
    ) -> str:
        """An event on `events` with watermill's headers, all strings; returns its message id."""
        message_id = message_id or str(uuid.uuid4())
        headers: dict[str, Any] = {MESSAGE_UUID: message_id, NAME: name}
        if aggregate_id is not None:
            headers[AGGREGATE_ID] = aggregate_id
        headers.update(extra_headers or {})
        await self.publish(EVENTS_EXCHANGE, "", _body(body), headers)
        return message_id

    async def send_command(
        self,
        name: str,
        body: Mapping[str, Any] | bytes,
        *,
        message_id: str | None = None,
        extra_headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A command on its queue (default exchange, routing key = queue name); its message id."""
        message_id = message_id or str(uuid.uuid4())
        headers: dict[str, Any] = {MESSAGE_UUID: message_id, NAME: name, **(extra_headers or {})}
        await self.publish("", name, _body(body), headers)
        return message_id

    async def republish(self, observed: Observed) -> None:
        """The very same message again on `events`, as a redelivery would bring it."""
        await self.publish(EVENTS_EXCHANGE, "", observed.body, observed.headers)


def _body(body: Mapping[str, Any] | bytes) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, default=_json_number).encode()


def _json_number(value: object) -> object:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
