"""A throwaway local deployment: fresh databases and vhost, `financing serve` on free ports.

The one way the acceptance suite, the fault suite, the demo and the
benchmark stand the service up, and take it down again: SIGTERM, exit code 0
expected, databases and vhost removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from financing.config import Database
from tests.support import infra
from tests.support.service import ServiceProcess, free_port, storm_command


@dataclass(frozen=True)
class LocalDeployment:
    name: str  # also the name of its vhost
    command_db: Database
    query_db: Database
    amqp_url: str
    command_address: tuple[str, int]
    query_address: tuple[str, int]
    metrics_address: tuple[str, int]
    env: dict[str, str]
    service: ServiceProcess


BeforeStart = Callable[[LocalDeployment], Awaitable[None]]


def service_role(name: str) -> str:
    """The role of its own the service of deployment `name` connects as (`own_role`)."""
    return f"{name}_service"


def service_env(
    command_db: Database,
    query_db: Database,
    amqp_url: str,
    command_address: tuple[str, int],
    query_address: tuple[str, int],
    metrics_address: tuple[str, int],
) -> dict[str, str]:
    """The contract's environment for a deployment (and for CLI runs beside it)."""
    commands = command_db.connect_kwargs
    return {
        **os.environ,
        "COMMAND_SERVER_ADDRESS": f"{command_address[0]}:{command_address[1]}",
        "QUERY_SERVER_ADDRESS": f"{query_address[0]}:{query_address[1]}",
        "METRICS_ADDRESS": f"{metrics_address[0]}:{metrics_address[1]}",
        # The event store in libpq keyword form, the read models as a URL:
        # the contract accepts both, so both are exercised.
        "COMMAND_DB_CONNECTION_STRING": (
            f"host={commands['host']} port={commands['port']} user={commands['user']}"
            f" dbname={commands['database']} pool_max_conns=8"
        ),
        "QUERY_DB_CONNECTION_STRING": query_db.dsn(),
        "AMQP_ADDRESS": amqp_url,
        "LOGGER_LEVEL": "INFO",
        # A command naming an aggregate nobody creates is dead-lettered after about 3 s
        # (deferred twice), not the minute a deployment waits by default.
        "FINANCING_AGGREGATE_WAIT": "2",
    }


@contextlib.asynccontextmanager
async def local_deployment(
    prefix: str,
    *,
    extra_env: Mapping[str, str] | None = None,
    before_start: BeforeStart | None = None,
    name: str | None = None,
    redeliveries: int = 1,
    database_via: tuple[str, int] | None = None,
    own_role: bool = False,
) -> AsyncIterator[LocalDeployment]:
    """A started service of its own; on exit it must stop with exit code 0 on SIGTERM.

    `before_start` runs once the databases and vhost exist, before the
    service starts (to bind a listening queue, or declare legacy queues).
    `redeliveries` > 1 runs the service under a redelivery storm
    (tests.support.storm). `database_via` is where the service reaches PostgreSQL
    when not directly (a relay, tests.support.relay); the suite's own connections
    go straight to the server. `own_role`: the service connects as a role of its own,
    granted only what running it needs (`infra.grant_service_role`), its schemas
    migrated by their owner first.
    The service log is deleted when the block ends without an error.
    """
    name = name or infra.unique_name(prefix)
    async with contextlib.AsyncExitStack() as stack:
        role = service_role(name) if own_role else None
        if role is not None:  # dropped once its databases are
            await infra.create_role(role)
            stack.push_async_callback(infra.drop_role, role)
        command_db = await infra.create_database(f"{name}_commands")
        stack.push_async_callback(infra.drop_database, f"{name}_commands")
        query_db = await infra.create_database(f"{name}_queries")
        stack.push_async_callback(infra.drop_database, f"{name}_queries")
        amqp_url = await asyncio.to_thread(infra.create_vhost, name)
        stack.push_async_callback(asyncio.to_thread, infra.delete_vhost, name)

        command_address = ("127.0.0.1", free_port())
        query_address = ("127.0.0.1", free_port())
        metrics_address = ("127.0.0.1", free_port())

        def reached(db: Database) -> Database:
            """How the service reaches `db`: through `database_via`, as `role`."""
            host, port = database_via or (db.connect_kwargs["host"], db.connect_kwargs["port"])
            user = role or db.connect_kwargs["user"]
            return replace(
                db, connect_kwargs={**db.connect_kwargs, "host": host, "port": port, "user": user}
            )

        env = {
            **service_env(
                reached(command_db),
                reached(query_db),
                amqp_url,
                command_address,
                query_address,
                metrics_address,
            ),
            **(extra_env or {}),
        }
        log_path = Path(tempfile.gettempdir()) / f"{name}.service.log"
        command = storm_command(redeliveries) if redeliveries > 1 else None
        service = ServiceProcess(env, log_path, command=command)
        stack.push_async_callback(service.kill)  # acts only when the orderly stop did not run
        deployment = LocalDeployment(
            name,
            command_db,
            query_db,
            amqp_url,
            command_address,
            query_address,
            metrics_address,
            env,
            service,
        )
        if role is not None:
            await infra.grant_service_role(command_db, "commands", role)
            await infra.grant_service_role(query_db, "queries", role)
        if before_start is not None:
            await before_start(deployment)
        await service.start()
        yield deployment
        if service.running:
            # A component that crashed earlier shows here as a non-zero exit code.
            code = await service.stop()
            assert code == 0, (
                f"financing serve exited with {code} on SIGTERM; log:\n{service.log_tail()}"
            )
        log_path.unlink(missing_ok=True)  # kept only when something failed
