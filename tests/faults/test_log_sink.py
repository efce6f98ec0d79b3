"""A log that cannot be written (a full disk, a log reader gone) stops nothing: the
service serves, stops on SIGTERM and exits 0, its lines dropped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from grpclib.client import Channel

from financing.generated import CommandsStub, Money, SellInvoiceCommand, Uuid
from tests.support import infra
from tests.support.service import READY_EVENT, financing_command, free_port, reap

WITHIN = 30.0


@dataclass(frozen=True)
class Listener:
    env: dict[str, str]
    port: int


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    """`financing serve --components commands-api`'s environment, on a vhost of its own,
    logging at DEBUG so that every call writes lines."""
    name = infra.unique_name("fin_fault_log")
    port = free_port()
    env = {
        **os.environ,
        "AMQP_ADDRESS": infra.create_vhost(name),
        "COMMAND_SERVER_ADDRESS": f"127.0.0.1:{port}",
        "QUERY_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
        "METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "LOGGER_LEVEL": "DEBUG",
    }
    try:
        yield Listener(env, port)
    finally:
        infra.delete_vhost(name)


@contextlib.asynccontextmanager
async def serving(listener: Listener, stderr: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """The listener's process, its log written to `stderr`; killed at the end if the test
    left it running."""
    process = await asyncio.create_subprocess_exec(
        *financing_command(),
        "serve",
        "--components",
        "commands-api",
        env=listener.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        yield process
    finally:
        await reap(process)


async def sells(listener: Listener) -> bool:
    """Whether a SellInvoice call is answered OK now."""
    channel = Channel("127.0.0.1", listener.port)
    try:
        await CommandsStub(channel).sell_invoice(
            SellInvoiceCommand(
                issuer_id=Uuid(value=str(uuid.uuid4())), asking_price=Money(amount=10.0)
            ),
            timeout=5,
        )
    except (TimeoutError, OSError):  # not listening yet
        return False
    finally:
        channel.close()
    return True


async def stopped(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(WITHIN):
        return await process.wait()


async def test_a_log_on_a_full_disk_stops_nothing(listener: Listener) -> None:
    """Regression: the first line that could not be written raised out of the logger,
    and the service exited 1 while it started."""
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails: no space left on device
    try:
        async with serving(listener, full) as process:
            await infra.wait_until(
                lambda: sells(listener), timeout=WITHIN, what="an OK SellInvoice"
            )
            assert process.returncode is None
            assert await stopped(process) == 0
    finally:
        os.close(full)


async def test_a_log_reader_gone_stops_nothing(listener: Listener) -> None:
    """Regression: once the reader of its log had gone, the service went on serving, but a
    SIGTERM made it exit 1, where it exits 0."""
    async with serving(listener, asyncio.subprocess.PIPE) as process:
        assert process.stderr is not None

        async with asyncio.timeout(WITHIN):
            while READY_EVENT.encode() not in (line := await process.stderr.readline()):
                assert line, "the service ended its log before it was ready"
        transport = process._transport  # type: ignore[attr-defined]
        transport.get_pipe_transport(2).close()  # the reader goes: writes fail with EPIPE
        assert await sells(listener)
        assert await sells(listener)
        assert process.returncode is None
        assert await stopped(process) == 0
