"""The projector's triage and settling over in-memory deliveries and read models: which
deliveries of a batch it projects, and what becomes of the others."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
import structlog
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing.application import codec
from financing.application.errors import AwaitingOperator, Fault, Unavailable, UnrelayedEvent
from financing.application.memory import InMemoryEventStore
from financing.application.messages import InvestorRegistered
from financing.application.pipeline import (
    ABANDONED,
    Decoded,
    Outcome,
    OutcomeKind,
    exactly_once,
)
from financing.application.ports import (
    AGGREGATE_VERSION_HEADER,
    Envelope,
    StoredEvent,
    UnitOfWork,
    event_message_id,
)
from financing.application.read_models import (
    EMPTY,
    NOT_RECORDED,
    ForeignEvent,
    InMemoryReadModels,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
)
from financing.application.retry import Backoff, GaveUp, Limit, Outages, RetryPolicy
from financing.domain import events as ev
from financing.workers.projector import Projector
from tests.support.deliveries import MemoryDelivery, envelope_of

D = Decimal
INVESTOR = UUID("11111111-1111-4111-8111-111111111111")
RELAYED_AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class RecordingReadModels:
    """Read models that keep every batch applied to them."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, ev.DomainEvent]]] = []

    async def apply(
        self,
        batch: Sequence[tuple[str, ev.DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        self.batches.append(list(batch))
        return {message_id for message_id, _ in batch}

    async def digests(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        return {}

    async def recorded_at(self, message_ids: Sequence[str]) -> Mapping[str, datetime]:
        return {}

    async def foreign_events(self, after: int = 0, limit: int = 1000) -> list[ForeignEvent]:
        return []

    async def investors(self) -> list[InvestorRow]:
        return []

    async def invoices(self) -> list[InvoiceRow]:
        return []

    async def issuers(self) -> list[IssuerRow]:
        return []

    async def unlisted_invoices(self) -> list[UUID]:
        return []

    def applied(self) -> list[str]:
        return [message_id for batch in self.batches for message_id, _ in batch]


def relayed(event: ev.DomainEvent, version: int, recorded_at: datetime = RELAYED_AT) -> Envelope:
    """`event` as this service's relayer publishes it, from its event store row."""
    return stored(event, version, recorded_at).envelope()


def stored(event: ev.DomainEvent, version: int, recorded_at: datetime = RELAYED_AT) -> StoredEvent:
    """`event` as the event store's row of INVESTOR's `version`."""
    return StoredEvent(
        position=version,
        aggregate_type="Investor",
        aggregate_id=event.aggregate_id,
        version=version,
        name=codec.name_of(event),
        body=codec.encode_text(event),
        correlation_id="c-1",
        causation_id="m-1",
        recorded_at=recorded_at,
    )


def foreign(event: ev.DomainEvent) -> Envelope:
    """`event` as a reference relayer publishes it: watermill's three headers only."""
    return Envelope(
        message_id=str(uuid4()),
        name=codec.name_of(event),
        body=codec.encode(event),
        aggregate_id=str(event.aggregate_id),
    )


def added(amount: str = "1000") -> ev.InvestorFundsAddedEvent:
    return ev.InvestorFundsAddedEvent(INVESTOR, D(amount))


def copy_of(envelope: Envelope, how: str) -> Envelope:
    """The relayed `envelope` published again, changed as `how` says."""
    headers = dict(envelope.headers)
    if how == "a new message id":
        return replace(envelope, message_id=str(uuid4()))
    if how == "a new message id, without aggregateVersion":
        del headers[AGGREGATE_VERSION_HEADER]
        return replace(envelope, message_id=str(uuid4()), headers=headers)
    if how == "another version's id":
        version = int(headers[AGGREGATE_VERSION_HEADER])
        return replace(envelope, message_id=event_message_id(INVESTOR, version + 1))
    if how == "a version of thousands of digits":
        headers[AGGREGATE_VERSION_HEADER] = "9" * 5_000  # int() refuses it: a ValueError
        return replace(envelope, headers=headers)
    assert how == "a version that is not a number"
    headers[AGGREGATE_VERSION_HEADER] = "²"  # a digit to str.isdigit, not to int()
    return replace(envelope, headers=headers)


COPIES = [
    "a new message id",
    "a new message id, without aggregateVersion",
    "another version's id",
    "a version that is not a number",
    "a version of thousands of digits",
]


async def project(*envelopes: Envelope) -> tuple[RecordingReadModels, list[Outcome]]:
    """Project `envelopes` as one batch; the read models and each delivery's outcome."""
    read_models = RecordingReadModels()
    deliveries = [MemoryDelivery(envelope, source="projector") for envelope in envelopes]
    await Projector(read_models, Outages()).project(deliveries)
    outcomes = []
    for delivery in deliveries:
        [outcome] = delivery.settled
        outcomes.append(outcome)
    return read_models, outcomes


async def policy_outcome(envelope: Envelope, *held: StoredEvent) -> str:
    """What the saga's policies make of `envelope`, their store holding `held`: 'refused',
    or 'handled'."""

    async def handler(uow: UnitOfWork, message: object) -> None:
        return None

    message = codec.decode_message(envelope.name, envelope.body, envelope.aggregate_id)
    decoded = Decoded(MemoryDelivery(envelope), envelope, message)
    try:
        store = InMemoryEventStore()
        store.events.extend(held)
        await exactly_once(store, "policy", handler)(decoded)
    except UnrelayedEvent:
        return "refused"
    return "handled"


@pytest.mark.parametrize("how", COPIES)
async def test_a_copy_of_a_relayed_event_in_the_middle_of_a_batch_is_dead_lettered(
    how: str,
) -> None:
    """Regression: a relayed InvestorFundsAddedEvent published again under a new message
    id, its other headers kept, was projected again (the read model showed 1850 where
    the event store had 850), where the policies refuse it."""
    before = relayed(ev.InvestorCreatedEvent(INVESTOR), 1)
    original = relayed(added(), 2)
    copy = copy_of(original, how)
    after = relayed(added("5"), 3)

    read_models, outcomes = await project(before, original, copy, after)

    assert read_models.applied() == [before.message_id, original.message_id, after.message_id]
    assert [outcome.kind for outcome in outcomes] == [
        OutcomeKind.PROCESSED,
        OutcomeKind.PROCESSED,
        OutcomeKind.DEAD_LETTERED,
        OutcomeKind.PROCESSED,
    ]
    assert "is not an event of this service's event store" in outcomes[2].detail
    assert copy.message_id in outcomes[2].detail


async def test_a_refused_event_is_dead_lettered_with_the_reason_the_policies_give() -> None:
    copy = copy_of(relayed(added(), 2), "a new message id")
    message = codec.decode_message(copy.name, copy.body, copy.aggregate_id)
    decoded = Decoded(MemoryDelivery(copy), copy, message)

    async def handler(uow: UnitOfWork, message: object) -> None:
        return None

    with pytest.raises(UnrelayedEvent) as refused:
        await exactly_once(InMemoryEventStore(), "policy", handler)(decoded)
    _, [outcome] = await project(copy)

    # As the policies' pipeline says it (regression, a probe: the projector's reasons
    # lacked the error's class and the attempts made).
    assert outcome == Outcome.dead_letter(str(GaveUp(refused.value, Fault.PERMANENT, 1)))
    assert outcome.detail.startswith("UnrelayedEvent: ")


@pytest.mark.parametrize(
    ("how", "projector", "policies"),
    [
        ("as relayed", OutcomeKind.PROCESSED, "handled"),
        *((copy, OutcomeKind.DEAD_LETTERED, "refused") for copy in COPIES),
        # docs/contract.md section 2: the projector projects a reference relayer's events;
        # the policies act on this service's store's events only.
        ("with watermill's headers only", OutcomeKind.PROCESSED, "refused"),
    ],
)
async def test_the_projector_refuses_what_the_policies_refuse_but_a_foreign_relayers_event(
    how: str, projector: OutcomeKind, policies: str
) -> None:
    original = relayed(added(), 2)
    if how == "as relayed":
        envelope = original
    elif how == "with watermill's headers only":
        envelope = foreign(added())
    else:
        envelope = copy_of(original, how)

    _, [outcome] = await project(envelope)

    assert (outcome.kind, await policy_outcome(envelope, stored(added(), 2))) == (
        projector,
        policies,
    )


async def test_a_batch_settles_each_delivery_with_its_own_outcome() -> None:
    created = relayed(ev.InvestorCreatedEvent(INVESTOR), 1)
    original = relayed(added(), 2)
    registered = Envelope(
        message_id=str(uuid4()),
        name="InvestorRegistered",
        body=codec.encode(InvestorRegistered(INVESTOR, "Ann", D(10))),
    )
    poison = replace(foreign(added()), body=b"{not json")
    reference = foreign(added("7"))

    read_models, outcomes = await project(
        created, original, copy_of(original, "a new message id"), registered, poison, reference
    )

    assert [outcome.kind for outcome in outcomes] == [
        OutcomeKind.PROCESSED,
        OutcomeKind.PROCESSED,
        OutcomeKind.DEAD_LETTERED,
        OutcomeKind.IGNORED,
        OutcomeKind.DEAD_LETTERED,
        OutcomeKind.PROCESSED,
    ]
    assert "not valid JSON" in outcomes[4].detail
    # One transaction for the batch, in delivery order, without what it refused.
    assert [[message_id for message_id, _ in batch] for batch in read_models.batches] == [
        [created.message_id, original.message_id, reference.message_id]
    ]


async def test_an_event_projected_before_is_settled_as_a_duplicate_not_as_projected() -> None:
    """Regression: every event of a batch was counted as projected, copies already
    projected included: a redelivery storm looked like projection work, and each old copy
    added its age to the projection delay (one added 536 s)."""
    read_models = InMemoryReadModels()
    created = relayed(ev.InvestorCreatedEvent(INVESTOR), 1)
    original = relayed(added(), 2)
    first = [MemoryDelivery(envelope, source="projector") for envelope in (created, original)]
    await Projector(read_models, Outages()).project(first)
    # Copies of it, in a batch of their own and twice in one batch with a new event.
    again = [MemoryDelivery(original, source="projector")]
    await Projector(read_models, Outages()).project(again)
    later = relayed(added("3"), 3)
    mixed = [MemoryDelivery(envelope, source="projector") for envelope in (later, later)]
    await Projector(read_models, Outages()).project(mixed)

    settled = [delivery.settled[0].kind for delivery in [*first, *again, *mixed]]
    assert settled == [
        OutcomeKind.PROCESSED,
        OutcomeKind.PROCESSED,
        OutcomeKind.DUPLICATE,
        OutcomeKind.PROCESSED,
        OutcomeKind.DUPLICATE,
    ]


async def test_a_different_foreign_event_reusing_a_projected_message_id_is_dead_lettered() -> None:
    """Regression: a reference relayer's IssuerCreatedEvent published under the message id
    of another one it published before (a producer's bug) was settled as a duplicate: the
    second issuer never reached the read models, and nothing but a metric said so. As a
    command reusing a processed id (defect 75), it is dead-lettered now; a copy of the
    first is still a duplicate, in its own batch or in the same one."""
    read_models = InMemoryReadModels()
    issuer = uuid4()
    first = foreign(ev.IssuerCreatedEvent(issuer))
    other = replace(foreign(ev.IssuerCreatedEvent(uuid4())), message_id=first.message_id)
    # The same body about another aggregate (the id is in the aggregateID header only).
    elsewhere = replace(foreign(ev.InvestorFundsAddedEvent(uuid4(), D(5))), message_id=str(uuid4()))
    moved = replace(elsewhere, aggregate_id=str(uuid4()))
    batches = [[first], [other, first], [elsewhere, moved, elsewhere]]
    deliveries = []
    for batch in batches:
        settled = [MemoryDelivery(envelope, source="projector") for envelope in batch]
        await Projector(read_models, Outages()).project(settled)
        deliveries.extend(settled)

    outcomes = [delivery.settled[0] for delivery in deliveries]
    assert [outcome.kind for outcome in outcomes] == [
        OutcomeKind.PROCESSED,
        OutcomeKind.DEAD_LETTERED,
        OutcomeKind.DUPLICATE,
        OutcomeKind.PROCESSED,
        OutcomeKind.DEAD_LETTERED,
        OutcomeKind.DUPLICATE,
    ]
    assert f"{other.message_id}: the projector already projected a different event" in (
        outcomes[1].detail
    )
    assert [row.id for row in await read_models.issuers()] == [issuer]


async def test_an_event_recorded_at_another_time_under_a_projected_id_is_dead_lettered() -> None:
    """Regression: a command database restored from an older backup (or failed over to a
    standby that was behind) gave the stream versions of the events it lost, and so their
    message ids, to new events; the projector settled each as a copy of the lost one,
    and the read models drifted from the store without a word. A copy says when its
    event was recorded as the one projected did; another event under the id says
    another time, however close, and no clock is compared."""
    read_models = InMemoryReadModels()
    created = relayed(ev.InvestorCreatedEvent(INVESTOR), 1)
    lost = relayed(added(), 2)
    await Projector(read_models, Outages()).project([MemoryDelivery(created), MemoryDelivery(lost)])
    reused = relayed(added("3"), 2, recorded_at=RELAYED_AT + timedelta(milliseconds=1))
    assert reused.message_id == lost.message_id
    # In one batch too: the first event of an id projected now tells the others.
    fresh = relayed(added("5"), 3)
    other = relayed(added("6"), 3, recorded_at=RELAYED_AT + timedelta(seconds=1))
    batch = (lost, reused, fresh, fresh, other)
    deliveries = [MemoryDelivery(envelope) for envelope in batch]
    await Projector(read_models, Outages()).project(deliveries)

    outcomes = [delivery.settled[0] for delivery in deliveries]
    assert [outcome.kind for outcome in outcomes] == [
        OutcomeKind.DUPLICATE,
        OutcomeKind.DEAD_LETTERED,
        OutcomeKind.PROCESSED,
        OutcomeKind.DUPLICATE,
        OutcomeKind.DEAD_LETTERED,
    ]
    assert "where the event projected under this message id was recorded at" in (outcomes[1].detail)
    assert "financing projections rebuild" in outcomes[1].detail
    assert await read_models.investors() == [InvestorRow(INVESTOR, D(1005), D(0), D(0))]


async def test_an_id_recorded_without_its_time_tells_nothing_of_its_copies() -> None:
    """Records of an earlier release keep no time: an event under such an id is settled
    as a copy, as that release did."""
    read_models = InMemoryReadModels()
    lost = relayed(added(), 2)
    await read_models.apply([(lost.message_id, added())])  # no time kept with it
    reused = relayed(added("3"), 2, recorded_at=RELAYED_AT + timedelta(hours=1))
    [delivery] = [MemoryDelivery(reused)]
    await Projector(read_models, Outages()).project([delivery])
    assert delivery.settled[0].kind is OutcomeKind.DUPLICATE


class FlakyReadModels(InMemoryReadModels):
    """Read models whose database is unavailable for the first `failures` batches; the
    channel of each delivery in `cut` closes as it first is (one network fault cutting
    both)."""

    def __init__(self, failures: int, cut: Sequence[MemoryDelivery] = ()) -> None:
        super().__init__()
        self.failures = failures
        self.cut = cut

    async def apply(
        self,
        batch: Sequence[tuple[str, ev.DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        if self.failures:
            self.failures -= 1
            for delivery in self.cut:
                delivery.open = False
            raise Unavailable("query database", "no answer in time")
        return await super().apply(batch, digests, recorded)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_batch_tried_again_counts_a_retry_of_each_delivery_and_its_whole_wait() -> None:
    """Regression: the projector's retries of a batch were counted nowhere (the metric
    says one per retry of a delivery), and a delivery's handling was timed from the start
    of its batch: those that waited behind a batch being retried through a database
    outage showed under 0.1 s."""
    source = f"projector-{uuid4()}"
    envelopes = [relayed(ev.InvestorCreatedEvent(INVESTOR), 1), relayed(added(), 2)]
    deliveries = [MemoryDelivery(envelope, source=source) for envelope in envelopes]
    policy = RetryPolicy(unavailable=Limit(Backoff(0.001, 0.001), None))
    projector = Projector(FlakyReadModels(failures=3), Outages(), policy=policy)

    arrived = time.perf_counter() - 30  # waited 30 s behind the batch before
    await projector.project(deliveries, [arrived, arrived])

    assert [delivery.settled[0].kind for delivery in deliveries] == [OutcomeKind.PROCESSED] * 2
    assert sample("financing_messages_total", queue=source, outcome="retried") == 6
    assert sample("financing_message_handling_seconds_sum", queue=source) >= 60


async def test_deliveries_of_a_closed_channel_left_waiting_are_not_projected() -> None:
    """Regression: the deliveries a closed channel left in the projector's queue were
    projected, although the broker delivers them again after the ones before them. A
    batch given up as its channel closed (the database failing in the same fault) was
    followed by the rest of that channel's deliveries, projected ahead of the
    redelivered batch: issuers 3 and 4 made rows before 1 and 2, the lists' order wrong
    until a rebuild."""
    issuers = [uuid4() for _ in range(4)]
    envelopes = [
        envelope_of(ev.IssuerCreatedEvent(issuer_id=issuer), version=1) for issuer in issuers
    ]
    first = [MemoryDelivery(envelope, source="projector") for envelope in envelopes]
    again = [MemoryDelivery(envelope, source="projector") for envelope in envelopes]
    read_models = FlakyReadModels(failures=1, cut=first)
    policy = RetryPolicy(unavailable=Limit(Backoff(0.001, 0.001), None))
    projector = Projector(read_models, Outages(), policy=policy)

    await projector.project(first[:2])  # the channel closes while it is tried again
    await projector.project(first[2:] + again[:2])  # the rest of it, then the broker's again
    await projector.project(again[2:])

    assert [row.id for row in await read_models.issuers()] == issuers
    assert [delivery.settled for delivery in first] == [[ABANDONED]] * 4
    assert [delivery.settled for delivery in again] == [[Outcome.processed()]] * 4


async def test_the_time_kept_with_an_id_is_its_first_events_not_a_later_copys() -> None:
    """The first event of an id in a batch is the one projected: when its recording time
    cannot be read, none is kept, not that of a copy after it in the batch."""
    read_models = InMemoryReadModels()
    timed = relayed(added(), 2)
    untimed = replace(timed, headers={k: v for k, v in timed.headers.items() if k != "recorded_at"})
    await Projector(read_models, Outages()).project(
        [MemoryDelivery(untimed), MemoryDelivery(timed)]
    )
    assert await read_models.recorded_at([timed.message_id]) == {}


async def test_the_projection_delay_is_measured_by_the_clock_that_stamped_the_event() -> None:
    """Regression: measured by this host's clock from the event store's stamp: a host 30 s
    ahead of the database server read every delay 30 s longer, one behind read 0."""
    recorded = datetime.now(UTC) - timedelta(hours=1)  # by the server's clock
    before = sample("financing_projection_delay_seconds_sum")
    delivery = MemoryDelivery(relayed(added(), 1, recorded_at=recorded), source="projector")
    server_clock = recorded + timedelta(seconds=2)

    await Projector(RecordingReadModels(), Outages(), clock=lambda: server_clock).project(
        [delivery]
    )

    assert sample("financing_projection_delay_seconds_sum") - before == pytest.approx(2.0)


class HeldByAnother:
    """A query database holding the read models of store "a" until an operator mends it
    (after `refusals` questions about another store)."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.asked: list[str] = []

    async def require(self, store: str) -> None:
        self.asked.append(store)
        if store != "a" and self.refusals:
            self.refusals -= 1
            raise AwaitingOperator("query database", f"it holds store a's, not {store}'s")


async def test_events_of_another_event_store_wait_as_an_outage_and_are_projected_once_mended() -> (
    None
):
    """Regression: a projector of another deployment (a process opening the query
    database alone, which start-up cannot tell) projected its events into read models
    of another store, mixing them silently."""
    store = HeldByAnother(refusals=3)
    outages = Outages()
    read_models = RecordingReadModels()
    policy = RetryPolicy(unavailable=Limit(Backoff(0.001, 0.001), None))
    projector = Projector(read_models, outages, policy=policy, store=store)
    ours = stored(ev.InvestorCreatedEvent(INVESTOR), 1).envelope("b")
    foreign_event = foreign(added())  # another relayer's: no store named
    deliveries = [MemoryDelivery(e, source="projector") for e in (ours, foreign_event)]

    await projector.project(deliveries)

    assert store.asked == ["b"] * 4  # refused three times, an outage, then mended
    assert [d.settled[0].kind for d in deliveries] == [OutcomeKind.PROCESSED] * 2
    assert read_models.applied() == [ours.message_id, foreign_event.message_id]


class FailingWithABug(RecordingReadModels):
    """Read models whose every apply fails with a bug, keeping the log context of each."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[dict[str, object]] = []

    async def apply(
        self,
        batch: Sequence[tuple[str, ev.DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        self.contexts.append(structlog.contextvars.get_contextvars())
        raise ZeroDivisionError("a trigger divided by zero")


async def test_the_lines_of_a_failing_projection_say_which_event_they_are_about() -> None:
    """Regression (a probe): the lines of the retries of an event the read models failed
    on with a bug (a trigger's) named no message; only its dead letter's did."""
    read_models = FailingWithABug()
    envelope = relayed(ev.InvestorCreatedEvent(INVESTOR), 1)
    delivery = MemoryDelivery(envelope, source="projector")
    fast = RetryPolicy(bug=Limit(Backoff(0.001, 0.002), 2))

    with capture_logs() as logs:
        await Projector(read_models, Outages(), policy=fast).project([delivery])

    [outcome] = delivery.settled
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    # The batch's attempts: its retry's line names the event.
    [batch] = [line for line in logs if line["event"].startswith("projecting a batch failed")][:1]
    assert (batch["message_id"], batch["aggregate_id"]) == (envelope.message_id, str(INVESTOR))
    # Then the event's own attempts, each line of which names it (the log's context).
    alone = read_models.contexts[2:]
    assert alone and all(context["message_id"] == envelope.message_id for context in alone)
