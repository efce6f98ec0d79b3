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
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from uuid import UUID, uuid4

import asyncpg
from grpclib.client import Channel

from financing.adapters.postgres.connection import create_pool
from financing.adapters.rabbitmq.connection import connected
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application import codec
from financing.application.messages import InvestorRegistered, IssuerRegistered
from financing.application.ports import Envelope
from financing.config import Database, Settings
from financing.generated import (
    BidOnInvoiceCommand,
    CommandsStub,
    Money,
    SellInvoiceCommand,
    Uuid,
)
from scripts.sandbox import sandbox

POLL_INTERVAL = 0.01


@dataclass
class Observed:
    """What the read models showed, and when it was first seen.

    The watcher reads the read-model tables directly, for just the ids still
    awaited: polling the Queries API for whole lists would load the service
    with the measurement itself.
    """

    awaited_issuers: set[UUID] = field(default_factory=set)
    awaited_investors: set[UUID] = field(default_factory=set)
    awaited_invoices: set[UUID] = field(default_factory=set)
    registered: set[UUID] = field(default_factory=set)
    available: set[UUID] = field(default_factory=set)
    financed_at: dict[UUID, float] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


async def watch(pool: asyncpg.Pool, seen: Observed) -> None:
    """Latency figures carry up to POLL_INTERVAL of this sampling."""
    while True:
        for table, awaited in (
            ("issuers", seen.awaited_issuers),
            ("investors", seen.awaited_investors),
        ):
            if awaited:
                rows = await pool.fetch(
                    f"SELECT id FROM read_models.{table} WHERE id = ANY($1::uuid[])", list(awaited)
                )
                found = {row["id"] for row in rows}
                seen.registered |= found
                awaited -= found
        if seen.awaited_invoices:
            rows = await pool.fetch(
                "SELECT id, status FROM read_models.invoices"
                " WHERE id = ANY($1::uuid[]) AND issuer_id IS NOT NULL",
                list(seen.awaited_invoices),
            )
            now = time.perf_counter()
            for row in rows:
                seen.available.add(row["id"])
                if row["status"] == "FINANCED":
                    seen.financed_at[row["id"]] = now
                    seen.awaited_invoices.discard(row["id"])
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
    seen.awaited_issuers.add(issuer)
    seen.awaited_investors.add(investor)
    await publisher.publish_events(
        [
            _envelope(IssuerRegistered(id=issuer, name_="bench issuer")),
            _envelope(
                InvestorRegistered(id=investor, name_="bench investor", balance=Decimal(100))
            ),
        ]
    )
    await until(seen, lambda: {issuer, investor} <= seen.registered, within)
    reply = await commands.sell_invoice(
        SellInvoiceCommand(issuer_id=Uuid(str(issuer)), asking_price=Money(10))
    )
    invoice = UUID(reply.value)
    seen.awaited_invoices.add(invoice)
    await until(seen, lambda: invoice in seen.available, within)
    await commands.bid_on_invoice(
        BidOnInvoiceCommand(investor_id=Uuid(str(investor)), invoice_id=reply, bid=Money(10))
    )
    replied = time.perf_counter()
    await until(seen, lambda: invoice in seen.financed_at, within)
    return seen.financed_at[invoice] - replied


def _envelope(event: IssuerRegistered | InvestorRegistered) -> Envelope:
    return Envelope(message_id=str(uuid4()), name=event.name(), body=codec.encode(event))


@contextlib.asynccontextmanager
async def target(external: bool) -> AsyncIterator[tuple[tuple[str, int], Database, str]]:
    """The Commands address, the read-model database and the broker to drive."""
    if external:
        settings = Settings.from_env()
        yield _reachable(settings.command_address), settings.query_db, settings.amqp_url
        return
    async with sandbox("financing_bench") as box:
        yield box.command_address, box.query_db, box.amqp_url


def _reachable(address: tuple[str, int]) -> tuple[str, int]:
    host, port = address
    return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), port


async def main(args: argparse.Namespace) -> None:
    async with (
        target(args.external) as (command_address, query_db, amqp_url),
        contextlib.AsyncExitStack() as stack,
    ):
        commands_channel = Channel(*command_address)
        broker = await stack.enter_async_context(connected([amqp_url]))
        publisher = Publisher(broker)
        pool = await create_pool(query_db)
        seen = Observed()
        watcher = asyncio.create_task(watch(pool, seen))
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
        await pool.close()
        commands_channel.close()

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
