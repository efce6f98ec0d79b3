"""The delivery pipeline, composed as production composes it, over in-memory fakes:
what becomes of each delivery (its outcome), and how often the handler runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
import structlog
from structlog.testing import capture_logs

from financing.application import codec, handlers, routes
from financing.application.errors import MissingAggregate, PoisonMessage, Unavailable
from financing.application.memory import InMemoryEventStore, InMemoryUnitOfWork
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    CreateInvestor,
    CreateIssuer,
    Message,
    ReverseFinancing,
    SellInvoice,
)
from financing.application.pipeline import (
    Decoded,
    Handler,
    Outcome,
    OutcomeKind,
    Step,
    StoreHandler,
    compose,
    exactly_once,
)
from financing.application.ports import (
    EVENT_STORE_HEADER,
    REFUSED,
    REQUEUED_AT_HEADER,
    Cause,
    Envelope,
    UnitOfWork,
)
from financing.application.retry import Backoff, Limit, Outages, RetryPolicy
from financing.application.turns import AggregateTurns
from financing.domain import events as ev
from financing.domain.aggregates import Investor, Issuer
from tests.unit.bus import InMemoryBus, MemoryDelivery, envelope_of

D = Decimal

# The default limits (bug: 3 attempts, conflict: 50, unavailable: unlimited),
# with pauses of a few milliseconds so the tests are fast.
FAST = Backoff(0.001, 0.004)
POLICY = RetryPolicy(
    unavailable=Limit(FAST, None),
    conflict=Limit(FAST, 50),
    permanent=None,
    bug=Limit(FAST, 3),
)


def step_of(
    handler: Handler,
    name: str,
    others: OutcomeKind = OutcomeKind.DEAD_LETTERED,
    outages: Outages | None = None,
    policy: RetryPolicy = POLICY,
) -> Step:
    return compose(
        handler,
        names=frozenset({name}),
        others=others,
        policy=policy,
        outages=outages or Outages(),
    )


def store_step(store: InMemoryEventStore, name: str, handler: StoreHandler) -> Step:
    return step_of(exactly_once(store, handler.__name__, handler), name)


def delivery(message: Message, message_id: UUID | str | None = None) -> MemoryDelivery:
    return MemoryDelivery(envelope_of(message, message_id), source="test_queue")


class Counting:
    """A handler that counts its calls and finds every message processed."""

    def __init__(self) -> None:
        self.calls: list[Message] = []

    async def __call__(self, decoded: Decoded) -> Outcome:
        self.calls.append(decoded.message)
        return Outcome.processed()


class Malformed(MemoryDelivery):
    """A delivery whose headers cannot be read (no message id)."""

    @property
    def name(self) -> str | None:
        return None

    def envelope(self) -> Envelope:
        raise PoisonMessage("missing message id")


# Selection


async def test_a_message_of_another_name_on_a_shared_feed_is_ignored() -> None:
    handler = Counting()
    step = step_of(handler, "InvoiceFinancedEvent", others=OutcomeKind.IGNORED)
    outcome = await step(delivery(ev.IssuerCreatedEvent(uuid4())))
    assert outcome.kind is OutcomeKind.IGNORED
    assert handler.calls == []


async def test_a_message_of_another_name_on_its_own_queue_is_dead_lettered() -> None:
    handler = Counting()
    step = step_of(handler, "SellInvoice", others=OutcomeKind.DEAD_LETTERED)
    outcome = await step(delivery(CreateIssuer(uuid4())))
    # Said as every reason is (regression, a probe: it alone lacked the error's class and
    # the attempts made).
    assert outcome == Outcome.dead_letter(
        "PoisonMessage: a 'CreateIssuer' message on 'test_queue', whose consumer handles no"
        " such message (permanent, after 1 attempt(s))"
    )
    assert handler.calls == []


async def test_a_message_of_its_own_name_reaches_the_handler_decoded() -> None:
    handler = Counting()
    issuer = uuid4()
    outcome = await step_of(handler, "CreateIssuer")(delivery(CreateIssuer(issuer)))
    assert outcome.kind is OutcomeKind.PROCESSED
    assert handler.calls == [CreateIssuer(issuer)]


# Decoding


async def test_an_undecodable_body_is_dead_lettered_at_once_with_the_codecs_reason() -> None:
    handler = Counting()
    broken = Envelope(message_id=str(uuid4()), name="CreateIssuer", body=b"{not json")
    outcome = await step_of(handler, "CreateIssuer")(MemoryDelivery(broken))
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert "PoisonMessage: CreateIssuer: body is not valid JSON" in outcome.detail
    assert "after 1 attempt(s)" in outcome.detail
    assert handler.calls == []


async def test_a_body_missing_a_field_is_dead_lettered_naming_the_field() -> None:
    handler = Counting()
    partial = Envelope(message_id=str(uuid4()), name="CreateInvestor", body=b'{"Balance":1}')
    outcome = await step_of(handler, "CreateInvestor")(MemoryDelivery(partial))
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert "CreateInvestor: missing field ID" in outcome.detail
    assert handler.calls == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'"Balance":-1000000000000', "InvestorRegistered.Balance: must be at least"),
        (b'"Balance":9999999999999999.99', "InvestorRegistered.Balance: must be at most"),
    ],
)
async def test_a_registration_balance_that_is_not_money_is_dead_lettered_naming_it(
    body: bytes, reason: str
) -> None:
    """Regression: the bus took balances beyond the Commands API's range (1e16 - 0.01)."""
    handler = Counting()
    registered = Envelope(
        message_id=str(uuid4()),
        name="InvestorRegistered",
        body=b'{"ID":"%s","Name":"Ann",%s}' % (str(uuid4()).encode(), body),
    )
    outcome = await step_of(handler, "InvestorRegistered")(MemoryDelivery(registered))
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert f"PoisonMessage: {reason}" in outcome.detail
    assert handler.calls == []


