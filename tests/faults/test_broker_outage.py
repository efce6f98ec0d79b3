"""The service is cut off the broker under load: it says so, waits, and reconnects by itself.

Only the test's own vhost is touched (other runs share the broker): its
connections are closed, first briefly, then with guest's permissions on the
vhost revoked so that every reconnection attempt is refused. While the
service cannot enqueue, the Commands API must answer UNAVAILABLE, never OK.
Once the permissions are back the service must recover on its own, without a
restart, and every command it accepted must have had its effect.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from financing.adapters.rabbitmq import consumer, topology
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.publisher import AmqpCommandSender, Publisher
from financing.application import codec
from financing.application.messages import CreateIssuer, Message
from financing.application.ports import Envelope
from financing.application.processing import Subscription
from financing.application.read_models import InMemoryReadModels, IssuerRow
from financing.domain.events import IssuerCreatedEvent
from financing.entrypoints import projector
from financing.generated import ApproveFinancingCommand, CommandsStub, Uuid
from tests.faults.conftest import Deploy, add_figure, record_workload
from tests.faults.workload import Deployment, Workload, settle, suite_seed, verify_effects
from tests.support import infra
from tests.support.rabbitmq import private_vhost

# Longer than the Commands listener's enqueue budget (5 s), so it has to give up.
PROBE_TIMEOUT = 15.0
# Brief cuts in quick succession: the connections drop while acks are being written.
FLAPS = 10


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def close_connections(vhost: str) -> None:
    await asyncio.to_thread(
        rabbitmqctl, "close_all_connections", "--vhost", vhost, "fault injection"
    )


async def revoke(vhost: str) -> None:
    await asyncio.to_thread(rabbitmqctl, "clear_permissions", "--vhost", vhost, "guest")


async def grant(vhost: str) -> None:
    await asyncio.to_thread(
        rabbitmqctl, "set_permissions", "--vhost", vhost, "guest", ".*", ".*", ".*"
    )


async def probe_enqueue(target: Deployment) -> Status | str:
    """What the Commands API answers to a command while the broker is out of reach."""
    channel = Channel(*target.command_address)
    try:
        command = ApproveFinancingCommand(invoice_id=Uuid(str(uuid.uuid4())))
        await CommandsStub(channel).approve_financing(command, timeout=PROBE_TIMEOUT)
        return "OK"
    except GRPCError as exc:
        return exc.status
    finally:
        channel.close()


async def test_service_cut_off_the_broker_answers_unavailable_then_recovers_by_itself(
    deploy: Deploy,
) -> None:
    seed = suite_seed()
    schedule = random.Random(f"broker/{seed}")
    target = await deploy("broker")
    workload = Workload(target, seed=seed, concurrency=12)
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))
    try:
        # A brief cut: the connections drop and may come straight back.
        await asyncio.sleep(schedule.uniform(0.5, 1.5))
        await close_connections(target.vhost)

        # A long one: every reconnection is refused until permissions are back.
        await asyncio.sleep(schedule.uniform(0.5, 1.5))
        assert not running.done(), running.result()
        await revoke(target.vhost)
        try:
            await close_connections(target.vhost)
            cut_at = time.monotonic()
            answer = await probe_enqueue(target)
        finally:
            await grant(target.vhost)
        restored_at = time.monotonic()
        assert answer == Status.UNAVAILABLE, f"a command was answered {answer} without a broker"

        enough.set()
        await running
    finally:
        running.cancel()
    unavailable = [t for t in workload.stats.unavailable_at if cut_at <= t <= restored_at]
    assert target.service.running and target.starts() == 1, (
        f"the service did not survive on its own:\n{target.log_tail()}"
    )

    await settle(target)
    await verify_effects(target, workload)
    add_figure("broker connection cuts survived", 2)
    add_figure("client calls answered UNAVAILABLE without a broker", len(unavailable) + 1)
    record_workload(workload)


async def test_service_keeps_projecting_and_handling_through_a_flapping_broker(
    deploy: Deploy,
) -> None:
    """Regression: an ack written while the connection dropped could wait forever in
    aiormq; the projector waited with it and the read models froze for good."""
    seed = suite_seed()
    schedule = random.Random(f"flapping/{seed}")
    target = await deploy("flapping")
    workload = Workload(target, seed=seed, concurrency=12)
    enough = asyncio.Event()
    running = asyncio.create_task(workload.run(until=enough))
    try:
        for _ in range(FLAPS):
            await asyncio.sleep(schedule.uniform(0.05, 0.6))
            assert not running.done(), running.result()
            await close_connections(target.vhost)
        enough.set()
        await running
    finally:
        running.cancel()
    assert target.service.running and target.starts() == 1, target.log_tail()

    await settle(target, within=30)
    await verify_effects(target, workload)
    add_figure("broker connection cuts survived", FLAPS)
    record_workload(workload)


def issuer_created(issuer: uuid.UUID) -> Envelope:
    event = IssuerCreatedEvent(issuer_id=issuer)
    return Envelope(
        message_id=str(uuid.uuid4()),
        name=event.name(),
        body=codec.encode(event),
        aggregate_id=str(issuer),
    )


@pytest.fixture
def stuck_ack(monkeypatch: pytest.MonkeyPatch) -> list[aio_pika.IncomingMessage]:
    """The first ack never completes, as aiormq does when the connection dies under it;
    the list receives that message."""
    monkeypatch.setattr(projector, "ACK_TIMEOUT", 0.2, raising=False)
    monkeypatch.setattr(consumer, "ACK_TIMEOUT", 0.2, raising=False)
    original_ack = aio_pika.IncomingMessage.ack
    stuck: list[aio_pika.IncomingMessage] = []

    async def ack(message: aio_pika.IncomingMessage, *args: Any, **kwargs: Any) -> None:
        if not stuck:
            stuck.append(message)
            await asyncio.Event().wait()
        await original_ack(message, *args, **kwargs)

    monkeypatch.setattr(aio_pika.IncomingMessage, "ack", ack)
    return stuck


@dataclass(frozen=True)
class Broker:
    connection: AbstractRobustConnection
    publisher: Publisher


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """A connection and a publisher on a vhost of the test's own."""
    async with private_vhost("fin_fault_ack") as vhost:
        connection = await topology.connect(vhost.url)
        try:
            publisher = await Publisher.open(connection)
            yield Broker(connection, publisher)
            await publisher.close()
        finally:
            await connection.close()


