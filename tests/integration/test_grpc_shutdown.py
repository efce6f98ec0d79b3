"""Shutting down a gRPC server: its clients are told at once to take new calls elsewhere,
and the calls it has taken are answered."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from h2.errors import ErrorCodes

from financing.generated import Money, SellInvoiceCommand, Uuid
from tests.support import rabbitmq
from tests.support.infra import wait_until
from tests.support.metrics import scrape, value
from tests.support.raw_h2 import RawConnection
from tests.support.service import ServiceProcess, free_port

SELL_INVOICE = b"/Commands/SellInvoice"


def sell_invoice() -> bytes:
    """A SellInvoice request in its gRPC frame."""
    message = bytes(SellInvoiceCommand(Uuid(str(uuid.uuid4())), Money(10.0)))
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def test_at_shutdown_clients_are_told_at_once_and_the_calls_in_flight_are_answered(
    tmp_path: Path,
) -> None:
    """Regression: the server told its connections that it took no new call (GOAWAY) only
    once its calls in flight were over, and answered every call sent meanwhile
    UNAVAILABLE, where a client told at once sends it to another instance: a third of a
    client's calls failed, for as long as the longest call in flight lasted."""
    async with rabbitmq.private_vhost("fin_goaway") as vhost:
        port, metrics = free_port(), free_port()
        env = {
            **os.environ,
            "COMMAND_SERVER_ADDRESS": f"127.0.0.1:{port}",
            "QUERY_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
            "METRICS_ADDRESS": f"127.0.0.1:{metrics}",
            "AMQP_ADDRESS": vhost.url,
        }
        service = ServiceProcess(
            env, tmp_path / "service.log", args=("serve", "--components", "commands-api")
        )
        await service.start()
        try:
            async with RawConnection.open(("127.0.0.1", port)) as connection:
                async with rabbitmq.publishes_refused(vhost.name, "SellInvoice"):
                    taken = connection.call(SELL_INVOICE, sell_invoice())

                    async def in_flight() -> bool:
                        started = scrape(f"127.0.0.1:{metrics}")
                        return (
                            value(started, "grpc_server_started_total", grpc_method="SellInvoice")
                            == 1
                        )

                    await wait_until(in_flight, what="the call taken")
                    stopping = asyncio.create_task(service.stop())
                    assert await connection.sent_away(ErrorCodes.NO_ERROR) == b""
                    goaway = connection.goaway()
                    assert goaway is not None and goaway.last_stream_id == taken
                    assert connection.answer(taken) is None  # told while the call runs on
                    # A call a client sent before it read the GOAWAY: refused, to be sent
                    # elsewhere.
                    late = connection.call(SELL_INVOICE, sell_invoice())
                    assert await connection.was_reset(late) == ErrorCodes.REFUSED_STREAM
                    with pytest.raises(ConnectionRefusedError):
                        await asyncio.open_connection("127.0.0.1", port)
                # The broker takes the command again: the call taken is answered.
                answer = await connection.answered(taken)
                assert answer.get(b"grpc-status") == b"0", answer
            assert await stopping == 0
        finally:
            await service.kill()
