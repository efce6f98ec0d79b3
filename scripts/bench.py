"""`make bench`: concurrent financing sagas through the public API, with figures.

Each saga registers an issuer and an investor (integration events on the
bus), sells an invoice and bids on it over gRPC. Prints sagas per second and
the p50/p95/p99 latency from the BidOnInvoice reply to the read model showing
the invoice FINANCED. By default it runs against a throwaway deployment of its
own; `--external` drives the deployment named by the contract's environment
variables instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from uuid import uuid4

from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application import codec
from financing.application.messages import InvestorRegistered, IssuerRegistered
from financing.application.ports import Envelope
from financing.config import parse_address
from financing.generated import (
    BidOnInvoiceCommand,
    CommandsStub,
    InvoiceStatus,
    Money,
    QueriesStub,
    SellInvoiceCommand,
    Uuid,
)
from scripts.sandbox import sandbox

POLL_INTERVAL = 0.02


@dataclass
class Observed:
    """What the read models showed, and when it was first seen."""

    issuers: set[str] = field(default_factory=set)
    investors: set[str] = field(default_factory=set)
    available: set[str] = field(default_factory=set)
    financed_at: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


async def watch(queries: QueriesStub, seen: Observed) -> None:
    """Poll the Queries API; latency figures carry up to POLL_INTERVAL of this sampling."""
    while True:
        invoices, investors, issuers = await asyncio.gather(
            queries.all_invoices(Empty()),
            queries.all_investors(Empty()),
            queries.all_issuers(Empty()),
        )
        now = time.perf_counter()
        seen.issuers.update(i.id.value for i in issuers.issuers)
        seen.investors.update(i.id.value for i in investors.investors)
        for invoice in invoices.invoices:
            seen.available.add(invoice.id.value)
            if invoice.status == InvoiceStatus.FINANCED:
                seen.financed_at.setdefault(invoice.id.value, now)
        async with seen.changed:
            seen.changed.notify_all()
        await asyncio.sleep(POLL_INTERVAL)


async def until(seen: Observed, check: Callable[[], bool], within: float) -> None:
    async with asyncio.timeout(within), seen.changed:
        await seen.changed.wait_for(check)


async def saga(
    commands: CommandsStub, publisher: Publisher, seen: Observed, within: float
) -> float:
    issuer, investor = uuid4(), uuid4()
    await publisher.publish_events(
        [
            _envelope(IssuerRegistered(id=issuer, name_="bench issuer")),
            _envelope(
                InvestorRegistered(id=investor, name_="bench investor", balance=Decimal(100))
            ),
        ]
    )
    await until(
        seen, lambda: str(issuer) in seen.issuers and str(investor) in seen.investors, within
    )
    invoice = await commands.sell_invoice(
        SellInvoiceCommand(issuer_id=Uuid(str(issuer)), asking_price=Money(10))
    )
    await until(seen, lambda: invoice.value in seen.available, within)
    await commands.bid_on_invoice(
        BidOnInvoiceCommand(investor_id=Uuid(str(investor)), invoice_id=invoice, bid=Money(10))
    )
    replied = time.perf_counter()
    await until(seen, lambda: invoice.value in seen.financed_at, within)
    return seen.financed_at[invoice.value] - replied


def _envelope(event: IssuerRegistered | InvestorRegistered) -> Envelope:
    return Envelope(message_id=str(uuid4()), name=event.name(), body=codec.encode(event))


@contextlib.asynccontextmanager
async def target(external: bool) -> AsyncIterator[tuple[tuple[str, int], tuple[str, int], str]]:
    if external:
        command = parse_address(os.environ.get("COMMAND_SERVER_ADDRESS", "127.0.0.1:8080"))
        query = parse_address(os.environ.get("QUERY_SERVER_ADDRESS", "127.0.0.1:8081"))
        amqp = os.environ.get("AMQP_ADDRESS", "amqp://guest:guest@localhost:5672/")
        yield _reachable(command), _reachable(query), amqp
        return
    async with sandbox("financing_bench") as box:
        yield box.command_address, box.query_address, box.amqp_url


def _reachable(address: tuple[str, int]) -> tuple[str, int]:
    host, port = address
    return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), port


async def main(args: argparse.Namespace) -> None:
    async with target(args.external) as (command_address, query_address, amqp_url):
        commands_channel, queries_channel = Channel(*command_address), Channel(*query_address)
        connection = await topology.connect(amqp_url)
        publisher = await Publisher.open(connection)
        seen = Observed()
        watcher = asyncio.create_task(watch(QueriesStub(queries_channel), seen))
        limit = asyncio.Semaphore(args.concurrency)
        commands = CommandsStub(commands_channel)

        async def one() -> float:
            async with limit:
                return await saga(commands, publisher, seen, args.timeout)

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(args.sagas)), return_exceptions=True)
        elapsed = time.perf_counter() - started
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await publisher.close()
        await connection.close()
        commands_channel.close()
        queries_channel.close()

    latencies = sorted(o * 1000 for o in outcomes if isinstance(o, float))
    failures = [o for o in outcomes if not isinstance(o, float)]
    print(
        f"sagas: {args.sagas} ({args.concurrency} at a time), completed {len(latencies)}, "
        f"failed {len(failures)}"
    )
    print(f"throughput: {len(latencies) / elapsed:.1f} sagas/s over {elapsed:.2f} s")
    if len(latencies) >= 2:
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        print(
            f"BidOnInvoice reply -> read model FINANCED: p50 {q[49]:.0f} ms, "
            f"p95 {q[94]:.0f} ms, p99 {q[98]:.0f} ms, max {latencies[-1]:.0f} ms "
            f"(sampled every {POLL_INTERVAL * 1000:.0f} ms)"
        )
    for failure in failures[:5]:
        print(f"failure: {failure!r}")
    if failures:
        raise SystemExit(1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sagas", type=int, default=200, help="how many sagas (200)")
    parser.add_argument("--concurrency", type=int, default=50, help="sagas in flight (50)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per saga step, seconds")
    parser.add_argument(
        "--external", action="store_true", help="drive the deployment named by the environment"
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
