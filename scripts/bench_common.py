"""What every family of figures of `make bench` shares: percentiles, the figures
with their baselines and targets, tables, and what /proc and /metrics say."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# ---------------------------------------------------------------- percentiles


@dataclass(frozen=True)
class Percentiles:
    """p50 and p99 of a sample, in milliseconds."""

    p50: float
    p99: float
    count: int

    @classmethod
    def of_seconds(cls, samples: Sequence[float]) -> Percentiles:
        if not samples:
            return cls(float("nan"), float("nan"), 0)
        ms = sorted(s * 1000 for s in samples)
        if len(ms) == 1:
            return cls(ms[0], ms[0], 1)
        q = statistics.quantiles(ms, n=100, method="inclusive")
        return cls(q[49], q[98], len(ms))

    def text(self) -> str:
        return f"p50 {ms(self.p50)}, p99 {ms(self.p99)} (n={self.count})"


def ms(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def number(value: float, digits: int = 0) -> str:
    if value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


# ---------------------------------------------------------------- figures and targets


@dataclass(frozen=True)
class Figure:
    """One line of the summary: a measured value beside a baseline of the same run.

    `ratio` is value / baseline. `met` judges the target (None: no target,
    only context); `target` says what the target is.
    """

    section: str
    name: str
    value: str
    baseline_name: str
    baseline: str
    ratio: float
    target: str
    met: bool | None

    def row(self) -> list[str]:
        verdict = "-" if self.met is None else ("met" if self.met else "NOT met")
        ratio = "n/a" if self.ratio != self.ratio else f"{self.ratio:.2f}"
        return [
            self.section,
            self.name,
            self.value,
            f"{self.baseline} ({self.baseline_name})",
            ratio,
            self.target,
            verdict,
        ]


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else float("nan")


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ---------------------------------------------------------------- /proc

_TICKS = os.sysconf("SC_CLK_TCK")


def _program_and_cpu(stat: str) -> tuple[str, float]:
    """The program of a /proc/PID/stat text, and its utime + stime in seconds (fields 14
    and 15; the program's name, in parentheses, may hold spaces)."""
    end = stat.rindex(")")
    fields = stat[end + 2 :].split()
    return stat[stat.index("(") + 1 : end], (int(fields[11]) + int(fields[12])) / _TICKS


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    return _program_and_cpu(Path(f"/proc/{pid}/stat").read_text())[1]


def process_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


SERVERS = {
    "PostgreSQL": frozenset({"postgres"}),
    "RabbitMQ": frozenset({"beam.smp", "erl_child_setup", "inet_gethost", "epmd"}),
}


def servers_cpu_seconds() -> dict[int, tuple[str, float]]:
    """The server each PostgreSQL and RabbitMQ process belongs to, and its CPU-seconds, by pid."""
    found: dict[int, tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while the list was read
            continue
        program, seconds = _program_and_cpu(text)
        server = next((name for name, programs in SERVERS.items() if program in programs), None)
        if server is not None:
            found[int(stat.parent.name)] = (server, seconds)
    return found


def servers_cpu_spent(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU-seconds each server spent between two readings, counting the processes alive at
    both (a PostgreSQL backend that came and went in between is left out)."""
    spent = dict.fromkeys(SERVERS, 0.0)
    for pid, (server, seconds) in after.items():
        if pid in before:
            spent[server] += seconds - before[pid][1]
    return spent


def machine_cpu_seconds() -> float:
    """CPU-seconds the whole machine spent busy (every process, every core): /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICKS


# ---------------------------------------------------------------- /metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(address: tuple[str, int]) -> Samples:
    """Every sample of a Prometheus text endpoint, by (name, labels)."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(f"GET /metrics HTTP/1.1\r\nHost: {address[0]}\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
    _, _, body = response.partition(b"\r\n\r\n")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def delta(before: Samples, after: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The increase of every series of counter `name` between two scrapes."""
    return {
        labels: value - before.get((sample, labels), 0.0)
        for (sample, labels), value in after.items()
        if sample == name
    }
