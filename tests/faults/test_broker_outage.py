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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiormq
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from financing.adapters.postgres.read_models import PostgresReadModels
from financing.adapters.rabbitmq import consumer, topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.consumer import Deliveries, QueueConsumer, consume
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.publisher import AmqpCommandSender, Publisher
from financing.application import codec
from financing.application.messages import CreateIssuer, IssuerRegistered
from financing.application.moments import moment
from financing.application.pipeline import Decoded, Outcome, OutcomeKind
from financing.application.ports import Cause, Envelope
from financing.application.read_models import InMemoryReadModels, IssuerRow
from financing.application.retry import DELIVERIES, Outages
from financing.domain.events import IssuerCreatedEvent
from financing.generated import (
    CommandsStub,
    Money,
    SellInvoiceCommand,
    Uuid,
)
from financing.workers.projector import Projector
from tests.faults.conftest import Deploy, add_figure, record_workload, set_figure
from tests.faults.workload import (
    Deployment,
    IntegrationPublisher,
    Workload,
    assert_outages_logged_once,
    enqueue_one,
    errors_logged,
    settle,
    suite_seed,
    verify_effects,
)
from tests.support import infra
from tests.support.rabbitmq import private_vhost

# Longer than the Commands listener's enqueue budget (5 s), so it has to give up.
PROBE_TIMEOUT = 15.0
# Brief cuts in quick succession: the connections drop while acks are being written.
FLAPS = 10


# Once the broker lets the service in again, commands must be taken and applied within this.
HEALING_DEADLINE = 10.0


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def close_connections(vhost: str) -> None:
    await asyncio.to_thread(
        rabbitmqctl, "close_all_connections", "--vhost", vhost, "fault injection"
    )


async def revoke(vhost: str) -> None:
    await asyncio.to_thread(rabbitmqctl, "clear_permissions", "--vhost", vhost, "guest")


async def grant(vhost: str, *, read: str = ".*") -> None:
    """Permissions for guest on `vhost`: all, or reading only the queues `read` matches."""
    await asyncio.to_thread(
        rabbitmqctl, "set_permissions", "--vhost", vhost, "guest", ".*", ".*", read
    )


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
            answer = await enqueue_one(target, timeout=PROBE_TIMEOUT)
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
    refusals = await assert_outages_logged_once(
        target, "broker", ["broker unavailable", "broker reconnected"], refused=True
    )
    # Reconnections refused while the permissions were revoked: said, once, as the broker
    # said it (the outage line named the connections closed alone).
    assert [error for error, _ in refusals if "NOT_ALLOWED" in error], refusals
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
    assert not errors_logged(target), errors_logged(target)
    add_figure("broker connection cuts survived", FLAPS)
    record_workload(workload)


@dataclass(frozen=True)
class OtherUser:
    """A broker user of the test's own, so that the test keeps publishing while guest is refused."""

    name: str
    url: str


@pytest.fixture
async def other_user(deploy: Deploy) -> AsyncIterator[OtherUser]:
    name = infra.unique_name("fin_fault_user")
    await asyncio.to_thread(rabbitmqctl, "add_user", name, name)
    try:
        yield OtherUser(name, f"amqp://{name}:{name}@{infra.AMQP_HOST}:{infra.AMQP_PORT}/")
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", name)


async def sell(target: Deployment, issuer: uuid.UUID, *, timeout: float) -> uuid.UUID | Status:  # noqa: ASYNC109
    """SellInvoice through the Commands API: the new invoice's id, or the status of the failure."""
    channel = Channel(*target.command_address)
    try:
        command = SellInvoiceCommand(issuer_id=Uuid(str(issuer)), asking_price=Money(10.0))
        reply = await CommandsStub(channel).sell_invoice(command, timeout=timeout)
        return uuid.UUID(reply.value)
    except GRPCError as exc:
        return exc.status
    finally:
        channel.close()


