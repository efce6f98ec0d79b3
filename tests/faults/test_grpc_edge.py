"""The HTTP/2 edge of the gRPC servers (src/financing/entrypoints/grpc/edge.py): what one
connection can send, frame by frame, and what it gets, while other callers are served.

The service runs as `financing serve --components commands-api` (the `commands_api`
fixture); calls go to its health check, which needs nothing behind the listener, and to
SellInvoice where a command's correlation matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable

import h2.events
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest
from h2.errors import ErrorCodes

from financing.entrypoints.grpc.codec import REQUEST_TIMEOUT
from financing.entrypoints.grpc.edge import (
    CONTROL_FRAMES_BURST,
    LINGER,
    PREFACE_TIMEOUT,
    RESETS_BURST,
    SMALL_WINDOW_UPDATE,
    connection_limit,
)
from financing.generated import Money, QueriesStub, SellInvoiceCommand, Uuid
from tests.faults.conftest import FEW_DESCRIPTORS, CommandsApi
from tests.support.infra import wait_until
from tests.support.metrics import scrape, value
from tests.support.raw_h2 import EMPTY_MESSAGE, HEALTH_CHECK, WITHIN, RawConnection


def framed(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def serving(address: tuple[str, int]) -> bool:
    """Whether another client's health check is answered now."""
    channel = Channel(*address)
    try:
        await HealthStub(channel).Check(HealthCheckRequest(), timeout=5)
    finally:
        channel.close()
    return True


@pytest.fixture
def no_errors_logged(commands_api: CommandsApi) -> Callable[[], None]:
    logged = commands_api.service.log_size()

    def check() -> None:
        written = commands_api.service.log_tail(since=logged)
        assert '"level": "error"' not in written, written
        assert commands_api.service.running

    return check


@pytest.mark.parametrize("grpc_timeout", [b"0n", b"1n", b"1u", b"0S"])
async def test_a_call_whose_deadline_passed_before_it_arrived_is_answered_deadline_exceeded(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None], grpc_timeout: bytes
) -> None:
    """Regression: answered UNKNOWN, with "Timeout occurred" and a traceback logged."""
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(
            connection.call(
                HEALTH_CHECK.encode(), EMPTY_MESSAGE, metadata=[(b"grpc-timeout", grpc_timeout)]
            )
        )
        assert answer[b"grpc-status"] == str(Status.DEADLINE_EXCEEDED.value).encode(), answer
        assert answer[b"content-type"] == b"application/grpc", answer
        # The same connection serves the next call.
        answer = await connection.answered(connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE))
        assert answer[b"grpc-status"] == b"0", answer
    no_errors_logged()


async def test_frames_of_types_http2_does_not_define_are_ignored(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: grpclib raised on the event h2 makes of a frame of an undefined type
    (which a receiver must ignore: RFC 9113 section 5.5; 0x10 is PRIORITY_UPDATE, which
    h2 does not know either) or of an ALTSVC; the transport logged it as a
    fatal error, with a traceback, and closed the connection, its calls with it: one
    client made 63,000 such error lines a minute."""
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE))
        assert answer[b"grpc-status"] == b"0", answer
        altsvc = b"\x00\x01x" + b'h2=":443"'  # its origin's length, its origin, its value
        for frame_type, payload in ((0x0B, b"abcd"), (0x0A, altsvc), (0x10, b""), (0xFF, b"a")):
            # Length, type, no flags, stream 0, payload.
            header = len(payload).to_bytes(3, "big") + bytes([frame_type]) + b"\x00" * 5
            connection.send_raw(header + payload)
            answer = await connection.answered(
                connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE)
            )
            assert answer[b"grpc-status"] == b"0", answer
    no_errors_logged()


async def test_requests_without_a_path_are_reset_and_give_their_streams_back(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: each logged a traceback (KeyError ':path') and kept its stream open, so
    that after 100 of them the connection could carry no call."""
    async with RawConnection.open(commands_api.address) as connection:
        for _ in range(150):  # more than the 100 streams a connection may have open
            reset = await connection.was_reset(connection.call(None, EMPTY_MESSAGE))
            assert reset is ErrorCodes.PROTOCOL_ERROR
        for _ in range(3):
            answer = await connection.answered(
                connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE)
            )
            assert answer[b"grpc-status"] == b"0", answer
    no_errors_logged()


PSEUDO = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x")]


