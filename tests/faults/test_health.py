"""Health follows the dependencies: NOT_SERVING within seconds of losing one, SERVING once back.

Checked with grpcio's health-checking client (tests.support.foreign_grpc), as a
load balancer or an orchestrator would, while the broker refuses the service,
while the query database refuses connections, and while the service drains.
"""

from __future__ import annotations

import asyncio
import sys
import time

from h2.errors import ErrorCodes

from tests.faults.conftest import Deploy, add_figure, set_figure
from tests.faults.test_broker_outage import close_connections, grant, revoke
from tests.faults.test_database_outage import set_connections_allowed, terminate_sessions
from tests.support import foreign_grpc, infra
from tests.support.metrics import health_code
from tests.support.raw_h2 import EMPTY_MESSAGE, HEALTH_CHECK, RawConnection
from tests.support.service import ROOT, reap, run_cli

# "Within a few seconds": the probes run every second and time out after two.
NOTICED_WITHIN = 6.0
BACK_WITHIN = 10.0


async def status(address: tuple[str, int], service: str) -> object:
    answer = await foreign_grpc.run("check", f"{address[0]}:{address[1]}", service)
    return answer.get("status")


async def becomes(address: tuple[str, int], service: str, wanted: str, within: float) -> float:
    """Seconds until `service` on `address` reports `wanted`."""
    began = time.monotonic()

    async def reached() -> bool:
        return await status(address, service) == wanted

    await infra.wait_until(reached, timeout=within, interval=0.2, what=f"{service} {wanted}")
    return time.monotonic() - began


async def test_commands_is_not_serving_while_the_broker_refuses_the_service(
    deploy: Deploy,
) -> None:
    target = await deploy("health_broker")
    address = target.command_address
    assert await status(address, "Commands") == "SERVING"
    await revoke(target.vhost)
    try:
        await close_connections(target.vhost)
        noticed = await becomes(address, "Commands", "NOT_SERVING", NOTICED_WITHIN)
        assert await status(address, "") == "NOT_SERVING"
        assert await status(target.query_address, "Queries") == "SERVING"  # needs no broker
    finally:
        await grant(target.vhost)
    back = await becomes(address, "Commands", "SERVING", BACK_WITHIN)
    add_figure("health outages seen and ended", 1)
    set_figure("health: seconds to NOT_SERVING after the broker went", round(noticed, 1))
    set_figure("health: seconds to SERVING after the broker came back", round(back, 1))


async def test_queries_is_not_serving_while_its_database_refuses_connections(
    deploy: Deploy,
) -> None:
    target = await deploy("health_queries")
    _, queries_db = target.databases
    address = target.query_address
    assert await status(address, "Queries") == "SERVING"
    await set_connections_allowed(queries_db, False)
    try:
        await terminate_sessions([queries_db], wait=True)
        await becomes(address, "Queries", "NOT_SERVING", NOTICED_WITHIN)
        assert await status(target.command_address, "Commands") == "SERVING"
    finally:
        await set_connections_allowed(queries_db, True)
    await becomes(address, "Queries", "SERVING", BACK_WITHIN)
    await target.query_pool.expire_connections()
    add_figure("health outages seen and ended", 1)


async def test_a_queue_the_broker_will_not_let_be_consumed_is_one_steady_outage(
    deploy: Deploy,
) -> None:
    """Regression: the consumer's refusal was taken for the broker's outage, which the
    broker's own check ended every second: /health flapped between 200 and 503, and the
    log said "broker unavailable" and "broker reconnected" about once a second."""
    target = await deploy("health_queue")
    address = target.metrics_address
    assert await asyncio.to_thread(health_code, address) == 200
    await grant(target.vhost, read="^(?!SellInvoice$).*")  # SellInvoice cannot be consumed
    try:
        await close_connections(target.vhost)  # so that every consumer consumes again

        async def down() -> bool:
            return await asyncio.to_thread(health_code, address) == 503

        await infra.wait_until(down, timeout=NOTICED_WITHIN, interval=0.2, what="/health 503")
        # Steady over several rounds of the outage check (every second).
        answers: list[int] = []
        watched_until = time.monotonic() + 4.0

        async def watched() -> bool:
            answers.append(await asyncio.to_thread(health_code, address))
            return time.monotonic() > watched_until

        await infra.wait_until(watched, timeout=10.0, interval=0.2, what="4 s of /health")
        assert set(answers) == {503}, answers
    finally:
        await grant(target.vhost)

    async def up() -> bool:
        return await asyncio.to_thread(health_code, address) == 200

    await infra.wait_until(up, timeout=BACK_WITHIN, interval=0.2, what="/health 200")
    events = [str(line.get("event")) for line in target.service.log_lines()]
    assert events.count("queue SellInvoice unavailable") == 1, target.log_tail()
    assert events.count("queue SellInvoice recovered") == 1, target.log_tail()
    # The connections closed above: one outage of the broker at most, not one a second.
    assert events.count("broker unavailable") <= 1, target.log_tail()
    assert events.count("broker reconnected") <= 1, target.log_tail()


async def test_at_shutdown_a_watch_call_ends_and_every_connection_is_sent_away(
    deploy: Deploy,
) -> None:
    """Regression (the connections): grpclib closed its listeners alone; a client's
    connection stayed open until the process ended, was then reset by the kernel instead
    of told, and each left a ResourceWarning of a transport never closed."""
    # Warnings of resources never closed are shown (Python leaves them out by default).
    target = await deploy("health_drain", {"PYTHONWARNINGS": "always::ResourceWarning"})
    host, port = target.command_address
    watcher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.foreign_grpc",
        "watch",
        f"{host}:{port}",
        "Commands",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert watcher.stdout is not None
    stopping: asyncio.Task[int] | None = None
    try:
        async with RawConnection.open(target.query_address) as idle:
            answer = await idle.answered(idle.call(HEALTH_CHECK.encode(), EMPTY_MESSAGE))
            assert answer.get(b"grpc-status") == b"0", answer
            first = await asyncio.wait_for(watcher.stdout.readline(), 10)
            assert first.decode().strip() == "SERVING"
            stopping = asyncio.create_task(target.service.stop())
            assert await idle.sent_away(ErrorCodes.NO_ERROR) == b""
            await idle.until(lambda: False)  # until the server closes it
            assert idle.closed
            assert await stopping == 0
        rest, _ = await asyncio.wait_for(watcher.communicate(), 30)
    finally:
        if stopping is not None:
            await asyncio.gather(stopping, return_exceptions=True)
        await reap(watcher)
    statuses = rest.decode().splitlines()
    # Told, and then its call ended with a status (grpclib's went on until the
    # connection's close cut it).
    assert statuses == ["NOT_SERVING", "ended UNAVAILABLE: the service is shutting down"], statuses
    warned = [line for line in target.service.log_lines() if "ResourceWarning" in str(line)]
    assert warned == []


async def test_the_container_probe_passes_while_healthy_and_fails_once_the_service_is_gone(
    deploy: Deploy,
) -> None:
    target = await deploy("health_probe")
    healthy = await run_cli(target.service.env, "health-check")
    assert healthy.exit_code == 0, healthy.describe()
    assert await target.service.stop() == 0
    gone = await run_cli(target.service.env, "health-check")
    assert gone.exit_code == 1, gone.describe()
    assert "Commands" in gone.stderr and "metrics endpoint" in gone.stderr, gone.describe()