async def test_a_short_permission_outage_heals_by_itself_within_ten_seconds(
    deploy: Deploy, other_user: OtherUser
) -> None:
    """Guest's permissions on the vhost are revoked for a few seconds, without closing any
    connection: the broker closes the channels it refuses. Regression: the publisher's
    channel stayed closed for good, every SellInvoice then answered UNAVAILABLE and the
    integration event being handled stayed unacked, until the process was restarted."""
    target = await deploy("permissions")
    vhost = target.vhost
    await asyncio.to_thread(
        rabbitmqctl, "set_permissions", "--vhost", vhost, other_user.name, ".*", ".*", ".*"
    )
    registering = IntegrationPublisher(other_user.url.rstrip("/") + "/" + vhost)
    read_models = PostgresReadModels(target.query_pool)
    first, second = uuid.uuid4(), uuid.uuid4()

    async def registered(issuer: uuid.UUID) -> bool:
        return IssuerRow(issuer) in await read_models.issuers()

    async def published(issuer: uuid.UUID) -> None:
        event = IssuerRegistered(id=issuer, name_="outage")
        await registering.publish(
            Envelope(message_id=str(uuid.uuid4()), name=event.name(), body=codec.encode(event))
        )

    schedule = random.Random(f"permissions/{suite_seed()}")
    try:
        await published(first)
        await infra.wait_until(lambda: registered(first), what="the first issuer")
        await revoke(vhost)
        try:
            in_flight = asyncio.create_task(sell(target, first, timeout=PROBE_TIMEOUT))
            await published(second)  # handled while the service cannot send CreateIssuer
            outage = schedule.uniform(3, 6)
            await asyncio.sleep(outage)  # the outage itself, not a wait for a condition
        finally:
            await grant(vhost)
        restored_at = time.monotonic()

        async def accepted() -> uuid.UUID | None:
            answer = await sell(target, first, timeout=2)
            return answer if isinstance(answer, uuid.UUID) else None

        invoice = await infra.wait_until(
            accepted, timeout=HEALING_DEADLINE, interval=0.2, what="a SellInvoice answered OK"
        )
        accepted_after = time.monotonic() - restored_at

        async def applied() -> bool:
            return any(row.id == invoice for row in await read_models.invoices())

        await infra.wait_until(applied, timeout=HEALING_DEADLINE, what="the invoice to be stored")
        await infra.wait_until(
            lambda: registered(second),
            timeout=HEALING_DEADLINE,
            what="the issuer registered during the outage",
        )
        healed_after = time.monotonic() - restored_at
        answer = await in_flight
        if isinstance(answer, uuid.UUID):  # accepted before the refusal: it must not be lost

            async def kept() -> bool:
                return any(row.id == answer for row in await read_models.invoices())

            await infra.wait_until(kept, what="the invoice accepted as the outage began")
        else:
            assert answer is Status.UNAVAILABLE, answer
    finally:
        await registering.close()
    assert target.service.running and target.starts() == 1, target.log_tail()
    # The broker refused channels' work and kept the connection: no reconnection to speak of.
    await assert_outages_logged_once(target, "broker", ["broker unavailable", "broker recovered"])
    add_figure("broker permission outages healed", 1)
    set_figure("permission outage: seconds to first SellInvoice OK", round(accepted_after, 2))
    set_figure("permission outage: seconds until everything applied", round(healed_after, 2))


def issuer_created(issuer: uuid.UUID) -> Envelope:
    event = IssuerCreatedEvent(issuer_id=issuer)
    return Envelope(
        message_id=str(uuid.uuid4()),
        name=event.name(),
        body=codec.encode(event),
        aggregate_id=str(issuer),
    )


