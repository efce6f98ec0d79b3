"""The projector: folds the events of the bus into the read models.

It takes the deliveries of one queue in order (the broker adapter gives that
queue a single active consumer, so one instance projects at a time). When it
falls behind it takes everything already delivered, up to `batch_size`,
applies the batch in one transaction and only then settles it, through the
same parts every consumer uses:

- a message it does not project (an integration event, a command) is ignored
  (acked);
- a poison message (bad headers, bad JSON) is dead-lettered with its reason;
  the messages around it are projected as usual;
- so is a domain event the saga's policies would refuse as not relayed from
  this service's event store (`relayed_from_the_store`: a copy published
  again under a new id would be projected twice, and the read models would
  drift from the store); an event of another relayer, which carries none of
  this service's relayer's headers, is projected (docs/contract.md section 2);
- a batch that cannot be applied is retried as its failure's class says: an
  unavailable database without limit (nothing is acked meanwhile), a bug a
  few times; then the batch is applied one event at a time, so that only the
  event at fault is dead-lettered, with its reason, and the rest are
  projected. Rebuilding the read models after a fix takes it into account.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from financing import metrics
from financing.application.errors import Fault, PoisonMessage
from financing.application.grace import finish_on_cancel
from financing.application.moments import moment
from financing.application.pipeline import (
    ABANDONED,
    DUPLICATE,
    Decoded,
    Delivery,
    Outcome,
    OutcomeKind,
    decode,
    foreign_digest,
    not_handled,
    relayed_from_the_store,
    retried,
)
from financing.application.ports import EVENT_STORE_HEADER, RECORDED_AT_HEADER, ProjectedStore
from financing.application.read_models import (
    EMPTY,
    NOT_RECORDED,
    PROJECTED_EVENTS,
    ReadModelStore,
)
from financing.application.retry import (
    DELIVERIES,
    Abandoned,
    GaveUp,
    Outages,
    RetryPolicy,
    retry,
)
from financing.domain.events import DomainEvent
from financing.logging import get_logger

log = get_logger(__name__)

BATCH_SIZE = 100


class Projector:
    def __init__(
        self,
        read_models: ReadModelStore,
        outages: Outages,
        *,
        batch_size: int = BATCH_SIZE,
        policy: RetryPolicy = DELIVERIES,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        store: ProjectedStore | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._read_models = read_models
        # The event store whose read models these are, asked of each event relayed with
        # its store's name: another's wait in their queue, an outage (projected_store).
        self._store = store
        # The time by the event store's clock, which stamps `recorded_at` (the database
        # server's, `DatabaseClock`), for the projection delay.
        self._clock = clock
        self._outages = outages
        self._policy = policy
        self.batch_size = batch_size
        # Each delivery with its arrival (time.perf_counter()).
        self._delivered: asyncio.Queue[tuple[Delivery, float]] = asyncio.Queue()

    def receive(self, delivery: Delivery) -> None:
        """Take a delivery, in delivery order (called synchronously by the consumer)."""
        self._delivered.put_nowait((delivery, time.perf_counter()))

    async def run(self) -> None:
        """Project until cancelled."""
        while True:
            taken = [await self._delivered.get()]
            while len(taken) < self.batch_size and not self._delivered.empty():
                taken.append(self._delivered.get_nowait())
            batch, arrivals = zip(*taken, strict=True)
            await finish_on_cancel(self.project(batch, arrivals))

    async def project(
        self, batch: Sequence[Delivery], arrivals: Sequence[float] | None = None
    ) -> None:
        """Project `batch` and settle each delivery; its handling is timed from its
        arrival (`arrivals`, time.perf_counter(); by default now): one that waited
        behind a batch being retried waited as long."""
        now = time.perf_counter()
        triaged = [_triage(delivery) for delivery in batch]
        events = [item for item in triaged if isinstance(item, Decoded)]
        outcomes = await self._apply(events)

        async def settle(delivery: Delivery, item: Decoded | Outcome, arrived: float) -> None:
            outcome = outcomes[id(item)] if isinstance(item, Decoded) else item
            with structlog.contextvars.bound_contextvars(**delivery.log_fields()):
                await delivery.settle(outcome)
            metrics.settled(delivery.source, outcome.kind.value, time.perf_counter() - arrived)
            if isinstance(item, Decoded) and outcome.kind is OutcomeKind.PROCESSED:
                _observe_delay(item, self._clock())

        # Settled together, so that their acks go out in as few frames as they allow.
        await asyncio.gather(*map(settle, batch, triaged, arrivals or [now] * len(batch)))

    async def _apply(self, events: Sequence[Decoded]) -> dict[int, Outcome]:
        """The outcome of each event (by id of its Decoded)."""
        if not events:
            return {}
        said = _said(events)
        try:
            fresh, before = await retry(
                lambda: self._projected(events, said),
                policy=self._policy,
                outages=self._outages,
                what="projecting a batch",
                wanted=lambda: any(event.delivery.deliverable() for event in events),
                on_retry=lambda _: _retrying(events),
                # Its retries' lines say which event they are about (how many, of a batch).
                about=lambda: (
                    events[0].delivery.log_fields() if len(events) == 1 else {"events": len(events)}
                ),
            )
        except GaveUp as gave_up:
            log.error(
                "projecting a batch failed; projecting its events one at a time",
                events=len(events),
                error=str(gave_up),
            )
            return {id(event): await self._apply_one(event) for event in events}
        except Abandoned:  # the channel closed: every message is delivered again
            return {id(event): ABANDONED for event in events}
        outcomes: dict[int, Outcome] = {}
        projected_now = fresh
        for event in events:
            message_id = event.envelope.message_id
            if message_id in fresh:
                fresh = fresh - {message_id}  # a second copy in the batch is a duplicate
                log.debug("event projected", **event.delivery.log_fields())
                outcomes[id(event)] = Outcome.processed()
            else:
                outcomes[id(event)] = _copy(event, said if message_id in projected_now else before)
        return outcomes

    async def _projected(
        self, events: Sequence[Decoded], said: _Recorded
    ) -> tuple[AbstractSet[str], _Recorded]:
        """Apply `events`, recording what `said` says of each: the message ids projected
        now, and what was recorded of the others when they were projected before."""
        if self._store is not None:
            for store in {event.envelope.headers.get(EVENT_STORE_HEADER) for event in events}:
                if store is not None:
                    await self._store.require(store)
        fresh = await self._read_models.apply(
            [_pair(event) for event in events], said.digests, said.recorded
        )
        foreign = [message_id for message_id in said.digests if message_id not in fresh]
        own = [message_id for message_id in said.recorded if message_id not in fresh]
        return fresh, _Recorded(
            await self._read_models.digests(foreign) if foreign else EMPTY,
            await self._read_models.recorded_at(own) if own else NOT_RECORDED,
        )

    async def _apply_one(self, event: Decoded) -> Outcome:
        async def apply(delivery: Delivery) -> Outcome:
            fresh, before = await self._projected([event], _said([event]))
            if fresh:
                return Outcome.processed()
            return _copy(event, before)

        with structlog.contextvars.bound_contextvars(**event.delivery.log_fields()):
            return await retried(self._policy, self._outages)(apply)(event.delivery)


def _retrying(events: Sequence[Decoded]) -> None:
    """Count a retry of each delivery of a batch tried again."""
    for event in events:
        metrics.MESSAGES.labels(event.delivery.source, "retried").inc()


@dataclass(frozen=True)
class _Recorded:
    """What was recorded of the events a batch found projected before, by message id."""

    digests: Mapping[str, str]  # another relayer's events: what each said
    recorded: Mapping[str, datetime]  # this service's store's: when each was recorded


def _said(events: Sequence[Decoded]) -> _Recorded:
    """What the first event of each message id says of itself, to be recorded with it:
    another relayer's its digest, this service's store's when it was recorded."""
    digests: dict[str, str] = {}
    recorded: dict[str, datetime] = {}
    first: set[str] = set()
    for event in events:
        message_id = event.envelope.message_id
        if message_id in first:
            continue
        first.add(message_id)
        if (digest := _digest(event)) is not None:
            digests[message_id] = digest
        elif (recorded_at := _recorded_at(event)) is not None:
            recorded[message_id] = recorded_at
    return _Recorded(digests, recorded)


