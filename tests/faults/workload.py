"""A deterministic financing workload, a deployment to run it against, and the checks after it.

`deployment()` starts `financing serve` on databases and a vhost of its own.
`Workload` drives dozens of concurrent financing sagas the way real clients
would: Registering's integration events on `events`, commands through the
Commands gRPC API, each retried only while the call fails for want of the
service (UNAVAILABLE, connection refused or reset, deadline exceeded). A
retried call may duplicate a command that did get through (a second invoice,
a second bid): that is what a real client causes too, and the sagas are built
so that duplicates cannot change the final state of anything they know.

Each saga (seeded, so the same seed gives the same sagas):
  register an issuer and two or three investors -> sell an invoice ->
  a bid below the asking price (rejected) -> the winning bid (financed, maybe
  with an excess to release) -> sometimes a late bid (rejected) and a bid the
  investor cannot afford (dead-lettered) -> approve, reverse, or leave it.
A step waits until the event store shows the previous step's outcome, so the
invoice sees the bids in the saga's order and the final state is known in
advance (`Workload.expected()`).

After the faults: `settle()` waits until `financing check` passes (no
violation, no saga step in flight, read models equal to a replay) and
`verify_effects()` compares the read models with what the sagas must have
produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import Connection

from financing.adapters.postgres.connection import is_unavailable
from financing.adapters.postgres.event_store import EVENT_COLUMNS, stored_event
from financing.adapters.postgres.read_models import PostgresReadModels
from financing.adapters.rabbitmq.connection import (
    ClosedIfNotOpened,
    describe,
    is_broker_error,
)
from financing.adapters.rabbitmq.dead_letters import REASON_HEADER, SOURCE_QUEUE_HEADER
from financing.adapters.rabbitmq.envelopes import to_amqp
from financing.adapters.rabbitmq.topology import DEAD_LETTER_QUEUE, declare_events_exchange
from financing.application import codec
from financing.application.errors import Unavailable
from financing.application.messages import InvestorRegistered, IssuerRegistered
from financing.application.ports import Envelope
from financing.config import Database
from financing.domain import events as ev
from financing.entrypoints.cli.check import CheckResult, run_check
from financing.generated import (
    ApproveFinancingCommand,
    BidOnInvoiceCommand,
    CommandsStub,
    Money,
    ReverseFinancingCommand,
    SellInvoiceCommand,
    Uuid,
)
from tests.support.deployment import local_deployment
from tests.support.infra import wait_until
from tests.support.service import ServiceProcess

T = TypeVar("T")

# The suite's own database sessions carry this name, so that a fault aimed at
# the service's sessions (pg_terminate_backend) spares the observers.
OBSERVER_APPLICATION = "financing_faults_observer"
# Small, so that aggregates are also loaded from snapshots while faults strike.
SNAPSHOT_INTERVAL = "3"
# How long one RPC may take before the client gives up on that attempt: more
# than the listener's own budget for enqueueing (5 s), so that its UNAVAILABLE
# answer arrives before the client's deadline.
RPC_TIMEOUT = 8.0
POLL_INTERVAL = 0.05
CENT = Decimal("0.01")

# Statuses a client retries: the service is not there or could not take the command.
RETRYABLE_STATUSES = frozenset({Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED})
# What the gRPC client raises when the connection is refused or lost, or the deadline passes.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    StreamTerminatedError,
    ProtocolError,
)


def lost_while_opening(error: BaseException) -> bool:
    """Whether `error` is grpclib's client losing its connection as it opens a stream.

    grpclib's channel hands out a connection that the server closed after it was made
    and before the call's first stream (a service killed in that moment): its
    `create_stream` then raises AttributeError for the transport the close removed. The
    next call on the channel connects again, so this is a transport failure like any other.
    """
    return (
        isinstance(error, AttributeError)
        and error.name == "_transport"
        and isinstance(error.obj, Connection)
    )


def transport_failure(error: BaseException) -> bool:
    """Whether a gRPC call failed for want of the service, not for what it answered."""
    return isinstance(error, TRANSPORT_ERRORS) or lost_while_opening(error)


# What publishing an integration event raises while the broker is out of reach.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aio-pika: "connection closed" on a channel of a dead connection
)


def broker_failure(error: BaseException) -> bool:
    """Whether publishing failed for want of the broker."""
    return isinstance(error, BROKER_ERRORS)


def suite_seed() -> int:
    """The seed of the workloads and fault schedules; FINANCING_FAULTS_SEED replays another run."""
    return int(os.environ.get("FINANCING_FAULTS_SEED", "1"))


class WorkloadError(AssertionError):
    """The service answered something a correct service never answers, or a saga got stuck."""


# -- deployment --------------------------------------------------------------------------------


@dataclass
class Deployment:
    """One `financing serve` process on databases and a vhost of its own."""

    name: str
    vhost: str
    amqp_url: str
    command_db: Database
    query_db: Database
    command_address: tuple[str, int]
    query_address: tuple[str, int]
    metrics_address: tuple[str, int]
    service: ServiceProcess
    # The suite's own pools (application name OBSERVER_APPLICATION).
    event_pool: asyncpg.Pool
    query_pool: asyncpg.Pool

    @property
    def databases(self) -> tuple[str, str]:
        return (
            str(self.command_db.connect_kwargs["database"]),
            str(self.query_db.connect_kwargs["database"]),
        )

    def log_tail(self, max_lines: int = 80) -> str:
        return self.service.log_tail(max_lines=max_lines)

    def starts(self) -> int:
        """How many times the service became ready: 1 means it never had to be restarted."""
        return self.log_events()["service ready"]

    def json_log(self) -> list[dict[str, Any]]:
        """Every line the service wrote, over all its starts; each must be one JSON object."""
        path = self.service.log_path
        text = path.read_text("utf-8", "replace") if path.exists() else ""
        lines: list[dict[str, Any]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if not isinstance(line, dict):
                raise AssertionError(
                    f"line {number} of the service log is not a JSON object: {raw}"
                )
            lines.append(line)
        return lines

    def outage_lines(self, dependency: str) -> list[tuple[str, str]]:
        """(level, event) of the lines that say an outage of `dependency` began or ended."""
        return [
            (str(line.get("level")), str(line["event"]))
            for line in self.json_log()
            if line.get("dependency") == dependency
        ]

    def log_events(self) -> Counter[str]:
        """How many log lines of each event the service wrote, over all its starts."""
        counts: Counter[str] = Counter()
        path = self.service.log_path
        text = path.read_text("utf-8", "replace") if path.exists() else ""
        for raw in text.splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and isinstance(line.get("event"), str):
                    counts[line["event"]] += 1
        return counts


async def observer_pool(db: Database) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        **db.connect_kwargs,
        min_size=1,
        max_size=3,
        server_settings={"application_name": OBSERVER_APPLICATION},
    )
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def deployment(
    prefix: str,
    extra_env: Mapping[str, str] | None = None,
    *,
    redeliveries: int = 1,
    database_via: tuple[str, int] | None = None,
    own_role: bool = False,
) -> AsyncIterator[Deployment]:
    """A started service; on exit it must stop with exit code 0 on SIGTERM, then all is removed."""
    env = {"FINANCING_SNAPSHOT_INTERVAL": SNAPSHOT_INTERVAL, **(extra_env or {})}
    async with (
        local_deployment(
            f"fin_fault_{prefix}",
            extra_env=env,
            redeliveries=redeliveries,
            database_via=database_via,
            own_role=own_role,
        ) as local,
        contextlib.AsyncExitStack() as stack,
    ):
        event_pool = await observer_pool(local.command_db)
        stack.push_async_callback(event_pool.close)
        query_pool = await observer_pool(local.query_db)
        stack.push_async_callback(query_pool.close)
        yield Deployment(
            name=local.name,
            vhost=local.name,
            amqp_url=local.amqp_url,
            command_db=local.command_db,
            query_db=local.query_db,
            command_address=local.command_address,
            query_address=local.query_address,
            metrics_address=local.metrics_address,
            service=local.service,
            event_pool=event_pool,
            query_pool=query_pool,
        )


# -- the sagas --------------------------------------------------------------------------------


def money(cents: int) -> Decimal:
    return (Decimal(cents) * CENT).quantize(CENT)


def seeded_uuid(rng: random.Random) -> UUID:
    return UUID(int=rng.getrandbits(128), version=4)


@dataclass(frozen=True)
class PlannedInvestor:
    role: str  # "loser", "winner" or "poor"
    id: UUID
    balance: Decimal


@dataclass(frozen=True)
class PlannedBid:
    role: str
    amount: Decimal
    outcome: str  # "rejected", "financed" or "refused" (cannot afford it: dead-lettered)


@dataclass(frozen=True)
class SagaPlan:
    index: int
    issuer: UUID
    asking_price: Decimal
    investors: dict[str, PlannedInvestor]
    bids: tuple[PlannedBid, ...]
    ending: str | None  # "approve", "reverse" or None (stays financed)
    registration_ids: tuple[str, ...]  # message ids of the integration events

    @property
    def winning_bid(self) -> PlannedBid:
        return next(bid for bid in self.bids if bid.outcome == "financed")


def plan_saga(seed: int, index: int) -> SagaPlan:
    """Saga `index` of the workload seeded `seed`: the same pair always gives the same plan."""
    rng = random.Random(f"financing-faults/{seed}/{index}")
    asking = rng.randint(1_000, 50_000)
    below = rng.randint(100, asking - 1)
    winning = asking + (0 if rng.random() < 0.3 else rng.randint(1, 5_000))
    bids = [
        PlannedBid("loser", money(below), "rejected"),
        PlannedBid("winner", money(winning), "financed"),
    ]
    loser_total = below
    if rng.random() < 0.5:
        late = asking + rng.randint(0, 2_000)
        bids.append(PlannedBid("loser", money(late), "rejected"))
        loser_total += late
    # Balances cover every bid of the saga more than twice over, so a bid
    # duplicated by a client's retry is always affordable and every outcome
    # stays what the plan says, in whatever order duplicates arrive.
    investors = {
        "loser": PlannedInvestor(
            "loser", seeded_uuid(rng), money(3 * loser_total + rng.randint(0, 10_000))
        ),
        "winner": PlannedInvestor(
            "winner", seeded_uuid(rng), money(3 * winning + rng.randint(0, 10_000))
        ),
    }
    if rng.random() < 0.3:
        poor = rng.randint(100, asking - 1)
        investors["poor"] = PlannedInvestor("poor", seeded_uuid(rng), money(poor))
        bids.append(PlannedBid("poor", money(asking), "refused"))
    ending_roll = rng.random()
    ending = "approve" if ending_roll < 0.45 else "reverse" if ending_roll < 0.8 else None
    issuer = seeded_uuid(rng)
    registration_ids = tuple(str(seeded_uuid(rng)) for _ in range(1 + len(investors)))
    return SagaPlan(
        index=index,
        issuer=issuer,
        asking_price=money(asking),
        investors=investors,
        bids=tuple(bids),
        ending=ending,
        registration_ids=registration_ids,
    )


# -- what the event store shows ---------------------------------------------------------------

_PENDING_EVENTS = (
    f"SELECT {EVENT_COLUMNS} FROM events"
    " WHERE (transaction_id, position) > ($1::xid8, $2)"
    " AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY transaction_id, position LIMIT 1000"
)


@dataclass
class EventStoreView:
    """The facts the sagas wait for, folded from the event store in commit order."""

    events: int = 0
    issuers: set[UUID] = field(default_factory=set)
    investors: set[UUID] = field(default_factory=set)
    invoices: dict[UUID, tuple[UUID, Decimal]] = field(default_factory=dict)
    # (invoice, investor, amount) -> how many times the invoice answered such a bid
    answered: Counter[tuple[UUID, UUID, Decimal]] = field(default_factory=Counter)
    approved: set[UUID] = field(default_factory=set)
    reversed: set[UUID] = field(default_factory=set)

    def apply(self, event: ev.DomainEvent) -> None:
        self.events += 1
        match event:
            case ev.IssuerCreatedEvent(issuer_id=issuer):
                self.issuers.add(issuer)
            case ev.InvestorCreatedEvent(investor_id=investor):
                self.investors.add(investor)
            case ev.InvoiceCreatedEvent(invoice_id=invoice, issuer_id=issuer, asking_price=price):
                self.invoices[invoice] = (issuer, price)
            case (
                ev.InvoiceFinancedEvent(invoice_id=invoice, bid=bid)
                | ev.BidOnInvoiceRejectedEvent(invoice_id=invoice, bid=bid)
            ):
                self.answered[(invoice, bid.investor_id, bid.amount)] += 1
            case ev.InvoiceApprovedEvent(invoice_id=invoice):
                self.approved.add(invoice)
            case ev.InvoiceReversedEvent(invoice_id=invoice):
                self.reversed.add(invoice)


class EventStoreWatch:
    """Polls the event store (gap-safe, like the relayer) and wakes the waiting sagas."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.view = EventStoreView()
        self._changed = asyncio.Condition()
        self._after: tuple[Any, int] = (0, 0)

    async def run(self) -> None:
        while True:
            try:
                rows = await self._pool.fetch(_PENDING_EVENTS, *self._after)
            except Exception as error:
                if not is_unavailable(error):
                    raise
                await asyncio.sleep(POLL_INTERVAL)  # the server is restarting: poll again
                continue
            if rows:
                for row in rows:
                    self.view.apply(stored_event(row).event)
                self._after = (rows[-1]["transaction_id"], rows[-1]["position"])
                async with self._changed:
                    self._changed.notify_all()
            if len(rows) < 1000:
                await asyncio.sleep(POLL_INTERVAL)

    async def wait_for(self, predicate: Callable[[EventStoreView], bool], within: float) -> bool:
        """Whether `predicate` became true within `within` seconds."""
        try:
            async with asyncio.timeout(max(within, 0.0)), self._changed:
                await self._changed.wait_for(lambda: predicate(self.view))
        except TimeoutError:
            return False
        return True


