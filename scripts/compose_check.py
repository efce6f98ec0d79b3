"""`make compose-check`: the container deployment, run for real.

From nothing (`down -v`), it builds and starts compose.yaml (with PostgreSQL
published: deploy/compose.postgres.yaml), waits until every container's
healthcheck passes, runs the acceptance suite against the published ports
(`make acceptance TARGET=external`), restarts the service container, then the
broker container, and after each checks that the service recovers: its
healthcheck passes again (a probe started after the restart) and a financing
story sent afterwards is applied (integration events from `financing populate`
in the container, a SellInvoice and a BidOnInvoice over gRPC, the invoice read
FINANCED from the Queries API). It then runs `financing status` inside the
service container and removes everything (`down -v`). Exit code 0 only when
every step held; a summary with each step's duration is printed and written to
build/compose-check.json.

Needs Docker Engine and Compose (`docker-compose` v1, or DOCKER_COMPOSE="docker compose")
and the venv (`make compose-check` builds it). Variables: COMPOSE_PROJECT_NAME
(default financing-check), the port variables of compose.yaml (FINANCING_*_PORT,
FINANCING_PUBLISH_ADDRESS), FINANCING_POSTGRES_PASSWORD, PYTEST_ARGS (passed to
the acceptance run), COMPOSE_CHECK_KEEP=1 (leave the deployment running at the end).

COMPOSE_CHECK_PROFILE=scale (`make compose-check PROFILE=scale`) checks the scale
profile instead: three service instances on a three-node RabbitMQ cluster with
quorum queues (FINANCING_QUEUE_TYPE=quorum, every node in the first instance's
AMQP_ADDRESS); it also checks that the cluster has three running nodes and that
every queue the service declares is a quorum queue with a member on each node, a
story runs while the first node is stopped, and the broker restart restarts the
first node while the instances carry on through the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
# Debian's client: another `docker` on PATH may lack Compose.
DOCKER = os.environ.get("DOCKER") or (
    "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
)
COMPOSE = shlex.split(os.environ.get("DOCKER_COMPOSE", "docker-compose"))
PROJECT = os.environ.get("COMPOSE_PROJECT_NAME") or "financing-check"
FILES = ("compose.yaml", "deploy/compose.postgres.yaml")
PROFILE = os.environ.get("COMPOSE_CHECK_PROFILE", "")
NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3") if PROFILE == "scale" else ("rabbitmq",)
SERVICES = ("postgres", *NODES, "financing") + (
    ("financing-2", "financing-3") if PROFILE == "scale" else ()
)
# What the scale profile sets: quorum queues, every node known to the first instance.
PROFILE_ENV = (
    {
        "FINANCING_QUEUE_TYPE": "quorum",
        "FINANCING_AMQP_ADDRESS": ",".join(f"amqp://guest:guest@{n}:5672/" for n in NODES),
    }
    if PROFILE == "scale"
    else {}
)

HEALTHY_TIMEOUT = 240.0  # first start: PostgreSQL init, RabbitMQ boot, the service's start-up
RECOVERY_TIMEOUT = 120.0
STORY_TIMEOUT = 60.0
STATUS_TIMEOUT = 60.0


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


PUBLISH = _env("FINANCING_PUBLISH_ADDRESS", "127.0.0.1")
HOST = "127.0.0.1" if PUBLISH in ("0.0.0.0", "::", "") else PUBLISH
PORTS = {  # variable -> (default, what)
    "FINANCING_COMMANDS_PORT": ("18080", "gRPC Commands"),
    "FINANCING_QUERIES_PORT": ("18081", "gRPC Queries"),
    "FINANCING_METRICS_PORT": ("18082", "metrics and /health"),
    "FINANCING_AMQP_PORT": ("18672", "RabbitMQ AMQP"),
    "FINANCING_RABBITMQ_MANAGEMENT_PORT": ("18673", "RabbitMQ management"),
    "FINANCING_POSTGRES_PORT": ("15432", "PostgreSQL"),
}
if PROFILE == "scale":  # the two other instances' metrics (compose.yaml's scale profile)
    PORTS |= {
        "FINANCING_METRICS_PORT_2": ("18182", "financing-2's metrics"),
        "FINANCING_METRICS_PORT_3": ("18282", "financing-3's metrics"),
    }


def port(variable: str) -> int:
    return int(_env(variable, PORTS[variable][0]))


def deployment_env() -> dict[str, str]:
    """The contract's variables, pointing at the published ports (for the acceptance run)."""
    password = _env("FINANCING_POSTGRES_PASSWORD", "postgres")
    pg = f"postgresql://postgres:{password}@{HOST}:{port('FINANCING_POSTGRES_PORT')}"
    more = [v for v in ("FINANCING_METRICS_PORT_2", "FINANCING_METRICS_PORT_3") if v in PORTS]
    return {
        # What the other instances' consumers took counts too (the queues are shared).
        **(
            {"FINANCING_ACCEPTANCE_MORE_METRICS": ",".join(f"{HOST}:{port(v)}" for v in more)}
            if more
            else {}
        ),
        "COMMAND_SERVER_ADDRESS": f"{HOST}:{port('FINANCING_COMMANDS_PORT')}",
        "QUERY_SERVER_ADDRESS": f"{HOST}:{port('FINANCING_QUERIES_PORT')}",
        "METRICS_ADDRESS": f"{HOST}:{port('FINANCING_METRICS_PORT')}",
        "AMQP_ADDRESS": f"amqp://guest:guest@{HOST}:{port('FINANCING_AMQP_PORT')}/",
        "COMMAND_DB_CONNECTION_STRING": f"{pg}/postgres",
        "QUERY_DB_CONNECTION_STRING": f"{pg}/queries",
    }