async def test_a_body_that_is_not_utf8_is_dead_lettered_naming_its_encoding() -> None:
    """Regression: a UTF-16 JSON body was processed."""
    handler = Counting()
    body = codec.encode(CreateIssuer(uuid4())).decode().encode("utf-16")
    utf16 = Envelope(message_id=str(uuid4()), name="CreateIssuer", body=body)
    outcome = await step_of(handler, "CreateIssuer")(MemoryDelivery(utf16))
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert "CreateIssuer: body is not valid JSON: it must be UTF-8, not UTF-16" in outcome.detail
    assert handler.calls == []


async def test_a_delivery_with_unreadable_headers_is_dead_lettered_with_the_reason() -> None:
    handler = Counting()
    malformed = Malformed(envelope_of(CreateIssuer(uuid4())))
    outcome = await step_of(handler, "CreateIssuer")(malformed)
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert "missing message id" in outcome.detail
    assert handler.calls == []


# Failures of the handler


async def buggy(uow: UnitOfWork, command: CreateIssuer) -> None:
    raise TypeError("boom")


async def test_a_handler_with_a_bug_is_retried_a_few_times_then_dead_lettered_with_its_place() -> (
    None
):
    store = InMemoryEventStore()
    calls = 0

    async def counted(uow: UnitOfWork, command: CreateIssuer) -> None:
        nonlocal calls
        calls += 1
        await buggy(uow, command)

    step = step_of(exactly_once(store, "buggy", counted), "CreateIssuer")
    outcome = await step(delivery(CreateIssuer(uuid4())))
    assert calls == 3
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    line = buggy.__code__.co_firstlineno + 1
    assert outcome.detail.startswith(f"TypeError: boom (at test_pipeline.py:{line} in buggy)")
    assert store.events == [] and store.processed == set()


async def reads_after_writing(uow: UnitOfWork, command: CreateIssuer) -> None:
    issuer = await uow.load(Issuer, command.id)
    issuer.create()
    await uow.save(issuer)
    await uow.load(Issuer, command.id)


async def test_a_handler_that_reads_after_writing_is_called_once_and_dead_lettered() -> None:
    store = InMemoryEventStore()
    calls = 0

    async def counted(uow: UnitOfWork, command: CreateIssuer) -> None:
        nonlocal calls
        calls += 1
        await reads_after_writing(uow, command)

    step = step_of(exactly_once(store, "reads_after_writing", counted), "CreateIssuer")
    outcome = await step(delivery(CreateIssuer(uuid4())))
    assert calls == 1
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert outcome.detail.startswith("ReadAfterWrite: load after a write in the same unit of work")
    assert store.events == [] and store.processed == set()


async def test_an_unavailable_dependency_is_retried_until_it_is_back_then_processed() -> None:
    store = InMemoryEventStore()
    failures = 60  # beyond every attempt limit of the policy
    calls = 0

    async def flaky_create_issuer(uow: UnitOfWork, command: CreateIssuer) -> None:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise Unavailable("database", "connection refused")
        await handlers.create_issuer(uow, command)

    issuer = uuid4()
    with capture_logs() as logs:
        outcome = await store_step(store, "CreateIssuer", flaky_create_issuer)(
            delivery(CreateIssuer(issuer))
        )
    assert outcome == Outcome.processed(1)
    assert calls == failures + 1
    assert [stored.event for stored in store.events] == [ev.IssuerCreatedEvent(issuer)]
    assert [line["event"] for line in logs] == ["database unavailable", "database recovered"]


