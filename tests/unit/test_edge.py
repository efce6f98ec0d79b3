"""The gRPC edge counts a connection's frames from their headers, however its bytes are
cut by the reads, and says so at a measured pace when it sends connections away
(src/financing/entrypoints/grpc/edge.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpclib.const
import grpclib.protocol
import pytest
import structlog
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Stream
from structlog.testing import capture_logs

from financing.entrypoints.grpc import edge
from financing.entrypoints.grpc.codec import RequestCodec
from financing.entrypoints.grpc.edge import (
    SMALL_WINDOW_UPDATE,
    GrpcServer,
    Warnings,
    _FrameCounter,
)
from tests.support.infra import holds, wait_until

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, payload: bytes = b"", flags: int = 0, stream_id: int = 1) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


SMALL_UPDATE = frame(0x8, (SMALL_WINDOW_UPDATE - 1).to_bytes(4, "big"))
FRAMES = [
    frame(0x4, b"\x00\x03\x00\x00\x00\x64", stream_id=0),  # SETTINGS: makes no call
    frame(0x1, b"\x82" * 20, flags=0x4),  # HEADERS: a call
    frame(0x9, b"\x86" * 5),  # CONTINUATION: part of a call's headers
    frame(0x0, b"\x00" * 2000),  # DATA with a request's bytes in it
    frame(0x0),  # empty DATA: makes no call
    frame(0x0, b"\x00", flags=0x1),  # a byte of DATA, even one that ends its stream
    SMALL_UPDATE,  # makes no call
    frame(0x8, SMALL_WINDOW_UPDATE.to_bytes(4, "big")),
    frame(0x3, b"\x00\x00\x00\x08"),  # RST_STREAM: a reset
    frame(0x6, b"\x00" * 8, stream_id=0),  # PING: makes no call
    frame(0x2, b"\x00\x00\x00\x00\x10", stream_id=3),  # PRIORITY: makes no call
    frame(0xFA, b"\x01\x02"),  # a type HTTP/2 does not define: makes no call
]
STREAM = PREFACE + b"".join(FRAMES)


def counted(*reads: bytes) -> tuple[int, int, int]:
    counter = _FrameCounter(16_384)
    totals = [counter.count(data) for data in reads]
    calls, control, resets = (sum(column) for column in zip(*totals, strict=True))
    return calls, control, resets


def test_frames_are_counted_by_what_they_do() -> None:
    assert counted(STREAM) == (1, 7, 1)


def test_the_counts_do_not_depend_on_where_the_reads_cut_the_bytes() -> None:
    small_update_payload = STREAM.index(SMALL_UPDATE) + 9
    for cut in range(len(STREAM) + 1):
        # Regression (a probe): a WINDOW_UPDATE whose increment was cut by a read passed
        # uncounted, and 1-byte updates sent so were never counted.
        assert counted(STREAM[:cut], STREAM[cut:]) == (1, 7, 1), (cut, small_update_payload)


def test_bytes_given_one_at_a_time_are_counted_as_whole_ones() -> None:
    assert counted(*(STREAM[i : i + 1] for i in range(len(STREAM)))) == (1, 7, 1)


def test_a_frame_longer_than_the_server_takes_is_told_from_its_header_alone() -> None:
    counter = _FrameCounter(16_384)
    counter.count(STREAM + frame(0x0, b"\x00" * 16_384))  # the longest taken
    assert not counter.oversized
    header = (16_385).to_bytes(3, "big") + bytes((0x0, 0x0)) + (1).to_bytes(4, "big")
    counter.count(header[:5])
    assert not counter.oversized  # not whole yet
    counter.count(header[5:])  # and none of its payload
    assert counter.oversized


# The first bytes of a TLS 1.2/1.3 ClientHello record.
CLIENT_HELLO = bytes.fromhex("160301020001000001fc0303") + b"\x00" * 32


def test_a_tls_client_on_a_plaintext_port_is_told_from_a_frame_too_long() -> None:
    """Regression: a TLS client's first bytes, read as frames after the preface's
    length, announced a frame too long: it was said to have sent one."""
    for reads in ([CLIENT_HELLO], [CLIENT_HELLO[:1], CLIENT_HELLO[1:]]):
        counter = _FrameCounter(16_384)
        assert [counter.count(data) for data in reads] == [(0, 0, 0)] * len(reads)
        assert counter.not_http2 and counter.tls and not counter.oversized


def test_a_preface_that_is_not_http2s_is_not_counted_as_frames() -> None:
    counter = _FrameCounter(16_384)
    counter.count(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 64)
    assert counter.not_http2 and not counter.tls and not counter.oversized
    cut = _FrameCounter(16_384)
    cut.count(STREAM[:10])  # the preface's beginning, then something else
    cut.count(b"\x16" + STREAM[11:])
    assert cut.not_http2 and not cut.tls


async def test_a_warning_repeated_is_written_once_an_interval_saying_how_many_were_left_out() -> (
    None
):
    """Regression: a client connecting again each time it was sent away wrote a warning
    line for every connection, 13 a second. Regression (a probe): the count of those left
    out was written only with the next warning of their kind, however much later, or
    never: it ends the interval now."""
    warnings = Warnings(interval=0.2)
    texts = (
        "gRPC connection closed: it reset its calls too fast",
        "gRPC connection closed: it sent frames that make no call too fast",
    )
    with capture_logs() as logs:

        def mine() -> list[dict[str, object]]:
            # This instance's lines only: the service's own instances write to the same log.
            return [line for line in logs if str(line["event"]).startswith((*texts, "broke"))]

        for _ in range(5):
            warnings.warn(texts[0])
        warnings.warn(texts[1])
        assert [line["event"] for line in mine()] == list(texts)

        async def counted() -> bool:
            return len(mine()) == 3

        await wait_until(counted, interval=0.05, what="the interval to end")
        assert mine()[2] == {
            "event": texts[0],
            "log_level": "warning",
            "more_since_the_last_line": 4,
        }
        # Of one kind, whatever their texts: the last one's is said.
        for n in range(3):
            warnings.warn(f"broke HTTP/2 (index {n})", kind="broke HTTP/2")

        async def counted_again() -> bool:
            return len(mine()) == 5

        await wait_until(counted_again, interval=0.05, what="the next interval to end")
    assert [line["event"] for line in mine()[3:]] == [
        "broke HTTP/2 (index 0)",
        "broke HTTP/2 (index 2)",
    ]
    assert mine()[4]["more_since_the_last_line"] == 2


async def test_a_warning_that_comes_as_its_interval_ends_counts_those_left_out() -> None:
    """Regression: one that came just as the interval ended, before the loop had run the
    line counting those left out, was written beside that line: two lines 0.1 ms apart."""
    warnings = Warnings(interval=0.05)
    text = "gRPC connection closed: its TLS handshake failed (peer did not return a certificate)"
    with capture_logs() as logs:
        warnings.warn(text)
        warnings.warn(text)  # left out: its count due as the interval ends
        # The interval over, without a turn of the loop: the count's line is due, not run.
        while time.monotonic() < warnings._next[text]:
            pass
        warnings.warn(text)  # come before the loop wrote the count that was due
        await wait_until(lambda: holds(not warnings._left_out), what="the due line run")
    mine = [line for line in logs if line["event"] == text]
    assert [line.get("more_since_the_last_line") for line in mine] == [None, 1], mine


async def test_a_call_ending_after_its_connection_was_sent_away_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (a flood of both ports): the calls of a connection sent away (its
    resets too fast) that ended after it, a deadline's answer among them, tried to send
    their status on the closed connection: an ERROR line and a 60-line traceback each
    (`Invalid input ConnectionInputs.SEND_HEADERS in state ConnectionState.CLOSED`)."""
    server: GrpcServer

    async def ends_after_its_connection(stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        [connection] = list(server._edge_connections._open)
        connection._send_away("it is sent away for the test", b"test")
        raise GRPCError(Status.UNAVAILABLE, "answered on a connection sent away")

    class Ending:
        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            return {
                "/test.Test/Ends": grpclib.const.Handler(
                    ends_after_its_connection,
                    grpclib.const.Cardinality.UNARY_UNARY,
                    HealthCheckRequest,
                    HealthCheckResponse,
                )
            }

    server = GrpcServer([Ending()], codec=RequestCodec())
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    channel = Channel("127.0.0.1", port)
    try:
        with (
            caplog.at_level(logging.ERROR, logger="grpclib"),
            pytest.raises((GRPCError, StreamTerminatedError)),
        ):
            async with channel.request(
                "/test.Test/Ends",
                grpclib.const.Cardinality.UNARY_UNARY,
                HealthCheckRequest,
                HealthCheckResponse,
                timeout=5,
            ) as call:
                await call.send_message(HealthCheckRequest(), end=True)
                await call.recv_message()
        await wait_until(lambda: holds(not server._edge_connections._open), what="let go")
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], [
        record.getMessage() for record in caplog.records
    ]


