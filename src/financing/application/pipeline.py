"""The path of every delivery, built from small parts that each wrap the next.

    settle (adapter: ack, dead-letter, or leave for redelivery)
      └ retried      classify a failure: retry with backoff, or give up into a dead letter
          └ selected     ignore (or dead-letter) messages of names this consumer does not handle
              └ decoded      headers and body into a message; undecodable is permanent
                  └ exactly_once / sending   the handler; the former in a unit of work
                                             that records the message id

A part is a function from the step it wraps to a new step, as middleware
wraps a handler in a message router: each has one concern, and the order in
which `compose` stacks them is the only place that says how they combine.
Parts before `decoded` see a raw `Delivery`; parts after it see a `Decoded`
message. Transport details (acks, channels, queues) stay in the adapter that
implements `Delivery`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import structlog

from financing import metrics
from financing.application import codec
from financing.application.errors import (
    AlreadyProcessed,
    AwaitingOperator,
    ConcurrencyConflict,
    Fault,
    MissingAggregate,
    PoisonMessage,
    Refused,
    ReusedMessageId,
    UnrelayedEvent,
    attempts_allowed,
)
from financing.application.messages import Command, Message
from financing.application.ports import (
    AGGREGATE_VERSION_HEADER,
    EVENT_STORE_HEADER,
    RECORDED_AT_HEADER,
    REFUSED,
    Cause,
    CommandSender,
    Envelope,
    EventStore,
    Processed,
    RelayedEvent,
    UnitOfWork,
    body_digest,
    event_message_id,
)
from financing.application.retry import Abandoned, GaveUp, Outages, RetryPolicy, retry
from financing.application.turns import TURNS, AggregateTurns
from financing.domain.aggregates import Aggregate, RuleViolation
from financing.domain.events import DomainEvent
from financing.logging import get_logger

log = get_logger(__name__)


class OutcomeKind(enum.Enum):
    PROCESSED = "processed"  # applied, with the events it appended
    UNCHANGED = "unchanged"  # applied, but a rule said there was nothing to do
    DUPLICATE = "duplicate"  # processed before: nothing done again
    IGNORED = "ignored"  # not for this consumer
    DEAD_LETTERED = "dead_lettered"  # kept aside with its reason
    # Put aside for a while, to be delivered again: it names an aggregate that another
    # message, not processed yet, creates (RetryPolicy.aggregate_wait).
    DEFERRED = "deferred"
    ABANDONED = "abandoned"  # cannot be settled any more: the broker delivers it again


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    detail: str = ""  # the reason of a dead letter, the rule behind an unchanged outcome
    events: int = 0  # events appended
    delay: float = 0.0  # how long a deferred message is put aside (seconds)
    # Deferred past its wait because it came back late (its one such pass): how long it
    # had waited then.
    past_wait_from: float | None = None

    @classmethod
    def processed(cls, events: int = 0) -> Outcome:
        return cls(OutcomeKind.PROCESSED, events=events)

    @classmethod
    def dead_letter(cls, reason: str) -> Outcome:
        return cls(OutcomeKind.DEAD_LETTERED, reason)

    @classmethod
    def deferred(cls, reason: str, delay: float, *, past_wait_from: float | None = None) -> Outcome:
        return cls(OutcomeKind.DEFERRED, reason, delay=delay, past_wait_from=past_wait_from)


IGNORED = Outcome(OutcomeKind.IGNORED)
DUPLICATE = Outcome(OutcomeKind.DUPLICATE)
ABANDONED = Outcome(OutcomeKind.ABANDONED)


class Delivery(Protocol):
    """A message as a consumer receives it, before anything is checked."""

    @property
    def source(self) -> str:
        """Where it was consumed from (a queue): for logs and dead letters."""
        ...

    @property
    def name(self) -> str | None:
        """The message name, when it can be read without validating anything else."""
        ...

    def envelope(self) -> Envelope:
        """Id, name, aggregate id and string headers; raises PoisonMessage when malformed."""
        ...

    def deliverable(self) -> bool:
        """Whether it can still be settled (acked or dead-lettered)."""
        ...

    @property
    def waited(self) -> float:
        """Seconds since it was first deferred (0.0: never)."""
        ...

    @property
    def late(self) -> bool:
        """Whether it came back from a deferral long after its delay (the service was
        stopped, a backlog held it meanwhile)."""
        ...

    @property
    def past_wait_from(self) -> float | None:
        """How long it had waited when it was deferred past its wait for coming back
        late; None if it never was."""
        ...

    def log_fields(self) -> dict[str, Any]:
        """What identifies it in log lines (queue, name, message and aggregate ids)."""
        ...

    async def settle(self, outcome: Outcome) -> None:
        """Ack it, or dead-letter or defer it then ack it, or leave it to be delivered
        again."""
        ...


@dataclass(frozen=True)
class Decoded:
    delivery: Delivery
    envelope: Envelope
    message: Message


Step = Callable[[Delivery], Awaitable[Outcome]]
Handler = Callable[[Decoded], Awaitable[Outcome]]
StepPart = Callable[[Step], Step]
HandlerPart = Callable[[Handler], Handler]

# What handlers are written as: functions of (dependencies, message).
StoreHandler = Callable[[UnitOfWork, Any], Awaitable[None]]
SendingHandler = Callable[[CommandSender, Any, Cause], Awaitable[None]]


def compose(
    handler: Handler,
    *,
    names: frozenset[str],
    others: OutcomeKind,
    policy: RetryPolicy,
    outages: Outages,
    handler_parts: Iterable[HandlerPart] = (),
    turns: AggregateTurns = TURNS,
) -> Step:
    """The whole path of one consumer, from a raw delivery to its outcome."""
    for part in handler_parts:
        handler = part(handler)
    return retried(policy, outages, turns)(selected(names, others)(decoded(handler)))


def retried(policy: RetryPolicy, outages: Outages, turns: AggregateTurns = TURNS) -> StepPart:
    """Retries the inner step as the failure's class says; a failure it gives up on
    becomes a dead letter with its reason, and a delivery that can no longer be
    settled is abandoned to the broker's redelivery.

    A delivery that names an aggregate that does not exist yet (MissingAggregate) is
    deferred instead, while it has waited less than `policy.aggregate_wait`: the
    message that creates the aggregate may be behind others on its own queue (after
    an outage, each queue's backlog drains at its own pace). Back from a deferral, it
    gets one attempt, not its attempts again: a flood of commands naming aggregates
    that never come must not hold the consumer's slots at every return. Back late past
    its wait (the service stopped longer than the wait, with the message creating the
    aggregate waiting in its queue), it may wait as long again rather than be
    dead-lettered at its first attempt: what held it up held the other message up too,
    and each queue's backlog drains at its own pace. Once only: under a backlog every
    return is late. And a whole wait more whenever a dependency was out during its wait
    (a command database that refused writes, its disk full, while it answered reads):
    the message creating the aggregate waited through that outage too.

    A delivery that lost a race on aggregates (ConcurrencyConflict) takes its next
    attempts in their `turns`, one at a time in this process (`AggregateTurns`)."""

    def part(inner: Step) -> Step:
        async def step(delivery: Delivery) -> Outcome:
            raced: tuple[str, ...] = ()  # the aggregates its last attempt lost a race on

            async def attempt() -> Outcome:
                nonlocal raced
                try:
                    if not raced:
                        return await inner(delivery)
                    async with turns.taken(raced):
                        return await inner(delivery)
                except ConcurrencyConflict as conflict:
                    raced = tuple(str(id_) for id_, _ in conflict.loaded_at or ()) or raced
                    raise

            try:
                return await retry(
                    attempt,
                    policy=policy,
                    outages=outages,
                    what="processing",
                    wanted=delivery.deliverable,
                    on_retry=lambda _: metrics.MESSAGES.labels(delivery.source, "retried").inc(),
                    attempts_of=_once_when_missing if delivery.waited else attempts_allowed,
                )
            except GaveUp as gave_up:
                if gave_up.fault is Fault.BUG:
                    log.error("processing failed with a bug", exc_info=gave_up.error)
                if not isinstance(gave_up.error, MissingAggregate):
                    return Outcome.dead_letter(str(gave_up))
                waited, since = delivery.waited, delivery.past_wait_from
                # Its pass past its wait, if it had one, is a whole wait more.
                if waited < policy.aggregate_wait + (since or 0.0):
                    return Outcome.deferred(str(gave_up), policy.deferral_delay(waited))
                if outages.down_within(waited - (since or 0.0)):
                    # An outage during its wait held up the message that creates the
                    # aggregate as long (its write refused, its queue's backlog behind
                    # it): a whole wait more, from now, as often as outages come.
                    delay = policy.deferral_delay(waited)
                    return Outcome.deferred(str(gave_up), delay, past_wait_from=waited)
                if since is None and delivery.late:
                    delay = policy.deferral_delay(waited)
                    return Outcome.deferred(str(gave_up), delay, past_wait_from=waited)
                # Back from a deferral, a delivery has one attempt: the count above is its.
                said = (
                    f"; deferred before (one attempt each time back), it waited {waited:.1f} s"
                    " for it in all"
                    if waited
                    else ""
                )
                return Outcome.dead_letter(f"{gave_up}{said}")
            except Abandoned:
                return ABANDONED

        return step

    return part


def _reused_by(envelope: Envelope) -> str:
    """Who reused a message id, and what that means."""
    store = envelope.headers.get(EVENT_STORE_HEADER)
    if store:
        return (
            f"both relayed from event store {store!r}, which lost events after it relayed"
            " them, restored from an older backup or failed over to a standby that was"
            ' behind: docs/deployment.md "Restoring a database"'
        )
    return "its producer must give it an id of its own"


def _once_when_missing(error: BaseException) -> int | None:
    """The attempts of a delivery back from a deferral: one for a missing aggregate."""
    return 1 if isinstance(error, MissingAggregate) else attempts_allowed(error)


def selected(names: frozenset[str], others: OutcomeKind) -> StepPart:
    """Passes on the messages named in `names`; any other gets `others` (IGNORED on a
    feed shared with other consumers, DEAD_LETTERED on a queue of their own, where
    another name means the message was misrouted and acking it would lose it)."""

    def part(inner: Step) -> Step:
        async def step(delivery: Delivery) -> Outcome:
            outcome = not_handled(delivery, names, others)
            return await inner(delivery) if outcome is None else outcome

        return step

    return part


def not_handled(delivery: Delivery, names: frozenset[str], others: OutcomeKind) -> Outcome | None:
    """The outcome of a delivery whose readable name is not in `names`; None to handle it.

    A delivery whose name cannot be read is handled: decoding it names the problem.
    """
    name = delivery.name
    if name is None or name in names:
        return None
    if others is OutcomeKind.DEAD_LETTERED:
        # Said as every reason is: the error, its fault and the attempts made.
        unknown = PoisonMessage(
            f"a {name!r} message on {delivery.source!r}, whose consumer handles no such message"
        )
        return Outcome.dead_letter(str(GaveUp(unknown, Fault.PERMANENT, 1)))
    return IGNORED


def decode(delivery: Delivery) -> Decoded:
    """The delivery's message; raises PoisonMessage naming what is wrong."""
    envelope = delivery.envelope()
    message = codec.decode_message(envelope.name, envelope.body, envelope.aggregate_id)
    return Decoded(delivery, envelope, message)


def decoded(handler: Handler) -> Step:
    async def step(delivery: Delivery) -> Outcome:
        message = decode(delivery)
        if isinstance(message.message, Command):
            # A command carries no aggregateID: its lines named none, and a search of the
            # log for an invoice missed the commands that concern it. The delivery's task
            # holds the binding (the consumer's, for the lines about the delivery).
            structlog.contextvars.bind_contextvars(aggregate_id=str(message.message.aggregate_id))
        return await handler(message)

    return step


def exactly_once(store: EventStore, consumer: str, handler: StoreHandler) -> Handler:
    """Runs `handler` in one unit of work that records that `consumer` processed the
    message: the effect and the record commit together, or neither does, so a
    redelivered message changes nothing.

    The message is not looked up first: a copy processed before runs the handler
    again, and its unit of work then fails to record it (`AlreadyProcessed`) with
    none of its writes taking effect. Copies are rare; the look-up would cost
    every message a round trip.

    Copies are told apart by their message id, so a domain event is handled only
    with the id the event store derives for it (`relayed_from_the_store`), and only if
    the store holds it: its unit of work takes effect only then (`acting_on`), so an
    event published under a computed id by someone else changes nothing and takes no
    id of the store's (it is dead-lettered, EventNotInStore). The record
    keeps the body's digest too: a different message that reuses a processed id is
    dead-lettered (`ReusedMessageId`), not dropped unseen as a copy.

    A message a rule refuses is recorded as refused (REFUSED, with the rule), then
    dead-lettered: it is judged once, as an applied one is. A copy of it is not judged
    again against the state of its moment (refused for another reason, or applied after
    it was dead-lettered as refused): it is dead-lettered again, for the recorded rule.
    Dropped as a duplicate, a copy could take the message's only dead letter with it:
    the delivery that refused it may have ended before its dead letter was kept (and
    the broker redelivers it), or its own retry may find the record whose commit it
    saw fail. A copy an operator requeued from the dead letters (`Envelope.requeued`)
    is judged again, unless the broker redelivers it: that delivery may have judged it
    already, and its refusal is the one recorded.
    """

    async def run(decoded: Decoded) -> Outcome:
        envelope = decoded.envelope
        relayed = (
            relayed_from_the_store(envelope, decoded.message)
            if isinstance(decoded.message, DomainEvent)
            else None
        )
        digest = body_digest(envelope.body)
        try:
            return await once(decoded, digest, relayed)
        except AlreadyProcessed:
            before = await recorded(envelope, digest)
            if before is None:  # pruned since it refused this copy: processed again
                raise ConcurrencyConflict(
                    f"message {envelope.message_id}: the record that refused it as a copy is"
                    " gone (pruned)"
                ) from None
        except RuleViolation as violation:
            # A copy of a message already processed reads its effects (funds already
            # released) and may break a rule before it gets to record anything: that
            # is a duplicate, not a broken rule. A refusal is final, and recorded; an
            # aggregate that does not exist yet may come (the message waits for it).
            final = None if isinstance(violation, MissingAggregate) else violation
            before = await recorded(envelope, digest, refused_by=final, relayed=relayed)
            if before is None:
                raise
        return await copy(decoded, digest, before)

    async def recorded(
        envelope: Envelope,
        digest: str,
        refused_by: RuleViolation | None = None,
        relayed: RelayedEvent | None = None,
    ) -> Processed | None:
        """The record of `consumer` processing the message before; with `refused_by` and
        none, the refusal recorded (and None)."""
        async with store.unit_of_work(Cause.of(envelope)) as uow:
            before = await uow.recorded(consumer, envelope.message_id)
            if before is None and refused_by is not None:
                if relayed is not None:
                    await uow.acting_on(relayed)
                refusal = Processed(envelope.name, REFUSED, str(refused_by), 0, digest)
                await uow.record(consumer, envelope.message_id, refusal)
        return before

    async def copy(decoded: Decoded, digest: str, before: Processed) -> Outcome:
        """What becomes of a copy of a message `consumer` processed (`before`): a
        duplicate, or dead-lettered again if it was refused, or judged again if requeued
        (see above). A message that reuses the id of a different one it processed is
        dead-lettered (ReusedMessageId)."""
        envelope = decoded.envelope
        if before.digest and before.digest != digest:
            was = f"a {before.name} message" if before.name else "another message"
            raise ReusedMessageId(
                f"{envelope.name} {envelope.message_id}: {consumer} already processed {was}"
                " under this message id, with a different body; this one is not processed"
                f" ({_reused_by(envelope)})"
            )
        if before.outcome == REFUSED:
            if envelope.requeued and not envelope.redelivered:
                await store.forget_refusal(consumer, envelope.message_id)
                return await run(decoded)
            raise RuleViolation(before.detail)
        return DUPLICATE

    async def once(decoded: Decoded, digest: str, relayed: RelayedEvent | None) -> Outcome:
        envelope = decoded.envelope
        async with store.unit_of_work(Cause.of(envelope)) as uow:
            if relayed is not None:
                await uow.acting_on(relayed)
            noting = _Noting(uow)
            await handler(noting, decoded.message)
            appended, unchanged = noting.result()
            outcome = (
                Outcome.processed(appended)
                if appended
                else Outcome(
                    OutcomeKind.UNCHANGED, "; ".join(unchanged) or "the handler appended no event"
                )
            )
            await uow.record(
                consumer,
                envelope.message_id,
                Processed(envelope.name, outcome.kind.value, outcome.detail, appended, digest),
            )
        if outcome.kind is OutcomeKind.UNCHANGED:
            # A request that did nothing (approving an invoice not financed) is worth a
            # line; a saga's step with nothing to do (no excess bid to release, at every
            # financing at the asking price) is routine: at INFO it was nearly every line
            # of the log, burying the others.
            said = log.debug if isinstance(decoded.message, DomainEvent) else log.info
            said("message changed nothing", consumer=consumer, reason=outcome.detail)
        return outcome

    return run


# The headers only this service's relayer puts on a domain event (with the message id
# it derives): an event that carries any of them says it is one of this service's event
# store. A reference relayer's carries watermill's three headers only.
RELAYER_HEADERS = (AGGREGATE_VERSION_HEADER, "aggregateType", RECORDED_AT_HEADER)


def relayed_from_the_store(
    envelope: Envelope, event: DomainEvent, *, or_foreign: bool = False
) -> RelayedEvent | None:
    """The event as this service's store would hold it; UnrelayedEvent unless the
    message id is the one the event store derives from the event's aggregate id and
    version (the `aggregateVersion` header): the one rule by which every consumer of
    domain events tells an event of this service's store from a copy published again
    under another id, which would be applied twice. Whether the store holds it is for
    a unit of work to tell (`UnitOfWork.acting_on`): the id can be derived by anyone.

    `or_foreign`: an event that carries none of RELAYER_HEADERS passes too (None), as
    the event of another (a reference) relayer. The projector projects those
    (docs/contract.md section 2); the saga's policies, which change this service's
    aggregates, act on this store's events only.
    """
    if or_foreign and _foreign(envelope):
        return None
    version = envelope.headers.get(AGGREGATE_VERSION_HEADER, "")
    # A version is an int4 (the events table's column): a longer one is no version, and
    # int() would refuse one of thousands of digits with a ValueError (a bug).
    number = int(version) if version.isascii() and version.isdigit() and len(version) <= 10 else 0
    if number and envelope.message_id == event_message_id(event.aggregate_id, number):
        # The body is UTF-8: the codec decoded it.
        return RelayedEvent(event.aggregate_id, number, envelope.name, envelope.body.decode())
    raise UnrelayedEvent(
        f"{envelope.name} {envelope.message_id} is not an event of this service's event store:"
        f" its message id is not the one derived from its aggregateID and"
        f" {AGGREGATE_VERSION_HEADER} headers (a copy published again under a new id, or"
        " another store's event); its copies could not be told apart, so acting on it"
        " could apply one event twice"
    )


def _foreign(envelope: Envelope) -> bool:
    """Whether the message carries none of this service's relayer's headers."""
    return not any(header in envelope.headers for header in RELAYER_HEADERS)


def foreign_digest(envelope: Envelope, event: DomainEvent) -> str | None:
    """What a domain event of another relayer says (its name, its aggregate, its fields)
    digested, to tell a copy of it from a different event under the same message id;
    None for this service's relayed events, which their derived message id tells."""
    if not _foreign(envelope):
        return None
    return event_digest(event)


def event_digest(event: DomainEvent) -> str:
    """What a domain event says (its name, its aggregate, its fields), digested as the
    codec writes it, not as it came: a copy written otherwise (another order of keys,
    `1E+2` for 100, an id in capitals) says the same."""
    said = f"{event.name()}\n{event.aggregate_id}\n{codec.encode_text(event)}"
    return body_digest(said.encode())


def sending(sender: CommandSender, handler: SendingHandler) -> Handler:
    queues = _QueueOutages(sender)

    async def run(decoded: Decoded) -> Outcome:
        await handler(queues, decoded.message, Cause.of(decoded.envelope))
        return Outcome.processed()

    return run


class _QueueOutages:
    """`sender`, where the broker's refusal of a command's queue (declared again with
    other arguments, or of another type) is an outage of that queue until an operator
    mends it, as it is to the queue's consumer: the message that sends the command waits
    in its own queue. Refused, it was dead-lettered at once, to be requeued by hand
    once the queue was mended."""

    def __init__(self, sender: CommandSender) -> None:
        self._sender = sender

    async def send(self, command: Command, message_id: UUID, cause: Cause) -> None:
        try:
            await self._sender.send(command, message_id, cause)
        except Refused as refused:
            raise AwaitingOperator(f"queue {command.name()}", refused.detail) from refused


class _Noting:
    """A unit of work that notes what the handler saved: how many events, and
    which rules said there was nothing to do."""

    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow
        self._saved: dict[int, Aggregate] = {}
        self.recorded = uow.recorded
        self.load = uow.load
        self.load_both = uow.load_both
        self.record = uow.record
        self.acting_on = uow.acting_on

    async def save(self, aggregate: Aggregate) -> None:
        self._saved[id(aggregate)] = aggregate
        await self._uow.save(aggregate)

    def result(self) -> tuple[int, list[str]]:
        """Events appended, and the reasons of the aggregates that changed nothing."""
        appended = sum(len(aggregate.changes) for aggregate in self._saved.values())
        unchanged = [note for aggregate in self._saved.values() for note in aggregate.unchanged]
        return appended, unchanged