async def test_projector_goes_on_when_an_ack_never_completes(
    stuck_ack: list[aio_pika.IncomingMessage], broker: Broker
) -> None:
    """The stuck ack of the flapping broker, made certain."""
    publisher = broker.publisher
    await topology.declare_event_queue(
        publisher.channel, projector.PROJECTOR_QUEUE, arguments=projector.QUEUE_ARGUMENTS
    )
    read_models = InMemoryReadModels()
    projecting = asyncio.create_task(
        projector.run_projector(broker.connection, read_models, DeadLetters(publisher))
    )
    try:
        first, second = uuid.uuid4(), uuid.uuid4()
        await publisher.publish_events([issuer_created(first)])

        async def ack_stuck() -> bool:
            return bool(stuck_ack)

        await infra.wait_until(ack_stuck, timeout=10, what="an ack to get stuck")
        # Projected, but its ack hangs; the next event must be projected all the same.
        await publisher.publish_events([issuer_created(second)])

        async def both_projected() -> bool:
            return await read_models.issuers() == [IssuerRow(first), IssuerRow(second)]

        await infra.wait_until(both_projected, timeout=10, what="the second issuer")
    finally:
        projecting.cancel()
        await asyncio.gather(projecting, return_exceptions=True)


async def test_command_handler_stops_promptly_though_an_ack_never_completed(
    stuck_ack: list[aio_pika.IncomingMessage], broker: Broker
) -> None:
    """Regression: the message's task waited forever for its ack, and shutting the
    consumer down took its whole grace period."""
    processed = asyncio.Event()

    async def process(envelope: Envelope, message: Message) -> None:
        processed.set()

    subscription = Subscription("CreateIssuer", "CreateIssuer", False, process)
    consuming = asyncio.create_task(
        consumer.run_subscription(
            broker.connection, subscription, DeadLetters(broker.publisher), shutdown_grace=30
        )
    )
    try:
        await AmqpCommandSender(broker.publisher).send(CreateIssuer(id=uuid.uuid4()), uuid.uuid4())
        await asyncio.wait_for(processed.wait(), 10)

        async def ack_stuck() -> bool:
            return bool(stuck_ack)

        await infra.wait_until(ack_stuck, timeout=10, what="an ack to get stuck")
    finally:
        consuming.cancel()
        started = time.monotonic()
        await asyncio.gather(consuming, return_exceptions=True)
    assert time.monotonic() - started < 5, "the consumer waited for an ack that never came"
