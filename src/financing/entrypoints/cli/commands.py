"""The `financing` command line: the service, and the operator's tools beside it.

Each subcommand's --help names the environment variables it reads. A
dependency that cannot be reached is one line on stderr and exit code 1, not
a traceback; a configuration error is exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import resource
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn, TypeVar
from uuid import UUID

from financing import logging as service_logging
from financing import release
from financing.adapters.postgres import schema
from financing.adapters.postgres.connection import COMMAND_DATABASE, QUERY_DATABASE
from financing.adapters.postgres.rebuild import rebuild
from financing.adapters.rabbitmq.dead_letters import Selection
from financing.adapters.rabbitmq.queues import QUEUE_NAME_RULE, is_queue_name
from financing.application.errors import Refused, Unavailable
from financing.application.messages import InvestorRegistered
from financing.config import (
    AMQP_ADDRESS,
    COMMAND_DB,
    COMPONENTS,
    DB_TIMEOUT,
    DEDUP_RETENTION,
    LOGGER_LEVEL,
    METRICS_ADDRESS,
    QUERY_DB,
    QUEUE_TYPE,
    VARIABLES,
    ConfigError,
    Settings,
    Variable,
    parse_components,
)
from financing.domain.ids import parse_id
from financing.domain.money import MAX_AMOUNT, MAX_DECIMAL_PLACES, decimal_places
from financing.entrypoints import event_loop
from financing.entrypoints.bootstrap import (
    NEEDS_COMMAND_DB,
    NEEDS_QUERY_DB,
    NO_OVERRIDES,
    Overrides,
)
from financing.entrypoints.cli import broker as broker_commands
from financing.entrypoints.cli import dead_letters as dead_letter_commands
from financing.entrypoints.cli import relay as relay_commands
from financing.entrypoints.cli.check import run_check
from financing.entrypoints.cli.console import (
    OutputFailed,
    cancelled_by_signals,
    database,
    environment,
    write_lines,
)
from financing.entrypoints.cli.events import run_events
from financing.entrypoints.cli.health_check import HEALTH_CHECK_VARIABLES, probe
from financing.entrypoints.cli.populate import BATCH, Progress, registrations
from financing.entrypoints.cli.status import HEALTHY, MAX_RELAY_LAG, TIMEOUT, run_status
from financing.entrypoints.cli.tail import run_tail
from financing.entrypoints.cli.trace import run_trace
from financing.entrypoints.connections import (
    descriptor_limit,
    descriptors_needed,
    raise_descriptor_limit,
)
from financing.entrypoints.garbage import collect_as_a_server
from financing.entrypoints.service import serve

T = TypeVar("T")

# What an operator's subcommand does with the settings and its arguments: an exit code.
Run = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]

# Exit code of a command stopped by Ctrl-C before it could stop by itself (128 + SIGINT).
INTERRUPTED = 130


def _components(value: str) -> tuple[str, ...]:
    try:
        return parse_components(value)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count(value: str) -> int:
    count = _parsed(value, int, "a whole number")
    if count < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return count


def _positive(value: str) -> int:
    count = _parsed(value, int, "a whole number")
    if count < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return count


# The most an aggregate's version may be: the event store keeps versions as `int`.
MAX_VERSION = 2**31 - 1


def _version(value: str) -> int:
    count = _positive(value)
    if count > MAX_VERSION:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_VERSION}")
    return count


def _seconds(value: str) -> float:
    seconds = _parsed(value, float, "a number of seconds")
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return seconds


def _balance(value: str) -> Decimal:
    """An investor's balance as the service takes it: from 0 to MAX_AMOUNT, in cents."""
    amount = _parsed(value, Decimal, "a number")
    if not amount.is_finite() or amount < 0 or amount > MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {MAX_AMOUNT}")
    if decimal_places(amount) > MAX_DECIMAL_PLACES:
        raise argparse.ArgumentTypeError(f"must have at most {MAX_DECIMAL_PLACES} decimal places")
    return amount