class Failed(Exception):
    pass


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class Report:
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    steps: list[Step] = field(default_factory=list)

    def run(self, name: str, action: Callable[[], str | None]) -> None:
        print(f"\n=== {name}", flush=True)
        began = time.monotonic()
        try:
            detail = action() or ""
        except Failed as failure:
            self.steps.append(Step(name, False, time.monotonic() - began, str(failure)))
            print(f"=== FAILED: {name}: {failure}", flush=True)
            raise
        self.steps.append(Step(name, True, time.monotonic() - began, detail))
        print(f"=== ok ({time.monotonic() - began:.1f} s) {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    def summary(self) -> str:
        width = max(len(step.name) for step in self.steps)
        lines = [f"compose-check {'PASSED' if self.ok else 'FAILED'} ({self.started})"]
        for step in self.steps:
            mark = "ok  " if step.ok else "FAIL"
            lines.append(f"  {mark} {step.name:<{width}} {step.seconds:6.1f} s  {step.detail}")
        lines.append(f"  total {sum(step.seconds for step in self.steps):.1f} s")
        return "\n".join(lines)


# -- docker and compose ----------------------------------------------------------------------


def compose(*args: str, check: bool = True, capture: bool = False, timeout: float = 900) -> str:
    profile = ("--profile", PROFILE) if PROFILE else ()
    command = [
        *COMPOSE,
        "-p",
        PROJECT,
        *(a for f in FILES for a in ("-f", f)),
        *profile,
        *args,
    ]
    print(
        "$ " + " ".join(command[len(COMPOSE) :]) if capture else "$ " + shlex.join(command),
        flush=True,
    )
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **PROFILE_ENV},
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        output = result.stdout or ""
        raise Failed(f"`{shlex.join(command)}` exited with {result.returncode}\n{output}")
    return result.stdout or ""


def container(service: str) -> str:
    ids = compose("ps", "-q", service, capture=True).split()
    if not ids:
        raise Failed(f"no container for {service}")
    return ids[-1]


def inspect(container_id: str) -> dict[str, Any]:
    out = subprocess.run(
        [DOCKER, "inspect", container_id], text=True, capture_output=True, check=True
    ).stdout
    state: dict[str, Any] = json.loads(out)[0]["State"]
    return state


