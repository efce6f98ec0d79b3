"""`financing serve` as a child process: started, awaited until ready, stopped by signal."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from financing.config import parse_address
from tests.support import infra

READY_EVENT = "service ready"
START_TIMEOUT = float(os.environ.get("FINANCING_ACCEPTANCE_START_TIMEOUT", "40"))
STOP_TIMEOUT = 10.0


# The machine's servers' own ports (PostgreSQL; the broker's AMQP, management and
# distribution ports; epmd): the fault suite stops those servers, and a port handed out
# while one is down would keep it from starting again.
SERVER_PORTS = frozenset({4369, 5432, 5672, 15672, 25672})
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ports_outside_the_ephemeral_range() -> list[int]:
    """Up to 10,000 ports the kernel never picks for an outgoing connection."""
    try:
        low, high = map(int, EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    below, above = range(max(1024, low - 10_000), low), range(high + 1, 65536)
    return [port for port in max(below, above, key=len) if port not in SERVER_PORTS]


_CANDIDATES = _ports_outside_the_ephemeral_range()
_next_candidate = itertools.count(random.randrange(len(_CANDIDATES)))


def free_port() -> int:
    """A local port that nothing listens on, for a listener the suite starts later.

    It comes from outside the kernel's ephemeral range: a port that `bind(0)` hands out
    comes from inside it, and once released, any process's next outgoing connection (to
    PostgreSQL, to the broker) may take it before the listener binds it. Outside the range
    only another listener can take a port, and the probe skips those that one holds. This
    process hands the ports out in turn, so it repeats one only after all the others.
    """
    for _ in range(len(_CANDIDATES)):
        port = _CANDIDATES[next(_next_candidate) % len(_CANDIDATES)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError(f"no free local port from {_CANDIDATES[0]} to {_CANDIDATES[-1]}")


ROOT = Path(__file__).resolve().parents[2]


def financing_command() -> list[str]:
    """The venv's `financing` console script when installed, else the module."""
    script = Path(sys.executable).with_name("financing")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "financing"]


def storm_command(times: int) -> list[str]:
    """`financing` with every delivery handled `times` times (tests.support.storm)."""
    return [sys.executable, "-m", "tests.support.storm", str(times)]


@dataclass(frozen=True)
class CommandLine:
    """One finished run of the `financing` command line."""

    args: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"financing {' '.join(self.args)} exited with {self.exit_code}\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


async def reap(process: asyncio.subprocess.Process) -> None:
    """Kill `process` and wait for it, if it still runs (a test that failed part way)."""
    if process.returncode is None:
        process.kill()
        await process.wait()


async def run_cli(env: Mapping[str, str], *args: str, within: float = 60.0) -> CommandLine:
    """`financing ARGS` as an operator runs it beside a deployment, with its environment."""
    process = await asyncio.create_subprocess_exec(
        *financing_command(),
        *args,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(
            f"financing {' '.join(args)} did not finish within {within}s"
        ) from None
    assert process.returncode is not None
    return CommandLine(
        args,
        process.returncode,
        stdout.decode("utf-8", "replace"),
        stderr.decode("utf-8", "replace"),
    )


class ServiceProcess:
    """One `financing serve` child process; every start appends to the same log file."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        args: Sequence[str] = ("serve",),
        command: Sequence[str] | None = None,
    ) -> None:
        self.env = dict(env)
        self.args = tuple(args)
        self.command = tuple(command or financing_command())
        self.log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._log_offset = 0
        self._stopped_by_suite = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int:
        assert self._process is not None, "the service was never started"
        return self._process.pid

    @property
    def metrics_address(self) -> tuple[str, int]:
        return parse_address(self.env["METRICS_ADDRESS"])

    async def start(self, within: float = START_TIMEOUT) -> None:
        """Start and wait (at most `within` seconds) for its "service ready" log line."""
        assert not self.running, "the service is already running"
        self._stopped_by_suite = False
        self._log_offset = self.log_size()
        with self.log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                *self.args,
                env=self.env,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Its own session: a Ctrl-C in the terminal reaches pytest, whose
                # teardown then stops the service the orderly way.
                start_new_session=True,
            )
        self._process = process

        async def ready() -> bool:
            if process.returncode is not None:
                raise AssertionError(
                    f"financing serve exited with {process.returncode} before it was ready"
                )
            return any(line.get("event") == READY_EVENT for line in self.log_lines())

        try:
            await infra.wait_until(ready, timeout=within, interval=0.1, what="'service ready'")
        except AssertionError as exc:
            await self.kill()
            raise AssertionError(
                f"{exc}\nservice log:\n{self.log_tail(self._log_offset)}"
            ) from None

    async def stop(self, within: float = STOP_TIMEOUT) -> int:
        """SIGTERM; the exit code, or AssertionError when it does not exit within the deadline."""
        process = self._process
        assert process is not None, "the service was never started"
        if process.returncode is None:
            self._stopped_by_suite = True
            process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(process.wait(), within)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"financing serve did not exit within {within}s of SIGTERM;"
                f" log:\n{self.log_tail(self._log_offset)}"
            ) from None

    def state(self) -> str:
        process = self._process
        if process is None:
            return "never started"
        if process.returncode is None:
            return f"running (pid {process.pid})"
        if self._stopped_by_suite:
            return f"stopped by the suite, exit code {process.returncode}"
        return (
            f"exited with code {process.returncode} on its own: it crashed, or a signal"
            " from outside this suite stopped it"
        )

    async def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    def log_lines(self) -> list[dict[str, object]]:
        """The JSON log lines written since the last start."""
        lines: list[dict[str, object]] = []
        for raw in self._read_log(self._log_offset).splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    lines.append(line)
        return lines

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, since: int = 0, max_lines: int = 200) -> str:
        lines = self._read_log(since).splitlines()
        skipped = len(lines) - max_lines
        text = "\n".join(lines[-max_lines:])
        return f"[{skipped} earlier lines in {self.log_path}]\n{text}" if skipped > 0 else text

    def _read_log(self, offset: int) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")


ADDRESS_VARIABLES = ("COMMAND_SERVER_ADDRESS", "QUERY_SERVER_ADDRESS", "METRICS_ADDRESS")


def another_service(
    env: Mapping[str, str], log_path: Path, extra_env: Mapping[str, str] | None = None
) -> ServiceProcess:
    """One more `financing serve` with `env` (a running one's: same databases and broker),
    listening on free ports of its own."""
    own = {**env, **{variable: f"127.0.0.1:{free_port()}" for variable in ADDRESS_VARIABLES}}
    return ServiceProcess({**own, **(extra_env or {})}, log_path)