@pytest.mark.parametrize(
    ("pseudo", "metadata"),
    [
        # The health service's :path first, another's last: served as the last, it passed
        # for a health check, which is never put aside.
        ([*PSEUDO, (b":path", HEALTH_CHECK.encode()), (b":path", b"/Queries/AllIssuers")], []),
        ([(b":method", b"GET"), *PSEUDO, (b":path", HEALTH_CHECK.encode())], []),
        ([*PSEUDO, (b":path", HEALTH_CHECK.encode()), (b":foo", b"bar")], []),
        ([*PSEUDO, (b":path", b"/Commands/SellInvoice")], [(b"Idempotency-Key", b"k")]),
        ([*PSEUDO, (b":path", HEALTH_CHECK.encode())], [(b"connection", b"keep-alive")]),
        ([*PSEUDO, (b":path", HEALTH_CHECK.encode())], [(b"te", b"gzip")]),
    ],
    ids=["path-twice", "method-twice", "unknown-pseudo", "capitals", "connection", "te"],
)
async def test_a_malformed_request_is_reset_not_served(
    commands_api: CommandsApi,
    no_errors_logged: Callable[[], None],
    pseudo: list[tuple[bytes, bytes]],
    metadata: list[tuple[bytes, bytes]],
) -> None:
    """Regression (a probe): requests RFC 9113 calls malformed were served, by their last
    `:path`; a call with the health service's `:path` first escaped its connection's
    limit on calls begun, and `Idempotency-Key` in capitals was no key at all (the
    retry of a SellInvoice made a second invoice). Each is now reset (PROTOCOL_ERROR),
    as one without a `:path` is, and the connection serves on."""
    async with RawConnection.open(commands_api.address) as connection:
        reset = await connection.was_reset(
            connection.call(None, EMPTY_MESSAGE, pseudo=pseudo, metadata=metadata)
        )
        assert reset is ErrorCodes.PROTOCOL_ERROR
        answer = await connection.answered(connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE))
        assert answer[b"grpc-status"] == b"0", answer
    no_errors_logged()


@pytest.mark.parametrize("written", [b"-1S", b"1.5S", b"1X", b"abc", b"", b" 1S", b"123456789S"])
async def test_a_grpc_timeout_that_is_none_is_answered_invalid_argument(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None], written: bytes
) -> None:
    """Regression (a probe): answered UNKNOWN ("Invalid grpc-timeout header"), counted and
    logged nowhere; 9 digits, beyond the protocol's 8, were taken."""
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(
            connection.call(
                HEALTH_CHECK.encode(), EMPTY_MESSAGE, metadata=[(b"grpc-timeout", written)]
            )
        )
    assert answer[b"grpc-status"] == str(Status.INVALID_ARGUMENT.value).encode(), answer
    assert answer[b"grpc-message"].startswith(b"metadata grpc-timeout: "), answer
    no_errors_logged()