def _correlation_id(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    try:
        value.encode()
    except UnicodeEncodeError:  # bytes of the command line that are not UTF-8
        raise argparse.ArgumentTypeError(f"{value!r} is not UTF-8 text") from None
    return value


def _queue_name(value: str) -> str:
    """A name the broker can be asked about (the AMQP client refuses others)."""
    if not is_queue_name(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a queue name: {QUEUE_NAME_RULE}")
    return value


def _since(value: str) -> datetime:
    try:
        return relay_commands.parse_since(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _uuid(value: str) -> UUID:
    return _parsed(value, parse_id, "a UUID")


def _parsed(value: str, parse: Callable[[str], T], what: str) -> T:
    try:
        return parse(value)
    except (ValueError, InvalidOperation):
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None


class _Version(argparse.Action):
    """`--version`: the release and the schema versions it migrates its databases to (an
    operator rolling releases out tells them apart by these, docs/deployment.md), read
    from the package's migrations only when asked for, not on every command line."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the release and its schema versions, then exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        schemas = ", ".join(f"{name} schema {schema.latest(name)}" for name in schema.SCHEMAS)
        print(f"financing {release()} ({schemas})")
        parser.exit()


class _Commands:
    """Adds subcommands, each with the environment variables it reads in its --help."""

    def __init__(self, parser: argparse.ArgumentParser, dest: str) -> None:
        self._group = parser.add_subparsers(dest=dest, required=True)

    def add(
        self,
        name: str,
        help: str,
        *variables: Variable,
        run: Run | None = None,
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        parser = self._group.add_parser(
            name,
            help=help,
            description=description or help[:1].upper() + help[1:] + ".",
            epilog=environment(*variables, LOGGER_LEVEL),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # What it reads, and no other of the service's variables: one set for another
        # command (a listen address, say) does not stop this one.
        parser.set_defaults(reads=variables, usage_of=parser)  # the innermost one's wins
        if run is not None:
            parser.set_defaults(run=run)
        # Named by its choices, as the usage line names it: a missing subcommand was
        # said by the attribute it is parsed into (`dead_letters_command`).
        self._group.metavar = "{" + ",".join(self._group.choices) + "}"
        return parser


class _Parser(argparse.ArgumentParser):
    """argparse, taking a word that begins with a dash and a digit (`--since -5m`) for a
    value, as it takes `-5`, so that the value's own check says what is wrong with it
    rather than "expected one argument": no option of ours begins with a digit. Its
    subcommands' parsers are of its class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="financing",
        description="Event-sourced invoice financing: issuers sell invoices, investors bid.",
    )
    parser.add_argument("--version", action=_Version)
    commands = _Commands(parser, "command")
    _add_serve(commands)
    _add_populate(commands)
    projections = commands.add("projections", "manage the read models", *DATABASE_VARIABLES)
    rebuild_cmd = _Commands(projections, "projections_command").add(
        "rebuild",
        "replay the event store into fresh read models, then swap them in",
        *DATABASE_VARIABLES,
        run=_rebuild,
    )
    rebuild_cmd.add_argument(
        "--adopt",
        action="store_true",
        help="rebuild read models the query database holds of another event store (one"
        " this store took the place of), making them this store's; refused without it",
    )
    _add_check(commands)
    _add_relay(commands)
    _add_dead_letters(commands)
    _add_broker(commands)
    _add_inspection(commands)
    commands.add(
        "health-check",
        "exit 0 when the components this environment runs are healthy (a container probe)",
        *HEALTH_CHECK_VARIABLES,
        run=_health_check,
        description="Exit 0 when the components this environment runs are healthy: the gRPC"
        " health (Commands, Queries) of the gRPC components among FINANCING_COMPONENTS at"
        " their addresses, and the /health of the metrics endpoint, which covers every"
        " component (consumers consuming, no dependency down). A container probe.",
    )
    return parser


def _add_serve(commands: _Commands) -> None:
    serve_cmd = commands.add("serve", "run the service (every component by default)", *VARIABLES)
    serve_cmd.add_argument(
        "--components",
        type=_components,
        default=None,
        help=f"comma-separated subset of: {', '.join(COMPONENTS)}"
        " (default: FINANCING_COMPONENTS, else all)",
    )


# What a command that declares queues on the broker reads.
BROKER_VARIABLES = (AMQP_ADDRESS, QUEUE_TYPE)
# What a command that reads both databases reads (connecting is bounded by DB_TIMEOUT).
DATABASE_VARIABLES = (COMMAND_DB, QUERY_DB, DB_TIMEOUT)


def _add_populate(commands: _Commands) -> None:
    populate_cmd = commands.add(
        "populate",
        "publish IssuerRegistered and InvestorRegistered integration events",
        *BROKER_VARIABLES,
        run=_populate,
    )
    populate_cmd.add_argument("--issuers", type=_count, default=5, help="how many issuers (5)")
    populate_cmd.add_argument("--investors", type=_count, default=5, help="how many investors (5)")
    populate_cmd.add_argument(
        "--balance", type=_balance, default=Decimal(100), help="each investor's balance (100)"
    )


def _add_check(commands: _Commands) -> None:
    check_cmd = commands.add(
        "check",
        "verify the invariants from the event store and the read models against a replay",
        *DATABASE_VARIABLES,
        run=_check,
    )
    check_cmd.add_argument(
        "--skip-read-models", action="store_true", help="check the event store only"
    )


def _add_relay(commands: _Commands) -> None:
    variables = (COMMAND_DB, DB_TIMEOUT, DEDUP_RETENTION)
    relay = commands.add("relay", "manage the relayer of events to the broker", *variables)
    rewind = _Commands(relay, "relay_command").add(
        "rewind",
        "relay again the events recorded since a time (a broker that lost them)",
        *variables,
        run=_rewind,
        description=relay_commands.__doc__,
    )
    rewind.add_argument(
        "--since",
        type=_since,
        required=True,
        metavar="WHEN",
        help="a time with its offset (2026-12-05T10:00:00Z) or a duration before now (2h)",
    )
    rewind.add_argument(
        "--any-age",
        action="store_true",
        help="also from before FINANCING_DEDUP_RETENTION (the records that tell consumers"
        " a copy may be pruned: one could apply twice)",
    )


def _add_broker(commands: _Commands) -> None:
    broker = commands.add("broker", "hand the broker back to the reference service", AMQP_ADDRESS)
    _Commands(broker, "broker_command").add(
        "hand-back",
        "take away what the service added to a broker the reference used (every instance stopped)",
        AMQP_ADDRESS,
        run=_hand_back,
        description=broker_commands.__doc__,
    )


def _add_dead_letters(commands: _Commands) -> None:
    dead = commands.add(
        "dead-letters", "inspect, requeue or discard dead letters", *BROKER_VARIABLES
    )
    letters = _Commands(dead, "dead_letters_command")
    listing = letters.add(
        "list",
        "show dead letters with their reason (they stay queued)",
        *BROKER_VARIABLES,
        run=_list,
    )
    listing.add_argument("--limit", type=_positive, default=100, help="at most this many (100)")
    listing.add_argument("--bodies", action="store_true", help="print each message body too")
    _selection_arguments(listing)
    requeue = letters.add(
        "requeue",
        "send dead letters back to their source queue",
        *BROKER_VARIABLES,
        DEDUP_RETENTION,
        run=_requeue,
    )
    _selection_arguments(requeue)
    requeue.add_argument(
        "--any-age",
        action="store_true",
        help="also letters older than FINANCING_DEDUP_RETENTION (their messages'"
        " deduplication records may be pruned: one could apply twice)",
    )
    discard = letters.add(
        "discard",
        "remove dead letters for good (say --all for every one)",
        *BROKER_VARIABLES,
        run=_discard,
    )
    _selection_arguments(discard)
    discard.add_argument("--all", action="store_true", help="every dead letter")


def _selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queue", type=_queue_name, help="only those dead-lettered from this queue"
    )
    parser.add_argument("--message-id", help="only those with this message id")
    parser.add_argument("--aggregate", type=_uuid, help="only those concerning this aggregate id")


def _add_inspection(commands: _Commands) -> None:
    trace = commands.add(
        "trace",
        "every message and event a command caused, and what became of each",
        COMMAND_DB,
        DB_TIMEOUT,
        AMQP_ADDRESS,
        run=_trace,
    )
    trace.add_argument(
        "correlation_id",
        type=_correlation_id,
        help="the command's id: the correlation-id metadata of its answer",
    )
    events = commands.add(
        "events",
        "an aggregate's event stream and its row in the read models",
        *DATABASE_VARIABLES,
        run=_events,
    )
    events.add_argument("aggregate_id", type=_uuid, help="an investor, invoice or issuer id")
    events.add_argument(
        "--from-version", type=_version, default=1, help="only its events from this version on"
    )
    events.add_argument(
        "--last", type=_version, help="only its last events, this many (a long stream's end)"
    )
    commands.add(
        "tail",
        "print every event published on `events`, live, until Ctrl-C",
        AMQP_ADDRESS,
        run=_tail,
    )
    status = commands.add(
        "status",
        "whether the deployment is healthy, and how far behind each part is",
        *DATABASE_VARIABLES,
        AMQP_ADDRESS,
        METRICS_ADDRESS,  # of the service on this host, asked for its /health
        run=_status,
        description="Whether the deployment is healthy, and how far behind each part is.\n\n"
        + HEALTHY,
    )
    status.add_argument(
        "--max-relay-lag",
        type=_seconds,
        default=MAX_RELAY_LAG,
        help=f"seconds an event may wait to be relayed in a healthy deployment ({MAX_RELAY_LAG:g})",
    )
    status.add_argument(
        "--timeout",
        type=_seconds,
        default=TIMEOUT,
        help=f"seconds each of the databases and the broker has to answer ({TIMEOUT:g})",
    )


async def _populate(settings: Settings, args: argparse.Namespace) -> int:
    """Each registration's line once the broker confirmed it; when it fails part way, the
    lines printed are the registrations published, and stderr says how many."""
    published = 0
    progress = Progress()
    try:
        async for batch in registrations(
            settings.amqp_urls,
            issuers=args.issuers,
            investors=args.investors,
            balance=args.balance,
            queue_type=settings.queue_type,
            progress=progress,
        ):
            for event in batch:
                if isinstance(event, InvestorRegistered):
                    print(f"investor  {event.id}  balance {args.balance}")
                else:
                    print(f"issuer    {event.id}")
            published += len(batch)
    except (Unavailable, Refused) as error:
        _published_in_part(args, published, f"then: {error}", progress.publishing)
        return 1
    except asyncio.CancelledError:
        # Stopped by a signal: what was published cannot be taken back, so it is said.
        _published_in_part(args, published, "then stopped", progress.publishing)
        raise
    return 0


def _published_in_part(
    args: argparse.Namespace, published: int, then: str, publishing: bool
) -> None:
    asked = args.issuers + args.investors
    more = (
        f"up to {min(BATCH, asked - published)} more, of the batch not confirmed, may have"
        " been published too"
        if publishing
        else "none was published (the broker was not reached, or refused the topology)"
    )
    print(
        f"financing populate: {published} of {asked} registration(s) confirmed (printed"
        f" above), {then}; {more}",
        file=sys.stderr,
    )


async def _rebuild(settings: Settings, args: argparse.Namespace) -> int:
    async with (
        database(
            settings.command_db,
            COMMAND_DATABASE,
            "projections rebuild",
            scans=True,
            schema="commands",
            migrates=True,
        ) as events,
        database(settings.query_db, QUERY_DATABASE, "projections rebuild", scans=True) as queries,
    ):
        report = await rebuild(events, queries, adopt=args.adopt)
    foreign = f" and {report.foreign} of another relayer" if report.foreign else ""
    print(
        f"rebuilt read models from {report.events} event(s){foreign}: {report.investors}"
        f" investor(s), {report.invoices} invoice(s), {report.issuers} issuer(s)"
    )
    return 0


async def _hand_back(settings: Settings, args: argparse.Namespace) -> int:
    return await broker_commands.run_hand_back(settings, args.usage_of.prog)


async def _rewind(settings: Settings, args: argparse.Namespace) -> int:
    return await relay_commands.run_rewind(settings, args.since, any_age=args.any_age)


async def _check(settings: Settings, args: argparse.Namespace) -> int:
    async with database(
        settings.command_db, COMMAND_DATABASE, "check", scans=True, schema="commands"
    ) as events:
        if args.skip_read_models:
            result = await run_check(events)
        else:
            async with database(
                settings.query_db, QUERY_DATABASE, "check", scans=True, schema="queries"
            ) as queries:
                result = await run_check(events, queries)
    write_lines(result.lines())
    return 0 if result.ok else 1


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        source_queue=args.queue,
        message_id=args.message_id,
        aggregate_id=None if args.aggregate is None else str(args.aggregate),
    )


