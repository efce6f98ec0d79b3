"""A RabbitMQ cluster of three nodes of its own on this machine, for the tests that stop one.

Each node is `rabbitmq-server` as installed here, run as the `rabbitmq` user (so the
nodes and `rabbitmqctl` share its Erlang cookie), with its own node name, AMQP and
distribution ports, configuration, data and log directories under a temporary
directory, and no plugins. The machine's own broker (`rabbit@localhost`) is not
touched. The second and third nodes join the first; on exit every node is stopped
and its directory removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.infra import unique_name, wait_until
from tests.support.service import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_HOME = "/var/lib/rabbitmq"


@dataclass(frozen=True)
class Node:
    name: str  # the Erlang node name, for rabbitmqctl -n
    port: int  # AMQP
    directory: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


def rabbitmqctl(node: Node, *args: str, timeout: float = 120.0) -> str:
    """Run rabbitmqctl against `node` (as the rabbitmq user); its output, or an error."""
    done = subprocess.run(
        ["rabbitmqctl", "-n", node.name, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"rabbitmqctl -n {node.name} {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def _start(node: Node) -> None:
    directory = node.directory
    directory.mkdir(parents=True)
    (directory / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{node.port}\nloopback_users = none\n"
    )
    (directory / "enabled_plugins").write_text("[].\n")
    shutil.chown(directory, "rabbitmq")
    for child in directory.iterdir():
        shutil.chown(child, "rabbitmq")
    env = {
        "HOME": RABBITMQ_HOME,
        "RABBITMQ_NODENAME": node.name,
        "RABBITMQ_NODE_PORT": str(node.port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(directory / "pid"),
    }
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    script = f"cd {RABBITMQ_HOME} && {assignments} {RABBITMQ_BIN / 'rabbitmq-server'} -detached"
    subprocess.run(["su", "rabbitmq", "-s", "/bin/sh", "-c", script], check=True, timeout=60)


def _running(node: Node) -> bool:
    try:
        rabbitmqctl(node, "await_startup", "--timeout", "5", timeout=30)
    except AssertionError:
        return False
    return True


async def await_running(node: Node, within: float = 90.0) -> None:
    async def running() -> bool:
        return await asyncio.to_thread(_running, node)

    await wait_until(running, timeout=within, interval=0.5, what=f"node {node.name} running")


def _stop(node: Node) -> None:
    with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
        rabbitmqctl(node, "stop", timeout=60)


@contextlib.asynccontextmanager
async def rabbitmq_cluster(size: int = 3) -> AsyncIterator[list[Node]]:
    base = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="fin_cluster_"))
    await asyncio.to_thread(base.chmod, 0o755)
    prefix = unique_name("fin")
    nodes = [
        Node(f"{prefix}_{number}@localhost", free_port(), base / f"node{number}")
        for number in range(1, size + 1)
    ]
    try:
        for node in nodes:
            await asyncio.to_thread(_start, node)
        for node in nodes:
            await await_running(node)
        for node in nodes[1:]:
            await asyncio.to_thread(rabbitmqctl, node, "stop_app")
            await asyncio.to_thread(rabbitmqctl, node, "join_cluster", nodes[0].name)
            await asyncio.to_thread(rabbitmqctl, node, "start_app")
        yield nodes
    finally:
        for node in nodes:
            await asyncio.to_thread(_stop, node)
        shutil.rmtree(base, ignore_errors=True)
