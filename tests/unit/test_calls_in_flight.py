"""Shutting down lets the calls in flight finish: each gRPC service drains before its
listener closes (closing a grpclib server cancels the calls it is still answering)."""

from __future__ import annotations

import asyncio
import time

import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from structlog.testing import capture_logs

from financing.application.read_models import InMemoryReadModels, InvestorRow
from financing.application.retry import Outages
from financing.entrypoints.grpc.calls import CallsInFlight
from financing.entrypoints.grpc.codec import FramingChecked
from financing.entrypoints.grpc.queries import QueriesService
from financing.generated import AllInvestorsReply, QueriesStub
from tests.support import infra


class SlowReadModels(InMemoryReadModels):
    """Read models whose investors are read once `answer` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.answer = asyncio.Event()

    async def investors(self) -> list[InvestorRow]:
        self.reading.set()
        await self.answer.wait()
        return await super().investors()


async def test_a_query_in_flight_finishes_while_new_ones_are_refused() -> None:
    """Regression: only the Commands API was drained; a query in flight was cancelled by
    the listener's close, and its client got a broken stream instead of its answer."""
    read_models = SlowReadModels()
    queries = QueriesService(read_models, Outages())
    server = Server([FramingChecked(queries, calls=queries.calls)])  # as bootstrap serves it
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    channel = Channel("127.0.0.1", port)
    stub = QueriesStub(channel, timeout=10)
    try:
        in_flight = asyncio.create_task(stub.all_investors(Empty()))
        await asyncio.wait_for(read_models.reading.wait(), 5)
        draining = asyncio.create_task(queries.calls.drain(grace=10))
        with pytest.raises(GRPCError) as refused:
            await stub.all_investors(Empty())
        assert not draining.done()
        read_models.answer.set()
        await asyncio.wait_for(draining, 5)
        server.close()
        reply = await asyncio.wait_for(in_flight, 5)
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
    assert reply.investors == []
    assert refused.value.status is Status.UNAVAILABLE
    assert "shutting down" in (refused.value.message or "")


async def test_a_call_whose_request_is_still_arriving_when_draining_begins_is_answered() -> None:
    """Regression: a call was counted once its method enqueued or read; one whose request
    had not all arrived when the service began to drain was cancelled by the listener's
    close, its client left without an answer."""
    queries = QueriesService(InMemoryReadModels(), Outages())
    server = Server([FramingChecked(queries, calls=queries.calls)])
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    channel = Channel("127.0.0.1", port)
    try:
        async with channel.request(
            "/Queries/AllInvestors", Cardinality.UNARY_UNARY, Empty, AllInvestorsReply, timeout=10
        ) as stream:
            await stream.send_request()
            await stream._stream.send_data(b"\x00\x00\x00\x00\x00")  # its message, not its end
            await infra.wait_until(lambda: infra.holds(queries.calls.in_flight == 1), timeout=5)
            draining = asyncio.create_task(queries.calls.drain(grace=10))
            await stream._stream.end()  # the request's end arrives while the service drains
            stream._end_done = True
            reply = await asyncio.wait_for(stream.recv_message(), 5)
            await asyncio.wait_for(draining, 5)
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
    assert reply is not None and reply.investors == []


async def test_calls_still_in_flight_when_the_grace_ends_are_said_to_be_cut() -> None:
    """Regression: calls that outlived the shutdown grace (a database holding their read)
    were cut by the listener's close without a word in the log."""
    calls = CallsInFlight()
    with capture_logs() as logs, calls.call(), calls.call():
        await calls.drain(grace=0.01)
    [line] = [line for line in logs if line["event"].startswith("calls still in flight")]
    assert (line["calls"], line["log_level"]) == (2, "warning")


async def test_a_call_ending_as_the_grace_runs_out_is_not_said_to_be_cut() -> None:
    """Regression: on a loaded host the grace's end and the last call's came in the same
    turn of the event loop: "calls still in flight ... are cut" was logged, calls 0."""
    loop = asyncio.get_running_loop()
    calls = CallsInFlight()
    last = calls.call()
    last.__enter__()
    loop.call_later(0.01, last.__exit__, None, None, None)

    def held_up() -> None:  # the loop runs late: both ends are due in its next turn
        until = time.monotonic() + 0.05
        while time.monotonic() < until:
            pass

    loop.call_soon(held_up)
    with capture_logs() as logs:
        await calls.drain(grace=0.02)
    assert calls.in_flight == 0
    assert [line["event"] for line in logs] == []