async def test_a_delivery_that_can_no_longer_be_settled_while_retrying_is_abandoned() -> None:
    calls = 0
    target = delivery(CreateIssuer(uuid4()))

    async def channel_closes(decoded: Decoded) -> Outcome:
        nonlocal calls
        calls += 1
        target.open = False  # the channel it came on closed
        raise Unavailable("database", "connection refused")

    async with asyncio.timeout(5):  # fails, rather than hangs, if it kept retrying
        outcome = await step_of(channel_closes, "CreateIssuer")(target)
    assert outcome.kind is OutcomeKind.ABANDONED
    assert calls == 1


async def test_a_conflict_is_retried_until_the_handler_succeeds() -> None:
    store = InMemoryEventStore()
    issuer = uuid4()
    interfered = False

    async def raced_create_issuer(uow: UnitOfWork, command: CreateIssuer) -> None:
        nonlocal interfered
        await handlers.create_issuer(uow, command)
        if not interfered:
            interfered = True  # another writer creates it first
            async with store.unit_of_work() as other:
                await handlers.create_issuer(other, command)

    outcome = await store_step(store, "CreateIssuer", raced_create_issuer)(
        delivery(CreateIssuer(issuer))
    )
    # The retry found the issuer created: nothing to do, nothing appended twice.
    assert outcome.kind is OutcomeKind.UNCHANGED
    assert outcome.detail == f"Issuer {issuer}: already exists"
    assert [stored.event for stored in store.events] == [ev.IssuerCreatedEvent(issuer)]


# Waiting for an aggregate another message creates


async def test_a_message_naming_an_aggregate_not_created_yet_is_deferred() -> None:
    store = InMemoryEventStore()
    step = store_step(store, "SellInvoice", handlers.sell_invoice)
    issuer_id = uuid4()  # its CreateIssuer is still behind others on its queue

    outcome = await step(delivery(SellInvoice(uuid4(), issuer_id, D("50"))))

    assert outcome.kind is OutcomeKind.DEFERRED
    assert "MissingAggregate" in outcome.detail and str(issuer_id) in outcome.detail
    assert outcome.delay == POLICY.first_deferral  # put aside briefly the first time
    assert store.events == [] and store.processed == set()


async def test_a_message_back_from_a_deferral_gets_one_attempt_not_its_attempts_again() -> None:
    """Regression: each return ran its 8 attempts again (now 3), holding a consumer's slot about a
    second each time: 2,000 bids naming aggregates that never come held valid bids up
    for a minute."""
    calls = 0

    async def counted(uow: UnitOfWork, command: SellInvoice) -> None:
        nonlocal calls
        calls += 1
        await handlers.sell_invoice(uow, command)

    step = step_of(exactly_once(InMemoryEventStore(), "sell_invoice", counted), "SellInvoice")
    back = MemoryDelivery(envelope_of(SellInvoice(uuid4(), uuid4(), D("50"))), waited=5.0)

    outcome = await step(back)

    assert outcome.kind is OutcomeKind.DEFERRED
    assert calls == 1 and "after 1 attempt(s)" in outcome.detail
    assert outcome.delay == POLICY.deferral_delay(5.0) == 5.0  # as long as it waited


async def test_a_deferred_message_that_waited_long_enough_is_dead_lettered_saying_how_long() -> (
    None
):
    store = InMemoryEventStore()
    step = store_step(store, "SellInvoice", handlers.sell_invoice)
    late = MemoryDelivery(
        envelope_of(SellInvoice(uuid4(), uuid4(), D("50"))),
        waited=POLICY.aggregate_wait + 0.5,
    )

    outcome = await step(late)

    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    # Regression (a probe): "after 1 attempt(s); deferred, it waited ..." read as if it
    # had been tried once, not three times before its first deferral.
    assert outcome.detail.endswith(
        "(conflict, after 1 attempt(s)); deferred before (one attempt each time back),"
        f" it waited {POLICY.aggregate_wait + 0.5:.1f} s for it in all"
    )


async def test_a_deferred_message_back_late_past_its_wait_is_deferred_once_more() -> None:
    """Regression: the service stopped longer than the wait, the message creating the
    aggregate waiting in its queue all along: the deferred bid was dead-lettered at its
    first attempt after the start ("it waited 71.7 s"), its investor registered a
    moment later."""
    store = InMemoryEventStore()
    step = store_step(store, "SellInvoice", handlers.sell_invoice)
    back = MemoryDelivery(
        envelope_of(SellInvoice(uuid4(), uuid4(), D("50"))),
        waited=POLICY.aggregate_wait + 10.0,
        late=True,
    )

    outcome = await step(back)

    assert outcome.kind is OutcomeKind.DEFERRED
    assert outcome.past_wait_from == POLICY.aggregate_wait + 10.0
    assert outcome.delay == POLICY.deferral_delay(POLICY.aggregate_wait + 10.0)


