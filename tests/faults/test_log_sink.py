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
    logging at DEBUG."""
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


def filled(writer: int) -> None:
    """Fill the pipe of `writer` to its last byte, as a log reader that stopped reading
    leaves it (written through a description of its own: `writer` is left blocking)."""
    own = os.open(f"/proc/self/fd/{writer}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for chunk in (b"\n" * 4096, b"\n"):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(own, chunk)
    finally:
        os.close(own)


def drained(reader: int) -> bytes:
    received = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(reader, 1 << 16):
            received += chunk
    return received


async def test_a_log_reader_that_stopped_reading_stops_nothing(listener: Listener) -> None:
    """Regression (a probe): with its log a pipe (a container runtime's, a shell's `|`)
    whose reader had stopped reading, the first line that did not fit blocked the whole
    process: every call, `/health`, relaying and projecting, until the reader read
    again; and a SIGTERM then waited for the reader too."""
    reader, writer = os.pipe()  # blocking, as a runtime hands it over
    try:
        async with serving(listener, writer) as process:
            await infra.wait_until(
                lambda: sells(listener), timeout=WITHIN, what="an OK SellInvoice"
            )
            filled(writer)  # the reader stops
            for _ in range(3):
                process.send_signal(signal.SIGUSR1)  # a line of every task, each dropped
                assert await sells(listener)
            os.set_blocking(reader, False)
            drained(reader)  # the reader reads again

            async def said() -> bool:
                process.send_signal(signal.SIGUSR1)
                return b'"log lines dropped"' in drained(reader)

            await infra.wait_until(said, timeout=WITHIN, what="the dropped lines said")
            filled(writer)  # stopped again, for good: "shutting down" is dropped
            assert await stopped(process) == 0
    finally:
        os.close(reader)
        os.close(writer)
