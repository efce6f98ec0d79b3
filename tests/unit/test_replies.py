"""The Queries API's list replies in wire format: the bytes betterproto writes for the
same replies, a loop that keeps turning while a large one is written, and a reply
waiting for a slow reader that holds only its bytes."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from decimal import Decimal
from uuid import uuid4

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.metadata import decode_grpc_message
from grpclib.protocol import H2Protocol
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from financing import generated as pb
from financing.application.errors import Unavailable
from financing.application.read_models import (
    ROWS_PER_TURN,
    InMemoryReadModels,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
)
from financing.application.retry import Outages
from financing.domain.aggregates import InvoiceStatus
from financing.domain.events import Bid
from financing.domain.money import to_double
from financing.entrypoints.grpc import queries as queries_module
from financing.entrypoints.grpc import replies
from financing.entrypoints.grpc.codec import FramingChecked, RequestCodec
from financing.entrypoints.grpc.edge import GrpcServer
from financing.entrypoints.grpc.queries import (
    LIST_BUILDS,
    LIST_CALLS_PER_CONNECTION,
    LIST_CALLS_PER_HOST,
    LIST_REPLIES,
    QueriesService,
)
from financing.entrypoints.grpc.replies import listed
from financing.entrypoints.observability import observe_replies
from tests.support.answers import answer_fields
from tests.support.infra import holds, wait_until

PUSHBACK = "grpc-retry-pushback-ms"

AMOUNTS = [Decimal("0"), Decimal("0.01"), Decimal("10"), Decimal("999999999999.99")]


def money(amount: Decimal) -> pb.Money:
    return pb.Money(amount=to_double(amount))


def uuid(row_id: object) -> pb.Uuid:
    return pb.Uuid(value=str(row_id))


def invoices() -> list[InvoiceRow]:
    return [
        InvoiceRow(
            uuid4(),
            uuid4(),
            amount,
            status,
            None if status is InvoiceStatus.AVAILABLE else Bid(uuid4(), bid),
        )
        for amount in AMOUNTS
        for bid in AMOUNTS
        for status in InvoiceStatus
    ]


async def test_an_invoice_list_is_the_bytes_betterproto_writes() -> None:
    rows = invoices()

    encoded = await listed(rows, replies.invoice)

    expected = pb.AllInvoicesReply(
        invoices=[
            pb.Invoice(
                id=uuid(row.id),
                issuer_id=uuid(row.issuer_id),
                asking_price=money(row.asking_price),
                status=pb.InvoiceStatus.from_string(row.status.value),
                winning_bid=None
                if row.winning_bid is None
                else pb.Bid(
                    investor_id=uuid(row.winning_bid.investor_id),
                    amount=money(row.winning_bid.amount),
                ),
            )
            for row in rows
        ]
    )
    assert encoded.data == bytes(expected)
    parsed = pb.AllInvoicesReply().parse(encoded.data)
    assert parsed == expected
    assert [invoice.winning_bid is None for invoice in parsed.invoices] == [
        row.winning_bid is None for row in rows
    ]


async def test_investor_and_issuer_lists_are_the_bytes_betterproto_writes() -> None:
    investors = [InvestorRow(uuid4(), a, b, Decimal(0)) for a in AMOUNTS for b in AMOUNTS]
    issuers = [IssuerRow(uuid4()) for _ in range(3)]

    assert (await listed(investors, replies.investor)).data == bytes(
        pb.AllInvestorsReply(
            investors=[
                pb.Investor(
                    id=uuid(row.id), balance=money(row.balance), reserved=money(row.reserved)
                )
                for row in investors
            ]
        )
    )
    assert (await listed(issuers, replies.issuer)).data == bytes(
        pb.AllIssuersReply(issuers=[pb.Issuer(id=uuid(row.id)) for row in issuers])
    )
    assert (await listed([], replies.issuer)).data == b""


@pytest.mark.parametrize("count", [1, ROWS_PER_TURN, ROWS_PER_TURN + 1, 5 * ROWS_PER_TURN])
async def test_a_long_list_gives_the_loop_a_turn_every_so_many_rows(count: int) -> None:
    """Regression: a list of 11,000 invoices was built in one stretch of 4.5 s, in which
    the process answered no call, handled no delivery and failed its health probes."""
    rows = [IssuerRow(uuid4()) for _ in range(count)]
    loop = asyncio.get_running_loop()
    turns = 0
    ticking: asyncio.Handle | None = None

    def tick() -> None:
        # A callback scheduled again each time it runs: it runs once per turn of the loop.
        nonlocal turns, ticking
        turns += 1
        ticking = loop.call_soon(tick)

    ticking = loop.call_soon(tick)
    started = turns
    try:
        encoded = await listed(rows, replies.issuer)
    finally:
        assert ticking is not None
        ticking.cancel()

    assert turns - started == (count - 1) // ROWS_PER_TURN
    assert len(pb.AllIssuersReply().parse(encoded.data).issuers) == count


class FreshRows(InMemoryReadModels):
    """Issuers read anew for each call, as the database gives them; it keeps a weak
    reference to each row it made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[weakref.ref[IssuerRow]] = []

    async def issuers(self) -> list[IssuerRow]:
        rows = [IssuerRow(uuid4()) for _ in range(5_000)]  # a reply of 210 kB
        self.made += [weakref.ref(row) for row in rows]
        return rows