@pytest.mark.parametrize(
    ("ended_ago", "kind"), [(None, "deferred"), (30.0, "deferred"), (90.0, "dead_lettered")]
)
async def test_a_deferred_message_whose_wait_an_outage_held_up_is_deferred_for_a_wait_more(
    ended_ago: float | None, kind: str
) -> None:
    """Regression (a probe): the command database's disk full for 100 s, its reads
    answered and its writes refused: the sales held up, 880 bids were dead-lettered for
    invoices that existed once the disk was freed. A dependency out (None: still out)
    at some moment of its wait gives the message a whole wait more, from now."""
    outages = Outages()
    outages.failed(Unavailable("command database", "DiskFullError: No space left on device"))
    if ended_ago is not None:
        outages.succeeded("command database")
        assert outages.down() == frozenset()
        outages._ended_at["command database"] -= ended_ago  # as long ago as that
    step = step_of(
        exactly_once(InMemoryEventStore(), "sell_invoice", handlers.sell_invoice),
        "SellInvoice",
        outages=outages,
    )
    waited = POLICY.aggregate_wait + 0.5
    back = MemoryDelivery(envelope_of(SellInvoice(uuid4(), uuid4(), D("50"))), waited=waited)

    outcome = await step(back)

    assert outcome.kind.value == kind, outcome.detail
    if kind == "deferred":
        assert outcome.past_wait_from == waited


@pytest.mark.parametrize(("beyond", "kind"), [(59.0, "deferred"), (61.0, "dead_lettered")])
async def test_a_message_in_its_pass_past_its_wait_may_wait_as_long_again_and_no_longer(
    beyond: float, kind: str
) -> None:
    """Regression: its pass was one deferral of at most 5 s, shorter than the backlogs a
    long stop leaves behind it in each queue."""
    store = InMemoryEventStore()
    step = store_step(store, "SellInvoice", handlers.sell_invoice)
    started = POLICY.aggregate_wait + 10.0
    back = MemoryDelivery(
        envelope_of(SellInvoice(uuid4(), uuid4(), D("50"))),
        waited=started + beyond * POLICY.aggregate_wait / 60,
        late=True,  # late again: a pass is given once
        past_wait_from=started,
    )

    outcome = await step(back)

    assert outcome.kind.value == kind
    assert outcome.past_wait_from is None


async def test_a_deferred_message_whose_aggregate_was_created_meanwhile_is_processed() -> None:
    store = InMemoryEventStore()
    issuer_id = uuid4()
    await store_step(store, "CreateIssuer", handlers.create_issuer)(
        delivery(CreateIssuer(issuer_id))
    )
    step = store_step(store, "SellInvoice", handlers.sell_invoice)
    back = MemoryDelivery(envelope_of(SellInvoice(uuid4(), issuer_id, D("50"))), waited=12.0)

    assert await step(back) == Outcome.processed(1)


async def test_without_a_wait_a_missing_aggregate_is_dead_lettered_after_its_attempts() -> None:
    store = InMemoryEventStore()
    step = step_of(
        exactly_once(store, "sell_invoice", handlers.sell_invoice),
        "SellInvoice",
        policy=replace(POLICY, aggregate_wait=0.0),
    )

    outcome = await step(delivery(SellInvoice(uuid4(), uuid4(), D("50"))))

    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    attempts = MissingAggregate.retry_attempts
    assert f"after {attempts} attempt(s)" in outcome.detail and "waited" not in outcome.detail


# Exactly once


async def test_a_redelivered_message_is_a_duplicate_and_appends_nothing_twice() -> None:
    store = InMemoryEventStore()
    step = store_step(store, "CreateInvestor", handlers.create_investor)
    message_id = uuid4()
    command = CreateInvestor(uuid4(), D("100"))
    first = await step(delivery(command, message_id))
    events = list(store.events)
    again = await step(delivery(command, message_id))
    assert first == Outcome.processed(2)
    assert again.kind is OutcomeKind.DUPLICATE
    assert store.events == events and len(events) == 2
    assert store.processed == {("create_investor", str(message_id))}


