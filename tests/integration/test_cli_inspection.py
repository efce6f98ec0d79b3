"""`financing trace`, `financing events` and `financing tail` beside a running service.

One `financing serve` for the module, on databases and a vhost of its own.
Commands go through the Commands API, whose answers carry the correlation id;
registrations are published on `events` as Registering publishes them. The
operator's commands run as subprocesses with the deployment's environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import cast
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel

from financing.adapters.postgres.connection import COMMAND_DATABASE, create_pool
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.dead_letters import (
    DEFERRED_AT_HEADER,
    DEFERRED_REASON_HEADER,
    Selection,
    list_dead_letters,
    list_deferred,
)
from financing.adapters.rabbitmq.topology import declare_deferrals
from financing.application import codec
from financing.application.messages import SellInvoice
from financing.application.retry import Outages
from financing.entrypoints.cli.console import database
from financing.entrypoints.cli.populate import populate
from financing.generated import BidOnInvoiceCommand, CommandsStub, Money, SellInvoiceCommand, Uuid
from tests.support import infra, rabbitmq
from tests.support.answers import call, correlation_of
from tests.support.deployment import LocalDeployment, local_deployment
from tests.support.service import CommandLine, financing_command, free_port, reap, run_cli

# A SellInvoice waits about 3 s for its issuer before it is dead-lettered.
DEAD_LETTER_WITHIN = 20.0
# The name of this module's own database sessions.
TESTS = "financing tests"


@dataclass
class Operated:
    """The deployment, and what the tests drive and inspect it with."""

    deployment: LocalDeployment
    commands: CommandsStub
    events: asyncpg.Pool
    queries: asyncpg.Pool
    broker: Broker

    async def cli(self, *args: str) -> CommandLine:
        return await run_cli(self.deployment.env, *args)

    async def traced(self, correlation_id: str) -> list[str]:
        """The lines `financing trace` prints, which must succeed."""
        run = await self.cli("trace", correlation_id)
        assert run.exit_code == 0, run.describe()
        return run.stdout.splitlines()

    async def register(self, balance: int = 100) -> tuple[UUID, UUID]:
        """A registered issuer and investor: (issuer id, investor id)."""
        population = await populate(
            [self.deployment.amqp_url], issuers=1, investors=1, balance=Decimal(balance)
        )
        [issuer], [investor] = population.issuers, population.investors
        await self.stream_reaches(issuer, "IssuerCreatedEvent")
        await self.stream_reaches(investor, "InvestorFundsAddedEvent")
        return issuer, investor

    async def sell(self, issuer: UUID, price: int) -> tuple[UUID, str]:
        """(invoice id, the command's correlation id)."""
        request = SellInvoiceCommand(issuer_id=Uuid(str(issuer)), asking_price=Money(price))
        reply, answered = await call(self.commands, "/Commands/SellInvoice", request, Uuid)
        return UUID(reply.value), correlation_of(answered)

    async def bid(self, investor: UUID, invoice: UUID, amount: int) -> str:
        """The command's correlation id."""
        request = BidOnInvoiceCommand(
            investor_id=Uuid(str(investor)), invoice_id=Uuid(str(invoice)), bid=Money(amount)
        )
        _, answered = await call(self.commands, "/Commands/BidOnInvoice", request, Empty)
        return correlation_of(answered)

    async def invoice_on_sale(self, price: int = 10) -> tuple[UUID, UUID]:
        """(invoice id, investor id with 100): an invoice created, an investor to bid."""
        issuer, investor = await self.register()
        invoice, _ = await self.sell(issuer, price)
        await self.stream_reaches(invoice, "InvoiceCreatedEvent")
        return invoice, investor

    async def stream_reaches(self, aggregate_id: UUID, name: str) -> None:
        store = PostgresEventStore(self.events)

        async def reached() -> bool:
            return name in [event.name for event in await store.stream(aggregate_id)]

        await infra.wait_until(reached, what=f"{name} in the stream of {aggregate_id}")

    async def outcome_recorded(self, correlation_id: str, consumer: str) -> None:
        async def recorded() -> bool:
            found: bool = await self.events.fetchval(
                "SELECT EXISTS (SELECT FROM processed_messages"
                " WHERE correlation_id = $1 AND consumer = $2)",
                correlation_id,
                consumer,
            )
            return found

        await infra.wait_until(recorded, what=f"{consumer}'s record in {correlation_id}")

    async def dead_lettered(self, correlation_id: str) -> None:
        async def arrived() -> bool:
            selection = Selection(correlation_id=correlation_id)
            return bool(await list_dead_letters(self.broker, selection=selection))

        await infra.wait_until(
            arrived, timeout=DEAD_LETTER_WITHIN, what=f"the dead letter of {correlation_id}"
        )


@pytest.fixture(scope="module")
async def operated() -> AsyncIterator[Operated]:
    async with local_deployment("fin_cli_inspect") as deployment:
        channel = Channel(*deployment.command_address)
        events = await create_pool(deployment.command_db, COMMAND_DATABASE, application_name=TESTS)
        queries = await create_pool(deployment.query_db, application_name=TESTS)
        broker = Broker([deployment.amqp_url], Outages())
        try:
            yield Operated(deployment, CommandsStub(channel, timeout=10), events, queries, broker)
        finally:
            await broker.close()
            await queries.close()
            await events.close()
            channel.close()


def in_order(lines: list[str], *wanted: str) -> list[int]:
    """The index of the first line containing each of `wanted`, each after the previous."""
    found: list[int] = []
    for text in wanted:
        start = found[-1] + 1 if found else 0
        hits = [i for i, line in enumerate(lines) if i >= start and text in line]
        assert hits, f"{text!r} not found after line {start} in:\n" + "\n".join(lines)
        found.append(hits[0])
    return found


def depth(line: str) -> int:
    """How deep in the tree a step's line is: where its branch starts."""
    return max(line.find("└─ "), line.find("├─ "))


# financing trace


async def test_trace_of_a_bid_saga_shows_each_step_applied_under_the_message_causing_it(
    operated: Operated,
) -> None:
    invoice, investor = await operated.invoice_on_sale(price=10)
    correlation = await operated.bid(investor, invoice, 15)
    await operated.stream_reaches(investor, "InvestorFundsReleasedEvent")

    lines = await operated.traced(correlation)

    assert lines[0] == f"correlation {correlation}"
    steps = in_order(
        lines,
        "BidOnInvoice  command ",
        "applied by bid_on_invoice: 1 event",
        f"BidOnInvoicePlacedEvent  Investor {investor} v3",
        "applied by bid_placed_offers_bid_to_invoice: 1 event",
        f"InvoiceFinancedEvent  Invoice {invoice} v2",
        "applied by financing_releases_excess_bid: 1 event",
        f"InvestorFundsReleasedEvent  Investor {investor} v4",
    )
    headings = [lines[i] for i in steps[::2]]
    assert [depth(line) for line in headings] == [0, 3, 6, 9], "\n".join(lines)
    assert lines[-1] == "3 applied, 0 changed nothing, 0 refused, 0 dead-lettered, 0 deferred"


async def test_trace_says_which_step_changed_nothing_and_by_which_rule(
    operated: Operated,
) -> None:
    invoice, investor = await operated.invoice_on_sale(price=10)
    # The exact price: the financing leaves no excess to release.
    correlation = await operated.bid(investor, invoice, 10)
    await operated.outcome_recorded(correlation, "financing_releases_excess_bid")

    lines = await operated.traced(correlation)

    in_order(
        lines,
        f"InvoiceFinancedEvent  Invoice {invoice} v2",
        "changed nothing at financing_releases_excess_bid:"
        f" Investor {investor}: releasing 0 is not a positive amount",
    )
    assert lines[-1] == "2 applied, 1 changed nothing, 0 refused, 0 dead-lettered, 0 deferred"


async def test_trace_of_a_bid_over_the_investors_balance_shows_it_dead_lettered_with_the_rule(
    operated: Operated,
) -> None:
    invoice, investor = await operated.invoice_on_sale(price=10)
    correlation = await operated.bid(investor, invoice, 500)
    await operated.dead_lettered(correlation)

    lines = await operated.traced(correlation)

    in_order(
        lines,
        "BidOnInvoice  command ",
        f"refused by bid_on_invoice: investor {investor}: balance 100 is less than the bid 500",
        f"dead-lettered from BidOnInvoice: RuleViolation: investor {investor}:"
        " balance 100 is less than the bid 500",
    )
    assert lines[-1] == "0 applied, 0 changed nothing, 1 refused, 1 dead-lettered, 0 deferred"


async def test_trace_of_a_sale_by_an_unregistered_issuer_shows_it_dead_lettered_after_retries(
    operated: Operated,
) -> None:
    stranger = uuid4()
    _, correlation = await operated.sell(stranger, 25)
    await operated.dead_lettered(correlation)

    lines = await operated.traced(correlation)

    in_order(
        lines,
        "SellInvoice  command ",
        f"dead-lettered from SellInvoice: MissingAggregate: issuer {stranger} is not registered",
    )


async def test_trace_of_a_command_deferred_to_wait_for_its_aggregate_shows_it_waiting(
    operated: Operated,
) -> None:
    """Regression: a command deferred (a sale whose issuer's registration is still on
    its way) was nowhere in its trace: "nothing is known of correlation id"."""
    correlation, stranger = f"saga-{uuid4()}", uuid4()
    sale = SellInvoice(uuid4(), stranger, Decimal(25))
    deferred_at = datetime.now(UTC).isoformat()
    channel = await operated.broker.channel()
    try:
        deferrals = await declare_deferrals(channel)
        await deferrals.publish(
            aio_pika.Message(
                codec.encode(sale),
                message_id="sale-1",
                expiration=600,  # it stays there while the test looks
                headers={
                    "_watermill_message_uuid": "sale-1",
                    "name": "SellInvoice",
                    "correlation_id": correlation,
                    DEFERRED_AT_HEADER: deferred_at,
                    DEFERRED_REASON_HEADER: f"issuer {stranger} is not registered",
                },
            ),
            "SellInvoice",
        )
    finally:
        await channel.close()

    lines = await operated.traced(correlation)

    in_order(
        lines,
        "SellInvoice  command sale-1",
        # Regression (a probe): the aggregate it waits for went unnamed.
        f"deferred from SellInvoice: issuer {stranger} is not registered (since then)",
    )
    assert lines[-1] == "0 applied, 0 changed nothing, 0 refused, 0 dead-lettered, 1 deferred"
    assert await list_deferred(operated.broker) != []  # browsed, not taken


async def test_trace_of_an_unknown_correlation_id_says_nothing_is_known_and_exits_non_zero(
    operated: Operated,
) -> None:
    unknown = str(uuid4())

    run = await operated.cli("trace", unknown)

    assert run.exit_code == 1, run.describe()
    assert run.stdout == ""
    assert f"nothing is known of correlation id '{unknown}'" in run.stderr


# financing events


async def test_events_shows_the_stream_with_its_correlations_and_the_read_model_row(
    operated: Operated,
) -> None:
    invoice, investor = await operated.invoice_on_sale(price=10)
    correlation = await operated.bid(investor, invoice, 15)

    async def projected() -> bool:
        row = await operated.queries.fetchrow(
            "SELECT balance, reserved FROM read_models.investors WHERE id = $1", investor
        )
        return row is not None and (row["balance"], row["reserved"]) == (90, 10)

    await infra.wait_until(projected, what="the investor's row after the saga")

    run = await operated.cli("events", str(investor))

    assert run.exit_code == 0, run.describe()
    lines = run.stdout.splitlines()
    assert lines[0] == f"Investor {investor}: 4 event(s)"
    assert lines[1].split() == ["VERSION", "RECORDED", "AT", "NAME", "CORRELATION", "BODY"]
    names = [line.split()[2] for line in lines[2:6]]
    assert names == [
        "InvestorCreatedEvent",
        "InvestorFundsAddedEvent",
        "BidOnInvoicePlacedEvent",
        "InvestorFundsReleasedEvent",
    ]
    assert [line.split()[3] for line in lines[4:6]] == [correlation, correlation]
    assert f'"InvoiceID":"{invoice}"' in lines[4]
    row = lines[lines.index("read model (investors):") + 1 :]
    assert [line.split() for line in row] == [
        ["balance", "90"],
        ["reserved", "10"],
        ["committed", "0"],
    ]


async def test_events_shows_a_window_of_a_long_stream_without_reading_it_whole(
    operated: Operated,
) -> None:
    invoice, investor = await operated.invoice_on_sale(price=10)
    await operated.bid(investor, invoice, 15)

    async def four_events() -> bool:
        count: int = await operated.events.fetchval(
            "SELECT count(*) FROM events WHERE aggregate_id = $1", investor
        )
        return count == 4

    await infra.wait_until(four_events, what="the investor's four events")

    last = await operated.cli("events", str(investor), "--last", "2")
    assert last.exit_code == 0, last.describe()
    lines = last.stdout.splitlines()
    assert lines[0] == f"Investor {investor}: v3 to v4, 2 of its 4 event(s)"
    assert [line.split()[0] for line in lines[2:4]] == ["v3", "v4"]

    middle = await operated.cli("events", str(investor), "--from-version", "2", "--last", "9")
    assert middle.stdout.splitlines()[0] == f"Investor {investor}: v2 to v4, 3 of its 4 event(s)"

    past = await operated.cli("events", str(investor), "--from-version", "5")
    assert past.exit_code == 0, past.describe()
    assert past.stdout.splitlines()[0] == (
        f"Investor {investor}: no event in the window, of its 4 event(s)"
    )


async def test_events_of_an_unknown_aggregate_says_so_and_exits_non_zero(
    operated: Operated,
) -> None:
    unknown = uuid4()

    run = await operated.cli("events", str(unknown))

    assert run.exit_code == 1, run.describe()
    assert f"nothing is known of aggregate {unknown}" in run.stderr


async def test_trace_and_events_without_a_dependency_print_what_they_have_and_exit_1(
    operated: Operated,
) -> None:
    """Regression: `trace` without the broker and `events` without the query database
    printed what they found and exited 0, as if the story were whole: a script could
    not tell a trace missing its dead letters from a complete one."""
    invoice, investor = await operated.invoice_on_sale(price=10)
    correlation = await operated.bid(investor, invoice, 15)
    await operated.traced(correlation)  # the saga is there to trace
    nowhere = f"127.0.0.1:{free_port()}"
    no_broker = {**operated.deployment.env, "AMQP_ADDRESS": f"amqp://guest:guest@{nowhere}/"}
    no_reads = {
        **operated.deployment.env,
        "QUERY_DB_CONNECTION_STRING": f"postgresql://postgres@{nowhere}/queries",
    }

    traced = await run_cli(no_broker, "trace", correlation)
    shown_ = await run_cli(no_reads, "events", str(investor))
    # Regression: a correlation known only by its dead letter was said to be carried by
    # "no event, processed message, dead letter or deferred message" when the dead
    # letters could not be searched (the broker away, or busy with another reader).
    unsearched = await run_cli(no_broker, "trace", str(uuid4()))
    # Regression (a probe): an unknown aggregate was said to have no row in the read
    # models, which were not read.
    unknown = uuid4()
    unread = await run_cli(no_reads, "events", str(unknown))

    assert traced.exit_code == 1, traced.describe()
    assert "BidOnInvoicePlacedEvent" in traced.stdout
    assert "dead letters not searched" in traced.stderr
    assert shown_.exit_code == 1, shown_.describe()
    assert "InvestorCreatedEvent" in shown_.stdout
    assert "read model not shown" in shown_.stderr
    # Regression (a probe): a row not read was said to be "no row (not projected yet, or
    # the query database is unreachable)", the same words as a row missing.
    assert shown_.stdout.splitlines()[-1] == (
        "read model: not read (the query database did not answer it: why is on stderr)"
    )
    assert unsearched.exit_code == 1, unsearched.describe()
    assert (
        "no event or processed message (the dead letters and deferred messages were not"
        " searched) carries it" in unsearched.stderr
    ), unsearched.describe()
    assert unread.exit_code == 1, unread.describe()
    assert (
        f"nothing is known of aggregate {unknown}: no event in the event store, the read"
        " models were not read" in unread.stderr
    ), unread.describe()


# financing tail


async def read_until(stream: asyncio.StreamReader, wanted: Callable[[str], bool]) -> list[str]:
    """Lines read until one is `wanted` (it included), within a deadline."""
    lines: list[str] = []
    try:
        async with asyncio.timeout(15):
            while not lines or not wanted(lines[-1]):
                line = await stream.readline()
                if not line:
                    raise AssertionError(f"the output ended first: {lines}")
                lines.append(line.decode().rstrip("\n"))
    except TimeoutError:
        raise AssertionError(f"no wanted line within 15 s: {lines}") from None
    return lines


@contextlib.asynccontextmanager
async def tailing(env: Mapping[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """`financing tail` as a subprocess, once it says it follows the events; killed on exit
    if it is still running."""
    tail = await asyncio.create_subprocess_exec(
        *financing_command(),
        "tail",
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert tail.stderr is not None
        await read_until(tail.stderr, lambda line: "following events on" in line)
        yield tail
    finally:
        await reap(tail)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_tail_stopped_while_it_connects_exits_zero(stop: signal.Signals) -> None:
    """Regression: the signals were handled only once connected; while a broker did not
    answer, Ctrl-C gave 130 and SIGTERM killed it (143)."""
    proxy = rabbitmq.BrokerProxy()
    await proxy.start()
    await proxy.cut()  # connections are accepted and never answered
    tail = await asyncio.create_subprocess_exec(
        *financing_command(),
        "tail",
        env={**os.environ, "AMQP_ADDRESS": proxy.url("/")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def connecting() -> bool:
            return proxy.connections > 0

        await infra.wait_until(connecting, what="financing tail connecting")
        tail.send_signal(stop)
        async with asyncio.timeout(10):
            _, stderr = await tail.communicate()
    finally:
        await reap(tail)
        await proxy.close()
    assert tail.returncode == 0, stderr.decode()[-2000:]


async def test_tail_prints_each_event_live_until_ctrl_c_then_leaves_no_queue_behind(
    operated: Operated,
) -> None:
    async with tailing(operated.deployment.env) as tail:
        assert tail.stdout is not None
        issuer, _ = await operated.register()
        printed = await read_until(tail.stdout, lambda line: "IssuerCreatedEvent" in line)
        # Regression: an operator's command's connection was named `financing`, as the
        # service's are: the broker's list could not tell them apart.
        named = await rabbitmq.connection_names(operated.deployment.name)
        assert "financing tail" in named and "financing" in named, named

        tail.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(tail.wait(), 10)

    assert code == 0
    at, name, aggregate, version, label, correlation, body = printed[-1].split(maxsplit=6)
    assert (name, aggregate, version, label) == (
        "IssuerCreatedEvent",
        str(issuer),
        "v1",
        "correlation",
    )
    assert at.endswith("Z") and correlation != "-"
    assert body == f'{{"IssuerID":"{issuer}"}}'
    # An integration event has no aggregate, nor version.
    assert any(line.split()[1:4] == ["IssuerRegistered", "-", "-"] for line in printed), printed
    queues = await rabbitmq.list_queues(operated.deployment.name)
    assert not [name for name in queues if name.startswith("financing_tail_")]


async def test_tail_whose_reader_is_gone_ends_quietly_as_a_shell_tool_does(
    operated: Operated,
) -> None:
    """Regression: `financing tail | head` never ended, and logged a traceback for every
    event after `head` had gone (the callback's BrokenPipeError went to asyncio)."""
    async with tailing(operated.deployment.env) as tail:
        assert tail.stdout is not None and tail.stderr is not None
        await operated.register()
        await read_until(tail.stdout, lambda line: "IssuerCreatedEvent" in line)
        transport = cast(asyncio.SubprocessTransport, tail._transport)  # type: ignore[attr-defined]
        reader = transport.get_pipe_transport(1)
        assert reader is not None
        reader.close()  # as `head` exits
        await operated.register()

        code = await asyncio.wait_for(tail.wait(), 15)
        said = (await tail.stderr.read()).decode()

    assert code == 128 + signal.SIGPIPE, said
    assert "Traceback" not in said and "BrokenPipe" not in said, said


async def test_tail_losing_the_broker_says_so_and_exits_with_a_failure_code() -> None:
    async with (
        rabbitmq.private_vhost("fin_cli_tail") as vhost,
        tailing({**os.environ, "AMQP_ADDRESS": vhost.url}) as tail,
    ):
        assert tail.stderr is not None
        await rabbitmq.close_connections(vhost.name)
        code = await asyncio.wait_for(tail.wait(), 15)
        said = (await tail.stderr.read()).decode()

    assert code == 1
    assert "financing tail: broker unavailable: the connection to the broker was lost" in said


# Database sessions


async def test_the_services_database_sessions_are_named_financing(operated: Operated) -> None:
    names = await operated.events.fetch(
        "SELECT DISTINCT application_name FROM pg_stat_activity"
        " WHERE datname = $1 AND application_name <> $2 AND backend_type = 'client backend'",
        operated.deployment.command_db.connect_kwargs["database"],
        TESTS,
    )

    assert [row["application_name"] for row in names] == ["financing"]


async def test_an_operator_commands_database_sessions_are_named_after_it(
    operated: Operated,
) -> None:
    async with database(operated.deployment.command_db, COMMAND_DATABASE, "trace") as pool:
        session = await pool.fetchval("SELECT pg_backend_pid()")
        named = await operated.events.fetchval(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1", session
        )

    assert named == "financing trace"


async def test_a_command_that_scans_keeps_its_statements_past_a_databases_statement_timeout() -> (
    None
):
    """Regression (a probe): a `statement_timeout` a DBA set on the database (20 ms, or
    30 s on a large store) cut `check`'s scans, said "command database unavailable";
    their sessions now take the scans' own timeout whatever the database says."""
    async with infra.fresh_database("fin_scan_timeout") as db:
        # Not 1 ms: on a loaded machine the session's own SHOW outlasted it.
        await infra.alter_database(db.connect_kwargs["database"], "SET statement_timeout = '300ms'")
        async with database(db, COMMAND_DATABASE, "check", scans=True) as pool:
            assert await pool.fetchval("SHOW statement_timeout") == "10min"
            await pool.execute("SELECT pg_sleep(0.4)")
        async with database(db, COMMAND_DATABASE, "trace") as pool:  # no scan: the database's
            assert await pool.fetchval("SHOW statement_timeout") == "300ms"