async def test_a_caller_that_does_not_read_its_reply_holds_its_bytes_not_its_rows() -> None:
    """Regression: the rows stayed alive as long as the reply waited for its reader,
    several times the reply's size: 20 MB per stalled caller of a list of 30,000
    invoices, a gigabyte for 40 of them."""
    store = FreshRows()
    async with queries_server(store) as (queries, port), never_reading(port):

        async def rows_let_go() -> bool:
            return bool(store.made) and all(row() is None for row in store.made)

        await wait_until(rows_let_go, what="the rows let go while the reply waits")
        assert queries.calls.in_flight == 1  # still sending


def _sample(name: str, method: str) -> float:
    return REGISTRY.get_sample_value(name, {"grpc_method": method}) or 0.0


async def test_the_bytes_of_replies_waiting_for_their_callers_are_measured() -> None:
    """Regression: nothing measured the replies' sizes, nor the bytes held for callers
    that read slowly, which is what a process serving lists needs memory for."""
    size_before = _sample("financing_list_reply_bytes_sum", "AllIssuers")
    async with queries_server(FreshRows()) as (queries, port):
        observe_replies(queries)

        async def held() -> float:
            return _sample("financing_list_reply_bytes_held", "AllIssuers")

        async def let_go() -> bool:
            return not await held()

        async with never_reading(port):
            await wait_until(held, what="a reply held for its caller")
            size = _sample("financing_list_reply_bytes_sum", "AllIssuers") - size_before
            assert size > 200_000  # 5,000 issuers
            assert await held() == size
        await wait_until(let_go, what="the reply let go with its caller")


Caller = h2.connection.H2Connection


@contextlib.asynccontextmanager
async def never_reading(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, h2.connection.H2Connection]]:
    """A caller of AllIssuers with a 1 kB window that it never grants more of: the reply
    waits for it. Its socket's reader and its HTTP/2 side, until the block ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        caller = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        caller.initiate_connection()
        caller.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024})
        caller.send_headers(1, ALL_ISSUERS)
        caller.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
        writer.write(caller.data_to_send())
        yield reader, caller
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def queries_server(
    store: InMemoryReadModels, *, busy_wait: float = queries_module.BUSY_WAIT
) -> AsyncIterator[tuple[QueriesService, int]]:
    """A Queries server of its own on a free port, wired as the service wires one."""
    queries = QueriesService(store, Outages(), busy_wait=busy_wait)
    server = GrpcServer(
        [FramingChecked(queries, calls=queries.calls)], codec=RequestCodec(), busy=queries.busy
    )
    await server.start("127.0.0.1", 0)
    try:
        yield queries, server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_caller_that_never_takes_its_reply_in_is_answered_and_its_reply_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: a caller that never granted a window held its reply, 17 MB for a list
    of 60,000 invoices, for as long as it kept its connection (100 such: 1.7 GB)."""
    monkeypatch.setattr(queries_module, "REPLY_TIMEOUT", 0.3)
    async with queries_server(FreshRows()) as (queries, port):
        async with never_reading(port) as (reader, caller):
            status: bytes | None = None
            async with asyncio.timeout(10):
                while status is None and (data := await reader.read(65536)):
                    for event in caller.receive_data(data):  # never a window granted
                        if isinstance(event, h2.events.TrailersReceived):
                            status = dict(event.headers)[b"grpc-status"]

        async def let_go() -> bool:
            return queries.calls.in_flight == 0

        await wait_until(let_go, what="the call to end")
    assert status == str(Status.DEADLINE_EXCEEDED.value).encode()