async def test_a_redelivered_message_that_breaks_no_rule_is_a_duplicate_too() -> None:
    store = InMemoryEventStore()
    investor_id, issuer_id, invoice_id = uuid4(), uuid4(), uuid4()
    for name, handler, message in [
        ("CreateInvestor", handlers.create_investor, CreateInvestor(investor_id, D("100"))),
        ("CreateIssuer", handlers.create_issuer, CreateIssuer(issuer_id)),
        ("SellInvoice", handlers.sell_invoice, SellInvoice(invoice_id, issuer_id, D("50"))),
    ]:
        await store_step(store, name, handler)(delivery(message))
    step = store_step(store, "BidOnInvoice", handlers.bid_on_invoice)
    bid, message_id = BidOnInvoice(investor_id, invoice_id, D("10")), uuid4()
    assert await step(delivery(bid, message_id)) == Outcome.processed(1)
    again = await step(delivery(bid, message_id))  # the balance would allow a second bid
    assert again.kind is OutcomeKind.DUPLICATE
    assert [stored.name for stored in store.events].count("BidOnInvoicePlacedEvent") == 1


async def test_another_message_under_a_processed_id_is_dead_lettered_not_dropped() -> None:
    store = InMemoryEventStore()
    step = store_step(store, "CreateInvestor", handlers.create_investor)
    message_id = uuid4()
    assert await step(delivery(CreateInvestor(uuid4(), D("100")), message_id)) == (
        Outcome.processed(2)
    )
    other = CreateInvestor(uuid4(), D("250"))  # a producer reusing the id
    outcome = await step(delivery(other, message_id))
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert "ReusedMessageId" in outcome.detail and str(message_id) in outcome.detail
    assert "already processed a CreateInvestor message" in outcome.detail
    assert [stored.aggregate_id for stored in store.events].count(other.id) == 0


async def test_a_reused_id_relayed_from_an_event_store_says_the_store_lost_events() -> None:
    """The producer that reused an id, where both messages say they were relayed from an
    event store, is that store's relayer: the store lost events it had relayed (a
    fail-over to a standby behind it), which the reason said nothing of."""
    store = InMemoryEventStore()
    step = store_step(store, "CreateInvestor", handlers.create_investor)
    message_id = uuid4()

    def relayed(message: CreateInvestor) -> MemoryDelivery:
        envelope = envelope_of(message, message_id)
        headers = {**envelope.headers, EVENT_STORE_HEADER: "financing"}
        return MemoryDelivery(replace(envelope, headers=headers), source="test_queue")

    assert await step(relayed(CreateInvestor(uuid4(), D("100")))) == Outcome.processed(2)
    outcome = await step(relayed(CreateInvestor(uuid4(), D("250"))))
    assert outcome.kind is OutcomeKind.DEAD_LETTERED
    assert "relayed from event store 'financing', which lost events" in outcome.detail
    assert "producer must give it an id" not in outcome.detail


async def test_another_message_under_a_processed_id_is_dead_lettered_when_it_breaks_a_rule() -> (
    None
):
    # The record is looked up when a rule says no, too: this one is not a copy either.
    store = InMemoryEventStore()
    issuer_id, message_id = uuid4(), uuid4()
    await store_step(store, "CreateIssuer", handlers.create_issuer)(
        delivery(CreateIssuer(issuer_id))
    )
    step = store_step(store, "SellInvoice", handlers.sell_invoice)
    invoice = SellInvoice(uuid4(), issuer_id, D("50"))
    assert await step(delivery(invoice, message_id)) == Outcome.processed(1)
    again = await step(delivery(SellInvoice(invoice.invoice_id, issuer_id, D("70")), message_id))
    assert again.kind is OutcomeKind.DEAD_LETTERED and "ReusedMessageId" in again.detail


async def test_a_copy_is_a_duplicate_where_the_record_keeps_no_digest() -> None:
    # Records of releases that kept no digest: a copy cannot be told from another message.
    store = InMemoryEventStore()
    step = store_step(store, "CreateInvestor", handlers.create_investor)
    message_id = uuid4()
    await step(delivery(CreateInvestor(uuid4(), D("100")), message_id))
    key = ("create_investor", str(message_id))
    store.outcomes[key] = replace(store.outcomes[key], digest="")
    outcome = await step(delivery(CreateInvestor(uuid4(), D("250")), message_id))
    assert outcome.kind is OutcomeKind.DUPLICATE