async def _list(settings: Settings, args: argparse.Namespace) -> int:
    return await dead_letter_commands.list_letters(
        settings, _selection(args), args.limit, args.bodies
    )


async def _requeue(settings: Settings, args: argparse.Namespace) -> int:
    return await dead_letter_commands.requeue(settings, _selection(args), any_age=args.any_age)


async def _discard(settings: Settings, args: argparse.Namespace) -> int:
    return await dead_letter_commands.discard(settings, _selection(args))


async def _trace(settings: Settings, args: argparse.Namespace) -> int:
    return await run_trace(settings, args.correlation_id)


async def _events(settings: Settings, args: argparse.Namespace) -> int:
    return await run_events(
        settings, args.aggregate_id, from_version=args.from_version, last=args.last
    )


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    return await run_tail(settings)


async def _health_check(settings: Settings, args: argparse.Namespace) -> int:
    return await probe(settings)


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    return await run_status(settings, max_relay_lag=args.max_relay_lag, answer_within=args.timeout)


def _refuse_ambiguous_discard(args: argparse.Namespace) -> None:
    """Discarding is for good: every dead letter only when asked for in so many words."""
    if args.command != "dead-letters" or args.dead_letters_command != "discard":
        return
    chosen = any((args.queue, args.message_id, args.aggregate))
    if args.all and chosen:
        args.usage_of.error("--all discards every dead letter: give it alone, or no --all")
    if not args.all and not chosen:
        args.usage_of.error("say which (--queue, --message-id, --aggregate) or --all")