# -- Registering's integration events ---------------------------------------------------------


class IntegrationPublisher:
    """Publishes to `events` with confirms, reconnecting after any broker trouble."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> AbstractExchange:
        async with self._lock:
            if self._exchange is None or self._channel is None or self._channel.is_closed:
                await self._drop()
                # A connection that fails to open closes itself, as the service's do:
                # left to aio-pika's finaliser, it warned that its close was never awaited.
                self._connection = await aio_pika.connect(
                    self._url, timeout=5, connection_class=ClosedIfNotOpened
                )
                self._channel = await self._connection.channel(publisher_confirms=True)
                self._exchange = await declare_events_exchange(self._channel)
            return self._exchange

    async def _drop(self) -> None:
        connection, self._connection, self._channel, self._exchange = (
            self._connection,
            None,
            None,
            None,
        )
        if connection is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await asyncio.wait_for(connection.close(), 2)

    async def publish(self, envelope: Envelope) -> None:
        """One attempt: raises a BROKER_ERRORS error when it is not confirmed."""
        try:
            async with asyncio.timeout(5):
                exchange = await self._open()
                await exchange.publish(to_amqp(envelope), routing_key="")
        except BROKER_ERRORS:
            async with self._lock:
                await self._drop()
            raise
        except Exception as error:
            if not is_broker_error(error):  # aiormq's bare failure of a publish pending
                raise
            async with self._lock:
                await self._drop()
            raise ConnectionError(describe(error)) from error

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


# -- the workload -----------------------------------------------------------------------------


@dataclass
class WorkloadStats:
    sagas_started: int = 0
    sagas_completed: int = 0
    commands_accepted: int = 0
    integration_events: int = 0
    # commands that needed more than one call: each may have been enqueued twice
    commands_retried: Counter[str] = field(default_factory=Counter)
    # why calls failed and were retried: gRPC status or exception type
    failures: Counter[str] = field(default_factory=Counter)
    # when calls failed with UNAVAILABLE (time.monotonic())
    unavailable_at: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ExpectedInvestor:
    balance: Decimal
    reserved: Decimal
    committed: Decimal


@dataclass(frozen=True)
class ExpectedInvoice:
    issuer_id: UUID
    asking_price: Decimal
    status: str
    winner: UUID
    winning_amount: Decimal


@dataclass
class Expected:
    issuers: set[UUID] = field(default_factory=set)
    investors: dict[UUID, ExpectedInvestor] = field(default_factory=dict)
    invoices: dict[UUID, ExpectedInvoice] = field(default_factory=dict)
    labels: dict[UUID, str] = field(default_factory=dict)


# When the saga the current worker task runs must be done (time.monotonic()).
_saga_deadline: ContextVar[float] = ContextVar("saga_deadline")


class Workload:
    """Concurrent financing sagas against one deployment; see the module docstring."""

    def __init__(
        self,
        target: Deployment,
        *,
        seed: int,
        concurrency: int = 16,
        within: float = 90.0,
    ) -> None:
        """`within`: how long one saga may take, faults and restarts included."""
        self.target = target
        self.seed = seed
        self.concurrency = concurrency
        self.within = within
        self.stats = WorkloadStats()
        self.plans: dict[int, SagaPlan] = {}
        self.invoices: dict[int, UUID] = {}  # saga index -> the invoice id the client was given
        self.watch = EventStoreWatch(target.event_pool)
        self._jitter = random.Random(seed)

    async def run(self, *, sagas: int | None = None, until: asyncio.Event | None = None) -> None:
        """Run `sagas` sagas, or keep starting new ones until `until` is set; then finish them."""
        if sagas is None and until is None:
            raise ValueError("give a number of sagas or an event that ends the workload")
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while (sagas is None or next_index < sagas) and not (until and until.is_set()):
                index, next_index = next_index, next_index + 1
                await self._saga(plan_saga(self.seed, index), commands, publisher)

        channel = Channel(*self.target.command_address)
        commands = CommandsStub(channel)
        publisher = IntegrationPublisher(self.target.amqp_url)
        watching = asyncio.create_task(self.watch.run(), name="event store watch")
        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            pending: set[asyncio.Task[None]] = {*workers, watching}
            while pending - {watching}:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # the first failure, as itself
        finally:
            for task in (*workers, watching):
                task.cancel()
            await asyncio.gather(*workers, watching, return_exceptions=True)
            await publisher.close()
            channel.close()

    # -- one saga

    async def _saga(
        self, plan: SagaPlan, commands: CommandsStub, publisher: IntegrationPublisher
    ) -> None:
        self.plans[plan.index] = plan
        self.stats.sagas_started += 1
        # Each worker is a task of its own, so this is the deadline of its saga alone: a
        # workload that runs until the faults are over may last longer than one saga may.
        _saga_deadline.set(time.monotonic() + self.within)
        where = f"saga {plan.index}"
        await self._register(plan, publisher)
        investor_ids = {investor.id for investor in plan.investors.values()}
        await self._wait(
            lambda v: plan.issuer in v.issuers and investor_ids <= v.investors,
            f"{where}: issuer and investors created",
        )
        reply = await self._call(
            "SellInvoice",
            lambda: commands.sell_invoice(
                SellInvoiceCommand(
                    issuer_id=Uuid(str(plan.issuer)),
                    asking_price=Money(float(plan.asking_price)),
                ),
                timeout=RPC_TIMEOUT,
            ),
        )
        invoice = UUID(reply.value)
        self.invoices[plan.index] = invoice
        await self._wait(lambda v: invoice in v.invoices, f"{where}: invoice {invoice} created")
        for bid in plan.bids:
            await self._bid(commands, plan, invoice, bid)
        if plan.ending == "approve":
            await self._call(
                "ApproveFinancing",
                lambda: commands.approve_financing(
                    ApproveFinancingCommand(invoice_id=Uuid(str(invoice))), timeout=RPC_TIMEOUT
                ),
            )
            await self._wait(lambda v: invoice in v.approved, f"{where}: invoice approved")
        elif plan.ending == "reverse":
            await self._call(
                "ReverseFinancing",
                lambda: commands.reverse_financing(
                    ReverseFinancingCommand(invoice_id=Uuid(str(invoice))), timeout=RPC_TIMEOUT
                ),
            )
            await self._wait(lambda v: invoice in v.reversed, f"{where}: invoice reversed")
        self.stats.sagas_completed += 1

    async def _bid(
        self, commands: CommandsStub, plan: SagaPlan, invoice: UUID, bid: PlannedBid
    ) -> None:
        investor = plan.investors[bid.role].id
        command = BidOnInvoiceCommand(
            investor_id=Uuid(str(investor)),
            invoice_id=Uuid(str(invoice)),
            bid=Money(float(bid.amount)),
        )
        await self._call(
            "BidOnInvoice", lambda: commands.bid_on_invoice(command, timeout=RPC_TIMEOUT)
        )
        if bid.outcome == "refused":
            return  # nothing is ever stored for it: it is dead-lettered
        key = (invoice, investor, bid.amount)
        await self._wait(
            lambda v: v.answered[key] > 0,
            f"saga {plan.index}: bid {bid.amount} of the {bid.role} answered by invoice {invoice}",
        )

    async def _register(self, plan: SagaPlan, publisher: IntegrationPublisher) -> None:
        events: list[IssuerRegistered | InvestorRegistered] = [
            IssuerRegistered(id=plan.issuer, name_=f"issuer {plan.index}")
        ]
        events += [
            InvestorRegistered(
                id=investor.id, name_=f"{investor.role} {plan.index}", balance=investor.balance
            )
            for investor in plan.investors.values()
        ]
        for message_id, event in zip(plan.registration_ids, events, strict=True):
            envelope = Envelope(message_id=message_id, name=event.name(), body=codec.encode(event))
            # Published again with the same message id after a failure, as a
            # well-behaved publisher does: the service deduplicates it.
            publish = functools.partial(publisher.publish, envelope)
            await self._retry(event.name(), publish, broker_failure)
            self.stats.integration_events += 1

    # -- calling and waiting

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A gRPC call, retried only while the service is not there to take it."""
        result = await self._retry(what, call, transport_failure)
        self.stats.commands_accepted += 1
        return result

    async def _retry(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        retryable: Callable[[BaseException], bool],
    ) -> T:
        attempts = 0
        while True:
            attempts += 1
            try:
                result = await call()
            except GRPCError as exc:
                if exc.status not in RETRYABLE_STATUSES:
                    raise WorkloadError(
                        f"{what} answered {exc.status.name}: {exc.message}"
                    ) from exc
                reason = exc.status.name
                if exc.status is Status.UNAVAILABLE:
                    self.stats.unavailable_at.append(time.monotonic())
            except Exception as exc:
                if not retryable(exc):
                    raise
                reason = type(exc).__name__
            else:
                if attempts > 1:
                    self.stats.commands_retried[what] += 1
                return result
            self.stats.failures[reason] += 1
            if time.monotonic() > _saga_deadline.get():
                raise WorkloadError(f"{what} still failing ({reason}) at the saga's deadline")
            # Client backoff, jittered so that retries do not arrive in lockstep.
            await asyncio.sleep(
                min(0.05 * 2 ** min(attempts, 4), 0.5) * self._jitter.uniform(0.5, 1)
            )

    async def _wait(self, predicate: Callable[[EventStoreView], bool], what: str) -> None:
        if not await self.watch.wait_for(predicate, _saga_deadline.get() - time.monotonic()):
            raise WorkloadError(
                f"timed out after {self.within}s waiting for {what}\n"
                f"service log tail:\n{self.target.log_tail()}"
            )

    # -- the outcome

    def expected(self) -> Expected:
        """The final state of everything the completed sagas know of."""
        out = Expected()
        for index, plan in self.plans.items():
            invoice = self.invoices.get(index)
            out.issuers.add(plan.issuer)
            out.labels[plan.issuer] = f"saga {index} issuer"
            for investor in plan.investors.values():
                out.labels[investor.id] = f"saga {index} {investor.role}"
                out.investors[investor.id] = ExpectedInvestor(
                    investor.balance, Decimal(0), Decimal(0)
                )
            if invoice is None:
                continue
            out.labels[invoice] = f"saga {index} invoice"
            winner = plan.investors["winner"]
            price = plan.asking_price
            status = {"approve": "APPROVED", "reverse": "REVERSED", None: "FINANCED"}[plan.ending]
            out.invoices[invoice] = ExpectedInvoice(
                plan.issuer, price, status, winner.id, plan.winning_bid.amount
            )
            if status == "APPROVED":
                winner_state = ExpectedInvestor(winner.balance - price, Decimal(0), price)
            elif status == "FINANCED":
                winner_state = ExpectedInvestor(winner.balance - price, price, Decimal(0))
            else:
                winner_state = ExpectedInvestor(winner.balance, Decimal(0), Decimal(0))
            out.investors[winner.id] = winner_state
        return out