async def _refused_bid(store: InMemoryEventStore) -> tuple[Step, BidOnInvoice, UUID, str]:
    """A bid refused for want of funds, then those funds released: judged again, it would
    be placed. The bid's step, the bid, its message id and the refusal's reason."""
    investor_id, issuer_id, first, second = uuid4(), uuid4(), uuid4(), uuid4()
    for name, handler, message in [
        ("CreateInvestor", handlers.create_investor, CreateInvestor(investor_id, D("10"))),
        ("CreateIssuer", handlers.create_issuer, CreateIssuer(issuer_id)),
        ("SellInvoice", handlers.sell_invoice, SellInvoice(first, issuer_id, D("50"))),
        ("SellInvoice", handlers.sell_invoice, SellInvoice(second, issuer_id, D("50"))),
    ]:
        await store_step(store, name, handler)(delivery(message))
    step = store_step(store, "BidOnInvoice", handlers.bid_on_invoice)
    assert await step(delivery(BidOnInvoice(investor_id, first, D("10")))) == Outcome.processed(1)
    bid, message_id = BidOnInvoice(investor_id, second, D("5")), uuid4()
    refused = await step(delivery(bid, message_id))
    assert refused.kind is OutcomeKind.DEAD_LETTERED
    assert "balance 0 is less than the bid 5" in refused.detail
    async with store.unit_of_work() as uow:  # the first bid lost: its funds released
        investor = await uow.load(Investor, investor_id)
        investor.release_funds(D("10"))
        await uow.save(investor)
    return step, bid, message_id, refused.detail


def _placed(store: InMemoryEventStore, bid: BidOnInvoice) -> int:
    return sum(
        stored.name == "BidOnInvoicePlacedEvent" and str(bid.invoice_id) in stored.body
        for stored in store.events
    )


@pytest.mark.parametrize("redelivered", [False, True])
async def test_a_copy_of_a_refused_message_is_dead_lettered_for_its_rule_not_judged_again(
    redelivered: bool,
) -> None:
    """Regression: a refusal was not recorded, so each copy was judged again: a client's
    retry under the same idempotency key, or the broker's redelivery, was dead-lettered
    for another balance, or placed once the funds were back while the first copy's dead
    letter said it was refused. A copy is dead-lettered again, for the rule recorded:
    dropped, it could take the only dead letter with it (the broker's copy of a delivery
    that ended before its dead letter was kept)."""
    store = InMemoryEventStore()
    step, bid, message_id, reason = await _refused_bid(store)
    record = store.outcomes[("bid_on_invoice", str(message_id))]
    assert (record.outcome, record.events) == ("refused", 0)
    copy = replace(envelope_of(bid, message_id), redelivered=redelivered)
    assert await step(MemoryDelivery(copy, source="test_queue")) == Outcome.dead_letter(reason)
    assert _placed(store, bid) == 0


class _CommitAnswerLost(InMemoryEventStore):
    """A store whose first unit of work recording a refusal commits, and then fails as
    the database does when the answer to a commit is lost (its statement timed out)."""

    lost = False

    @asynccontextmanager
    async def unit_of_work(self, cause: Cause | None = None) -> AsyncIterator[InMemoryUnitOfWork]:
        async with super().unit_of_work(cause) as uow:
            yield uow
        if not self.lost and any(what.outcome == REFUSED for what in uow._outcomes.values()):
            self.lost = True
            raise Unavailable("command database", "the connection was lost after COMMIT")


async def test_a_refusal_whose_commit_was_not_seen_is_dead_lettered_when_retried() -> None:
    """The delivery's retry finds the refusal whose commit it saw fail: it is dead-lettered,
    not taken for a copy of itself and dropped with no dead letter at all."""
    store = _CommitAnswerLost()
    await _refused_bid(store)  # which asserts that the refused bid was dead-lettered
    assert store.lost  # after its first attempt saw the refusal's commit fail


async def test_a_refused_message_requeued_by_an_operator_is_judged_again() -> None:
    store = InMemoryEventStore()
    step, bid, message_id, _ = await _refused_bid(store)
    envelope = envelope_of(bid, message_id)
    requeued = replace(envelope, headers={**envelope.headers, REQUEUED_AT_HEADER: "now"})
    assert await step(MemoryDelivery(requeued, source="test_queue")) == Outcome.processed(1)
    assert _placed(store, bid) == 1
    assert store.outcomes[("bid_on_invoice", str(message_id))].outcome == "processed"
    assert (await step(MemoryDelivery(requeued, source="test_queue"))).kind is (
        OutcomeKind.DUPLICATE
    )


async def test_a_requeued_message_the_broker_redelivers_keeps_the_refusal_recorded() -> None:
    """The delivery the broker gives again may have judged it already (refused again,
    dead-lettered, its ack lost): judged once more, it could be placed beside that dead
    letter. It is dead-lettered again for the rule recorded (requeue it again)."""
    store = InMemoryEventStore()
    step, bid, message_id, reason = await _refused_bid(store)
    envelope = envelope_of(bid, message_id)
    requeued = replace(
        envelope, headers={**envelope.headers, REQUEUED_AT_HEADER: "now"}, redelivered=True
    )
    assert await step(MemoryDelivery(requeued, source="test_queue")) == (
        Outcome.dead_letter(reason)
    )
    assert _placed(store, bid) == 0


