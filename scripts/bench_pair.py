"""Two versions of the service side by side, at the same time on the same machine.

    git worktree add /tmp/before <commit>
    python -m scripts.bench_pair --before /tmp/before/src

Two throwaway deployments run at once: "before" runs the service from the
source tree given (its `src`: `PYTHONPATH` puts it ahead of the installed
package), "after" from this checkout. The bench drives both, in turns:

- latency: sagas one at a time, in blocks of `--block` sagas, alternating
  before, after, after, before, ... so that the machine's drift during the
  run falls on both alike; p50 and p99 of each figure on each side, and in
  how many pairs of neighbouring blocks the after side's median was the
  lower one;
- throughput: rounds of `--sagas` sagas with `--in-flight` in flight, in the
  same alternation; sagas/s and the service's CPU per saga on each side.

On a machine whose figures move from run to run by more than the change
being measured, one run before and one after cannot tell the two apart;
interleaved, both sides see the same load from outside. A script that
prints figures, not a test (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from financing.logging import configure
from scripts import bench_saga
from scripts.bench_common import Percentiles, Stopwatch, heading, ms, number, say, table
from scripts.sandbox import sandbox

SIDES = ("before", "after")


@dataclass(frozen=True)
class Options:
    before: Path
    samples: int  # sagas one at a time, per side
    block: int
    in_flight: int
    sagas: int  # per throughput round
    rounds: int  # throughput rounds per side


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_pair",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "--before", type=Path, required=True, help="the `src` folder of the version to compare"
    )
    parser.add_argument("--samples", type=int, default=400, help="sagas one at a time per side")
    parser.add_argument("--block", type=int, default=20, help="sagas per turn (20)")
    parser.add_argument("--in-flight", type=int, default=32, help="throughput: in flight (32)")
    parser.add_argument("--sagas", type=int, default=256, help="throughput: sagas per round")
    parser.add_argument(
        "--rounds", type=int, default=4, help="throughput: rounds per side (0: none)"
    )
    args = parser.parse_args(argv)
    before = args.before.resolve()
    if not (before / "financing" / "__init__.py").is_file():
        parser.error(f"--before {before}: no financing package in it")
    if args.samples < 1 or args.block < 1 or args.in_flight < 1 or args.sagas < 1:
        parser.error("--samples, --block, --in-flight and --sagas must be at least 1")
    if args.rounds < 0:
        parser.error("--rounds must be at least 0")
    return Options(before, args.samples, args.block, args.in_flight, args.sagas, args.rounds)


def turns(count: int) -> list[str]:
    """`count` turns per side, as before, after, after, before, before, after, ..."""
    order: list[str] = []
    for index in range(count):
        pair = list(SIDES) if index % 2 == 0 else list(reversed(SIDES))
        order += pair
    return order


@dataclass
class Side:
    """One deployment and what was measured on it."""

    name: str
    deployment: bench_saga.Deployment
    bus: bench_saga.BusWatch
    blocks: list[bench_saga.OneAtATime] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # sagas/s, one per round
    cpu_per_saga: list[float] = field(default_factory=list)  # seconds, one per round
    failed_in_rounds: int = 0

    async def latency_block(self, sagas: int) -> None:
        first = sum(block.done + block.failed for block in self.blocks)
        indexes = range(first, first + sagas)
        self.blocks.append(await bench_saga.one_at_a_time(self.deployment, self.bus, indexes))

    def one_at_a_time(self) -> bench_saga.OneAtATime:
        return bench_saga.OneAtATime.joined(self.blocks)

    def block_medians(self) -> list[float]:
        """accepted -> FINANCED, the median of each block."""
        return [
            statistics.median(block.series["end_to_end"])
            for block in self.blocks
            if block.series["end_to_end"]
        ]

    async def throughput_round(self, in_flight: int, sagas: int) -> None:
        level, costs = await bench_saga.measured_throughput(self.deployment, in_flight, sagas)
        self.rates.append(level.per_second)
        self.failed_in_rounds += level.failed
        if costs.sagas:
            self.cpu_per_saga.append(costs.service_cpu / costs.sagas)


@contextlib.asynccontextmanager
async def side(name: str, options: Options, investors: int) -> AsyncIterator[Side]:
    env = {"PYTHONPATH": str(options.before)} if name == "before" else None
    async with (
        sandbox(f"financing_pair_{name}", env) as box,
        bench_saga.driving(box, issuers=16, investors=investors, poll_interval=0.002) as driven,
    ):
        bus = bench_saga.BusWatch()
        async with bus.bound(driven.amqp):
            yield Side(name, driven, bus)


async def run(options: Options) -> dict[str, Side]:
    blocks = -(-options.samples // options.block)
    investors = blocks * options.block + options.rounds * options.sagas + 16
    async with (
        side("before", options, investors) as before,
        side("after", options, investors) as after,
    ):
        sides = {"before": before, "after": after}
        for one in sides.values():
            seconds = await bench_saga.register_all(one.deployment)
            say(f"{one.name}: pid {one.deployment.pids[0]}, registered in {seconds:.1f} s")
            await bench_saga.throughput(one.deployment, 8, 16)  # warm: every path taken once
        heading(f"latency, one saga at a time: {blocks} blocks of {options.block} per side")
        for name in turns(blocks):
            await sides[name].latency_block(options.block)
        if options.rounds:
            heading(
                f"throughput: {options.rounds} rounds of {options.sagas} sagas per side,"
                f" {options.in_flight} in flight"
            )
            for one in sides.values():
                one.deployment.read_models.interval = 0.01
            for name in turns(options.rounds):
                await sides[name].throughput_round(options.in_flight, options.sagas)
                say(f"{name}: {sides[name].rates[-1]:.1f} sagas/s")
    return sides


def after_lower(before: Sequence[float], after: Sequence[float]) -> tuple[int, int]:
    """In how many pairs of neighbouring blocks (the i-th of each side) the after side's
    median was the lower one, of how many pairs."""
    pairs = list(zip(before, after, strict=False))
    return sum(1 for b, a in pairs if a < b), len(pairs)


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}" if before else "n/a"


def report(sides: dict[str, Side], options: Options) -> None:
    before, after = sides["before"], sides["after"]
    measured = {name: one.one_at_a_time() for name, one in sides.items()}
    heading(f"before: {options.before}; after: this checkout")
    rows = []
    for name, label in bench_saga.LATENCY_LABELS.items():
        b, a = (Percentiles.of_seconds(measured[s].series[name]) for s in SIDES)
        rows.append(
            [
                label,
                f"{ms(b.p50)} / {ms(b.p99)}",
                f"{ms(a.p50)} / {ms(a.p99)}",
                f"{_ratio(a.p50, b.p50)} / {_ratio(a.p99, b.p99)}",
            ]
        )

    def row(label: str, measure: Callable[[Side], float], text: Callable[[float], str]) -> None:
        b, a = measure(before), measure(after)
        rows.append([label, text(b), text(a), _ratio(a, b)])

    def cpu_ms(seconds: float) -> str:
        return ms(seconds * 1000)

    row(
        "service CPU per saga, one at a time",
        lambda s: measured[s.name].service_cpu / max(1, measured[s.name].done),
        cpu_ms,
    )
    if options.rounds:
        row(
            f"sagas/s, {options.in_flight} in flight (median of rounds)",
            lambda s: statistics.median(s.rates),
            lambda rate: number(rate, 1),
        )
        row(
            f"service CPU per saga, {options.in_flight} in flight (median of rounds)",
            lambda s: statistics.median(s.cpu_per_saga),
            cpu_ms,
        )
    print(table(["figure (p50 / p99)", "before", "after", "after / before"], rows))
    lower, pairs = after_lower(before.block_medians(), after.block_medians())
    say(
        f"accepted -> FINANCED: the after side's block median was the lower one in"
        f" {lower} of {pairs} pairs of neighbouring blocks"
    )
    if options.rounds:
        say(
            "sagas/s by round: before "
            + ", ".join(f"{r:.1f}" for r in before.rates)
            + "; after "
            + ", ".join(f"{r:.1f}" for r in after.rates)
        )
    failed = sum(m.failed for m in measured.values()) + sum(
        s.failed_in_rounds for s in sides.values()
    )
    if failed:
        say(f"{failed} sagas did not finish in time: left out")


def main(options: Options) -> None:
    configure("WARNING")
    clock = Stopwatch()
    sides = asyncio.run(run(options))
    report(sides, options)
    heading(f"{clock.elapsed:.0f} s in all")


if __name__ == "__main__":
    main(parse_args())