_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def _moment(text: str) -> datetime:
    """Docker's RFC 3339 time (nanoseconds, Z or an offset) as an aware datetime."""
    match = _STAMP.match(text.strip())
    if match is None:
        raise ValueError(f"not a Docker timestamp: {text!r}")
    seconds, fraction, zone = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    offset = "+00:00" if zone in (None, "Z") else zone
    return datetime.fromisoformat(f"{seconds}.{micro}{offset}").astimezone(UTC)


def wait_healthy(service: str, *, since: datetime | None = None, timeout: float) -> float:
    """Wait until `service` is healthy by a probe that started after `since`; seconds waited."""
    began = time.monotonic()
    last = shown = ""
    while time.monotonic() - began < timeout:
        state = inspect(container(service))
        health = state.get("Health") or {}
        status = health.get("Status", "none")
        if not state.get("Running"):
            last = f"not running (status {state.get('Status')}, exit code {state.get('ExitCode')})"
        elif status == "healthy":
            probes = health.get("Log") or []
            passed_after = [
                probe
                for probe in probes
                if probe.get("ExitCode") == 0
                and (since is None or _moment(probe["Start"]) >= since)
            ]
            if passed_after:
                return time.monotonic() - began
            last = "healthy, waiting for a probe started after the restart"
        else:
            probes = health.get("Log") or []
            output = probes[-1].get("Output", "").strip() if probes else ""
            last = f"{status}: {output[-300:]}" if output else status
        if last != shown:
            print(f"    {service}: {last}", flush=True)
            shown = last
        time.sleep(2)
    logs = compose("logs", "--no-color", "--tail", "60", service, check=False, capture=True)
    raise Failed(f"{service} not healthy within {timeout:.0f} s ({last})\n{logs}")


def down() -> str:
    compose("down", "-v", "--remove-orphans")
    return ""


def up() -> str:
    compose("up", "-d", "--build")
    return ""


def wait_all_healthy() -> str:
    waited = {service: wait_healthy(service, timeout=HEALTHY_TIMEOUT) for service in SERVICES}
    return "healthy: " + ", ".join(f"{s} {w:.1f} s" for s, w in waited.items())


def ports_free() -> str:
    """Refuse to start when a port to publish is taken (a local server, another deployment)."""
    taken = []
    for variable, (_, what) in PORTS.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As Docker's proxy binds: the connections of a check just ended, waiting out
            # TIME_WAIT on the port, took it for taken; a listener still fails the bind.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port(variable)))
            except OSError:
                taken.append(f"{HOST}:{port(variable)} ({what}; set {variable})")
    if taken:
        raise Failed(
            "ports in use: "
            + ", ".join(taken)
            + f" (a deployment of project {PROJECT} still up? `make compose-check` removes its own)"
        )
    return ", ".join(f"{port(v)}" for v in PORTS)


# -- a financing story over the public interfaces -------------------------------------------


