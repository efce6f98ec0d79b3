"""Hostile messages, and watching what the service does with them.

`Hostile` is one message as a misbehaving publisher could send it (any body,
headers of any AMQP type) together with what the service must do with it:
the queues whose consumers must dead-letter it, or none when every consumer
acks and ignores it (an unknown name on `events`, docs/contract.md section 2).
`Observer` watches a deployment's vhost: every event on `events` and every
dead letter, which it takes from `financing_dead_letters` and acks so that the
queue stays short (or leaves there, for the operator's tools).
`tests.support.service.run_cli` runs the operator's CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.topology import PROJECTOR_QUEUE, UNROUTED, subscription
from financing.application import codec
from financing.application.messages import COMMAND_TYPES
from financing.application.read_models import PROJECTED_EVENTS
from financing.application.routes import INTEGRATION, POLICIES
from tests.acceptance.bus import Broker, EventLog, MessageLog, Observed
from tests.acceptance.driver import Financing, financing_for
from tests.acceptance.system import Address, System
from tests.faults.workload import Deployment
from tests.support import infra
from tests.support.rabbitmq import RawText, list_queues

EVENTS_EXCHANGE = "events"
DEAD_LETTER_QUEUE = "financing_dead_letters"
MESSAGE_UUID = "_watermill_message_uuid"
NAME = "name"
AGGREGATE_ID = "aggregateID"

COMMAND_QUEUES: tuple[str, ...] = tuple(command.name() for command in COMMAND_TYPES)
# The queue of each consumer of `events` other than the projector, by the name it handles.
HANDLER_QUEUES: dict[str, str] = {
    route.message_name: subscription(route.message_name).queue.name
    for route in (*POLICIES, *INTEGRATION)
}
EVENT_QUEUES: tuple[str, ...] = (*HANDLER_QUEUES.values(), PROJECTOR_QUEUE, UNROUTED)
CONSUMED_QUEUES: tuple[str, ...] = (*COMMAND_QUEUES, *EVENT_QUEUES)
# Every name an event consumer decodes.
EVENT_NAMES: tuple[str, ...] = tuple(sorted(set(HANDLER_QUEUES) | PROJECTED_EVENTS))

# Every hostile message carries this string header, so that its dead letters can
# be found even when its own message id is missing or mangled. Tables go on the
# wire sorted by key and a dead letter that cannot keep every header keeps the
# first ones: this name sorts before any lowercase one.
CASE_HEADER = "_hostile_case"


@dataclass
class Hostile:
    """One hostile message, where it goes, and the queues that must dead-letter it."""

    label: str
    body: bytes
    headers: dict[str, Any]
    queue: str | None = None  # a command queue; None: the `events` exchange
    case: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def name(self) -> Any:
        return self.headers.get(NAME)

    def expected_dead_letters(self) -> frozenset[str]:
        """The source queues of the dead letters this message must produce."""
        if self.queue is not None:
            # A command queue dead-letters anything it cannot process, its own
            # command malformed or another name misrouted to it.
            return frozenset({self.queue})
        name = readable(self.name)
        if name is None:
            # A name that is missing, empty or not a string routes to no consumer's queue:
            # the consumer of what routes nowhere dead-letters it, once.
            return frozenset({UNROUTED})
        return event_consumers_of(name)

    def describe(self) -> str:
        body = self.body[:120].decode("utf-8", "replace")
        more = f"... ({len(self.body)} bytes)" if len(self.body) > 120 else ""
        shown = [k for k in self.headers if k != CASE_HEADER]
        headers = {k: _preview(self.headers[k]) for k in shown[:8]}
        if len(shown) > 8:
            headers["..."] = f"{len(shown) - 8} more"
        target = f"queue {self.queue}" if self.queue else "exchange events"
        return f"[{self.label}] to {target}, headers {headers}, body {body!r}{more}"


def readable(value: Any) -> str | None:
    """The name a consumer reads from a `name` header value, None if it cannot read one."""
    if isinstance(value, RawText):
        try:
            value = value.raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and value else None


def event_consumers_of(name: str) -> frozenset[str]:
    """The queues whose consumers handle (and so decode) events of this name."""
    queues = set()
    if name in HANDLER_QUEUES:
        queues.add(HANDLER_QUEUES[name])
    if name in PROJECTED_EVENTS:
        queues.add(PROJECTOR_QUEUE)
    return frozenset(queues)


def headers_for(name: Any, *, aggregate_id: str | None = None) -> dict[str, Any]:
    headers: dict[str, Any] = {MESSAGE_UUID: str(uuid.uuid4()), NAME: name}
    if aggregate_id is not None:
        headers[AGGREGATE_ID] = aggregate_id
    return headers


def valid_body(name: str) -> dict[str, Any]:
    """A well-formed JSON body for a message of this name (ids fresh, amounts 10)."""
    spec = codec.REGISTRY[name]
    body: dict[str, Any] = {}
    for spec_field in spec.fields:
        if spec_field.key is None:
            continue
        if spec_field.kind == "uuid":
            body[spec_field.key] = str(uuid.uuid4())
        elif spec_field.kind == "money":
            body[spec_field.key] = 10
        elif spec_field.kind == "text":
            body[spec_field.key] = "hostile"
        else:
            body[spec_field.key] = {"InvestorID": str(uuid.uuid4()), "Amount": 10}
    return body


def needs_aggregate_id(name: str) -> bool:
    return any(f.key is None for f in codec.REGISTRY[name].fields)


def money_keys(name: str) -> list[str]:
    return [f.key for f in codec.REGISTRY[name].fields if f.key and f.kind in ("money", "bid")]


def to_json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode()


@dataclass
class Observer:
    """What a test sees of a deployment's broker."""

    broker: Broker
    events: EventLog
    dead_letters: MessageLog

    def system(self, target: Deployment) -> System:
        return System(
            command_address=Address(*target.command_address),
            query_address=Address(*target.query_address),
            metrics_address=Address(*target.metrics_address),
            amqp_url=target.amqp_url,
            broker=self.broker,
            events=self.events,
            dead_letters=self.dead_letters,
            service=None,
            env=target.service.env,
        )