# -- after the faults -------------------------------------------------------------------------


# What the final checks found over the session, reported with the suite's figures.
CHECKS: Counter[str] = Counter()


@contextlib.asynccontextmanager
async def under_load(workload: Workload) -> AsyncIterator[asyncio.Task[None]]:
    """The workload running while the block injects faults; when the block ends, no new
    saga starts and those under way are finished."""
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))
    try:
        yield running
        enough.set()
        await running
    finally:
        running.cancel()


async def more_sagas(
    workload: Workload, running: asyncio.Task[None], sagas: int, *, within: float = 120.0
) -> None:
    """Wait until `sagas` more sagas completed while the workload goes on (faults are
    injected meanwhile); a workload that failed shows its error."""
    goal = workload.stats.sagas_completed + sagas

    async def reached() -> bool:
        if running.done():
            running.result()
            raise AssertionError("the workload ended early")
        return workload.stats.sagas_completed >= goal

    await wait_until(reached, timeout=within, what=f"{sagas} more sagas")


async def enqueue_one(target: Deployment, *, timeout: float) -> Status:  # noqa: ASYNC109
    """What the Commands API answers to one command: an approval of an invoice nobody has,
    which the service enqueues (and later dead-letters, the invoice being unknown)."""
    channel = Channel(*target.command_address)
    try:
        command = ApproveFinancingCommand(invoice_id=Uuid(str(uuid.uuid4())))
        await CommandsStub(channel).approve_financing(command, timeout=timeout)
        return Status.OK
    except GRPCError as exc:
        return exc.status
    finally:
        channel.close()


