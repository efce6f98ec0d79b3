"""Where a saga's time goes, read off the wire: every PostgreSQL message and AMQP frame of a
few sagas, one at a time, on one clock (`docs/performance.md`, "A hop on the wire").

    python -m scripts.wire_timeline            # 3 sagas after 20 to warm up
    python -m scripts.wire_timeline --sagas 5

It starts a throwaway deployment as `make bench` does, captures loopback TCP with
tcpdump (Debian's `tcpdump` package; capturing needs root) from before the service
starts, so that every connection's start-up is seen, and prints, for each saga from
the `BidOnInvoice` publish on, one line per packet that carries PostgreSQL messages or
AMQP frames: milliseconds since the saga's start, the connection, and what went over
it. PostgreSQL connections are named by their `application_name` and database
(`financing@..._commands` is the service on the event store); a prepared statement is
shown by the start of its text. AMQP lines name the method, the channel and the
message name of publishes and deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import struct
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scripts import bench_saga
from scripts.sandbox import sandbox

PG_PORT, AMQP_PORT = 5432, 5672
SSL_REQUEST = 80877103
PROTOCOL_3 = 196608
# (class, method) of the AMQP methods worth naming.
METHODS = {
    (60, 40): "publish",
    (60, 60): "deliver",
    (60, 80): "ack",
    (60, 120): "nack",
    (60, 50): "return",
}
MESSAGE_NAME = re.compile(rb"[A-Z][A-Za-z]+(?:Event|Invoice|Issuer|Investor|Registered|Financing)")


@dataclass(frozen=True)
class Packet:
    at: float  # seconds since the epoch, as tcpdump stamped it
    source: int  # ports
    target: int
    payload: bytes


def packets(capture: Path) -> Iterator[Packet]:
    """The TCP packets with a payload of a pcap file of the loopback interface."""
    data = capture.read_bytes()
    link = struct.unpack("<I", data[20:24])[0]
    header = {1: 14, 113: 16}.get(link, 4)  # Ethernet, Linux cooked, BSD loopback
    offset = 24
    while offset + 16 <= len(data):
        seconds, micros, length, _ = struct.unpack("<IIII", data[offset : offset + 16])
        frame = data[offset + 16 : offset + 16 + length]
        offset += 16 + length
        ip = frame[header:]
        if not ip or ip[0] >> 4 != 4 or ip[9] != 6:  # IPv4, TCP
            continue
        tcp = ip[(ip[0] & 15) * 4 :]
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            source, target = struct.unpack(">HH", tcp[:4])
            yield Packet(seconds + micros / 1e6, source, target, payload)


@dataclass
class Decoder:
    """Splits each direction of each connection into protocol messages, across packets."""

    pending: dict[tuple[int, int], bytes] = field(default_factory=lambda: defaultdict(bytes))
    names: dict[int, str] = field(default_factory=dict)  # client port -> connection name
    statements: dict[tuple[int, bytes], str] = field(default_factory=dict)

    def line(self, packet: Packet) -> tuple[str, str] | None:
        """(connection, what the packet carried), or None for other traffic."""
        if PG_PORT in (packet.source, packet.target):
            client = packet.source if packet.target == PG_PORT else packet.target
            what = self._postgres(packet, client, to_server=packet.target == PG_PORT)
            return (self.names.get(client, f"pg:{client}"), what) if what else None
        if AMQP_PORT in (packet.source, packet.target):
            client = packet.source if packet.target == AMQP_PORT else packet.target
            what = self._amqp(packet)
            return (f"amqp:{client}", what) if what else None
        return None

    def _postgres(self, packet: Packet, client: int, *, to_server: bool) -> str:
        key = (packet.source, packet.target)
        data = self.pending[key] + packet.payload
        parts: list[str] = []
        at = 0
        if not to_server and data[:1] in (b"N", b"S") and len(data) == 1:
            self.pending[key] = b""
            return ""  # the answer to an SSL request
        while at + 5 <= len(data):
            if to_server and client not in self.names:
                size, code = struct.unpack(">II", data[at : at + 8])
                if code == SSL_REQUEST:
                    at += size
                    continue
                if code == PROTOCOL_3:  # the start-up message: name the connection
                    fields = data[at + 8 : at + size].split(b"\0")
                    params = dict(zip(fields[::2], fields[1::2], strict=False))
                    app = params.get(b"application_name", b"").decode() or "client"
                    self.names[client] = f"{app}@{params.get(b'database', b'?').decode()}:{client}"
                    at += size
                    continue
            kind = data[at : at + 1].decode("latin-1")
            size = struct.unpack(">I", data[at + 1 : at + 5])[0]
            if at + 1 + size > len(data):
                break
            parts.append(self._message(client, kind, data[at + 5 : at + 1 + size], to_server))
            at += 1 + size
        self.pending[key] = data[at:]
        return " ".join(part for part in parts if part)

    def _message(self, client: int, kind: str, body: bytes, to_server: bool) -> str:
        if to_server:
            if kind == "P":
                name, rest = body.split(b"\0", 1)
                self.statements[(client, name)] = rest.split(b"\0", 1)[0].decode("utf-8", "replace")
                return ""
            if kind == "B":
                name = body.split(b"\0", 2)[1]
                text = self.statements.get((client, name), name.decode("latin-1"))
                return f"-> {' '.join(text.split())[:90]!r}"
            if kind == "Q":
                return f"-> {body[:-1].decode('utf-8', 'replace')[:90]!r}"
            return ""
        if kind == "C":
            return f"<- {body[:-1].decode()}"
        if kind == "s":  # what asyncpg's fetchval and fetchrow end with
            return "<- done"
        if kind == "A":
            return "<- NOTIFY " + body[4:].split(b"\0", 1)[0].decode()
        if kind == "E":
            return "<- ERROR"
        return ""

    def _amqp(self, packet: Packet) -> str:
        key = (packet.source, packet.target)
        data = self.pending[key] + packet.payload
        if data.startswith(b"AMQP"):
            data = data[8:]
        parts: list[str] = []
        at = 0
        while at + 7 <= len(data):
            kind, channel, size = struct.unpack(">BHI", data[at : at + 7])
            if at + 8 + size > len(data):
                break
            payload = data[at + 7 : at + 7 + size]
            if kind == 1:
                method = METHODS.get(struct.unpack(">HH", payload[:4]))
                if method:
                    parts.append(f"{method} ch{channel}")
            elif kind == 2 and parts:
                found = MESSAGE_NAME.search(payload)
                parts[-1] += f" {found.group().decode()}" if found else ""
            at += 8 + size
        self.pending[key] = data[at:]
        direction = "->" if packet.target == AMQP_PORT else "<-"
        return f"{direction} {', '.join(parts)}" if parts else ""


@contextlib.contextmanager
def capturing(into: Path) -> Iterator[None]:
    tcpdump = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-w", str(into), "-s", "0", "-B", "65536", "-U", "tcp"],
        stderr=subprocess.PIPE,
    )
    try:
        assert tcpdump.stderr is not None
        tcpdump.stderr.readline()  # "listening on lo ...": capturing from now on
        yield
    finally:
        tcpdump.send_signal(signal.SIGINT)
        tcpdump.wait(10)


@contextlib.asynccontextmanager
async def deployment() -> AsyncIterator[bench_saga.Deployment]:
    async with (
        sandbox("financing_wire") as box,
        bench_saga.driving(box, issuers=4, investors=100, poll_interval=0.002) as driven,
    ):
        await bench_saga.register_all(driven)
        yield driven


async def sagas(warm: int, count: int) -> list[tuple[float, float, dict[str, float]]]:
    """(start, end, the bench's figures) of `count` sagas, each alone, after `warm` more."""
    spans = []
    async with deployment() as driven:
        bus = bench_saga.BusWatch()
        async with bus.bound(driven.amqp):
            for index in range(warm + count):
                started = time.time()
                figures = await bench_saga.one_saga(driven, bus, index)
                if index >= warm:
                    spans.append((started, time.time(), figures))
                await asyncio.sleep(0.05)  # the service quiet again before the next
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=3, help="sagas to show (3)")
    parser.add_argument("--warm", type=int, default=20, help="sagas run first, not shown (20)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        capture = Path(folder) / "wire.pcap"
        with capturing(capture):
            spans = asyncio.run(sagas(options.warm, options.sagas))
        decoder = Decoder()
        lines = [(p.at, decoder.line(p)) for p in packets(capture)]
    for started, ended, figures in spans:
        print("\n== saga: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in figures.items()))
        bid = next(
            (at for at, line in lines if started <= at and line and "BidOnInvoice" in line[1]),
            started,
        )
        for at, line in lines:
            if line and bid <= at <= ended:
                print(f"{(at - bid) * 1000:8.3f}  {line[0]:<36} {line[1]}")


if __name__ == "__main__":
    main()