def _copy(event: Decoded, earlier: _Recorded) -> Outcome:
    """The outcome of an event whose message id was projected before: a copy is a
    duplicate; a different event that reuses the id is dead-lettered, not dropped
    unseen. Another relayer's event is told from a copy by its digest (docs/reliability.md,
    defect 101); this service's by when its store recorded it: a copy says the time of
    the event projected, while an event recorded at another time under the same id was
    given it by an event store that lost the events it had relayed (restored from an
    older backup, failed over to a standby that was behind: defect 108). An id recorded
    without a time (by an earlier release) tells nothing: a duplicate."""
    envelope = event.envelope
    digest = _digest(event)
    if digest is not None:
        recorded = earlier.digests.get(envelope.message_id)
        if recorded is None or digest == recorded:
            return DUPLICATE
        return Outcome.dead_letter(
            f"{envelope.name} {envelope.message_id}: the projector already projected a"
            " different event under this message id; this one is not projected (its"
            " publisher must give it an id of its own)"
        )
    projected = earlier.recorded.get(envelope.message_id)
    recorded_at = _recorded_at(event)
    if projected is None or recorded_at is None or recorded_at == projected:
        return DUPLICATE
    return Outcome.dead_letter(
        f"{envelope.name} {envelope.message_id}: recorded at {moment(recorded_at)}, where"
        f" the event projected under this message id was recorded at {moment(projected)}:"
        " the event store no longer holds events it relayed (restored from an older"
        " backup, failed over to a standby that was behind?) and gave their ids to new"
        " ones; the read models hold events the store lost: rebuild them (`financing"
        ' projections rebuild`, docs/deployment.md, "Restoring a database")'
    )