def _record_unparsed(log: MessageLog, message: AbstractIncomingMessage, queue: str) -> Observed:
    observed = Observed(
        seq=len(log.messages),
        queue=queue,
        headers=dict(message.headers or {}),
        body=bytes(message.body),
        data=None,
        delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
        redelivered=bool(message.redelivered),
    )
    log.messages.append(observed)
    return observed


class _DeadLetterLog(MessageLog):
    """Also records bodies nested too deeply for the JSON parser, unparsed."""

    def record(self, message: AbstractIncomingMessage, queue: str) -> Observed:
        try:
            return super().record(message, queue)
        except RecursionError:
            return _record_unparsed(self, message, queue)


class _EventLog(EventLog):
    """Also records bodies nested too deeply for the JSON parser, unparsed."""

    def record(self, message: AbstractIncomingMessage, queue: str) -> Observed:
        try:
            return super().record(message, queue)
        except RecursionError:
            return _record_unparsed(self, message, queue)


async def _listen_to_events(broker: Broker) -> EventLog:
    """Every message on `events`, through a queue of the observer's own."""
    log = _EventLog("events")
    name = infra.unique_name("observed_events")
    queue = await broker.channel.declare_queue(name, exclusive=True)
    await queue.bind(EVENTS_EXCHANGE, routing_key="")

    async def on_message(message: AbstractIncomingMessage) -> None:
        log.record(message, name)
        await message.ack()

    await queue.consume(on_message)
    return log


@contextlib.asynccontextmanager
async def observing(
    target: Deployment, *, take_dead_letters: bool = True
) -> AsyncIterator[Observer]:
    """Listen to `events` and take every dead letter of the deployment, until the block ends.

    With `take_dead_letters=False` the dead letters stay in their queue, for
    the operator's tools to find.
    """
    broker = await Broker.connect(target.amqp_url)
    try:
        await broker.declare_events_exchange()
        events = await _listen_to_events(broker)
        dead_letters = _DeadLetterLog("dead letters")
        if take_dead_letters:
            channel = await broker.connection.channel()
            queue = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)

            async def on_dead_letter(message: AbstractIncomingMessage) -> None:
                dead_letters.record(message, DEAD_LETTER_QUEUE)
                await message.ack()

            await queue.consume(on_dead_letter)
        yield Observer(broker, events, dead_letters)
    finally:
        await broker.close()