async def test_a_message_waiting_for_its_aggregate_is_not_recorded_as_refused() -> None:
    store = InMemoryEventStore()
    step = store_step(store, "BidOnInvoice", handlers.bid_on_invoice)
    outcome = await step(delivery(BidOnInvoice(uuid4(), uuid4(), D("5"))))
    assert outcome.kind is OutcomeKind.DEFERRED
    assert store.outcomes == {} and store.processed == set()


async def test_the_same_message_for_two_consumers_is_processed_by_each() -> None:
    store = InMemoryEventStore()
    message_id = uuid4()
    command = CreateIssuer(uuid4())
    first = exactly_once(store, "first", handlers.create_issuer)
    second = exactly_once(store, "second", handlers.create_issuer)
    assert (await step_of(first, "CreateIssuer")(delivery(command, message_id))).events == 1
    outcome = await step_of(second, "CreateIssuer")(delivery(command, message_id))
    assert outcome.kind is OutcomeKind.UNCHANGED  # not DUPLICATE: a consumer of its own
    assert store.processed == {("first", str(message_id)), ("second", str(message_id))}


async def test_handler_parts_wrap_the_handler_inside_the_retry() -> None:
    store = InMemoryEventStore()
    seen: list[OutcomeKind] = []

    def twice(handler: Handler) -> Handler:
        async def run(decoded: Decoded) -> Outcome:
            outcomes = [await handler(decoded), await handler(decoded)]
            seen.extend(outcome.kind for outcome in outcomes)
            return outcomes[0]

        return run

    step = compose(
        exactly_once(store, "create_issuer", handlers.create_issuer),
        names=frozenset({"CreateIssuer"}),
        others=OutcomeKind.DEAD_LETTERED,
        policy=POLICY,
        outages=Outages(),
        handler_parts=[twice],
    )
    assert (await step(delivery(CreateIssuer(uuid4())))).kind is OutcomeKind.PROCESSED
    assert seen == [OutcomeKind.PROCESSED, OutcomeKind.DUPLICATE]
    assert len(store.events) == 1


# Commands that change nothing


async def _financed_invoice(bus: InMemoryBus) -> UUID:
    issuer, investor, invoice = uuid4(), uuid4(), uuid4()
    await bus.run(CreateIssuer(issuer))
    await bus.run(CreateInvestor(investor, D("100")))
    await bus.run(SellInvoice(invoice, issuer, D("10")))
    await bus.run(BidOnInvoice(investor, invoice, D("20")))
    return invoice


def command_step(bus: InMemoryBus, name: str) -> Step:
    [route] = [route for route in routes.COMMANDS if route.message_name == name]
    return store_step(bus.store, name, route.handler)


async def test_approving_an_available_invoice_is_unchanged_naming_the_rule_and_logged() -> None:
    bus = InMemoryBus()
    issuer, invoice = uuid4(), uuid4()
    await bus.run(CreateIssuer(issuer))
    await bus.run(SellInvoice(invoice, issuer, D("10")))
    events = list(bus.store.events)
    with capture_logs() as logs:
        outcome = await command_step(bus, "ApproveFinancing")(delivery(ApproveFinancing(invoice)))
    assert outcome.kind is OutcomeKind.UNCHANGED
    assert "only a FINANCED invoice can be approved" in outcome.detail
    assert f"Invoice {invoice}: is AVAILABLE" in outcome.detail
    assert bus.store.events == events
    [line] = [line for line in logs if line["event"] == "message changed nothing"]
    assert line["log_level"] == "info"
    assert line["reason"] == outcome.detail
    assert line["consumer"] == "approve_financing"


async def test_reversing_an_approved_invoice_is_unchanged_naming_the_rule_and_logged() -> None:
    bus = InMemoryBus()
    invoice = await _financed_invoice(bus)
    await bus.run(ApproveFinancing(invoice))
    events = list(bus.store.events)
    with capture_logs() as logs:
        outcome = await command_step(bus, "ReverseFinancing")(delivery(ReverseFinancing(invoice)))
    assert outcome.kind is OutcomeKind.UNCHANGED
    assert "is APPROVED; only a FINANCED invoice can be reversed" in outcome.detail
    assert bus.store.events == events
    [line] = [line for line in logs if line["event"] == "message changed nothing"]
    assert (line["log_level"], line["reason"]) == ("info", outcome.detail)


