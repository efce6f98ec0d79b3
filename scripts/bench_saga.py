"""Figures of the running service, driven from outside as its clients drive it.

The service runs as `financing serve` on a throwaway deployment (its own
databases and vhost, tests/support/deployment.py). The bench talks to it
only through its public surfaces, with foreign clients:

- Registering's integration events (`IssuerRegistered`, `InvestorRegistered`)
  published on `events` with aio-pika, headers and JSON written by hand as the
  contract describes them;
- the Commands API through grpcio (scripts/bench_grpc.py);
- the `events` exchange, through a queue of the bench's own bound to it;
- the read-model tables of the query database, polled for the awaited ids;
- the Prometheus endpoints (METRICS_ADDRESS) and /proc/PID of its processes: one,
  or two when scripts/bench.py runs some components apart (`--apart`).

A saga is SellInvoice (asking 10) then, once the invoice is listed, BidOnInvoice
(15) by an investor of its own registered beforehand (balance 100), until
the read model shows the invoice FINANCED; the policies then release the
excess 5. One investor per saga, so that no two sagas write the same stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from scripts.bench_common import (
    Percentiles,
    Samples,
    delta,
    machine_cpu_seconds,
    process_cpu_seconds,
    process_rss_bytes,
    say,
    scrape,
    servers_cpu_seconds,
    servers_cpu_spent,
)
from scripts.bench_grpc import ForeignCommands
from tests.support.deployment import LocalDeployment
from tests.support.service import ServiceProcess

ASKING_PRICE = 10.0
BID = 15.0
BALANCE = 100
# The read model shows an invoice as FINANCED from then on (status only moves forward).
FINANCED_OR_LATER = ("FINANCED", "APPROVED", "REVERSED")


# ---------------------------------------------------------------- Registering, foreign publisher


async def register(
    connection: AbstractRobustConnection, issuers: Iterable[str], investors: Iterable[str]
) -> None:
    """Publish IssuerRegistered and InvestorRegistered, persistent and confirmed."""
    channel = await connection.channel(publisher_confirms=True)
    events = await channel.declare_exchange("events", aio_pika.ExchangeType.FANOUT, durable=True)
    bodies: list[tuple[str, dict[str, object]]] = []
    bodies += [("IssuerRegistered", {"ID": i, "Name": "bench issuer"}) for i in issuers]
    bodies += [
        ("InvestorRegistered", {"ID": i, "Name": "bench investor", "Balance": BALANCE})
        for i in investors
    ]
    limit = asyncio.Semaphore(128)

    async def publish(name: str, body: dict[str, object]) -> None:
        message_id = str(uuid.uuid4())
        async with limit:
            await events.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    headers={"_watermill_message_uuid": message_id, "name": name},
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="",
            )

    await asyncio.gather(*(publish(name, body) for name, body in bodies))
    await channel.close()


# ---------------------------------------------------------------- the read models, polled


class ReadModelWatch:
    """Polls the read-model tables for the invoices awaited, and notes when each was
    first seen listed, and first seen FINANCED.

    It polls every `interval`, and back to back while an invoice is `due`: the bus
    has shown the event that makes it FINANCED, so the projector is applying it now.
    A time noted then is late by at most about two queries' round trips, where one
    noted between polls can be late by up to `interval` more (which may be changed
    between runs).
    """

    def __init__(self, conn: asyncpg.Connection, interval: float) -> None:
        self._conn = conn
        self.interval = interval
        self._listed: dict[str, asyncio.Future[float]] = {}
        self._financed: dict[str, asyncio.Future[float]] = {}
        self._due: set[str] = set()
        self._woken = asyncio.Event()

    def listed(self, invoice_id: str) -> asyncio.Future[float]:
        return self._listed.setdefault(invoice_id, asyncio.get_running_loop().create_future())

    def financed(self, invoice_id: str) -> asyncio.Future[float]:
        return self._financed.setdefault(invoice_id, asyncio.get_running_loop().create_future())

    @property
    def hurried(self) -> frozenset[str]:
        """The invoices polled back to back now (`due`, not yet seen FINANCED)."""
        return frozenset(self._due)

    def due(self, invoice_id: str) -> None:
        """Poll back to back until `invoice_id` is seen FINANCED, from now on."""
        if not self.financed(invoice_id).done():
            self._due.add(invoice_id)
            self._woken.set()

    async def run(self) -> None:
        while True:
            awaited = [i for i, f in self._listed.items() if not f.done()]
            awaited += [i for i, f in self._financed.items() if not f.done()]
            if awaited:
                rows = await self._conn.fetch(
                    "SELECT id::text AS id, status FROM read_models.invoices"
                    " WHERE id = ANY($1::uuid[]) AND issuer_id IS NOT NULL",
                    awaited,
                )
                now = time.perf_counter()
                for row in rows:
                    listed = self._listed.get(row["id"])
                    if listed is not None and not listed.done():
                        listed.set_result(now)
                    financed = self._financed.get(row["id"])
                    if (
                        financed is not None
                        and not financed.done()
                        and row["status"] in FINANCED_OR_LATER
                    ):
                        financed.set_result(now)
                self._due = {i for i in self._due if not self._financed[i].done()}
                self._forget_settled()
            if self._due:
                await asyncio.sleep(0)  # the others' turn, then the next poll
                continue
            self._woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), self.interval)

    def _forget_settled(self) -> None:
        for awaited in (self._listed, self._financed):
            if len(awaited) > 4096:
                for key in [k for k, f in awaited.items() if f.done()]:
                    del awaited[key]


async def wait_registered(
    conn: asyncpg.Connection, issuers: list[str], investors: list[str], within: float
) -> None:
    """Until every issuer and investor is in the read models."""
    deadline = time.monotonic() + within
    while True:
        found = await conn.fetchval(
            "SELECT (SELECT count(*) FROM read_models.issuers WHERE id = ANY($1::uuid[]))"
            " + (SELECT count(*) FROM read_models.investors WHERE id = ANY($2::uuid[]))",
            issuers,
            investors,
        )
        if found == len(issuers) + len(investors):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{found} of {len(issuers) + len(investors)} registered")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------- the bus, seen by our own queue


class BusWatch:
    """An exclusive queue of the bench's own bound to `events`: when each domain event of
    a saga was delivered to it, by (event name, the saga's invoice or investor id)."""

    KEYS: ClassVar[dict[str, Callable[[str, dict[str, object]], str]]] = {
        "InvoiceCreatedEvent": lambda aggregate, body: aggregate,
        "BidOnInvoicePlacedEvent": lambda aggregate, body: str(body["InvoiceID"]),
        "InvoiceFinancedEvent": lambda aggregate, body: aggregate,
        "InvestorFundsReleasedEvent": lambda aggregate, body: aggregate,
    }

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], asyncio.Future[float]] = {}

    def seen(self, name: str, key: str) -> asyncio.Future[float]:
        return self._seen.setdefault((name, key), asyncio.get_running_loop().create_future())

    async def deliver(self, message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        headers = message.headers or {}
        name = str(headers.get("name", ""))
        key_of = self.KEYS.get(name)
        if key_of is None:
            return
        body = json.loads(message.body)
        future = self.seen(name, key_of(str(headers.get("aggregateID", "")), body))
        if not future.done():
            future.set_result(now)

    @contextlib.asynccontextmanager
    async def bound(self, connection: AbstractRobustConnection) -> AsyncIterator[None]:
        channel: AbstractChannel = await connection.channel()
        events = await channel.declare_exchange(
            "events", aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, routing_key="")
        tag = await queue.consume(self.deliver, no_ack=True)
        try:
            yield
        finally:
            await queue.cancel(tag)
            await channel.close()


# ---------------------------------------------------------------- the figures


@dataclass
class Deployment:
    """The running service and the bench's clients of it."""

    box: LocalDeployment
    commands: ForeignCommands
    amqp: AbstractRobustConnection
    read_models: ReadModelWatch
    read_conn: asyncpg.Connection
    # `financing serve` processes: the deployment's own, then any running components apart.
    processes: tuple[ServiceProcess, ...]
    issuers: list[str]
    investors: list[str] = field(default_factory=list)
    _next_investor: int = 0

    def investor(self) -> str:
        investor = self.investors[self._next_investor]
        self._next_investor += 1
        return investor

    def issuer(self, index: int) -> str:
        return self.issuers[index % len(self.issuers)]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids)

    def rss(self) -> int:
        return sum(process_rss_bytes(pid) for pid in self.pids)

    async def scrape(self) -> Samples:
        """Every process's samples, each one's summed over the processes."""
        samples: Samples = {}
        for process in self.processes:
            for key, value in (await scrape(process.metrics_address)).items():
                samples[key] = samples.get(key, 0.0) + value
        return samples