def _digest(event: Decoded) -> str | None:
    return foreign_digest(event.envelope, _event(event))


def _triage(delivery: Delivery) -> Outcome | Decoded:
    """The delivery's decoded event, or its outcome when there is nothing to project."""
    if not delivery.deliverable():
        # Its channel closed while it waited to be taken: the broker delivers it again,
        # after the messages before it. Projected now, it could go before one of those
        # (a batch ahead of it given up as its channel closed) and make its row first.
        return ABANDONED
    outcome = not_handled(delivery, PROJECTED_EVENTS, OutcomeKind.IGNORED)
    if outcome is not None:
        return outcome
    try:
        decoded = decode(delivery)
        relayed_from_the_store(decoded.envelope, _event(decoded), or_foreign=True)
        return decoded
    # Said as the other consumers say theirs: the error, its fault and the attempts made.
    except PoisonMessage as error:
        return Outcome.dead_letter(str(GaveUp(error, Fault.PERMANENT, 1)))
    except Exception as error:  # a bug in decoding: the same on every attempt
        log.error("decoding failed with a bug", exc_info=error)
        return Outcome.dead_letter(str(GaveUp(error, Fault.BUG, 1)))


def _observe_delay(event: Decoded, now: datetime) -> None:
    """From the event's commit (the relayer's `recorded_at` header) to `now`."""
    committed = _recorded_at(event)
    if committed is not None:
        metrics.PROJECTION_DELAY.observe(max(0.0, (now - committed).total_seconds()))


def _recorded_at(event: Decoded) -> datetime | None:
    """When the event store recorded the event (the relayer's `recorded_at` header);
    None from a publisher other than the relayer."""
    recorded_at = event.envelope.headers.get(RECORDED_AT_HEADER)
    if not recorded_at:
        return None
    try:
        committed = datetime.fromisoformat(recorded_at)
    except ValueError:
        return None
    return committed if committed.tzinfo is not None else None


def _pair(event: Decoded) -> tuple[str, DomainEvent]:
    return event.envelope.message_id, _event(event)


def _event(event: Decoded) -> DomainEvent:
    message = event.message
    assert isinstance(message, DomainEvent)  # PROJECTED_EVENTS names domain events only
    return message
