"""`make bench`: the service's performance figures, each beside a baseline of the same run.

1. latency, one saga at a time, end to end and hop by hop on the `events`
   exchange, against RabbitMQ's raw publish -> deliver latency;
2. throughput of bid sagas at 1, 8, 32 and 128 in flight, against the
   publish-bound ceiling (confirmed persistent publishes per second / 7);
3. the service's CPU-seconds per saga and its memory;
4. deliveries its consumers received per saga, against those they used;
5. appends: the event store's unit of work against pgbench with the same
   statements, pgbench's one-row insert and the eventsourcing library;
6. rebuilding the read models, against reading the event store.

The service runs on a throwaway deployment of its own (databases, vhost,
`financing serve` as a child process) and is driven from outside with foreign
clients (grpcio, aio-pika). The machine is small and shared, so every figure
is printed beside a baseline measured in the same run, with the ratio; a
figure is a measurement, never a test. docs/performance.md explains each one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import uvloop

from financing.config import COMPONENTS, COMPONENTS_VARIABLE, ConfigError, parse_components
from financing.logging import configure
from scripts import bench_append, bench_broker, bench_rebuild, bench_saga
from scripts.bench_common import (
    Figure,
    Percentiles,
    Stopwatch,
    heading,
    ms,
    number,
    ratio,
    say,
    table,
)
from scripts.sandbox import sandbox
from tests.support import infra
from tests.support.deployment import LocalDeployment
from tests.support.service import ServiceProcess, another_service

PUBLISHES_PER_SAGA = 7  # publishes per bid saga the ceiling divides by (the service makes 6)
RAW_QUEUES = 2  # queues our topology delivers an event to: its handler's and the projector's
SECTIONS = ("service", "append", "rebuild")
MB = 1024 * 1024


@dataclass(frozen=True)
class Options:
    quick: bool
    latency_samples: int
    broker_samples: int
    levels: tuple[int, ...]
    main_level: int
    rounds: int
    min_sagas: int
    max_sagas: int
    publish_seconds: float
    poll_latency: float
    poll_throughput: float
    writers: int
    append_seconds: float
    append_rounds: int
    rebuild_events: int
    sections: tuple[str, ...]
    apart: tuple[str, ...]  # components run by a second `financing serve` process

    def sagas(self, in_flight: int) -> int:
        return max(self.min_sagas, min(self.max_sagas, in_flight * self.rounds))


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help="about 2 minutes, fewer samples")
    parser.add_argument("--latency-samples", type=int, help="sagas one at a time (400; quick 60)")
    parser.add_argument(
        "--broker-samples",
        type=int,
        help="raw publish -> deliver samples per queue count (300; quick 100)",
    )
    parser.add_argument("--levels", default="1,8,32,128", help="sagas in flight (1,8,32,128)")
    parser.add_argument(
        "--main-level", type=int, default=32, help="the level whose costs are measured (32)"
    )
    parser.add_argument(
        "--rounds", type=int, help="sagas per level = in flight x rounds (16; quick 4)"
    )
    parser.add_argument(
        "--min-sagas", type=int, help="at least this many per level (100; quick 15)"
    )
    parser.add_argument(
        "--max-sagas", type=int, help="at most this many per level (1024; quick 256)"
    )
    parser.add_argument(
        "--publish-seconds", type=float, help="length of a publish-rate run (5; quick 2)"
    )
    parser.add_argument(
        "--poll-latency", type=float, default=0.002, help="read-model poll, latency (0.002 s)"
    )
    parser.add_argument(
        "--poll-throughput", type=float, default=0.01, help="read-model poll, throughput (0.01 s)"
    )
    parser.add_argument("--writers", type=int, default=16, help="concurrent appenders (16)")
    parser.add_argument("--append-seconds", type=float, help="per append contender (6; quick 3)")
    parser.add_argument("--append-rounds", type=int, help="rounds of the contenders (3; quick 1)")
    parser.add_argument(
        "--rebuild-events", type=int, default=21000, help="events to rebuild from (21000)"
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"which families to run, of {','.join(SECTIONS)} (all)",
    )
    parser.add_argument(
        "--apart",
        default="",
        help="components to run in a second `financing serve` process, comma-separated"
        f" (of {','.join(COMPONENTS)}); the first runs the rest (none: one process)",
    )
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: float | None, full: float, short: float) -> float:
        return value if value is not None else (short if quick else full)

    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose among {SECTIONS}")
    try:
        apart = parse_components(args.apart) if args.apart else ()
    except ConfigError as error:
        parser.error(f"--apart: {error}")
    if set(apart) >= set(COMPONENTS):
        parser.error("--apart must leave some components to the first process")
    if set(apart) & {"commands-api", "queries-api"}:
        parser.error("--apart: the bench drives the first process's APIs; keep them there")
    levels = tuple(int(level) for level in args.levels.split(","))
    if args.main_level not in levels:
        parser.error(f"--main-level {args.main_level} is not among --levels {args.levels}")
    return Options(
        quick=quick,
        latency_samples=int(pick(args.latency_samples, 400, 60)),
        broker_samples=int(pick(args.broker_samples, 300, 100)),
        levels=levels,
        main_level=args.main_level,
        rounds=int(pick(args.rounds, 16, 4)),
        min_sagas=int(pick(args.min_sagas, 100, 15)),
        max_sagas=int(pick(args.max_sagas, 1024, 256)),
        publish_seconds=pick(args.publish_seconds, 5, 2),
        poll_latency=args.poll_latency,
        poll_throughput=args.poll_throughput,
        writers=args.writers,
        append_seconds=pick(args.append_seconds, 6, 3),
        append_rounds=int(pick(args.append_rounds, 3, 1)),
        rebuild_events=args.rebuild_events,
        sections=sections,
        apart=apart,
    )


# ---------------------------------------------------------------- 1-4: the running service


@dataclass
class ServiceFigures:
    raw: dict[int, Percentiles]
    latency: bench_saga.LatencyFigures
    publish_rate: bench_broker.PublishRate
    publish_rate_topology: bench_broker.PublishRate
    levels: list[bench_saga.Level]
    costs: bench_saga.Costs
    idle_rss: int
    final_rss: int  # after every level


@contextlib.asynccontextmanager
async def started_apart(
    box: LocalDeployment, components: tuple[str, ...]
) -> AsyncIterator[tuple[ServiceProcess, ...]]:
    """A second `financing serve` on `box`'s databases and vhost running `components`
    (none: no second process), stopped afterwards."""
    if not components:
        yield ()
        return
    log_path = Path(tempfile.gettempdir()) / f"{box.name}.apart.log"
    process = another_service(box.env, log_path, {COMPONENTS_VARIABLE.name: ",".join(components)})
    await process.start()
    try:
        yield (process,)
    finally:
        code = await process.stop()
    if code != 0:
        raise RuntimeError(f"the second process exited with {code}; log in {log_path}")
    log_path.unlink()


async def run_service(options: Options) -> ServiceFigures:
    heading("starting a throwaway deployment: financing serve, its databases and vhost")
    first = tuple(component for component in COMPONENTS if component not in options.apart)
    async with (
        sandbox("financing_bench", {COMPONENTS_VARIABLE.name: ",".join(first)}) as box,
        started_apart(box, options.apart) as apart,
        bench_broker.own_vhost() as broker_url,
    ):
        investors = options.latency_samples + 16 + sum(options.sagas(n) for n in options.levels)
        async with bench_saga.driving(
            box,
            issuers=16,
            investors=investors,
            poll_interval=options.poll_latency,
            apart=apart,
        ) as deployment:
            await asyncio.sleep(1)
            idle_rss = deployment.rss()
            say(
                f"financing serve is pid {', '.join(map(str, deployment.pids))},"
                f" RSS {idle_rss / MB:.0f} MB when idle"
            )
            if apart:
                say(f"the second process runs {', '.join(options.apart)}; the first the rest")
            seconds = await bench_saga.register_all(deployment)
            say(
                f"registered {len(deployment.issuers)} issuers and {investors} investors"
                f" (integration events) in {seconds:.1f} s"
            )

            heading("1. latency, one saga at a time")
            raw = {}
            for queues in (1, RAW_QUEUES, 9):
                raw[queues] = await bench_broker.publish_deliver_latency(
                    broker_url, queues, options.broker_samples
                )
                say(
                    f"raw publish -> deliver, persistent, confirmed, {queues} durable queue(s):"
                    f" {raw[queues].text()}"
                )
            latency = await bench_saga.latency(deployment, options.latency_samples)
            for name, label in bench_saga.LATENCY_LABELS.items():
                say(f"{label}: {getattr(latency, name).text()}")
            if latency.failed:
                say(f"{latency.failed} sagas did not finish within 30 s a step: left out")
            say(
                f"the service's CPU over the last {latency.sagas_measured} of them:"
                f" {latency.service_cpu:.2f} s in {latency.seconds:.1f} s"
                f" ({latency.busy:.0%} busy),"
                f" {_per_saga_ms(latency.service_cpu, latency.sagas_measured)} per saga"
            )

            heading("2-4. throughput, costs, deliveries")
            await bench_saga.throughput(deployment, 8, 16)  # warm: every path taken once
            deployment.read_models.interval = options.poll_throughput
            rate = await bench_broker.confirmed_publish_rate(
                broker_url, 256, options.publish_seconds
            )
            say(
                f"confirmed persistent publishes, 256 in flight, 1 durable queue:"
                f" {number(rate.per_second)}/s ({rate.published} in {rate.seconds:.1f} s)"
            )
            rate_topology = await bench_broker.confirmed_publish_rate(
                broker_url, 256, options.publish_seconds, queues=RAW_QUEUES, consumed=True
            )
            say(
                f"the same to {RAW_QUEUES} durable queues, each drained by an acking consumer"
                f" in this process: {number(rate_topology.per_second)}/s"
            )
            levels = []
            costs: bench_saga.Costs | None = None
            for in_flight in options.levels:
                sagas = options.sagas(in_flight)
                if in_flight == options.main_level:
                    level, costs = await bench_saga.measured_throughput(
                        deployment, in_flight, sagas
                    )
                else:
                    level = await bench_saga.throughput(deployment, in_flight, sagas)
                levels.append(level)
                say(
                    f"{in_flight:>3} in flight: {level.per_second:5.1f} sagas/s over"
                    f" {level.sagas} sagas ({level.failed} failed); saga {level.saga.text()};"
                    f" accepted -> FINANCED {level.accepted_to_financed.text()}"
                )
            assert costs is not None
            final_rss = deployment.rss()
    return ServiceFigures(raw, latency, rate, rate_topology, levels, costs, idle_rss, final_rss)


def service_figures(found: ServiceFigures, options: Options) -> list[Figure]:
    figures = []
    raw = found.raw[RAW_QUEUES]
    raw_name = f"raw publish->deliver, {RAW_QUEUES} queues"
    e2e = found.latency.end_to_end
    for quantile, limit in (("p50", 20.0), ("p99", 60.0)):
        value, base = getattr(e2e, quantile), getattr(raw, quantile)
        figures.append(
            Figure(
                "1 latency",
                f"accepted -> FINANCED {quantile}",
                ms(value),
                f"{raw_name} {quantile}",
                ms(base),
                ratio(value, base),
                f"<= {limit:.0f} ms",
                value <= limit,
            )
        )
    for name in ("accepted_to_placed", "placed_to_financed", "financed_to_released"):
        label = bench_saga.LATENCY_LABELS[name].removeprefix("hop: ")
        figures += _hop(name, label, found, raw, raw_name)
    figures += _hop("read_model_trailing", "read model trailing the bus", found, raw, raw_name)

    main = next(level for level in found.levels if level.in_flight == options.main_level)
    ceiling = found.publish_rate.per_second / PUBLISHES_PER_SAGA
    figures.append(
        Figure(
            "2 throughput",
            f"bid sagas/s, {main.in_flight} in flight",
            f"{main.per_second:.1f}/s",
            f"publish-bound ceiling: {number(found.publish_rate.per_second)} publishes/s"
            f" / {PUBLISHES_PER_SAGA}",
            f"{ceiling:.1f}/s",
            ratio(main.per_second, ceiling),
            ">= 0.35 x",
            ratio(main.per_second, ceiling) >= 0.35,
        )
    )
    costs = found.costs
    servers = sum(costs.servers_cpu.values())
    cores = os.cpu_count() or 1
    carried = cores * costs.sagas / servers if servers else float("inf")
    figures.append(
        Figure(
            "2 throughput",
            f"PostgreSQL + RabbitMQ CPU-s per saga, {main.in_flight} in flight",
            _per_saga_ms(servers, costs.sagas),
            f"sagas/s {cores} cores could carry at that cost alone, the service's own left out",
            f"{carried:.1f}/s",
            ratio(carried, ceiling),
            "(context: x ceiling)",
            None,
        )
    )
    latency = found.latency
    done = latency.sagas_measured
    figures.append(
        Figure(
            "3 costs",
            "service CPU-s per saga, one at a time",
            _per_saga_ms(latency.service_cpu, done),
            f"the same at {options.main_level} in flight",
            _per_saga_ms(costs.service_cpu, costs.sagas),
            ratio(latency.service_cpu / max(1, done), costs.service_cpu / costs.sagas),
            f"(context: busy {latency.busy:.0%})",
            None,
        )
    )
    figures.append(
        Figure(
            "3 costs",
            f"service CPU-s per saga, {options.main_level} in flight",
            _per_saga_ms(costs.service_cpu, costs.sagas),
            "machine CPU-s per saga, every process",
            _per_saga_ms(costs.machine_cpu, costs.sagas),
            ratio(costs.service_cpu, costs.machine_cpu),
            "(context)",
            None,
        )
    )
    figures.append(
        Figure(
            "3 costs",
            "service RSS, end of the run",
            f"{costs.rss_end / MB:.0f} MB",
            "RSS idle after start-up",
            f"{found.idle_rss / MB:.0f} MB",
            ratio(costs.rss_end, found.idle_rss),
            "<= 150 MB",
            costs.rss_end <= 150 * MB,
        )
    )
    figures.append(
        Figure(
            "4 deliveries",
            "received per saga",
            f"{costs.received_per_saga:.2f}",
            "used per saga (processed + unchanged)",
            f"{costs.used_per_saga:.2f}",
            ratio(costs.received_per_saga, costs.used_per_saga),
            "<= 2 x",
            ratio(costs.received_per_saga, costs.used_per_saga) <= 2,
        )
    )
    return figures


def _hop(
    name: str, label: str, found: ServiceFigures, raw: Percentiles, raw_name: str
) -> list[Figure]:
    hop: Percentiles = getattr(found.latency, name)
    figures = []
    for quantile in ("p50", "p99"):
        value, base = getattr(hop, quantile), getattr(raw, quantile)
        figures.append(
            Figure(
                "1 latency",
                f"{label} {quantile}",
                ms(value),
                f"{raw_name} {quantile}",
                ms(base),
                ratio(value, base),
                "<= 2 x raw",
                ratio(value, base) <= 2,
            )
        )
    return figures


def _per_saga_ms(seconds: float, sagas: int) -> str:
    return f"{seconds / max(1, sagas) * 1000:.1f} ms"


def print_service_details(found: ServiceFigures, options: Options) -> None:
    costs = found.costs
    heading(f"3-4. what the {options.main_level}-in-flight run cost (until the service was quiet)")
    say(
        f"CPU-seconds: financing serve {costs.service_cpu:.2f}, the whole machine"
        f" {costs.machine_cpu:.2f}, this bench {costs.bench_cpu:.2f}, for {costs.sagas} sagas"
    )
    say(
        "of the machine's: "
        + ", ".join(f"{server} {seconds:.2f}" for server, seconds in costs.servers_cpu.items())
        + " (their processes alive from start to end of the run)"
    )
    say(
        f"RSS of financing serve: {found.idle_rss / MB:.0f} MB idle after start-up,"
        f" {costs.rss_end / MB:.0f} MB at the end of this run,"
        f" {found.final_rss / MB:.0f} MB after every level"
    )
    say(
        f"publishes per saga (commands accepted + events relayed + dead letters):"
        f" {costs.publishes / costs.sagas:.2f} (the ceiling divides by {PUBLISHES_PER_SAGA})"
    )
    rows = [
        [
            queue,
            f"{received / costs.sagas:.2f}",
            f"{costs.used.get(queue, 0.0) / costs.sagas:.2f}",
        ]
        for queue, received in sorted(costs.received.items())
        if received
    ]
    rows.append(["all", f"{costs.received_per_saga:.2f}", f"{costs.used_per_saga:.2f}"])
    print(table(["queue", "received/saga", "used/saga"], rows))


def level_table(found: ServiceFigures) -> str:
    ceiling = found.publish_rate.per_second / PUBLISHES_PER_SAGA
    rows = [
        [
            str(level.in_flight),
            str(level.sagas - level.failed),
            f"{level.per_second:.1f}",
            f"{ratio(level.per_second, ceiling):.2f}",
            ms(level.saga.p50),
            ms(level.saga.p99),
            ms(level.accepted_to_financed.p50),
            ms(level.accepted_to_financed.p99),
        ]
        for level in found.levels
    ]
    return table(
        [
            "in flight",
            "sagas",
            "sagas/s",
            f"/ ceiling {ceiling:.1f}",
            "saga p50",
            "saga p99",
            "accepted->FINANCED p50",
            "p99",
        ],
        rows,
    )


# ---------------------------------------------------------------- 5: appends


@dataclass
class AppendFigures:
    ours: float
    pgbench_ours: float
    asyncpg_ours: float
    pgbench_simple: float
    es_application: float
    es_aggregate: float
    script: bench_append.PgbenchScript


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


async def run_append(options: Options) -> AppendFigures:
    heading(f"5. appends, {options.writers} concurrent writers, fresh aggregates")
    writers, seconds = options.writers, options.append_seconds
    kinds = ("ours", "pg", "asyncpg", "simple", "app", "agg")
    results: dict[str, list[float]] = {k: [] for k in kinds}
    async with bench_append.event_store_database("financing_bench_capture") as db:
        captured = await bench_append.capture(db)
        script = bench_append.pgbench_script(captured)
    say(
        f"our unit of work sends {script.statements} statements per transaction;"
        " the pgbench script made of them:"
    )
    for line in script.describe().splitlines():
        say(f"  {line}")
    for round_number in range(1, options.append_rounds + 1):
        async with bench_append.event_store_database("financing_bench_append") as db:
            results["ours"].append(await bench_append.units_per_second(db, writers, seconds))
        async with bench_append.event_store_database("financing_bench_pgbench") as db:
            run = await asyncio.to_thread(bench_append.pgbench, db, script, writers, seconds)
            results["pg"].append(run.tps)
        async with bench_append.event_store_database("financing_bench_asyncpg") as db:
            rate = await bench_append.replayed_per_second(db, captured, writers, seconds)
            results["asyncpg"].append(rate)
        async with infra.fresh_database("financing_bench_simple") as db:
            await bench_append.prepare_simple_insert(db)
            simple = bench_append.SIMPLE_INSERT
            run_simple = await asyncio.to_thread(bench_append.pgbench, db, simple, writers, seconds)
            results["simple"].append(run_simple.tps)
        for key, application in (("app", True), ("agg", False)):
            async with infra.fresh_database("financing_bench_eventsourcing") as db:
                rate = await asyncio.to_thread(
                    bench_append.eventsourcing_inserts_per_second,
                    db,
                    writers,
                    seconds,
                    application=application,
                )
                results[key].append(rate)
        say(
            f"round {round_number}: ours {results['ours'][-1]:.0f}/s, pgbench with our"
            f" statements {results['pg'][-1]:.0f}/s ({run.failed} failed), asyncpg alone with our"
            f" statements {results['asyncpg'][-1]:.0f}/s, pgbench one-row insert"
            f" {results['simple'][-1]:.0f}/s, eventsourcing application recorder"
            f" {results['app'][-1]:.0f}/s, aggregate recorder {results['agg'][-1]:.0f}/s"
        )
    return AppendFigures(
        _mean(results["ours"]),
        _mean(results["pg"]),
        _mean(results["asyncpg"]),
        _mean(results["simple"]),
        _mean(results["app"]),
        _mean(results["agg"]),
        script,
    )


def append_figures(found: AppendFigures, options: Options) -> list[Figure]:
    name = f"units of work/s, {options.writers} writers"
    value = f"{found.ours:.0f}/s"
    rows = [
        ("pgbench, our statements", found.pgbench_ours, ">= 0.7 x", 0.7),
        ("asyncpg alone, our statements", found.asyncpg_ours, "(context)", None),
        ("pgbench, one-row insert", found.pgbench_simple, "(context)", None),
        ("eventsourcing application recorder", found.es_application, ">= 3 x", 3.0),
        ("eventsourcing aggregate recorder", found.es_aggregate, "(context)", None),
    ]
    return [
        Figure(
            "5 append",
            name,
            value,
            base_name,
            f"{base:.0f}/s",
            ratio(found.ours, base),
            target,
            None if floor is None else ratio(found.ours, base) >= floor,
        )
        for base_name, base, target, floor in rows
    ]


# ---------------------------------------------------------------- 6: rebuild


async def run_rebuild(options: Options) -> bench_rebuild.RebuildFigures:
    heading("6. projection rebuild")
    found = await bench_rebuild.measure(options.rebuild_events)
    say(
        f"{found.events} events: rebuilt in {found.rebuild_seconds:.2f} s"
        f" ({number(found.rebuild_per_second)} events/s); read alone (read_all, decoded)"
        f" in {found.read_seconds:.2f} s ({number(found.read_per_second)} events/s)"
    )
    return found


def rebuild_figures(found: bench_rebuild.RebuildFigures) -> list[Figure]:
    return [
        Figure(
            "6 rebuild",
            f"rebuild events/s ({found.events} events)",
            f"{number(found.rebuild_per_second)}/s",
            "reading the event store alone",
            f"{number(found.read_per_second)}/s",
            ratio(found.rebuild_per_second, found.read_per_second),
            ">= 20,000/s",
            found.rebuild_per_second >= 20_000,
        )
    ]


# ---------------------------------------------------------------- the run


async def describe_machine() -> None:
    conn = await asyncpg.connect(
        host=infra.PG_HOST, port=infra.PG_PORT, user=infra.PG_USER, database="postgres"
    )
    try:
        pg = await conn.fetchval("SHOW server_version")
        sync = await conn.fetchval("SHOW synchronous_commit")
    finally:
        await conn.close()
    rabbit = await asyncio.to_thread(_output, "rabbitmqctl", "-q", "version")
    commit = await asyncio.to_thread(_output, "git", "describe", "--always", "--dirty")
    say(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit},"
        f" {os.cpu_count()} cores, Python {platform.python_version()},"
        f" PostgreSQL {pg} (synchronous_commit {sync}), RabbitMQ {rabbit}"
    )


def _output(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return done.stdout.strip() or "?"


def main(options: Options) -> None:
    configure("WARNING")  # the service's code run in this process: its warnings only
    clock = Stopwatch()
    heading("financing bench" + (" --quick" if options.quick else ""))
    asyncio.run(describe_machine())
    figures: list[Figure] = []
    service: ServiceFigures | None = None
    if "service" in options.sections:
        service = asyncio.run(run_service(options))
        print_service_details(service, options)
        figures += service_figures(service, options)
    # On uvloop, as `financing serve` runs the unit of work and `financing projections
    # rebuild` the rebuild.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if "append" in options.sections:
            figures += append_figures(runner.run(run_append(options)), options)
        if "rebuild" in options.sections:
            figures += rebuild_figures(runner.run(run_rebuild(options)))

    heading("figures, each beside a baseline of this run (ratio = figure / baseline)")
    print(
        table(
            ["#", "figure", "measured", "baseline (same run)", "ratio", "target", ""],
            [figure.row() for figure in figures],
        )
    )
    if service is not None:
        heading("bid sagas by number in flight (saga = SellInvoice sent -> read model FINANCED)")
        print(level_table(service))
    met = sum(1 for f in figures if f.met)
    judged = sum(1 for f in figures if f.met is not None)
    heading(f"{met} of {judged} targets met; {clock.elapsed:.0f} s in all")


if __name__ == "__main__":
    main(parse_args())