@contextlib.asynccontextmanager
async def driving(
    box: LocalDeployment,
    *,
    issuers: int,
    investors: int,
    poll_interval: float,
    apart: Sequence[ServiceProcess] = (),
) -> AsyncIterator[Deployment]:
    """The bench's clients of `box` (and of the processes running components `apart`
    from it, on its databases and vhost), with issuers and investors to register."""
    amqp = await aio_pika.connect_robust(box.amqp_url)
    read_conn = await asyncpg.connect(**box.query_db.connect_kwargs)
    poll_conn = await asyncpg.connect(**box.query_db.connect_kwargs)
    watch = ReadModelWatch(poll_conn, poll_interval)
    poller = asyncio.create_task(watch.run())
    commands = ForeignCommands(box.command_address)
    deployment = Deployment(
        box,
        commands,
        amqp,
        watch,
        read_conn,
        (box.service, *apart),
        [str(uuid.uuid4()) for _ in range(issuers)],
        [str(uuid.uuid4()) for _ in range(investors)],
    )
    try:
        yield deployment
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await commands.close()
        await poll_conn.close()
        await read_conn.close()
        await amqp.close()


async def register_all(deployment: Deployment) -> float:
    """Register every issuer and investor; the seconds until all are in the read models."""
    started = time.perf_counter()
    await register(deployment.amqp, deployment.issuers, deployment.investors)
    await wait_registered(
        deployment.read_conn,
        deployment.issuers,
        deployment.investors,
        within=60 + len(deployment.investors) / 10,
    )
    return time.perf_counter() - started


