"""What an operator's command prints reaches its reader whole, a signal or none."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import signal
import sys
from pathlib import Path

import pytest

from financing.entrypoints.cli import commands
from financing.entrypoints.cli.console import OutputFailed, write_lines
from tests.support.infra import wait_until
from tests.support.service import ROOT

REPORT = ["é" * 300_000, *(f"line {n}" for n in range(20_000))]

WRITER = """
import signal, sys
from financing.entrypoints.cli.console import write_lines
# As the event loop's handler does: the signal is noted, and the write goes on.
signal.signal(signal.SIGINT, lambda *_: None)
write_lines(["é" * 300_000, *(f"line {n}" for n in range(20_000))])
"""


@pytest.mark.skipif(
    not Path("/proc/self/wchan").exists(),
    reason="tells a process blocked writing to a full pipe by Linux's /proc/PID/wchan",
)
async def test_a_report_interrupted_by_a_signal_while_its_reader_lags_arrives_whole() -> None:
    """Regression (a probe): `events` printed its report in one write; a signal while the
    pipe was full (a reader paging, `timeout 5 financing events X > file`) lost all but
    the first 64 KB of it, its last line cut, and the command exited 0."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    wchan = Path(f"/proc/{child.pid}/wchan")

    async def blocked_writing() -> bool:
        return "pipe_write" in await asyncio.to_thread(wchan.read_text)

    try:
        await wait_until(blocked_writing, timeout=30, what="the writer to fill the pipe")
        child.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            out, _ = await child.communicate()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0
    assert out.decode().split("\n") == [*REPORT, ""]


class FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_output_that_cannot_be_written_is_told_apart_from_a_reader_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): `financing events X > /dev/full` ended on an uncaught
    exception's traceback, logged as critical."""
    monkeypatch.setattr(sys, "stdout", FullDisk())
    with pytest.raises(OutputFailed) as failed:
        write_lines(["a line"])
    assert failed.value.error.errno == errno.ENOSPC


def test_the_command_line_says_output_it_could_not_write_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full_disk(argv: object, *, overrides: object) -> None:
        raise OutputFailed(OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(commands, "_run", full_disk)
    monkeypatch.setattr(commands, "_drop_output", lambda: None)  # the test's stdout stays
    with pytest.raises(SystemExit) as exited:
        commands.run(["events", "x"])

    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "financing: its output could not be written: [Errno 28] No space left on device\n"
    )
