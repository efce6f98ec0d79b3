"""The `financing` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from financing import logging as service_logging
from financing.config import ConfigError, Settings
from financing.entrypoints.populate import populate
from financing.entrypoints.service import COMPONENTS, serve


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
        settings.amqp_url, issuers=args.issuers, investors=args.investors, balance=args.balance
    )
    for issuer in population.issuers:
        print(f"issuer    {issuer}")
    for investor in population.investors:
        print(f"investor  {investor}  balance {args.balance}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"financing: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    service_logging.configure(settings.log_level)
    if args.command == "serve":
        sys.exit(asyncio.run(serve(settings, args.components)))
    elif args.command == "populate":
        asyncio.run(_populate(settings, args))