async def test_a_connection_http2_could_not_be_begun_on_is_closed_and_not_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): under an address-space limit, a connection whose HTTP/2 set-up
    raised (a MemoryError) stayed counted and half made: its client's call waited for
    its deadline, and at shutdown its GOAWAY raised AttributeError, exit 1."""
    real = grpclib.protocol.H2Protocol.connection_made
    failures = 0

    def failing_once(self: Any, transport: Any) -> None:
        nonlocal failures
        if not failures:
            failures += 1
            raise MemoryError
        real(self, transport)

    monkeypatch.setattr(grpclib.protocol.H2Protocol, "connection_made", failing_once)
    server = GrpcServer([Health()], codec=RequestCodec())
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        with capture_logs() as logs:
            first = Channel("127.0.0.1", port)
            try:
                with pytest.raises((ConnectionError, StreamTerminatedError, GRPCError)):
                    await HealthStub(first).Check(HealthCheckRequest(), timeout=5)
            finally:
                first.close()
            second = Channel("127.0.0.1", port)
            try:  # the next connection is served
                await HealthStub(second).Check(HealthCheckRequest(), timeout=5)
            finally:
                second.close()
        assert failures == 1
        assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
            "gRPC connection closed: HTTP/2 could not be begun on it (MemoryError())"
        ]
        server.go_away()  # what shutting down does first: nothing half made to tell
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_closed_for_breaking_http2_is_not_taken_to_make_room(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (a probe): a connection grpclib closed for breaking HTTP/2 counted as
    idle until its transport said it was lost; chosen meanwhile to make room for its
    host's next connection, its GOAWAY raised on the transport grpclib had let go, and
    that next connection, never counted, was never closed: under `ulimit -n 64` a flood
    of them held 35 sockets for 20 s and every port refused."""
    lost: list[tuple[Any, Any]] = []  # connection_lost calls held back by the test
    real_lost = edge._Protocol.connection_lost
    monkeypatch.setattr(edge._Protocol, "connection_lost", lambda *call: lost.append(call))
    server = GrpcServer([Health()], codec=RequestCodec(), connections=2)  # 1 a host
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        _, breaking = await asyncio.open_connection("127.0.0.1", port)
        breaking.write(b"GARBAGE!" * 8)  # no HTTP/2 preface
        await wait_until(lambda: holds(bool(lost)), what="the broken connection closed")
        with caplog.at_level(logging.ERROR):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            closed = await asyncio.wait_for(reader.read(), 5)  # refused: closed at once
        writer.close()
        breaking.close()
        assert closed == b"", closed
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
            r.getMessage() for r in caplog.records
        ]
    finally:
        for call in lost:
            real_lost(*call)
        server.close()
        await server.wait_closed()


async def test_a_warning_line_carries_no_fields_of_the_call_that_happened_to_write_it() -> None:
    """Regression (a probe): `commands answered UNAVAILABLE ... busy`, a line standing for
    162 refusals, carried the message and correlation ids of one of those calls, as if
    it were about that command; so did the line counting those left out."""
    warnings = Warnings(interval=0.1)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:

        def mine() -> list[dict[str, object]]:
            return [line for line in logs if line["event"] == "calls answered busy"]

        for call in range(3):
            with structlog.contextvars.bound_contextvars(message_id=f"m-{call}"):
                warnings.warn("calls answered busy", seen=call)

        async def counted() -> bool:
            return len(mine()) == 2

        await wait_until(counted, interval=0.05, what="the interval to end")
    assert [line.get("message_id") for line in mine()] == [None, None]
    assert [line["seen"] for line in mine()] == [0, 2]  # its own fields kept