@pytest.fixture
def stuck_ack(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first ack frame never completes, as aiormq's does when the connection dies
    under it; the list receives its delivery tag."""
    monkeypatch.setattr(consumer, "ACK_TIMEOUT", 0.2, raising=False)
    original_ack = aiormq.Channel.basic_ack
    stuck: list[int] = []

    async def basic_ack(channel: aiormq.Channel, delivery_tag: int, *args: Any, **kw: Any) -> None:
        if not stuck:
            stuck.append(delivery_tag)
            await asyncio.Event().wait()
        await original_ack(channel, delivery_tag, *args, **kw)

    monkeypatch.setattr(aiormq.Channel, "basic_ack", basic_ack)
    return stuck


@dataclass(frozen=True)
class BrokerSide:
    broker: Broker
    publisher: Publisher
    dead_letters: DeadLetters
    outages: Outages


@pytest.fixture
async def broker_side() -> AsyncIterator[BrokerSide]:
    """A connection and a publisher on a vhost of the test's own."""
    async with private_vhost("fin_fault_ack") as vhost:
        outages = Outages()
        broker = Broker([vhost.url], outages)
        publisher = Publisher(broker)
        try:
            yield BrokerSide(
                broker, publisher, DeadLetters(publisher, outages, DELIVERIES), outages
            )
        finally:
            await publisher.close()
            await broker.close()


async def ack_stuck(stuck: list[int]) -> None:
    async def stuck_yet() -> bool:
        return bool(stuck)

    await infra.wait_until(stuck_yet, timeout=10, what="an ack to get stuck")


async def test_projector_goes_on_when_an_ack_never_completes(
    stuck_ack: list[int], broker_side: BrokerSide
) -> None:
    """The stuck ack of the flapping broker, made certain."""
    read_models = InMemoryReadModels()
    projector = Projector(read_models, broker_side.outages)
    queue = QueueConsumer(
        broker_side.broker,
        topology.PROJECTOR.queue,
        broker_side.dead_letters,
        broker_side.outages,
        projector.receive,
        prefetch=projector.batch_size,
    )
    projecting = [asyncio.create_task(queue.run()), asyncio.create_task(projector.run())]
    try:
        await infra.wait_until(lambda: _set(queue.consuming), what="the projector to consume")
        first, second = uuid.uuid4(), uuid.uuid4()
        await broker_side.publisher.publish_events([issuer_created(first)])
        await ack_stuck(stuck_ack)
        # Projected, but its ack hangs; the next event must be projected all the same.
        await broker_side.publisher.publish_events([issuer_created(second)])

        async def both_projected() -> bool:
            return await read_models.issuers() == [IssuerRow(first), IssuerRow(second)]

        await infra.wait_until(both_projected, timeout=10, what="the second issuer")
    finally:
        for task in projecting:
            task.cancel()
        await asyncio.gather(*projecting, return_exceptions=True)
        await queue.close()


async def _set(event: asyncio.Event) -> bool:
    return event.is_set()


async def test_command_handler_stops_promptly_though_an_ack_never_completed(
    stuck_ack: list[int], broker_side: BrokerSide
) -> None:
    """Regression: the message's task waited forever for its ack, and shutting the
    consumer down took its whole grace period."""
    processed = asyncio.Event()

    async def handler(message: Decoded) -> Outcome:
        processed.set()
        return Outcome(OutcomeKind.PROCESSED)

    subscription = topology.subscription(CreateIssuer.name())
    step = subscription.step(
        handler,
        policy=DELIVERIES,
        outages=broker_side.outages,
    )
    deliveries = Deliveries(step, shutdown_grace=30)
    queue = QueueConsumer(
        broker_side.broker,
        subscription.queue,
        broker_side.dead_letters,
        broker_side.outages,
        deliveries.receive,
        prefetch=8,
    )
    consuming = asyncio.create_task(consume(queue, deliveries))
    try:
        sender = AmqpCommandSender(broker_side.publisher)
        message_id = uuid.uuid4()
        await sender.send(
            CreateIssuer(id=uuid.uuid4()), message_id, Cause(str(message_id), str(message_id))
        )
        await asyncio.wait_for(processed.wait(), 10)
        await ack_stuck(stuck_ack)
    finally:
        consuming.cancel()
        started = time.monotonic()
        await asyncio.gather(consuming, return_exceptions=True)
    assert time.monotonic() - started < 5, "the consumer waited for an ack that never came"


# The queues the tests of a queue found missing delete: one of domain events, a command
# queue, one of Registering's events.
DELETED = (topology.PROJECTOR_QUEUE, "SellInvoice", "events_IssuerRegistered")
# The queues nobody consumes, and what is said of one deleted under the service.
UNCONSUMED = (topology.DEAD_LETTER_QUEUE, topology.DEFERRALS)
RESTORED = (
    "a queue of the service was deleted under it, with what it held; declared again (an"
    " operator, or a policy's `expires`: keep such policies off it)"
)


async def _said_missing(
    said: Callable[[], list[dict[str, Any]]], deleted: Sequence[str], last_projected: datetime
) -> None:
    """Each queue of `deleted` said missing once, with who must send what it held again:
    the events by the rewind from a minute before the last projected."""
    await infra.wait_until(
        lambda: infra.holds(len(said()) == len(deleted)), what="the queues missing said"
    )
    lines = {line["queue"]: line for line in said()}
    assert set(lines) == set(deleted), lines
    projector = lines[topology.PROJECTOR_QUEUE]
    assert projector["last_processed_recorded_at"] == moment(last_projected), projector
    since = moment(last_projected - timedelta(minutes=1))
    assert f"financing relay rewind --since {since}" in projector["events"], projector
    assert "their clients must send them again" in lines["SellInvoice"]["messages"]
    assert "publish them again" in lines["events_IssuerRegistered"]["messages"]


async def test_a_queue_deleted_while_the_service_was_cut_off_the_broker_is_said_as_it_reconnects(
    deploy: Deploy,
) -> None:
    """Regression: a queue deleted while the service's broker connection was down (a
    broker that lost its queues, an operator) was declared again by the first channel on
    the new connection with nothing said, what it held lost to its consumer. A queue its
    consumer's records say it consumed before is said as the connection is opened again,
    before anything declares it; a connection opened again with every queue there says
    nothing."""
    target = await deploy("deleted_while_cut_off")

    def said() -> list[dict[str, Any]]:
        return [line for line in target.json_log() if line["event"] == topology.REOPENED_WITHOUT]

    def reconnected() -> int:
        return [event for _, event in target.outage_lines("broker")].count("broker reconnected")

    workload = Workload(target, seed=suite_seed(), concurrency=2)
    await workload.run(sagas=2)
    await settle(target)
    await close_connections(target.vhost)  # every queue still there
    await infra.wait_until(lambda: infra.holds(reconnected() == 1), what="a reconnection")
    read_models = PostgresReadModels(target.query_pool)
    last_projected = await read_models.last_projected_recorded_at(datetime.now(UTC))
    assert last_projected is not None

    await _deleted_while_cut_off(target, DELETED)
    await _said_missing(said, DELETED, last_projected)
    assert reconnected() == 2
    await settle(target)
    await verify_effects(target, workload)


async def _deleted_while_cut_off(target: Deployment, queues: Sequence[str]) -> None:
    """`queues` deleted while the service is cut off the broker (its permissions revoked,
    its connections closed), then the permissions given back."""
    await revoke(target.vhost)
    try:
        await close_connections(target.vhost)
        await infra.wait_until(
            lambda: infra.holds(
                [event for _, event in target.outage_lines("broker")].count("broker unavailable")
                == 2
            ),
            what="the service cut off the broker",
        )
        for queue in queues:
            await asyncio.to_thread(rabbitmqctl, "delete_queue", "--vhost", target.vhost, queue)
    finally:
        await grant(target.vhost)


async def test_a_queue_nobody_consumes_deleted_while_cut_off_is_said_and_made_again(
    deploy: Deploy,
) -> None:
    """Regression (a probe): the dead letters' and the deferrals' queues, deleted while the
    service's broker connection was down, were declared again with nothing said, the
    dead letters and deferred commands they held lost. Each is declared again as the
    connection is opened again, and said once."""
    target = await deploy("unconsumed_deleted_while_cut_off")

    def restored() -> list[str]:
        return [line["queue"] for line in target.json_log() if line["event"] == RESTORED]

    await close_connections(target.vhost)  # the first outage, with every queue there
    await infra.wait_until(
        lambda: infra.holds(
            [event for _, event in target.outage_lines("broker")].count("broker reconnected") == 1
        ),
        what="a reconnection",
    )
    await _deleted_while_cut_off(target, UNCONSUMED)
    await infra.wait_until(
        lambda: infra.holds(sorted(restored()) == sorted(UNCONSUMED)),
        what="the queues nobody consumes said restored",
    )
    listed = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_queues", "--vhost", target.vhost, "name"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert set(UNCONSUMED) <= set(listed.stdout.split()), listed.stdout  # there again
    workload = Workload(target, seed=suite_seed(), concurrency=2)
    await workload.run(sagas=2)
    await settle(target)
    await verify_effects(target, workload)
    assert sorted(restored()) == sorted(UNCONSUMED)  # said once each


async def test_a_queue_deleted_while_no_instance_consumed_it_is_said_as_the_service_starts(
    deploy: Deploy,
) -> None:
    """Regression (a probe): a queue deleted while no instance consumed it (every instance
    stopped, or a broker that lost it) was declared again with nothing said, the events it
    held lost to its consumer. A queue its consumer's records say it consumed before is
    said as the service starts, with the rewind that sends those events again; a queue of
    a new deployment is not."""
    target = await deploy("deleted_while_stopped")

    def said() -> list[dict[str, Any]]:
        return [
            line
            for line in target.json_log()
            if line["event"].startswith("a queue of the service was missing as it started")
        ]

    workload = Workload(target, seed=suite_seed(), concurrency=2)
    await workload.run(sagas=2)
    await settle(target)
    assert said() == []  # the first start declared every queue anew, and said nothing
    read_models = PostgresReadModels(target.query_pool)
    last_projected = await read_models.last_projected_recorded_at(datetime.now(UTC))
    assert last_projected is not None
    assert await target.service.stop() == 0
    # Regression (a probe of the fix): a command queue and a queue of Registering's
    # events, which no rewind fills again, were declared again with nothing said, ten
    # accepted commands lost without a word.
    deleted = DELETED
    for queue in deleted:
        await asyncio.to_thread(rabbitmqctl, "delete_queue", "--vhost", target.vhost, queue)
    await target.service.start()

    await _said_missing(said, deleted, last_projected)
    await settle(target)
    await verify_effects(target, workload)

    # Regression (a probe): the dead letters' and the deferrals' queues, deleted while no
    # instance ran, were declared again with nothing said, what they held lost. Said at
    # start-up where the consumers' records say the deployment ran before (its first
    # start, on a broker without them, said nothing).
    def restored() -> list[str]:
        return [line["queue"] for line in target.json_log() if line["event"] == RESTORED]

    assert restored() == []
    assert await target.service.stop() == 0
    for queue in UNCONSUMED:
        await asyncio.to_thread(rabbitmqctl, "delete_queue", "--vhost", target.vhost, queue)
    await target.service.start()
    await infra.wait_until(
        lambda: infra.holds(sorted(restored()) == sorted(UNCONSUMED)),
        what="the queues nobody consumes said restored",
    )
