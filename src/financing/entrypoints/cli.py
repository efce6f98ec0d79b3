"""The `financing` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal, InvalidOperation

import asyncpg

from financing import logging as service_logging
from financing.adapters.postgres.connection import create_pool
from financing.adapters.postgres.rebuild import rebuild
from financing.adapters.rabbitmq.connection import connected
from financing.adapters.rabbitmq.dead_letters import list_dead_letters, requeue_dead_letters
from financing.config import ConfigError, Database, Settings
from financing.entrypoints.bootstrap import COMPONENTS, NO_OVERRIDES, Overrides
from financing.entrypoints.check import run_check
from financing.entrypoints.populate import populate
from financing.entrypoints.service import serve


def _components(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPONENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="financing",
        description="Event-sourced invoice financing: issuers sell invoices, investors bid.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser(
        "serve",
        help="run the service (every component by default)",
        description="Run the service. Configuration comes from the environment "
        "(COMMAND_SERVER_ADDRESS, QUERY_SERVER_ADDRESS, COMMAND_DB_CONNECTION_STRING, "
        "QUERY_DB_CONNECTION_STRING, AMQP_ADDRESS, LOGGER_LEVEL).",
    )
    serve_cmd.add_argument(
        "--components",
        type=_components,
        default=list(COMPONENTS),
        help=f"comma-separated subset of: {', '.join(COMPONENTS)} (default: all)",
    )
    populate_cmd = commands.add_parser(
        "populate",
        help="publish IssuerRegistered and InvestorRegistered integration events",
    )
    populate_cmd.add_argument("--issuers", type=_count, default=5, help="how many issuers (5)")
    populate_cmd.add_argument("--investors", type=_count, default=5, help="how many investors (5)")
    populate_cmd.add_argument(
        "--balance", type=_balance, default=Decimal(100), help="each investor's balance (100)"
    )
    projections = commands.add_parser("projections", help="manage the read models")
    projections_cmd = projections.add_subparsers(dest="projections_command", required=True)
    projections_cmd.add_parser(
        "rebuild",
        help="replay the event store into fresh read models, then swap them in",
    )

    check_cmd = commands.add_parser(
        "check",
        help="verify the invariants from the event store and the read models against a replay",
    )
    check_cmd.add_argument(
        "--skip-read-models", action="store_true", help="check the event store only"
    )

    dead = commands.add_parser("dead-letters", help="inspect and requeue dead-lettered messages")
    dead_cmd = dead.add_subparsers(dest="dead_letters_command", required=True)
    dead_list = dead_cmd.add_parser(
        "list", help="show dead letters with their reason (kept queued)"
    )
    dead_list.add_argument("--limit", type=_count, default=100)
    dead_list.add_argument("--bodies", action="store_true", help="print each message body too")
    requeue = dead_cmd.add_parser("requeue", help="send dead letters back to their source queue")
    requeue.add_argument("--queue", help="only those that came from this queue")
    requeue.add_argument("--message-id", help="only the one with this message id")
    return parser


def _count(value: str) -> int:
    count = int(value)
    if count < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return count


def _balance(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return amount


async def _populate(settings: Settings, args: argparse.Namespace) -> None:
    population = await populate(
        settings.amqp_urls, issuers=args.issuers, investors=args.investors, balance=args.balance
    )
    for issuer in population.issuers:
        print(f"issuer    {issuer}")
    for investor in population.investors:
        print(f"investor  {investor}  balance {args.balance}")


async def _rebuild(settings: Settings) -> None:
    async with _pool(settings.command_db) as events, _pool(settings.query_db) as queries:
        report = await rebuild(events, queries)
    print(
        f"rebuilt read models from {report.events} events: {report.investors} investors, "
        f"{report.invoices} invoices, {report.issuers} issuers"
    )


async def _check(settings: Settings, args: argparse.Namespace) -> int:
    async with _pool(settings.command_db) as events:
        if args.skip_read_models:
            result = await run_check(events)
        else:
            async with _pool(settings.query_db) as queries:
                result = await run_check(events, queries)
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


async def _dead_letters(settings: Settings, args: argparse.Namespace) -> None:
    async with connected(settings.amqp_urls) as broker:
        if args.dead_letters_command == "list":
            letters = await list_dead_letters(broker, args.limit)
            for letter in letters:
                print(
                    f"{letter.dead_lettered_at}  {letter.source_queue}  {letter.name}  "
                    f"{letter.message_id}\n    reason: {letter.reason}"
                )
                if args.bodies:
                    print(f"    body: {letter.body.decode('utf-8', 'replace')}")
            print(f"{len(letters)} dead letter(s)")
        else:
            count = await requeue_dead_letters(
                broker, source_queue=args.queue, message_id=args.message_id
            )
            print(f"requeued {count} dead letter(s)")


@contextlib.asynccontextmanager
async def _pool(db: Database) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(db, db.describe())
    try:
        yield pool
    finally:
        await pool.close()


def main(argv: Sequence[str] | None = None, *, overrides: Overrides = NO_OVERRIDES) -> None:
    """The command line; `overrides` changes the service's wiring (tests only)."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"financing: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    service_logging.configure(settings.log_level)
    if args.command == "serve":
        sys.exit(asyncio.run(serve(settings, args.components, overrides=overrides)))
    elif args.command == "populate":
        asyncio.run(_populate(settings, args))
    elif args.command == "projections":
        asyncio.run(_rebuild(settings))
    elif args.command == "check":
        sys.exit(asyncio.run(_check(settings, args)))
    elif args.command == "dead-letters":
        asyncio.run(_dead_letters(settings, args))