async def settle(target: Deployment, *, within: float = 60.0) -> CheckResult:
    """Wait until `financing check` passes; fail with its report and the service log if not.

    An invariant violation fails at once: it can only get worse, unlike a saga
    step in flight or a read model that has not caught up yet.
    """
    last: CheckResult | None = None
    deadline = time.monotonic() + within
    while True:
        if not target.service.running:
            raise AssertionError(f"the service is not running:\n{target.log_tail()}")
        try:
            last = await run_check(target.event_pool, target.query_pool)
        except Unavailable:  # the suite's own sessions, after a server restart
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)
            continue
        if last.ok:
            CHECKS.update({"final checks passed": 1, "invariant violations found": 0})
            return last
        if last.invariants.violations or time.monotonic() > deadline:
            CHECKS.update(
                {
                    "final checks failed": 1,
                    "invariant violations found": len(last.invariants.violations),
                }
            )
            why = (
                "invariants violated"
                if last.invariants.violations
                else f"not settled after {within}s"
            )
            report = "\n".join(last.lines())
            raise AssertionError(
                f"financing check: {why}\n{report}\nservice log tail:\n{target.log_tail()}"
            )
        await asyncio.sleep(0.25)


def errors_logged(target: Deployment) -> list[dict[str, object]]:
    """ERROR lines of the service log (every line must be JSON)."""
    return [line for line in target.json_log() if line.get("level") in ("error", "critical")]