async def _operate(run: Run, settings: Settings, args: argparse.Namespace) -> int:
    """An operator's command: an unreachable dependency is one line on stderr, exit code 1.

    SIGINT and SIGTERM cancel it, so that what it opened is closed and what it made is
    undone (a rebuild's schema) either way, and it exits 128 + the signal with one line
    saying so; `tail`, which runs until stopped, exits 0. Each line begins with the
    command's whole name (`financing projections rebuild`)."""
    work = asyncio.create_task(run(settings, args))
    with cancelled_by_signals(work) as signalled:
        try:
            return await work
        except (Unavailable, Refused) as error:
            print(f"{args.usage_of.prog}: {error}", file=sys.stderr)
            if not signalled:
                return 1
        except asyncio.CancelledError:
            if not signalled:
                raise
    if args.command == "tail":
        return 0
    [signum] = signalled
    print(f"{args.usage_of.prog}: stopped by {signum.name}", file=sys.stderr)
    return 128 + signum


def _configuration_error(args: argparse.Namespace, error: str) -> NoReturn:
    """Say `error` as a configuration error (the service's as a log line), exit 2."""
    if args.command == "serve":
        _service_configuration_error(error)
    else:
        print(f"{args.usage_of.prog}: configuration error: {error}", file=sys.stderr)
    sys.exit(2)