async def test_an_unchanged_message_is_still_recorded_as_processed() -> None:
    bus = InMemoryBus()
    invoice = await _financed_invoice(bus)
    await bus.run(ApproveFinancing(invoice))
    message_id = uuid4()
    step = command_step(bus, "ApproveFinancing")
    assert (await step(delivery(ApproveFinancing(invoice), message_id))).kind is (
        OutcomeKind.UNCHANGED
    )
    assert (await step(delivery(ApproveFinancing(invoice), message_id))).kind is (
        OutcomeKind.DUPLICATE
    )


async def test_a_command_that_appends_events_is_processed_and_logs_no_unchanged_line() -> None:
    bus = InMemoryBus()
    invoice = await _financed_invoice(bus)
    with capture_logs() as logs:
        outcome = await command_step(bus, "ApproveFinancing")(delivery(ApproveFinancing(invoice)))
    assert outcome == Outcome.processed(1)
    assert not [line for line in logs if line["event"] == "message changed nothing"]


@pytest.mark.parametrize(
    ("command", "aggregate"),
    [
        (ApproveFinancing(INVOICE := uuid4()), INVOICE),
        (BidOnInvoice(INVESTOR := uuid4(), uuid4(), D(10)), INVESTOR),
        (CreateIssuer(ISSUER := uuid4()), ISSUER),
    ],
)
async def test_the_lines_about_a_command_name_the_aggregate_it_changes(
    command: ApproveFinancing | BidOnInvoice | CreateIssuer, aggregate: UUID
) -> None:
    """Regression (a probe): a command carries no aggregateID header, so every line about
    one said `aggregate_id` null: a search of the log for an invoice missed the commands
    that concern it."""
    bound: list[object] = []

    async def handler(decoded: Decoded) -> Outcome:
        bound.append(structlog.contextvars.get_contextvars().get("aggregate_id"))
        return Outcome.processed()

    step = step_of(handler, command.name())
    # In a task of its own, as each delivery is handled.
    outcome = await asyncio.create_task(step(delivery(command)))

    assert outcome.kind is OutcomeKind.PROCESSED
    assert bound == [str(aggregate)]


async def test_the_retries_of_deliveries_that_lost_a_race_on_an_aggregate_take_turns() -> None:
    """Regression: every delivery that lost a race on an aggregate tried again at once
    with the others that lost: 600 bids of one investor in one process cost 2,421
    attempts that lost, each loser racing every other."""
    store = InMemoryEventStore()
    investor = uuid4()
    async with store.unit_of_work() as uow:
        created = await uow.load(Investor, investor)
        created.create(Decimal(100))
        await uow.save(created)
    racers = 5
    loaded = asyncio.Barrier(racers)
    overlapped = asyncio.Event()
    attempts: dict[UUID, int] = {}
    running = most = 0

    async def bid(uow: UnitOfWork, command: CreateIssuer) -> None:
        nonlocal running, most
        held = await uow.load(Investor, investor)
        attempts[command.id] = attempts.get(command.id, 0) + 1
        if attempts[command.id] == 1:
            await loaded.wait()  # every first attempt loads the same version: all but one lose
        else:
            running += 1
            most = max(most, running)
            if running > 1:
                overlapped.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):  # long enough for another retry to come in
                    await overlapped.wait()
            running -= 1
        held.place_bid(uuid4(), Decimal(1))
        await uow.save(held)

    turns = AggregateTurns()
    step = compose(
        exactly_once(store, "bid", bid),
        names=frozenset({"CreateIssuer"}),
        others=OutcomeKind.DEAD_LETTERED,
        policy=POLICY,
        outages=Outages(),
        turns=turns,
    )
    outcomes = await asyncio.gather(*(step(delivery(CreateIssuer(uuid4()))) for _ in range(racers)))

    assert [outcome.kind for outcome in outcomes] == [OutcomeKind.PROCESSED] * racers
    assert most == 1, "retries of the same aggregate ran side by side"
    assert len(turns) == 0  # every turn let go


async def test_a_financing_at_the_asking_price_releases_nothing_and_says_it_at_debug_only() -> None:
    """Regression (a soak at 20 sagas/s): every financing at exactly the asking price
    wrote an INFO line, `message changed nothing ... releasing 0.00 is not a positive
    amount`: 16,311 of its 16,369 lines."""
    bus = InMemoryBus()
    investor, issuer, invoice = uuid4(), uuid4(), uuid4()
    await bus.run(CreateInvestor(investor, D("100")))
    await bus.run(CreateIssuer(issuer))
    await bus.run(SellInvoice(invoice, issuer, D("10")))
    with capture_logs() as logs:
        await bus.run(BidOnInvoice(investor, invoice, D("10")))  # the whole saga
    [line] = [line for line in logs if line["event"] == "message changed nothing"]
    assert (line["consumer"], line["log_level"]) == ("financing_releases_excess_bid", "debug")