ALL_ISSUERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "x"),
    (":path", "/Queries/AllIssuers"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


class GatedRows(InMemoryReadModels):
    """Issuers and investors read only once the gate opens; it notes how many reads run
    at once, and which list each read was of, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.reading = self.most = 0
        self.reads: list[str] = []

    async def _gated(self, what: str) -> None:
        self.reads.append(what)
        self.reading += 1
        self.most = max(self.most, self.reading)
        try:
            await self.gate.wait()
        finally:
            self.reading -= 1

    async def issuers(self) -> list[IssuerRow]:
        await self._gated("issuers")
        return [IssuerRow(uuid4()) for _ in range(100)]

    async def investors(self) -> list[InvestorRow]:
        await self._gated("investors")
        return []


async def test_lists_are_read_and_written_a_few_at_a_time() -> None:
    """Regression: 100 calls of a large list on one connection were built side by side:
    every other caller waited seconds, and the process grew by 4 GB."""
    store = GatedRows()
    async with queries_server(store) as (queries, port):
        channel = Channel("127.0.0.1", port)
        try:
            calls = [
                asyncio.create_task(pb.QueriesStub(channel).all_issuers(Empty(), timeout=10))
                for _ in range(LIST_BUILDS + 3)
            ]

            async def all_arrived() -> bool:
                return queries.calls.in_flight == len(calls)

            await wait_until(all_arrived, what="every call to arrive")
            store.gate.set()
            replies_ = await asyncio.gather(*calls)
        finally:
            channel.close()
    assert [len(reply.issuers) for reply in replies_] == [100] * len(calls)
    assert store.most == LIST_BUILDS


async def test_one_connections_many_list_calls_do_not_hold_up_anothers() -> None:
    """Regression: the lists of all callers waited their turn in one line: a caller with
    100 calls of the invoices' list put another's list of 50 issuers behind them all
    (it timed out)."""
    store = GatedRows()
    async with queries_server(store) as (queries, port):
        greedy, other = Channel("127.0.0.1", port), Channel("127.0.0.1", port)
        try:
            many = [
                asyncio.create_task(pb.QueriesStub(greedy).all_issuers(Empty(), timeout=10))
                for _ in range(3 * LIST_CALLS_PER_CONNECTION)
            ]

            async def arrived(count: int) -> bool:
                return queries.calls.in_flight == count

            await wait_until(lambda: arrived(len(many)), what="the greedy calls")
            one = asyncio.create_task(pb.QueriesStub(other).all_investors(Empty(), timeout=10))
            await wait_until(lambda: arrived(len(many) + 1), what="the other call")
            store.gate.set()
            await asyncio.gather(*many, one)
        finally:
            greedy.close()
            other.close()
    # The other caller's list is read as soon as one of the greedy caller's is done.
    assert store.reads.index("investors") == LIST_BUILDS


class ChannelFrom(Channel):
    """A channel whose connections leave from `source`, another address of the host's
    loopback network: another host, as the server sees it."""

    def __init__(self, source: str, host: str, port: int) -> None:
        super().__init__(host, port)
        self._source = source

    async def _create_connection(self) -> H2Protocol:
        _, protocol = await asyncio.get_running_loop().create_connection(
            self._protocol_factory, self._host, self._port, local_addr=(self._source, 0)
        )
        return protocol


async def test_one_hosts_many_connections_do_not_hold_up_another_hosts_lists() -> None:
    """Regression: one host's 8 connections, each with 2 list calls whose replies it did
    not read, held every list place for 60 s: every other caller's list waited."""
    store = GatedRows()
    async with queries_server(store) as (queries, port):
        greedy = [ChannelFrom("127.0.0.2", "127.0.0.1", port) for _ in range(LIST_REPLIES // 2)]
        other = Channel("127.0.0.1", port)
        try:
            many = [
                asyncio.create_task(pb.QueriesStub(channel).all_issuers(Empty(), timeout=10))
                for channel in greedy
                for _ in range(LIST_CALLS_PER_CONNECTION)
            ]

            async def arrived(count: int) -> bool:
                return queries.calls.in_flight == count

            await wait_until(lambda: arrived(len(many)), what="the greedy host's calls")
            one = asyncio.create_task(pb.QueriesStub(other).all_investors(Empty(), timeout=10))
            await wait_until(lambda: arrived(len(many) + 1), what="the other host's call")
            store.gate.set()
            await asyncio.gather(*many, one)
        finally:
            for channel in [*greedy, other]:
                channel.close()
    # The other host's list is read as soon as one of the greedy host's places is free.
    assert store.reads.index("investors") <= LIST_CALLS_PER_HOST


@pytest.mark.parametrize("database_down", [False, True], ids=["busy", "database down"])
async def test_a_list_call_given_no_place_within_the_busy_wait_is_answered_busy(
    monkeypatch: pytest.MonkeyPatch, database_down: bool
) -> None:
    """Regression: list calls waited for their turn without bound: 2,000 in flight from
    clients retrying at once queued until their deadlines, 0.8 answered a second where
    one polite client got 6.6, and the process spent itself beginning and cutting calls.
    Regression (a DBA's lock on a table): where the calls ahead wait on a database found
    down, "busy" pointed at the load; the database is named."""
    monkeypatch.setattr(queries_module, "LIST_REPLIES", 2)
    store = GatedRows()
    async with queries_server(store, busy_wait=0.3) as (queries, port):
        holder, other = Channel("127.0.0.1", port), Channel("127.0.0.1", port)
        try:
            held = [
                asyncio.create_task(pb.QueriesStub(holder).all_issuers(Empty(), timeout=10))
                for _ in range(2)
            ]
            await wait_until(lambda: holds(len(store.reads) == 2), what="every place taken")
            if database_down:
                # As a call ahead of it that failed on it left it.
                queries._lists["issuers"].failed["query database"] = "a statement waited"
            refusing = asyncio.create_task(
                answer_fields(("127.0.0.1", port), "/Queries/AllIssuers", Empty())
            )
            await wait_until(lambda: holds(queries.busy()), what="a call waiting its turn")
            refused = await refusing
            store.gate.set()
            await asyncio.gather(*held)
        finally:
            holder.close()
            other.close()
    assert refused["grpc-status"] == str(Status.UNAVAILABLE.value)
    # A busy answer tells a client's retry policy to come back after about the busy
    # wait again (spread); an outage leaves it to the client's own backoff.
    if database_down:
        assert PUSHBACK not in refused
    else:
        assert 150 <= int(refused[PUSHBACK]) <= 450
    assert decode_grpc_message(refused["grpc-message"]) == (
        "AllIssuers not answered: query database unavailable, the AllIssuers calls ahead of"
        " it waiting on it; try again later"
        if database_down
        else "AllIssuers not answered: the service was busy answering AllIssuers calls (1"
        " waiting for a turn) for the 0.3 s it waited; try again later"
    )
    assert store.reads == ["issuers", "issuers"]
    assert not queries.busy()
    listed = queries._lists["issuers"]
    assert not listed.connections and not listed.hosts  # every place given back


async def test_a_list_call_waiting_for_its_turn_is_answered_at_once_when_shutting_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queries_module, "LIST_REPLIES", 1)
    store = GatedRows()
    async with queries_server(store, busy_wait=60) as (queries, port):
        holder, other = Channel("127.0.0.1", port), Channel("127.0.0.1", port)
        try:
            held = asyncio.create_task(pb.QueriesStub(holder).all_issuers(Empty(), timeout=10))
            await wait_until(lambda: holds(len(store.reads) == 1), what="the place taken")
            waiting = asyncio.create_task(pb.QueriesStub(other).all_issuers(Empty(), timeout=10))
            await wait_until(lambda: holds(queries.calls.in_flight == 2), what="the call")
            draining = asyncio.create_task(queries.calls.drain(grace=10))
            with pytest.raises(GRPCError) as refused:
                async with asyncio.timeout(5):  # not the busy wait's 60 s
                    await waiting
            store.gate.set()
            await held
            await draining
        finally:
            holder.close()
            other.close()
    assert refused.value.status is Status.UNAVAILABLE
    assert refused.value.message == "AllIssuers not answered: the service is shutting down"
    assert store.reads == ["issuers"]  # the held call's alone


async def test_a_lost_connections_handler_is_let_go_once_its_calls_end() -> None:
    """Regression: grpclib looks for the handlers of lost connections only at every tenth
    new connection: a flood's last connections stayed, with every stream they had opened,
    until ten more came."""
    store = GatedRows()
    queries = QueriesService(store, Outages())
    server = GrpcServer([FramingChecked(queries, calls=queries.calls)], codec=RequestCodec())
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        channel = Channel("127.0.0.1", port)
        call = asyncio.create_task(pb.QueriesStub(channel).all_issuers(Empty(), timeout=10))
        await wait_until(lambda: holds(queries.calls.in_flight == 1), what="the call")
        channel.close()  # lost with its call open
        with contextlib.suppress(Exception):
            await call

        async def let_go() -> bool:
            return not server._handlers and queries.calls.in_flight == 0

        await wait_until(let_go, what="the lost connection's handler let go")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_list_call_trying_a_database_found_down_keeps_its_outage_open() -> None:
    """Regression (a DBA's lock on a read model's table for 32 s): each list call waited
    FINANCING_DB_TIMEOUT (10 s) on the lock and failed; 5 s after a failure the outage
    was said over, the next call still waiting, and begun again as it failed: `/health`
    flapped, and two outages were said of one lock."""
    database = "query database"
    outages = Outages()

    async def answers() -> None:
        return None  # the check passes: the server answers, the table is locked

    outages.check_with(database, answers, attempts_within=10.0)
    queries = QueriesService(InMemoryReadModels(), outages)
    down = Unavailable(database, "a statement waited longer than FINANCING_DB_TIMEOUT")
    let_go = asyncio.Event()

    async def waits_on_the_lock() -> list[object]:
        await let_go.wait()
        raise down

    async def failed_at_once() -> list[object]:
        raise down

    issuers = queries._lists["issuers"]
    with pytest.raises(GRPCError):
        await queries._read("AllIssuers", issuers, failed_at_once)
    waiting = asyncio.create_task(queries._read("AllIssuers", issuers, waits_on_the_lock))
    await wait_until(lambda: holds(bool(outages._trying.get(database))), what="a call waiting")
    await outages.check_once(within=1.0, quiet=0.0)  # long past the last failure
    assert database in outages._since, "said over while a call still waited on it"
    let_go.set()
    with pytest.raises(GRPCError):
        await waiting


class LockedInvoices(InMemoryReadModels):
    """The invoices' table locked: each read of it waits until the lock is let go, then
    fails as a statement that waited FINANCING_DB_TIMEOUT does, or, once `unlocked`,
    reads. The other tables read at once."""

    def __init__(self) -> None:
        super().__init__()
        self.let_go = asyncio.Event()
        self.unlocked = False
        self.waiting = 0
        self.reads = 0

    async def invoices(self) -> list[InvoiceRow]:
        self.reads += 1
        if self.unlocked:
            return []
        self.waiting += 1
        try:
            await self.let_go.wait()
        finally:
            self.waiting -= 1
        if self.unlocked:
            return []
        raise Unavailable("query database", "a statement waited longer than FINANCING_DB_TIMEOUT")


async def test_a_list_waiting_on_its_locked_table_does_not_hold_up_the_other_lists() -> None:
    """Regression (a DBA's lock on the invoices' table): the invoices' lists waiting on it
    held the process's two list builds, and the investors' and issuers' lists waited
    behind them until they were answered UNAVAILABLE."""
    store = LockedInvoices()
    async with queries_server(store, busy_wait=0.5) as (_, port):
        channels = [Channel("127.0.0.1", port) for _ in range(LIST_BUILDS + 1)]
        try:
            waiting = [
                asyncio.create_task(pb.QueriesStub(channel).all_invoices(Empty(), timeout=10))
                for channel in channels[:LIST_BUILDS]
            ]
            await wait_until(lambda: holds(store.waiting == LIST_BUILDS), what="reads waiting")
            other = pb.QueriesStub(channels[-1])
            investors = await other.all_investors(Empty(), timeout=5)
            issuers = await other.all_issuers(Empty(), timeout=5)
            assert store.waiting == LIST_BUILDS, "the invoices' reads let go before"
            store.let_go.set()
            outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        finally:
            for channel in channels:
                channel.close()
    assert investors.investors == [] and issuers.issuers == []
    assert [getattr(o, "status", o) for o in outcomes] == [Status.UNAVAILABLE] * LIST_BUILDS


async def test_a_list_whose_read_failed_is_refused_at_once_while_one_call_tries_again() -> None:
    """Regression (a DBA's lock on a table): each call of its list waited
    FINANCING_DB_TIMEOUT on the lock holding a place every list shares, and once those
    were taken the other lists were refused too. One call tries the database again; the
    others of its list are told at once what the last one met."""
    store = LockedInvoices()
    async with queries_server(store) as (queries, port):
        channel = Channel("127.0.0.1", port)
        try:
            stub = pb.QueriesStub(channel)
            store.let_go.set()
            with pytest.raises(GRPCError) as first:
                await stub.all_invoices(Empty(), timeout=5)
            store.let_go.clear()
            trying = asyncio.create_task(stub.all_invoices(Empty(), timeout=10))
            await wait_until(lambda: holds(store.waiting == 1), what="one call trying again")
            with pytest.raises(GRPCError) as refused:
                await stub.all_invoices(Empty(), timeout=1)
            assert store.waiting == 1, "a second call waited on the lock"
            assert (await stub.all_issuers(Empty(), timeout=5)).issuers == []
            store.unlocked = True
            store.let_go.set()
            assert (await trying).invoices == []
            assert (await stub.all_invoices(Empty(), timeout=5)).invoices == []
        finally:
            channel.close()
    assert first.value.status is refused.value.status is Status.UNAVAILABLE
    assert refused.value.message == (
        "AllInvoices not answered: query database unavailable, try again: a statement waited"
        " longer than FINANCING_DB_TIMEOUT (another AllInvoices call is trying it)"
    )
    assert not queries._lists["invoices"].failed


async def test_the_calls_of_a_locked_list_do_not_take_the_places_the_other_lists_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a DBA's lock on the invoices' table, a client calling AllInvoices twice a
    second on each of five connections): the invoices' calls waiting on the lock held
    every place of their host, and its AllInvestors and AllIssuers were refused as "busy"
    until the first invoices' read failed, FINANCING_DB_TIMEOUT later."""
    monkeypatch.setattr(queries_module, "LIST_REPLIES", 4)
    store = LockedInvoices()
    async with queries_server(store, busy_wait=0.3) as (queries, port):
        channels = [Channel("127.0.0.1", port) for _ in range(3)]
        try:
            flood = [
                asyncio.create_task(pb.QueriesStub(channel).all_invoices(Empty(), timeout=10))
                for channel in channels
                for _ in range(2)
            ]

            async def every_place_taken() -> bool:  # 4 places, 6 calls
                return store.waiting == LIST_BUILDS and queries.busy()

            await wait_until(every_place_taken, what="the invoices' places taken")
            other = pb.QueriesStub(channels[0])
            assert (await other.all_investors(Empty(), timeout=5)).investors == []
            assert (await other.all_issuers(Empty(), timeout=5)).issuers == []
            store.let_go.set()
            await asyncio.gather(*flood, return_exceptions=True)
        finally:
            for channel in channels:
                channel.close()


async def test_a_call_that_waited_while_the_reads_ahead_of_it_failed_is_told_at_once() -> None:
    """Regression (a DBA's lock): a call that waited its turn behind the two reads waiting
    on the lock became, once they failed, the one to try the database again, and waited
    FINANCING_DB_TIMEOUT once more: 20 s in all."""
    store = LockedInvoices()
    async with queries_server(store) as (queries, port):
        channels = [Channel("127.0.0.1", port) for _ in range(LIST_BUILDS + 1)]
        try:
            calls = [
                asyncio.create_task(pb.QueriesStub(channel).all_invoices(Empty(), timeout=10))
                for channel in channels
            ]
            await wait_until(
                lambda: holds(store.waiting == LIST_BUILDS and queries.calls.in_flight == 3),
                what="two reads waiting on the lock, a call behind them",
            )
            store.let_go.set()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for channel in channels:
                channel.close()
    assert store.reads == LIST_BUILDS  # the third call read nothing
    messages = sorted(str(getattr(outcome, "message", outcome)) for outcome in outcomes)
    assert messages[-1] == (
        "AllInvoices not answered: query database unavailable, try again: a statement waited"
        " longer than FINANCING_DB_TIMEOUT (met by the calls ahead of it)"
    )


async def test_a_read_its_caller_gave_up_on_after_a_while_is_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a DBA's lock, callers with 3 s deadlines): every read of the locked
    table was given up by its caller before FINANCING_DB_TIMEOUT; no outage, no line,
    `/health` 200: nothing said the table was held."""
    monkeypatch.setattr(queries_module, "SLOW_READ_SAID", 0.1)
    store = LockedInvoices()
    async with queries_server(store) as (_, port):
        channel = Channel("127.0.0.1", port)
        try:
            with capture_logs() as logs:
                with pytest.raises(TimeoutError):  # the client's deadline
                    await pb.QueriesStub(channel).all_invoices(Empty(), timeout=0.3)

                async def said() -> bool:
                    return any("given up" in str(line["event"]) for line in logs)

                await wait_until(said, what="the read given up said")
        finally:
            store.let_go.set()
            channel.close()
    [line] = [line for line in logs if "given up" in str(line["event"])]
    assert line["event"].startswith("a read of invoices was given up by its caller after 0.")