async def test_header_values_beyond_ascii_are_served_and_never_taken_as_a_correlation_id(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: the first byte beyond ASCII in a header value closed the connection,
    every call on it unanswered, with "Fatal error on transport" logged."""
    correlation = "été".encode()
    command = SellInvoiceCommand(issuer_id=Uuid("8d7b6a3e-9a43-4a2c-8f5e-0b1c2d3e4f50"))
    command.asking_price = Money(amount=10.0)
    async with RawConnection.open(commands_api.address) as connection:
        checked = connection.call(
            HEALTH_CHECK.encode(), EMPTY_MESSAGE, metadata=[(b"x-note", "café".encode())]
        )
        sold = connection.call(
            b"/Commands/SellInvoice",
            framed(bytes(command)),
            metadata=[(b"correlation-id", correlation), (b"x-raw", b"\xff\xfe")],
        )
        keyed = connection.call(
            b"/Commands/SellInvoice",
            framed(bytes(command)),
            metadata=[(b"idempotency-key", "clé".encode())],
        )
        assert (await connection.answered(checked))[b"grpc-status"] == b"0"
        answer = await connection.answered(sold)
        assert answer[b"grpc-status"] == b"0", answer
        # A correlation of the service's own: gRPC metadata values are ASCII.
        assert answer[b"correlation-id"].isascii(), answer
        # A key must be ASCII too, and is refused rather than ignored.
        answer = await connection.answered(keyed)
        assert answer[b"grpc-status"] == str(Status.INVALID_ARGUMENT.value).encode(), answer
        assert answer[b"grpc-message"].startswith(b"idempotency-key"), answer
    no_errors_logged()


# Lenient decoders drop what is not of the alphabet ("!!!" decodes to nothing), or
# stop at a cut group ("a").
@pytest.mark.parametrize("value", [b"*not base64*", b"!!!", b"Y@Q", b"a", b"YQ==,@@"])
async def test_a_bin_metadata_value_that_is_not_base64_is_answered_invalid_argument(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None], value: bytes
) -> None:
    """Regression: logged a traceback ("Server error") and left the call unanswered."""
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(
            connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, metadata=[(b"trace-bin", value)])
        )
    assert answer[b"grpc-status"] == str(Status.INVALID_ARGUMENT.value).encode(), answer
    assert b"trace-bin" in answer[b"grpc-message"], answer
    assert answer[b"content-type"] == b"application/grpc", answer
    no_errors_logged()


@pytest.mark.parametrize("value", [b"YQ", b"YQ==", b"YWJj", b"", b"YQ==,YWJj"])
async def test_a_bin_metadata_value_in_base64_padded_or_not_is_taken(
    commands_api: CommandsApi, value: bytes
) -> None:
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(
            connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, metadata=[(b"trace-bin", value)])
        )
    assert answer[b"grpc-status"] == str(Status.OK.value).encode(), answer


async def test_a_method_the_server_does_not_have_is_answered_unimplemented_to_any_client(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: grpclib answered without `content-type`, which gRPC asks of an answer
    of trailers only, and grpclib's own clients then reported UNKNOWN ("Missing
    content-type header") instead of UNIMPLEMENTED."""
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(connection.call(b"/Commands/Xyz", EMPTY_MESSAGE))
    assert answer[b"grpc-status"] == str(Status.UNIMPLEMENTED.value).encode(), answer
    assert answer[b"content-type"] == b"application/grpc", answer
    assert answer[b"grpc-message"] == b"/Commands/Xyz: no such method", answer

    channel = Channel(*commands_api.address)
    try:
        with pytest.raises(GRPCError) as raised:
            await QueriesStub(channel).all_invoices(Empty())  # served on the other port
    finally:
        channel.close()
    assert raised.value.status is Status.UNIMPLEMENTED, raised.value
    no_errors_logged()


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/grpc+proto",
        b"application/grpc;charset=utf-8",
        b"application/grpc; charset=utf-8",
        b"application/grpc;proto",
        b"application/grpc+proto; charset=utf-8",
        b"application/grpc+json",  # grpc-go serves a codec it lacks as protobuf
    ],
)
async def test_a_grpc_content_type_with_a_subtype_or_parameters_is_served_as_grpc_go_serves_it(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None], content_type: bytes
) -> None:
    """Regression: anything after `application/grpc` but `+proto` was answered HTTP 415
    ("Unacceptable content-type header", UNKNOWN to the client), where the reference's
    grpc-go server answers the call."""
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(
            connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, content_type=content_type)
        )
    assert answer[b":status"] == b"200", answer
    assert answer[b"grpc-status"] == str(Status.OK.value).encode(), answer
    no_errors_logged()


@pytest.mark.parametrize("content_type", [b"application/grpcx", b"application/json", b"text/plain"])
async def test_a_content_type_that_is_not_grpc_is_refused(
    commands_api: CommandsApi, content_type: bytes
) -> None:
    async with RawConnection.open(commands_api.address) as connection:
        answer = await connection.answered(
            connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, content_type=content_type)
        )
    assert answer[b":status"] == b"415", answer