async def _within(awaitable: Awaitable[float], seconds: float = 30.0) -> float:
    return await asyncio.wait_for(awaitable, seconds)


@dataclass(frozen=True)
class LatencyFigures:
    end_to_end: Percentiles  # BidOnInvoice accepted -> read model FINANCED
    accepted_to_placed: Percentiles  # accepted -> BidOnInvoicePlacedEvent on the bus
    placed_to_financed: Percentiles  # BidOnInvoicePlacedEvent -> InvoiceFinancedEvent
    financed_to_released: Percentiles  # InvoiceFinancedEvent -> InvestorFundsReleasedEvent
    read_model_trailing: Percentiles  # InvoiceFinancedEvent on the bus -> read model FINANCED
    bid_rpc: Percentiles  # the BidOnInvoice call itself
    failed: int  # sagas that did not finish within 30 s a step
    # Over the second half of the sagas (the first ones also pay for first uses: statements
    # prepared on each pooled connection, code paths taken once):
    sagas_measured: int
    seconds: float  # from the start of the first of them to the end of the last
    service_cpu: float  # seconds of the service's CPU meanwhile (its processes together)

    @property
    def busy(self) -> float:
        """The share of the time the service spent on its CPU, one saga at a time."""
        return self.service_cpu / self.seconds if self.seconds else float("nan")


# The figures of one saga at a time, as one_saga names them.
LATENCY_LABELS = {
    "end_to_end": "BidOnInvoice accepted -> read model FINANCED",
    "accepted_to_placed": "hop: accepted -> BidOnInvoicePlacedEvent on the bus",
    "placed_to_financed": "hop: BidOnInvoicePlacedEvent -> InvoiceFinancedEvent",
    "financed_to_released": "hop: InvoiceFinancedEvent -> InvestorFundsReleasedEvent",
    "read_model_trailing": "hop: InvoiceFinancedEvent on the bus -> read model FINANCED",
    "bid_rpc": "(the BidOnInvoice RPC itself, sent -> OK)",
}


@dataclass(frozen=True)
class OneAtATime:
    """Sagas run one after the other, and what they took."""

    # Seconds, by figure (LATENCY_LABELS), one per saga done that measured it (`one_saga`).
    series: dict[str, list[float]]
    done: int
    failed: int
    seconds: float  # from the first saga's start to the last one's end
    service_cpu: float  # seconds of the service's CPU meanwhile (its processes together)

    @classmethod
    def joined(cls, parts: Iterable[OneAtATime]) -> OneAtATime:
        parts = list(parts)
        return cls(
            {name: [v for part in parts for v in part.series[name]] for name in LATENCY_LABELS},
            sum(part.done for part in parts),
            sum(part.failed for part in parts),
            sum(part.seconds for part in parts),
            sum(part.service_cpu for part in parts),
        )