def _loop_threads() -> int:
    """The threads libuv starts for the event loop (UV_THREADPOOL_SIZE, 4 by default)."""
    raw = os.environ.get("UV_THREADPOOL_SIZE", "")
    return min(int(raw), 1024) if raw.isascii() and raw.isdigit() and int(raw) > 0 else 4


def _threads_startable(count: int) -> bool:
    """Whether `count` threads can run beside this one now. Where they cannot, libuv
    aborts the process at its first name lookup (SIGABRT, exit 134, without a line)."""
    release = threading.Event()
    started: list[threading.Thread] = []
    try:
        for _ in range(count):
            thread = threading.Thread(target=release.wait, daemon=True)
            thread.start()
            started.append(thread)
    except RuntimeError:  # "can't start new thread"
        return False
    finally:
        release.set()
        for thread in started:
            thread.join()
    return True


def _service_configuration_error(error: str) -> None:
    """The service's lines are JSON off a terminal: its configuration errors too."""
    service_logging.configure("INFO")
    service_logging.get_logger(__name__).error("configuration error", error=error)


def _arguments(parser: argparse.ArgumentParser, words: list[str]) -> argparse.Namespace:
    """The parsed command line; `serve`'s usage errors (`--components bogus`, an unknown
    option) are one log line, as its configuration errors are, not argparse's text."""
    if words[:1] != ["serve"]:
        return _command_line(parser, words)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return _command_line(parser, words)
    except SystemExit as exit:
        if exit.code != 2:  # --help, which goes to stdout
            raise
        last = said.getvalue().strip().splitlines()[-1]  # "financing serve: error: MESSAGE"
        _service_configuration_error(last.split("error: ", 1)[-1])
        raise


