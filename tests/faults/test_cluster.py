"""A three-node RabbitMQ cluster with quorum queues: one node stopped under load and
started again loses nothing and applies nothing twice.

Two instances of the service run on one PostgreSQL, each given every node of the cluster
in `AMQP_ADDRESS`, the first node first for one and the second node first for the other,
so they start connected to different nodes. `FINANCING_QUEUE_TYPE=quorum` replicates every
queue on the three nodes. Concurrent sagas run while the first node's broker application
is stopped (`rabbitmqctl stop_app`) and started again; the instance connected to it moves
to another node. Afterwards every saga ended as planned, the invariants hold and the read
models equal a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from financing.adapters.rabbitmq import topology
from financing.config import Database
from tests.faults.conftest import add_figure, record_workload, set_figure
from tests.faults.workload import (
    Deployment,
    Workload,
    more_sagas,
    observer_pool,
    settle,
    suite_seed,
    under_load,
    verify_effects,
)
from tests.support import infra
from tests.support.cluster import Node, await_running, rabbitmq_cluster, rabbitmqctl
from tests.support.deployment import service_env
from tests.support.service import ServiceProcess, free_port


def instance(
    name: str, command_db: Database, query_db: Database, nodes: list[Node]
) -> ServiceProcess:
    addresses = [("127.0.0.1", free_port()) for _ in range(3)]
    env = service_env(command_db, query_db, ",".join(node.url for node in nodes), *addresses)
    env |= {"FINANCING_QUEUE_TYPE": "quorum", "FINANCING_SNAPSHOT_INTERVAL": "5"}
    return ServiceProcess(env, Path(tempfile.gettempdir()) / f"{name}.service.log")


@contextlib.asynccontextmanager
async def clustered_deployment(
    nodes: list[Node],
) -> AsyncIterator[tuple[Deployment, ServiceProcess]]:
    """Two instances on the cluster, started; the first as the target the workload drives."""
    name = infra.unique_name("fin_fault_cluster")
    async with contextlib.AsyncExitStack() as stack:
        command_db = await infra.create_database(f"{name}_commands")
        stack.push_async_callback(infra.drop_database, f"{name}_commands")
        query_db = await infra.create_database(f"{name}_queries")
        stack.push_async_callback(infra.drop_database, f"{name}_queries")
        first = instance(f"{name}.1", command_db, query_db, nodes)
        second = instance(f"{name}.2", command_db, query_db, [nodes[1], nodes[2], nodes[0]])
        for service in (first, second):
            stack.push_async_callback(service.kill)  # acts only when the orderly stop did not
            await service.start()
        event_pool = await observer_pool(command_db)
        stack.push_async_callback(event_pool.close)
        query_pool = await observer_pool(query_db)
        stack.push_async_callback(query_pool.close)
        env = first.env
        target = Deployment(
            name=name,
            vhost="/",
            # The workload's integration events go through the node that stays up.
            amqp_url=nodes[2].url,
            command_db=command_db,
            query_db=query_db,
            command_address=_address(env["COMMAND_SERVER_ADDRESS"]),
            query_address=_address(env["QUERY_SERVER_ADDRESS"]),
            metrics_address=_address(env["METRICS_ADDRESS"]),
            service=first,
            event_pool=event_pool,
            query_pool=query_pool,
        )
        yield target, second
        for service in (second, first):
            assert await service.stop() == 0, service.log_tail()
            service.log_path.unlink(missing_ok=True)


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


async def test_a_cluster_node_stopped_under_load_loses_nothing_and_doubles_nothing() -> None:
    seed = suite_seed()
    async with (
        rabbitmq_cluster(3) as nodes,
        clustered_deployment(nodes) as (target, second),
    ):
        queue_types = await asyncio.to_thread(
            rabbitmqctl, nodes[0], "list_queues", "name", "type", "--quiet"
        )
        assert "classic" not in queue_types and "quorum" in queue_types, queue_types
        workload = Workload(target, seed=seed, concurrency=16)
        async with under_load(workload) as running:
            await more_sagas(workload, running, 10)
            stopped = time.monotonic()
            await asyncio.to_thread(rabbitmqctl, nodes[0], "stop_app")
            await more_sagas(workload, running, 10)  # on the two other nodes
            set_figure(
                "cluster: seconds from stopping a node to 10 more sagas done",
                round(time.monotonic() - stopped, 1),
            )
            await asyncio.to_thread(rabbitmqctl, nodes[0], "start_app")
            await await_running(nodes[0])
            await more_sagas(workload, running, 10)
        await settle(target)
        await verify_effects(target, workload)
        assert second.running, second.log_tail()
        moved = [
            line
            for line in target.service.log_lines() + second.log_lines()
            if line.get("event") == "broker reconnected"
        ]
        assert moved, "no instance reconnected: neither was on the stopped node"
        # Their queues all there on the nodes it moved to: none said missing.
        assert not [
            line
            for line in target.service.log_lines() + second.log_lines()
            if line.get("event") == topology.REOPENED_WITHOUT
        ]
    record_workload(workload)
    add_figure("cluster nodes stopped and started under load", 1)