async def one_at_a_time(deployment: Deployment, bus: BusWatch, indexes: range) -> OneAtATime:
    """A saga for each of `indexes`, one after the other (the service otherwise idle)."""
    series: dict[str, list[float]] = {name: [] for name in LATENCY_LABELS}
    done = failed = 0
    cpu, started = deployment.cpu_seconds(), time.perf_counter()
    for index in indexes:
        try:
            one = await one_saga(deployment, bus, index)
        except TimeoutError:
            failed += 1
            continue
        done += 1
        for name, value in one.items():
            series[name].append(value)
    seconds, cpu = time.perf_counter() - started, deployment.cpu_seconds() - cpu
    return OneAtATime(series, done, failed, seconds, cpu)


async def latency(deployment: Deployment, samples: int) -> LatencyFigures:
    """One saga at a time; each bid placed once the invoice is listed (the service idle)."""
    bus = BusWatch()
    half = samples // 2
    async with bus.bound(deployment.amqp):
        first = await one_at_a_time(deployment, bus, range(half))
        second = await one_at_a_time(deployment, bus, range(half, samples))
    both = OneAtATime.joined((first, second))
    return LatencyFigures(
        **{name: Percentiles.of_seconds(values) for name, values in both.series.items()},
        failed=both.failed,
        sagas_measured=second.done,
        seconds=second.seconds,
        service_cpu=second.service_cpu,
    )


# Figures a saga whose read model is watched closely leaves out, and those one whose
# read model is polled every interval leaves out (`one_saga`).
NOT_CLOSE = frozenset({"financed_to_released"})
NOT_POLLED = frozenset({"end_to_end", "read_model_trailing"})


async def one_saga(deployment: Deployment, bus: BusWatch, index: int) -> dict[str, float]:
    """The figures of one saga, alone. Every other saga (even `index`) watches its read
    model closely: polled back to back once the bus shows `InvoiceFinancedEvent`, so
    that FINANCED is noted within about two queries of its commit, not within a poll
    interval. That polling takes CPU while the release hop runs beside the projector,
    so those sagas leave that hop out, and the others, whose FINANCED is noted a poll
    interval late, leave out the figures that end at it."""
    close = index % 2 == 0
    investor = deployment.investor()
    invoice = await deployment.commands.sell_invoice(deployment.issuer(index), ASKING_PRICE)
    await _within(deployment.read_models.listed(invoice))
    # Watched from before the bid, so that the poller notes the status when it changes,
    # not once the bus events below have been waited for.
    shown_financed = deployment.read_models.financed(invoice)
    if close:
        bus.seen("InvoiceFinancedEvent", invoice).add_done_callback(
            lambda _: deployment.read_models.due(invoice)
        )
    sent = time.perf_counter()
    await deployment.commands.bid_on_invoice(investor, invoice, BID)
    accepted = time.perf_counter()
    placed = await _within(bus.seen("BidOnInvoicePlacedEvent", invoice))
    financed = await _within(bus.seen("InvoiceFinancedEvent", invoice))
    released = await _within(bus.seen("InvestorFundsReleasedEvent", investor))
    shown = await _within(shown_financed)
    figures = {
        "end_to_end": shown - accepted,
        "accepted_to_placed": placed - accepted,
        "placed_to_financed": financed - placed,
        "financed_to_released": released - financed,
        "read_model_trailing": shown - financed,
        "bid_rpc": accepted - sent,
    }
    left_out = NOT_CLOSE if close else NOT_POLLED
    return {name: value for name, value in figures.items() if name not in left_out}


@dataclass(frozen=True)
class Level:
    in_flight: int
    sagas: int
    failed: int
    seconds: float  # from the first SellInvoice to the last FINANCED seen
    saga: Percentiles  # SellInvoice sent -> read model FINANCED
    accepted_to_financed: Percentiles  # BidOnInvoice accepted -> read model FINANCED

    @property
    def per_second(self) -> float:
        return (self.sagas - self.failed) / self.seconds