def financing_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [
        *COMPOSE,
        "-p",
        PROJECT,
        *(a for f in FILES for a in ("-f", f)),
        "exec",
        "-T",
        "financing",
        "financing",
        *args,
    ]
    print("$ financing " + " ".join(args) + "   (in the service container)", flush=True)
    result = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, timeout=120)
    if check and result.returncode != 0:
        raise Failed(
            f"financing {' '.join(args)} exited with {result.returncode}\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def story() -> str:
    """Integration events, then commands, all applied: the service works end to end."""
    populated = financing_cli("populate", "--issuers", "1", "--investors", "1", "--balance", "100")
    issuer = investor = None
    for line in populated.stdout.splitlines():
        words = line.split()
        if words[:1] == ["issuer"]:
            issuer = UUID(words[1])
        elif words[:1] == ["investor"]:
            investor = UUID(words[1])
    if issuer is None or investor is None:
        raise Failed(f"financing populate printed no ids:\n{populated.stdout}")
    return asyncio.run(_commands(issuer, investor))


async def _commands(issuer: UUID, investor: UUID) -> str:
    from betterproto.lib.google.protobuf import Empty
    from grpclib.client import Channel

    from financing.generated import (
        BidOnInvoiceCommand,
        CommandsStub,
        InvoiceStatus,
        Money,
        QueriesStub,
        SellInvoiceCommand,
        Uuid,
    )

    commands_channel = Channel(HOST, port("FINANCING_COMMANDS_PORT"))
    queries_channel = Channel(HOST, port("FINANCING_QUERIES_PORT"))
    commands, queries = CommandsStub(commands_channel), QueriesStub(queries_channel)
    began = time.monotonic()

    async def until(what: str, found: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + STORY_TIMEOUT
        while time.monotonic() < deadline:
            value = await found()
            if value:
                return value
            await asyncio.sleep(0.2)
        raise Failed(f"{what} not seen within {STORY_TIMEOUT:.0f} s")

    try:

        async def registered() -> bool:
            issuers = {i.id.value for i in (await queries.all_issuers(Empty())).issuers}
            investors = {i.id.value for i in (await queries.all_investors(Empty())).investors}
            return str(issuer) in issuers and str(investor) in investors

        await until("the issuer and investor from `financing populate`", registered)
        reply = await commands.sell_invoice(
            SellInvoiceCommand(issuer_id=Uuid(str(issuer)), asking_price=Money(amount=10))
        )
        invoice = reply.value

        async def invoice_row(status: int) -> Any:
            for row in (await queries.all_invoices(Empty())).invoices:
                if row.id.value == invoice and row.status == status:
                    return row
            return None

        await until("the invoice on sale", lambda: invoice_row(InvoiceStatus.AVAILABLE))
        await commands.bid_on_invoice(
            BidOnInvoiceCommand(
                investor_id=Uuid(str(investor)), invoice_id=Uuid(invoice), bid=Money(amount=15)
            )
        )
        row = await until("the invoice FINANCED", lambda: invoice_row(InvoiceStatus.FINANCED))
        if row.winning_bid.investor_id.value != str(investor):
            raise Failed(f"invoice {invoice} financed by {row.winning_bid.investor_id.value}")
    except Failed:
        raise
    except Exception as error:
        raise Failed(f"the story failed: {type(error).__name__}: {error}") from error
    finally:
        commands_channel.close()
        queries_channel.close()
    return f"invoice {invoice[:8]} sold and FINANCED in {time.monotonic() - began:.1f} s"


# -- the steps -------------------------------------------------------------------------------


def acceptance() -> str:
    env = {**os.environ, **deployment_env()}
    print("    " + " ".join(f"{k}={v}" for k, v in deployment_env().items()), flush=True)
    process = subprocess.Popen(
        ["make", "--no-print-directory", "acceptance", "TARGET=external"],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    tail: list[str] = []
    for line in process.stdout:
        sys.stdout.write(line)
        tail = [*tail[-20:], line.rstrip()]
    code = process.wait()
    counts = [t for t in tail if " in " in t and ("passed" in t or "failed" in t)]
    result = counts[-1] if counts else ""
    if code != 0:
        raise Failed(f"make acceptance TARGET=external exited with {code}: {result}")
    return result.strip("= ")


def restart(service: str) -> str:
    before = inspect(container(service))["StartedAt"]
    compose("restart", service)
    after = inspect(container(service))
    if after["StartedAt"] == before:
        raise Failed(f"{service} was not restarted")
    since = _moment(after["StartedAt"])
    waited = wait_healthy(service, since=since, timeout=RECOVERY_TIMEOUT)
    detail = f"{service} healthy again {waited:.1f} s after the restart"
    if service != "financing":
        # The service's own probe, run after the broker was back, must pass again.
        back = datetime.now(UTC)
        waited = wait_healthy("financing", since=back, timeout=RECOVERY_TIMEOUT)
        detail += f", financing healthy {waited:.1f} s later"
    return detail


def story_without(service: str) -> str:
    """A story while `service` (the first broker node) is stopped, the instances carrying
    on through the other nodes; then the node started again and healthy."""
    compose("stop", service)
    try:
        told = story()
    finally:
        compose("start", service)
    waited = wait_healthy(service, since=datetime.now(UTC), timeout=RECOVERY_TIMEOUT)
    return f"{told} with {service} stopped; {service} healthy again {waited:.1f} s later"


def cluster() -> str:
    """Three running nodes, and every queue of the service a quorum queue with a member on
    each: declared while the first node was alone, they stayed there alone, and the
    service stopped with that node."""
    report = compose(
        "exec",
        "-T",
        "rabbitmq",
        "rabbitmqctl",
        "-q",
        "cluster_status",
        "--formatter",
        "json",
        capture=True,
    )
    running = json.loads(report[report.index("{") :]).get("running_nodes", [])
    if len(running) != len(NODES):
        raise Failed(f"running nodes: {running}, expected {len(NODES)}")
    listed = compose(
        "exec",
        "-T",
        "rabbitmq",
        "rabbitmqctl",
        "-q",
        "list_queues",
        "name",
        "type",
        "members",
        "--formatter",
        "json",
        capture=True,
    )
    rows = json.loads(listed[listed.index("[") :])
    types = {row["name"]: row["type"] for row in rows}
    classic = sorted(name for name, kind in types.items() if kind != "quorum")
    if not types or classic:
        raise Failed(f"not quorum queues: {classic or 'no queue at all'}")
    short = {row["name"]: row["members"] for row in rows if len(row["members"]) != len(NODES)}
    if short:
        raise Failed(f"quorum queues without a member on each node: {short}")
    return f"nodes {', '.join(running)}; {len(types)} quorum queues, each on every node"


def status() -> str:
    deadline = time.monotonic() + STATUS_TIMEOUT
    while True:
        result = financing_cli("status", check=False)
        print(result.stdout + result.stderr, flush=True)
        if result.returncode == 0:
            return "healthy (exit code 0)"
        if time.monotonic() > deadline:
            raise Failed(f"financing status exited with {result.returncode}")
        time.sleep(3)


def main(argv: Sequence[str]) -> int:
    if subprocess.run([*COMPOSE, "version"], capture_output=True, check=False).returncode != 0:
        print(f"compose-check: `{shlex.join(COMPOSE)}` is not available", file=sys.stderr)
        return 2
    report = Report()
    keep = os.environ.get("COMPOSE_CHECK_KEEP") == "1"
    try:
        report.run("clean slate (down -v)", down)
        report.run("published ports free", ports_free)
        report.run("up -d --build", up)
        report.run("every healthcheck passes", wait_all_healthy)
        if PROFILE == "scale":
            report.run("a cluster of three nodes, quorum queues", cluster)
        # First: the suite reads the published instance's metrics, which the projector's
        # move to another instance (a broker node stopped) would leave behind.
        report.run("acceptance suite (TARGET=external)", acceptance)
        if PROFILE == "scale":
            report.run(
                "story with the first broker node stopped", lambda: story_without("rabbitmq")
            )
        report.run("restart the service container", lambda: restart("financing"))
        report.run("story after the service restart", story)
        report.run("restart the broker container", lambda: restart("rabbitmq"))
        report.run("story after the broker restart", story)
        report.run("financing status (in the container)", status)
    except Failed:
        print(compose("ps", check=False, capture=True))
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        if keep:
            print(f"COMPOSE_CHECK_KEEP=1: project {PROJECT} left running")
        else:
            with contextlib.suppress(Failed):
                report.run("down -v", down)
    summary = report.summary()
    print("\n" + summary)
    out = ROOT / "build" / "compose-check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "ok": report.ok,
                "started": report.started,
                "steps": [asdict(step) for step in report.steps],
            },
            indent=2,
        )
        + "\n"
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
