"""How scripts/wire_timeline.py reads PostgreSQL messages and AMQP frames off a capture."""

from __future__ import annotations

import struct
from pathlib import Path

from scripts.wire_timeline import (
    AMQP_PORT,
    PG_PORT,
    PROTOCOL_3,
    SSL_REQUEST,
    Decoder,
    Packet,
    packets,
)

CLIENT = 40000


def pg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack(">I", len(body) + 4) + body


def startup(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack(">II", len(body) + 8, PROTOCOL_3) + body


def amqp(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def to_server(payload: bytes, at: float = 0.0) -> Packet:
    return Packet(at, CLIENT, PG_PORT, payload)


def to_client(payload: bytes, at: float = 0.0) -> Packet:
    return Packet(at, PG_PORT, CLIENT, payload)


def test_postgres_connections_are_named_and_statements_shown_by_their_text() -> None:
    decoder = Decoder()
    ssl = struct.pack(">II", 8, SSL_REQUEST)
    assert decoder.line(to_server(ssl)) is None
    assert decoder.line(to_client(b"N")) is None
    hello = startup(user="postgres", database="shop_commands", application_name="financing")
    assert decoder.line(to_server(hello)) is None

    parse = pg(b"P", b"stmt_1\0SELECT  version\n FROM events\0\0\0")
    bind = pg(b"B", b"\0stmt_1\0" + b"\0" * 6)
    execute, sync = pg(b"E", b"\0\0\0\0\0"), pg(b"S", b"")
    message = parse + bind + execute + sync
    # A message split across packets is shown once it is whole.
    assert decoder.line(to_server(message[:7])) is None
    line = decoder.line(to_server(message[7:]))
    assert line == ("financing@shop_commands:40000", "-> 'SELECT version FROM events'")

    done = pg(b"C", b"SELECT 1\0") + pg(b"Z", b"I")
    assert decoder.line(to_client(done)) == ("financing@shop_commands:40000", "<- SELECT 1")
    notify = pg(b"A", struct.pack(">I", 7) + b"financing_events\0\0")
    assert decoder.line(to_client(notify))[1] == "<- NOTIFY financing_events"  # type: ignore[index]


def test_amqp_frames_are_named_with_the_message_they_carry() -> None:
    decoder = Decoder()
    publish = amqp(1, 15, struct.pack(">HH", 60, 40) + b"\0\0\6events\0\1")
    name = b"BidOnInvoicePlacedEvent"
    table = b"\x04nameS" + struct.pack(">I", len(name)) + name  # the `name` header
    properties = struct.pack(">H", 0x2000) + struct.pack(">I", len(table)) + table
    header = amqp(2, 15, struct.pack(">HHQ", 60, 0, 3) + properties)
    body = amqp(3, 15, b"{}\n")
    line = decoder.line(Packet(0.0, CLIENT, AMQP_PORT, b"AMQP\0\0\x09\x01" + publish + header))
    assert line == ("amqp:40000", "-> publish ch15 BidOnInvoicePlacedEvent")
    assert decoder.line(Packet(0.0, CLIENT, AMQP_PORT, body)) is None
    ack = amqp(1, 4, struct.pack(">HHQ?", 60, 80, 9, False))
    assert decoder.line(Packet(0.0, CLIENT, AMQP_PORT, ack)) == ("amqp:40000", "-> ack ch4")


def test_packets_are_read_from_a_loopback_capture(tmp_path: Path) -> None:
    def frame(source: int, target: int, payload: bytes) -> bytes:
        tcp = struct.pack(">HHIIBBHHH", source, target, 0, 0, 5 << 4, 0, 0, 0, 0)
        ip = struct.pack(
            ">BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp) + len(payload),
            0,
            0,
            64,
            6,
            0,
            b"\x7f\0\0\1",
            b"\x7f\0\0\1",
        )
        return b"\0" * 12 + b"\x08\x00" + ip + tcp + payload  # Ethernet

    records = [(1.5, frame(CLIENT, PG_PORT, b"abc")), (2.25, frame(PG_PORT, CLIENT, b""))]
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for at, captured in records:
        seconds, micros = int(at), round((at % 1) * 1e6)
        data += struct.pack("<IIII", seconds, micros, len(captured), len(captured)) + captured
    capture = tmp_path / "wire.pcap"
    capture.write_bytes(data)

    # The second packet carries nothing (an ack of TCP's own) and is left out.
    assert list(packets(capture)) == [Packet(1.5, CLIENT, PG_PORT, b"abc")]
