"""An HTTP/2 connection driven frame by frame, as a foreign or hostile client drives it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import h2.events
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes

# How long a connection waits for what the server sends it.
WITHIN = 10.0
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# An empty HealthCheckRequest in its gRPC frame: not compressed, 0 bytes long.
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"


def _graceful(event: h2.events.Event) -> bool:
    return isinstance(event, h2.events.ConnectionTerminated) and event.error_code == 0


class RawConnection:
    """An HTTP/2 connection driven frame by frame, as a foreign or hostile client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.h2 = H2Connection(
            H2Configuration(
                client_side=True,
                header_encoding=None,  # header values as bytes, both ways
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.events: list[h2.events.Event] = []
        self.closed = False

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, address: tuple[str, int], *, from_host: str | None = None
    ) -> AsyncIterator[RawConnection]:
        """Connected to `address`, from the loopback address `from_host` (127.0.0.2, ...:
        another host as the server counts them) where given."""
        local = None if from_host is None else (from_host, 0)
        reader, writer = await asyncio.open_connection(*address, local_addr=local)
        connection = cls(reader, writer)
        connection.h2.initiate_connection()
        connection.flush()
        try:
            yield connection
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def flush(self) -> None:
        self._writer.write(self.h2.data_to_send())

    def call(
        self,
        path: bytes | None,
        body: bytes | Sequence[bytes],
        *,
        metadata: Sequence[tuple[bytes, bytes]] = (),
        end: bool = True,
        content_type: bytes = b"application/grpc",
        pseudo: Sequence[tuple[bytes, bytes]] | None = None,
    ) -> int:
        """Send a request (without `:path` when `path` is None; its body in one DATA frame,
        or one for each of its parts; its side left open unless `end`; `pseudo`: its
        pseudo-header fields as given, in place of those made of `path`); its stream id."""
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x")]
        if path is not None:
            headers.append((b":path", path))
        if pseudo is not None:
            headers = list(pseudo)
        headers += [(b"content-type", content_type), (b"te", b"trailers"), *metadata]
        self.h2.send_headers(stream_id, headers)
        parts = [body] if isinstance(body, bytes) else list(body)
        for at, part in enumerate(parts):
            self.h2.send_data(stream_id, part, end_stream=end and at == len(parts) - 1)
        self.flush()
        return stream_id

    def send_raw(self, frame: bytes) -> None:
        """Bytes written as they are, past h2 (a frame it would not write)."""
        self._writer.write(frame)

    def cancel(self, stream_id: int) -> None:
        """Reset `stream_id` as a client cancelling its call does."""
        self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self.flush()

    async def until(self, done: Callable[[], bool], within: float = WITHIN) -> None:
        """Take in what the server sends until `done()` or the server closes."""
        async with asyncio.timeout(within):
            while not done() and not self.closed:
                try:
                    data = await self._reader.read(65536)
                except (ConnectionResetError, BrokenPipeError):  # closed by the server
                    data = b""
                if not data:
                    self.closed = True
                    return
                received = self.h2.receive_data(data)
                self.events += received
                if any(_graceful(event) for event in received):
                    # The calls the server took go on after a GOAWAY NO_ERROR (RFC 9113
                    # section 6.8), whose frames h2 refuses once it has read one; and a
                    # call sent after it stands for one a client sent before reading it.
                    self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
                self.flush()  # acks of its settings and pings, window updates

    def answer(self, stream_id: int) -> dict[bytes, bytes] | None:
        """The headers and trailers the server ended `stream_id` with, once it has."""
        fields: dict[bytes, bytes] = {}
        ended = False
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                fields.update(event.headers)
            ended = ended or isinstance(event, h2.events.StreamEnded)
        return fields if ended else None

    def reset(self, stream_id: int) -> ErrorCodes | None:
        for event in self.events:
            if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                return ErrorCodes(event.error_code)
        return None

    def acks(self) -> int:
        return sum(isinstance(e, h2.events.PingAckReceived) for e in self.events)

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return found[0] if found else None

    async def sent_away(self, code: ErrorCodes = ErrorCodes.ENHANCE_YOUR_CALM) -> bytes:
        """The debug data of the GOAWAY (of `code`) the server sends it away with."""
        await self.until(lambda: self.goaway() is not None)
        goaway = self.goaway()
        assert goaway is not None and goaway.error_code == code, goaway
        return bytes(goaway.additional_data or b"")

    def settings_acked(self) -> bool:
        """Whether the server has acknowledged its SETTINGS: it has taken the connection."""
        return any(isinstance(e, h2.events.SettingsAcknowledged) for e in self.events)

    async def was_reset(self, stream_id: int) -> ErrorCodes:
        await self.until(lambda: self.reset(stream_id) is not None)
        reset = self.reset(stream_id)
        assert reset is not None, f"stream {stream_id} was not reset: {self.events[-5:]}"
        return reset

    async def answered(self, stream_id: int, within: float = WITHIN) -> dict[bytes, bytes]:
        await self.until(lambda: self.answer(stream_id) is not None, within)
        answer = self.answer(stream_id)
        assert answer is not None, f"stream {stream_id} was not answered: {self.events[-5:]}"
        return answer