@contextlib.asynccontextmanager
async def driving(target: Deployment, observer: Observer) -> AsyncIterator[Financing]:
    """The acceptance suite's scenario driver, on this deployment."""
    async with financing_for(observer.system(target)) as financing:
        yield financing


async def publish(broker: Broker, hostile: Hostile) -> None:
    """The message exactly as described, confirmed by the broker."""
    headers = {**hostile.headers, CASE_HEADER: hostile.case}
    if hostile.queue is None:
        await broker.publish(EVENTS_EXCHANGE, "", hostile.body, headers)
    else:
        await broker.publish("", hostile.queue, hostile.body, headers)


async def expect_dead_letters(
    observer: Observer, hostiles: Sequence[Hostile], *, since: int = 0, within: float = 30.0
) -> dict[str, list[Observed]]:
    """Wait until every message was dead-lettered by exactly the queues it must be.

    Returns the dead letters of each case. Fails, describing the messages, when
    one is missing after `within` seconds or a queue dead-lettered a message it
    should have ignored.
    """
    by_case: dict[str, list[Observed]] = {}

    def missing() -> list[str]:
        by_case.clear()
        for letter in observer.dead_letters.view(since):
            case = letter.headers.get(CASE_HEADER)
            if isinstance(case, str):
                by_case.setdefault(case, []).append(letter)
        problems = []
        for hostile in hostiles:
            got = sorted(str(m.source_queue) for m in by_case.get(hostile.case, []))
            want = sorted(hostile.expected_dead_letters())
            if got != want:
                problems.append(
                    f"{hostile.describe()}\n    dead-lettered by {got}, expected {want}"
                )
        return problems

    async def complete() -> bool:
        return not missing()

    try:
        await infra.wait_until(complete, timeout=within, interval=0.1, what="dead letters")
    except AssertionError:
        problems = missing()
        raise AssertionError(
            f"{len(problems)} of {len(hostiles)} hostile messages not dead-lettered as expected:\n"
            + "\n".join(problems[:20])
        ) from None
    return dict(by_case)


def assert_well_formed(letter: Observed) -> None:
    """A dead letter says why and where from, and all its headers are strings."""
    assert letter.reason, f"dead letter without a reason: {letter.headers}"
    assert letter.source_queue, f"dead letter without its source queue: {letter.headers}"
    not_strings = {k: type(v).__name__ for k, v in letter.headers.items() if not isinstance(v, str)}
    assert not not_strings, f"dead letter headers that are not strings: {not_strings}"


async def queue_backlog(vhost: str, queues: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(ready, unacknowledged) of each of `queues` that still holds a message."""
    state = await list_queues(vhost)
    backlog = {}
    for queue in queues:
        row = state.get(queue)
        if row is None:
            continue
        counts = (int(row["messages_ready"]), int(row["messages_unacknowledged"]))
        if counts != (0, 0):
            backlog[queue] = counts
    return backlog


async def wait_drained(vhost: str, queues: Iterable[str], *, within: float = 20.0) -> None:
    """Every one of `queues` empty: nothing waiting, nothing held unacknowledged."""
    names = list(queues)
    last: dict[str, tuple[int, int]] = {}

    async def drained() -> bool:
        last.clear()
        last.update(await queue_backlog(vhost, names))
        return not last

    try:
        await infra.wait_until(drained, timeout=within, interval=0.3, what="queues drained")
    except AssertionError:
        raise AssertionError(
            f"queues still holding messages after {within}s (ready, unacked): {last}"
        ) from None


async def publish_all(broker: Broker, hostiles: Iterable[Hostile], *, parallel: int = 16) -> None:
    """Publish every message, a few in flight at a time."""
    pending = list(hostiles)
    for start in range(0, len(pending), parallel):
        await asyncio.gather(*(publish(broker, h) for h in pending[start : start + parallel]))


def _preview(value: Any) -> str:
    if isinstance(value, RawText):
        text = f"RawText({value.raw[:24]!r}{'...' if len(value.raw) > 24 else ''})"
    else:
        text = f"{type(value).__name__}:{value!r}"
    return text if len(text) <= 60 else text[:57] + "..."