async def throughput(deployment: Deployment, in_flight: int, sagas: int) -> Level:
    """`sagas` sagas, `in_flight` at a time; the bid once the read model lists the invoice."""
    limit = asyncio.Semaphore(in_flight)
    investors = [deployment.investor() for _ in range(sagas)]

    async def saga(index: int) -> tuple[float, float]:
        async with limit:
            started = time.perf_counter()
            commands = deployment.commands
            invoice = await commands.sell_invoice(deployment.issuer(index), ASKING_PRICE)
            await _within(deployment.read_models.listed(invoice), 60)
            await commands.bid_on_invoice(investors[index], invoice, BID)
            accepted = time.perf_counter()
            shown = await _within(deployment.read_models.financed(invoice), 60)
            return shown - started, shown - accepted

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(saga(i) for i in range(sagas)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    done = [o for o in outcomes if isinstance(o, tuple)]
    for failure in [o for o in outcomes if not isinstance(o, tuple)][:3]:
        say(f"saga failed: {failure!r}")
    return Level(
        in_flight,
        sagas,
        sagas - len(done),
        elapsed,
        Percentiles.of_seconds([d[0] for d in done]),
        Percentiles.of_seconds([d[1] for d in done]),
    )


@dataclass(frozen=True)
class Costs:
    """What the service spent on a throughput run, counted until it was quiet again."""

    sagas: int
    service_cpu: float  # seconds, utime + stime of `financing serve` (its processes together)
    machine_cpu: float  # seconds, every process of the machine (PostgreSQL, RabbitMQ, bench)
    bench_cpu: float  # seconds, this process (the load generator)
    servers_cpu: dict[str, float]  # seconds, PostgreSQL's and RabbitMQ's processes
    rss_end: int  # bytes, `financing serve` (its processes together) at the end of the run
    received: dict[str, float]  # deliveries the service's consumers received, by queue
    used: dict[str, float]  # of which processed or unchanged (an effect, or a rule said no)
    publishes: float  # commands queued + events relayed + dead letters published

    @property
    def received_per_saga(self) -> float:
        return sum(self.received.values()) / self.sagas

    @property
    def used_per_saga(self) -> float:
        return sum(self.used.values()) / self.sagas


def _bench_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def quiet(deployment: Deployment, within: float = 20.0) -> Samples:
    """Scrape until the service's counters stop moving (the last sagas' trailing steps
    done); the last scrape."""
    deadline = time.monotonic() + within
    last = await deployment.scrape()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = await deployment.scrape()
        if _activity(now) == _activity(last):
            return now
        last = now
    return last


def _activity(samples: Samples) -> float:
    return sum(
        value
        for (name, _), value in samples.items()
        if name in ("financing_messages_total", "financing_events_relayed_total")
    )


async def measured_throughput(
    deployment: Deployment, in_flight: int, sagas: int
) -> tuple[Level, Costs]:
    """A throughput run with what it cost the service: CPU, memory, deliveries."""
    before = await quiet(deployment)
    cpu, machine, bench = deployment.cpu_seconds(), machine_cpu_seconds(), _bench_cpu()
    servers = servers_cpu_seconds()
    level = await throughput(deployment, in_flight, sagas)
    rss = deployment.rss()
    after = await quiet(deployment)
    cpu = deployment.cpu_seconds() - cpu
    machine, bench = machine_cpu_seconds() - machine, _bench_cpu() - bench
    servers_spent = servers_cpu_spent(servers, servers_cpu_seconds())
    received: dict[str, float] = {}
    used: dict[str, float] = {}
    for labels, increase in delta(before, after, "financing_messages_total").items():
        queue, outcome = dict(labels)["queue"], dict(labels)["outcome"]
        if outcome != "retried":
            received[queue] = received.get(queue, 0.0) + increase
        if outcome in ("processed", "unchanged"):
            used[queue] = used.get(queue, 0.0) + increase
    commands = sum(
        increase
        for labels, increase in delta(before, after, "grpc_server_handled_total").items()
        if dict(labels).get("grpc_service") == "Commands" and dict(labels).get("grpc_code") == "OK"
    )
    relayed = sum(delta(before, after, "financing_events_relayed_total").values())
    dead = sum(delta(before, after, "financing_dead_letters_published_total").values())
    done = level.sagas - level.failed
    costs = Costs(
        done, cpu, machine, bench, servers_spent, rss, received, used, commands + relayed + dead
    )
    return level, costs