def _command_line(parser: argparse.ArgumentParser, words: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, with an unknown argument refused by the subcommand it was given
    to, under that subcommand's usage (argparse leaves it to the top parser's)."""
    args, unknown = parser.parse_known_args(words)
    if unknown:
        args.usage_of.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _drop_output() -> None:
    """What is still buffered for stdout, which cannot take it, must not fail again at
    exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run(argv: Sequence[str] | None = None, *, overrides: Overrides | None = None) -> None:
    """The command line; `overrides` changes the service's wiring (tests only). Output
    whose reader has gone (`financing dead-letters list | head`) ends the command as
    it ends a shell tool: quietly, exit 128 + SIGPIPE; output that cannot be written
    otherwise (a full disk) is one line on stderr, exit 1."""
    try:
        _run(argv, overrides=overrides)
    except BrokenPipeError:
        _drop_output()
        sys.exit(128 + signal.SIGPIPE)
    except OutputFailed as failed:
        _drop_output()
        with contextlib.suppress(OSError, ValueError):
            print(f"financing: its output could not be written: {failed.error}", file=sys.stderr)
        sys.exit(1)


def _run(argv: Sequence[str] | None, *, overrides: Overrides | None) -> None:
    parser = build_parser()
    args = _arguments(parser, list(sys.argv[1:] if argv is None else argv))
    _refuse_ambiguous_discard(args)
    try:
        settings = Settings.from_env(reads=args.reads)
    except ConfigError as exc:
        _configuration_error(args, str(exc))
    threads = _loop_threads()
    if not _threads_startable(threads):
        address_space, _ = resource.getrlimit(resource.RLIMIT_AS)
        why = "a limit on processes or threads is reached (ulimit -u, a container's pids limit)"
        if address_space != resource.RLIM_INFINITY:
            # Each thread's stack is mapped out of it: the more likely cause, where set.
            why = (
                f"the address space the process may map (ulimit -v, {address_space >> 20}"
                f" MiB) cannot hold their stacks, or {why}"
            )
        _configuration_error(
            args,
            f"this process may not start the {threads} threads its event loop needs beside"
            f" its own (libuv's, for name lookups): {why}; raise it, or set"
            " UV_THREADPOOL_SIZE lower",
        )
    if args.command == "serve":  # the pools of the databases its components open
        selected = set(args.components or settings.components)
        opens = (bool(selected & NEEDS_COMMAND_DB), bool(selected & NEEDS_QUERY_DB))
    else:  # those of the databases the command reads (its --help lists them)
        names = {variable.name for variable in args.reads}
        opens = (COMMAND_DB.name in names, QUERY_DB.name in names)
    pools = (settings.command_db, settings.query_db)
    needed = descriptors_needed(
        *(db.pool_max_size for opened, db in zip(opens, pools, strict=True) if opened)
    )
    raise_descriptor_limit()
    if (soft := descriptor_limit()) is not None and soft < needed:
        # Below it the process failed part way, each limit its own way: at the event
        # loop's start (a traceback, exit 1), at the "service ready" line, or at start-up
        # after its whole budget.
        _configuration_error(
            args,
            f"this process may open {soft} files (ulimit -n), where it needs {needed} at least"
            " (the event loop, the broker's connection, the database pools): raise the limit",
        )
    service_logging.configure(settings.log_level)
    try:
        if args.command == "serve":
            components = args.components or settings.components
            wiring = overrides or NO_OVERRIDES
            collect_as_a_server()
            sys.exit(on_the_loop(serve(settings, components, overrides=wiring, last=True)))
        sys.exit(on_the_loop(_operate(args.run, settings, args)))
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)


def on_the_loop(main: Coroutine[Any, Any, int]) -> int:
    """What `main` returns, run on the loop the service runs on (uvloop), so that an
    operator's command (a rebuild, a replay) runs the adapters as the service runs them.
    A loop that cannot be closed in order afterwards leaves the exit code as it is: under
    a descriptor limit met as the service stopped, uvloop could not make the socket pair
    it closes with, and the process ended with a traceback and exit 1 after its last
    line had said 0."""
    runner = asyncio.Runner(loop_factory=event_loop.new_event_loop)
    try:
        return runner.run(main)
    finally:
        try:
            runner.close()
        except Exception as error:  # the process ends now: its system frees what is left
            service_logging.get_logger(__name__).warning(
                "the event loop could not be closed in order", error=repr(error)
            )