# How long an outage may go on being logged as begun once its dependency is back: its
# end is logged when the dependency's check next passes (`Outages.watch`, every 1 s; a
# check waits for at most 1 s), with room for a loaded machine and the suite's own
# sessions coming back.
OUTAGE_END_WITHIN = 15.0


async def assert_outages_logged_once(
    target: Deployment,
    dependency: str,
    expected: list[str],
    *,
    required: bool = True,
    refused: bool = False,
) -> list[tuple[str, str]]:
    """The outages of `dependency` (at least one if `required`) were logged as alternating
    begin and end lines, no error line was written, and every line of the log is JSON;
    with `refused`, an outage may also say, once each, what the dependency refused the
    service with meanwhile ("... still unavailable"): those lines are returned.

    An outage whose end is not logged yet is waited for (OUTAGE_END_WITHIN): the
    dependency is back, but its check may not have run since."""
    noted = f"{dependency} still unavailable"

    def lines_of() -> list[tuple[str, str]]:
        return [
            line for line in target.outage_lines(dependency) if not (refused and line[1] == noted)
        ]

    async def ended() -> bool:
        return len(lines_of()) % len(expected) == 0

    await wait_until(
        ended, timeout=OUTAGE_END_WITHIN, what=f"the last outage of {dependency} to end"
    )
    lines = lines_of()
    assert lines or not required, f"no outage of {dependency} was logged:\n{target.log_tail()}"
    events = [event for _, event in lines]
    assert events == expected * (len(events) // len(expected)), events
    assert not errors_logged(target), errors_logged(target)
    return [
        (str(line.get("error")), str(line["event"]))
        for line in target.json_log()
        if line.get("dependency") == dependency and line["event"] == noted
    ]


async def events_by_name(target: Deployment) -> Counter[str]:
    """How many events of each name the event store holds."""
    rows = await target.event_pool.fetch("SELECT name, count(*) AS n FROM events GROUP BY name")
    return Counter({row["name"]: row["n"] for row in rows})


async def messages_processed(target: Deployment) -> int:
    """Messages whose effect was committed once: by the command and saga handlers, and projected."""
    handled: int = await target.event_pool.fetchval("SELECT count(*) FROM processed_messages")
    projected: int = await target.query_pool.fetchval(
        "SELECT count(*) FROM read_models.processed_messages"
    )
    return handled + projected


@dataclass(frozen=True)
class Outcome:
    """The read models of the workload's entities, named by their role in the sagas."""

    investors: dict[str, ExpectedInvestor]
    invoices: dict[str, tuple[str, Decimal, str, str, Decimal]]
    issuers: frozenset[str]
    unknown_invoices: list[str]  # created by retried SellInvoice calls the client never heard of


async def outcome(target: Deployment, workload: Workload) -> Outcome:
    expected = workload.expected()
    label = expected.labels
    read = PostgresReadModels(target.query_pool)
    investors = {
        label[row.id]: ExpectedInvestor(row.balance, row.reserved, row.committed)
        for row in await read.investors()
        if row.id in label
    }
    invoices: dict[str, tuple[str, Decimal, str, str, Decimal]] = {}
    unknown: list[str] = []
    for row in await read.invoices():
        winner = row.winning_bid
        if row.id not in label:
            unknown.append(
                f"{row.status.value} invoice of {label.get(row.issuer_id, row.issuer_id)}"
            )
            continue
        invoices[label[row.id]] = (
            label.get(row.issuer_id, str(row.issuer_id)),
            row.asking_price,
            row.status.value,
            label.get(winner.investor_id, str(winner.investor_id)) if winner else "",
            winner.amount if winner else Decimal(0),
        )
    issuers = frozenset(label[row.id] for row in await read.issuers() if row.id in label)
    return Outcome(investors, invoices, issuers, sorted(unknown))


def expected_outcome(workload: Workload) -> Outcome:
    expected = workload.expected()
    label = expected.labels
    return Outcome(
        investors={label[i]: state for i, state in expected.investors.items()},
        invoices={
            label[i]: (
                label[inv.issuer_id],
                inv.asking_price,
                inv.status,
                label[inv.winner],
                inv.winning_amount,
            )
            for i, inv in expected.invoices.items()
        },
        issuers=frozenset(label[i] for i in expected.issuers),
        unknown_invoices=[],
    )


def differences(got: Outcome, want: Outcome) -> list[str]:
    out: list[str] = []
    for key in sorted(set(got.investors) | set(want.investors)):
        if got.investors.get(key) != want.investors.get(key):
            out.append(f"{key}: {got.investors.get(key)} != expected {want.investors.get(key)}")
    for key in sorted(set(got.invoices) | set(want.invoices)):
        if got.invoices.get(key) != want.invoices.get(key):
            out.append(f"{key}: {got.invoices.get(key)} != expected {want.invoices.get(key)}")
    for key in sorted(got.issuers ^ want.issuers):
        out.append(f"issuer {key}: {'unexpected' if key in got.issuers else 'missing'}")
    return out


@dataclass(frozen=True)
class DeadLetter:
    source_queue: str
    reason: str
    body: dict[str, Any]


async def take_dead_letters(target: Deployment) -> list[DeadLetter]:
    """Empty the service's dead-letter queue and return what it held."""
    taken: list[DeadLetter] = []
    connection = await aio_pika.connect(target.amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        # Passive: the service declared it, classic or quorum.
        queue = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            headers = message.headers or {}
            taken.append(
                DeadLetter(
                    source_queue=_text(headers.get(SOURCE_QUEUE_HEADER)),
                    reason=_text(headers.get(REASON_HEADER)),
                    body=json.loads(message.body),
                )
            )
    finally:
        await connection.close()
    return taken


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def refused_bids(workload: Workload) -> set[tuple[str, str]]:
    """(investor id, invoice id) of every bid a saga's investor could not afford."""
    return {
        (str(plan.investors[bid.role].id), str(workload.invoices[index]))
        for index, plan in workload.plans.items()
        for bid in plan.bids
        if bid.outcome == "refused"
    }


def _bid_of(letter: DeadLetter) -> tuple[str, str]:
    return (str(letter.body.get("InvestorID")), str(letter.body.get("InvoiceID")))


def dead_letter_problems(workload: Workload, letters: list[DeadLetter]) -> list[str]:
    """Only the bids the sagas' investors could not afford are dead letters, each at least once."""
    refused = refused_bids(workload)
    seen: set[tuple[str, str]] = set()
    problems: list[str] = []
    for letter in letters:
        key = _bid_of(letter)
        if (
            letter.source_queue == "BidOnInvoice"
            and "RuleViolation" in letter.reason
            and key in refused
        ):
            seen.add(key)
        else:
            problems.append(f"unexpected dead letter from {letter.source_queue}: {letter.reason}")
    problems += [f"bid of {i} on {inv} was never dead-lettered" for i, inv in refused - seen]
    return problems


# How long the last refused bids may take to reach the dead-letter queue: nothing is stored
# for them, so `settle()` cannot tell whether they were handled yet.
DEAD_LETTERS_WITHIN = 30.0


async def all_dead_letters(target: Deployment, workload: Workload) -> list[DeadLetter]:
    """The dead letters, taken until every refused bid is among them or the time is up."""
    refused = refused_bids(workload)
    letters: list[DeadLetter] = []

    async def every_refused_bid_taken() -> bool:
        letters.extend(await take_dead_letters(target))
        return refused <= {_bid_of(letter) for letter in letters}

    # Past the deadline, `dead_letter_problems` names each bid still missing.
    with contextlib.suppress(AssertionError):
        await wait_until(
            every_refused_bid_taken,
            timeout=DEAD_LETTERS_WITHIN,
            interval=0.25,
            what="every refused bid dead-lettered",
        )
    return letters


async def verify_effects(target: Deployment, workload: Workload) -> Outcome:
    """Every accepted command's effect is there, exactly as the sagas planned.

    The read models hold the planned state of every entity the sagas know of.
    Invoices nobody knows of may exist only if a SellInvoice call was retried,
    at most one per retried call, and must still be on sale. The dead letters
    are the bids investors could not afford, each at least once (a kill between
    dead-lettering and the ack dead-letters it again), and nothing else.
    """
    got = await outcome(target, workload)
    problems = differences(got, expected_outcome(workload))
    problems += dead_letter_problems(workload, await all_dead_letters(target, workload))
    retried_sells = workload.stats.commands_retried["SellInvoice"]
    if len(got.unknown_invoices) > retried_sells:
        problems.append(
            f"{len(got.unknown_invoices)} invoices nobody asked for, but only"
            f" {retried_sells} SellInvoice calls were retried: {got.unknown_invoices}"
        )
    problems += [
        f"unknown invoice not on sale: {line}"
        for line in got.unknown_invoices
        if not line.startswith("AVAILABLE")
    ]
    assert not problems, "effects differ from the plan:\n" + "\n".join(problems)
    return got


__all__ = [
    "CHECKS",
    "OBSERVER_APPLICATION",
    "DeadLetter",
    "Deployment",
    "EventStoreView",
    "EventStoreWatch",
    "Outcome",
    "SagaPlan",
    "Workload",
    "WorkloadError",
    "deployment",
    "differences",
    "events_by_name",
    "expected_outcome",
    "messages_processed",
    "more_sagas",
    "outcome",
    "plan_saga",
    "settle",
    "suite_seed",
    "take_dead_letters",
    "under_load",
    "verify_effects",
]