async def test_a_connection_flooding_pings_is_sent_away_and_others_are_served(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: one connection sending PINGs as fast as it could kept the process busy:
    other callers' calls timed out, and it grew by the acks the flooder never read."""
    async with RawConnection.open(commands_api.address) as flooder:
        # Batches of pings, each sent once the one before is answered: nothing of the
        # flooder's is left unread when the service closes the connection.
        for batch in range(20):
            for n in range(CONTROL_FRAMES_BURST // 2):
                flooder.h2.ping((batch * 1000 + n).to_bytes(8, "big"))
            flooder.flush()
            acked = (batch + 1) * (CONTROL_FRAMES_BURST // 2)
            await flooder.until(
                lambda acked=acked: flooder.goaway() is not None or flooder.acks() >= acked
            )
            if flooder.goaway() is not None:
                break
        goaway = flooder.goaway()
        assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert goaway.additional_data == b"too_many_pings"
        await flooder.until(lambda: False)  # and the connection is closed
        assert flooder.closed
    assert await serving(commands_api.address)
    no_errors_logged()


async def test_a_call_with_too_much_metadata_is_refused_alone(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: a call whose metadata went beyond the size the server advertises (which
    clients send anyway) closed its connection, every other call on it cancelled, with
    no line and no count."""
    async with RawConnection.open(commands_api.address) as connection:
        watch = connection.call(b"/grpc.health.v1.Health/Watch", EMPTY_MESSAGE)
        await connection.until(
            lambda: any(getattr(event, "stream_id", 0) == watch for event in connection.events)
        )
        for metadata in (
            [(b"x-big", b"v" * 70_000)],
            [(b"x-%d" % n, b"v" * 200) for n in range(300)],
        ):
            big = connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, metadata=metadata)
            answer = await connection.answered(big)
            assert answer.get(b"grpc-status") == b"8", answer  # RESOURCE_EXHAUSTED
            assert b"request metadata" in answer.get(b"grpc-message", b""), answer
        assert connection.goaway() is None and connection.answer(watch) is None
        answer = await connection.answered(connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE))
        assert answer.get(b"grpc-status") == b"0", answer
    no_errors_logged()


async def test_a_call_with_metadata_beyond_what_is_read_closes_its_connection_said_and_counted(
    commands_api: CommandsApi,
) -> None:
    before = closed_for(commands_api, "headers_too_large")
    async with RawConnection.open(commands_api.address) as connection:
        connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, metadata=[(b"x-big", b"v" * 300_000)])
        await connection.sent_away(ErrorCodes.ENHANCE_YOUR_CALM)
    assert closed_for(commands_api, "headers_too_large") == before + 1
    assert "gRPC connection closed: it broke HTTP/2" in commands_api.service.log_tail()


def raw_frame(kind: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """An HTTP/2 frame as bytes, whatever h2 would let a client send."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


FLOODS: dict[str, Callable[[int, int], bytes]] = {
    # PRIORITY on streams never opened (an idle stream may be given one)
    "priority": lambda n, _: raw_frame(0x2, 1001 + 2 * n, b"\x00\x00\x00\x00\x10"),
    "small window updates": lambda n, _: raw_frame(
        0x8, 0, (SMALL_WINDOW_UPDATE - 1).to_bytes(4, "big")
    ),
    "empty data": lambda n, stream_id: raw_frame(0x0, stream_id),
    # a byte each, ending streams long closed (h2 answers each with a reset)
    "bytes of data": lambda n, stream_id: raw_frame(0x0, stream_id, b"x", flags=0x1),
    "frames of no type": lambda n, _: raw_frame(0xFA, 0),
}


@pytest.mark.parametrize("flood", list(FLOODS))
async def test_a_connection_flooding_frames_that_make_no_call_is_sent_away(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None], flood: str
) -> None:
    """Regression: PING and SETTINGS counted, these did not: 220,000 to 290,000 a second
    on one connection held every other caller's calls up for 3 to 5 s; then DATA frames
    of a byte, or ending streams long closed, still did not (6 connections held others
    up 3.7 s)."""
    async with RawConnection.open(commands_api.address) as flooder:
        open_call = flooder.call(HEALTH_CHECK.encode(), b"", end=False)
        frames = b"".join(FLOODS[flood](n, open_call) for n in range(3 * CONTROL_FRAMES_BURST))
        flooder._writer.write(frames)
        assert await flooder.sent_away() == b"too_many_pings"
    assert await serving(commands_api.address)
    no_errors_logged()


async def test_a_frame_longer_than_the_server_takes_is_refused_as_its_header_arrives(
    commands_api: CommandsApi,
) -> None:
    """Regression (a probe): the header of a 16 MiB frame was taken, and the connection
    held until all of its payload had arrived, up to 16 MiB buffered for each
    connection, before h2 refused it."""
    closed = closed_for(commands_api, "frame_too_large")
    async with RawConnection.open(commands_api.address) as client:
        await client.until(client.settings_acked)
        # The header of a DATA frame of 16 MiB - 1, and none of its payload.
        client.send_raw(((1 << 24) - 1).to_bytes(3, "big") + bytes(2) + (1).to_bytes(4, "big"))
        goaway = await client.sent_away(ErrorCodes.FRAME_SIZE_ERROR)
    assert goaway == b"frame_too_large"
    assert closed_for(commands_api, "frame_too_large") == closed + 1
    assert await serving(commands_api.address)


async def test_a_connection_resetting_its_calls_fast_is_sent_away_and_others_are_served(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression (HTTP/2 "rapid reset", CVE-2023-44487): one connection opening and
    resetting 14,000 calls a second froze the process for minutes (every call of every
    caller timed out, the broker and the database were taken for gone) and grew it by
    2 GB."""
    before = closed_for(commands_api, "too_many_resets")
    async with RawConnection.open(commands_api.address) as attacker:
        for _ in range(RESETS_BURST + 200):
            stream_id = attacker.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, end=False)
            attacker.cancel(stream_id)
        assert await attacker.sent_away() == b"too_many_resets"
    assert closed_for(commands_api, "too_many_resets") == before + 1
    assert await serving(commands_api.address)
    no_errors_logged()


async def test_a_client_cancelling_some_of_its_calls_is_served(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    async with RawConnection.open(commands_api.address) as connection:
        for _ in range(RESETS_BURST // 2):
            connection.cancel(connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE, end=False))
        answer = await connection.answered(connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE))
        assert answer[b"grpc-status"] == b"0", answer
        assert connection.goaway() is None
    no_errors_logged()


async def test_a_client_pinging_as_keepalive_does_is_served(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    async with RawConnection.open(commands_api.address) as connection:
        for round_ in range(5):
            for n in range(CONTROL_FRAMES_BURST // 10):
                connection.h2.ping((round_ * 100 + n).to_bytes(8, "big"))
            answer = await connection.answered(
                connection.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE)
            )
            assert answer[b"grpc-status"] == b"0", answer
        assert connection.goaway() is None
    no_errors_logged()


async def closed_by_the_server(first: bytes, address: tuple[str, int]) -> None:
    """Connect, send `first`, then nothing: returns once the server has closed."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(first)
        async with asyncio.timeout(PREFACE_TIMEOUT + WITHIN):
            while await reader.read(65536):  # the server's SETTINGS, then its end
                pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_nothing_that_stalls_is_held(commands_api: CommandsApi) -> None:
    """Regression: a connection that sent nothing was held open for good, one file
    descriptor and memory each; then one that sent a single byte, or the preface
    without its SETTINGS, was (20,000 such reached the descriptor limit: no call was
    taken any more); and a call whose request never ended held its stream, and up to
    4 MiB of it, for good (200 such held 858 MB)."""

    async def unfinished_call() -> dict[bytes, bytes]:
        async with RawConnection.open(commands_api.address) as connection:
            # A request that announces more than it sends, and never ends.
            stream_id = connection.call(
                HEALTH_CHECK.encode(), framed(b"\x0a" * 100)[:50], end=False
            )
            return await connection.answered(stream_id, within=REQUEST_TIMEOUT + WITHIN)

    async with asyncio.timeout(max(PREFACE_TIMEOUT, REQUEST_TIMEOUT) + 2 * WITHIN):
        *_, answer = await asyncio.gather(
            closed_by_the_server(b"", commands_api.address),
            closed_by_the_server(b"P", commands_api.address),
            closed_by_the_server(H2_PREFACE, commands_api.address),
            unfinished_call(),
        )
    assert answer[b"grpc-status"] == str(Status.DEADLINE_EXCEEDED.value).encode(), answer
    assert b"not sent whole" in answer[b"grpc-message"], answer
    assert await serving(commands_api.address)


async def test_a_server_holding_all_the_connections_it_may_closes_the_one_idle_longest(
    few_connections: CommandsApi,
) -> None:
    """Regression: connections that sent their SETTINGS and then nothing were held until
    the process reached its descriptor limit; then no call, no database session and no
    broker connection could be opened any more."""
    limit = connection_limit(soft=FEW_DESCRIPTORS)  # its process opens no database pool
    logged = few_connections.service.log_size()
    made_room = closed_for(few_connections, "made_room")
    async with contextlib.AsyncExitStack() as stack:
        # A call open for good (a health watch): never closed to make room.
        busy = await stack.enter_async_context(RawConnection.open(few_connections.address))
        watch = busy.call(b"/grpc.health.v1.Health/Watch", EMPTY_MESSAGE)
        await busy.until(lambda: any(getattr(e, "stream_id", 0) == watch for e in busy.events))
        idle: list[RawConnection] = []
        for number in range(limit):  # one more than there is room for beside the busy one
            # From three hosts, none of which holds its share (half the limit).
            connection = await stack.enter_async_context(
                RawConnection.open(few_connections.address, from_host=f"127.0.0.{2 + number % 3}")
            )
            await connection.until(lambda c=connection: c.settings_acked())
            idle.append(connection)
        oldest, next_oldest = idle[0], idle[1]
        assert await oldest.sent_away(ErrorCodes.NO_ERROR) == b""
        assert await serving(few_connections.address)  # a new caller, served
        assert await next_oldest.sent_away(ErrorCodes.NO_ERROR) == b""
        assert busy.goaway() is None and busy.reset(watch) is None
        assert all(connection.goaway() is None for connection in idle[2:])
    assert closed_for(few_connections, "made_room") == made_room + 2
    written = few_connections.service.log_tail(since=logged)
    assert written.count("gRPC connections at their limit") == 1, written
    assert f'"limit": {limit}' in written, written

    async def room_again() -> bool:
        return "gRPC connections below their limit again" in few_connections.service.log_tail(
            since=logged
        )

    await wait_until(room_again, what="room again, said once")


async def test_connections_coming_faster_than_they_are_closed_leave_descriptors_to_spare(
    few_connections: CommandsApi,
) -> None:
    """Regression: a connection closed to make room was read a second more before it was
    closed, and counted no more meanwhile: 300 silent connections a second took the
    process's last descriptors (`accept` failed 270 times in 4 s)."""
    logged = few_connections.service.log_size()
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(4 * FEW_DESCRIPTORS):
            _, writer = await asyncio.open_connection(*few_connections.address)
            stack.callback(writer.close)
            writer.write(H2_PREFACE + raw_frame(0x4, 0))  # its SETTINGS, then nothing
        assert await serving(few_connections.address)
    written = few_connections.service.log_tail(since=logged)
    assert "out of system resource" not in written and "Too many open files" not in written
    assert few_connections.service.running


async def test_the_calls_of_a_connection_sent_away_end_with_it_and_log_no_error(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: a connection sent away was read a second more before it was closed,
    and its calls ran on meanwhile: each that answered logged two errors with
    tracebacks (the protocol refused to send on a connection it had ended)."""

    def watches_cancelled() -> float:
        samples = scrape(commands_api.metrics_address)
        return value(
            samples, "grpc_server_handled_total", grpc_method="Watch", grpc_code="CANCELLED"
        )

    before = watches_cancelled()
    async with RawConnection.open(commands_api.address) as connection:
        watches = [
            connection.call(b"/grpc.health.v1.Health/Watch", EMPTY_MESSAGE) for _ in range(3)
        ]
        await connection.until(
            lambda: all(
                any(getattr(event, "stream_id", 0) == watch for event in connection.events)
                for watch in watches
            )
        )
        connection._writer.write(raw_frame(0x2, 1001, b"\x00\x00\x00\x00\x10") * 300)
        assert await connection.sent_away() == b"too_many_pings"

        async def ended() -> bool:
            return watches_cancelled() == before + len(watches)

        await wait_until(ended, timeout=LINGER / 2, what="its calls ended with it")
    no_errors_logged()


def closed_for(api: CommandsApi, reason: str) -> float:
    """The connections the service has closed at the edge for `reason`."""
    return value(
        scrape(api.metrics_address), "financing_grpc_connections_closed_total", reason=reason
    )


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def test_a_call_its_caller_cancels_is_counted_cancelled_not_unknown(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: grpclib counts a call whose stream the caller reset as UNKNOWN, an
    error of the service's, which set off error-rate alerts for every cancelled call."""

    def handled(method: str, code: str) -> float:
        samples = scrape(commands_api.metrics_address)
        return value(samples, "grpc_server_handled_total", grpc_method=method, grpc_code=code)

    before = {
        (method, code): handled(method, code)
        for method in ("Watch", "SellInvoice")
        for code in ("CANCELLED", "UNKNOWN")
    }
    async with RawConnection.open(commands_api.address) as connection:
        # A SellInvoice waits for the rest of its request; a Watch answers once, then
        # stays open. The server takes a connection's calls in order: once the Watch has
        # answered, the SellInvoice is running too.
        sale = connection.call(b"/Commands/SellInvoice", b"\x00\x00", end=False)
        watch = connection.call(b"/grpc.health.v1.Health/Watch", EMPTY_MESSAGE)
        await connection.until(
            lambda: any(
                isinstance(event, h2.events.DataReceived) and event.stream_id == watch
                for event in connection.events
            )
        )
        connection.cancel(watch)
        connection.cancel(sale)

        async def counted() -> bool:
            return all(
                handled(method, "CANCELLED") == before[method, "CANCELLED"] + 1
                for method in ("Watch", "SellInvoice")
            )

        await wait_until(counted, what="both calls counted CANCELLED")
    for method in ("Watch", "SellInvoice"):
        assert handled(method, "UNKNOWN") == before[method, "UNKNOWN"]
    no_errors_logged()


async def test_a_call_whose_caller_closes_its_connection_is_counted_cancelled(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression: grpclib sends no trailers on a closed connection, so a call whose
    caller went away with its connection was never counted as handled, and
    `grpc_server_started_total` (then missing) could not show it either."""

    def counted(name: str, **labels: str) -> float:
        samples = scrape(commands_api.metrics_address)
        return value(samples, name, grpc_method="SellInvoice", **labels)

    started = counted("grpc_server_started_total", grpc_type="unary")
    cancelled = counted("grpc_server_handled_total", grpc_code="CANCELLED")
    handled = counted("grpc_server_handled_total")
    async with RawConnection.open(commands_api.address) as connection:
        # A SellInvoice that waits for the rest of its request until its connection ends.
        connection.call(b"/Commands/SellInvoice", b"\x00\x00", end=False)

        async def running() -> bool:
            return counted("grpc_server_started_total", grpc_type="unary") == started + 1

        await wait_until(running, what="the call started")

    async def ended() -> bool:
        return counted("grpc_server_handled_total") == handled + 1

    await wait_until(ended, what="the call counted as handled")
    assert counted("grpc_server_handled_total", grpc_code="CANCELLED") == cancelled + 1
    no_errors_logged()


async def test_one_hosts_connections_with_calls_open_leave_room_for_another_host(
    few_connections: CommandsApi,
) -> None:
    """Regression (a probe): one host held every connection with a health `Watch` open
    on each, and every other client's new connection was refused, an orchestrator's
    health probe among them, for as long as it stayed."""
    limit = connection_limit(soft=FEW_DESCRIPTORS)
    logged = few_connections.service.log_size()
    refused = closed_for(few_connections, "refused")
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(limit):  # twice its share
            connection = await stack.enter_async_context(
                RawConnection.open(few_connections.address, from_host="127.0.0.2")
            )
            watch = connection.call(b"/grpc.health.v1.Health/Watch", EMPTY_MESSAGE)
            await connection.until(
                lambda c=connection, w=watch: (
                    c.closed or any(getattr(e, "stream_id", 0) == w for e in c.events)
                )
            )
        assert await serving(few_connections.address)  # 127.0.0.1: another host
    assert closed_for(few_connections, "refused") >= refused + limit - limit // 2
    written = few_connections.service.log_tail(since=logged)
    assert "gRPC connections of one host at its share" in written, written
    assert '"host": "127.0.0.2"' in written, written


async def test_a_tls_client_on_the_plaintext_port_is_closed_and_said_to_be_one(
    commands_api: CommandsApi, no_errors_logged: Callable[[], None]
) -> None:
    """Regression (a probe): a client set up for TLS on a plaintext port was said to have
    announced a frame longer than the server takes, and counted `frame_too_large`."""
    logged = commands_api.service.log_size()
    before = (
        closed_for(commands_api, "tls_on_plaintext"),
        closed_for(commands_api, "frame_too_large"),
    )
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with asyncio.timeout(WITHIN):
            _, writer = await asyncio.open_connection(*commands_api.address, ssl=client)
            writer.close()
    assert (
        closed_for(commands_api, "tls_on_plaintext"),
        closed_for(commands_api, "frame_too_large"),
    ) == (before[0] + 1, before[1])
    written = commands_api.service.log_tail(since=logged)
    assert "it began a TLS handshake on a port that serves plaintext" in written, written
    assert "SETTINGS_MAX_FRAME_SIZE" not in written, written
    assert await serving(commands_api.address)
    no_errors_logged()
