"""Publishing with confirms: order, unroutable messages, failing fast, healing, sending commands."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from decimal import Decimal
from typing import Any

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from structlog.testing import capture_logs

from financing.adapters.rabbitmq import connection as connection_module
from financing.adapters.rabbitmq import publisher as publisher_module
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import BROKER, Broker
from financing.adapters.rabbitmq.envelopes import from_amqp, to_amqp
from financing.adapters.rabbitmq.publisher import (
    PROBE_CHANNEL_AGE,
    AmqpCommandSender,
    Publisher,
    PublishFailed,
    PublishUnconfirmed,
)
from financing.adapters.rabbitmq.topology import QueueSpec
from financing.application import codec
from financing.application.errors import Refused, Unavailable
from financing.application.messages import ApproveFinancing, CreateIssuer
from financing.application.ports import HANDING, Cause, Envelope, Handing
from financing.application.retry import Outages
from financing.domain import events as ev
from tests.support import rabbitmq
from tests.support.infra import holds, unique_name, wait_until

CAUSE = Cause(correlation_id=str(uuid.uuid4()), causation_id=str(uuid.uuid4()))


@pytest.fixture(scope="module")
async def vhost() -> AsyncIterator[rabbitmq.Vhost]:
    # Its own vhost: other tests' events would land on a queue bound to `events`.
    async with rabbitmq.private_vhost("fin_publisher") as vhost:
        yield vhost


@pytest.fixture
async def empty_vhost() -> AsyncIterator[rabbitmq.Vhost]:
    async with rabbitmq.private_vhost("fin_publisher") as vhost:
        yield vhost


@pytest.fixture
async def broker(vhost: rabbitmq.Vhost) -> AsyncIterator[Broker]:
    broker = Broker([vhost.url], Outages())
    yield broker
    await broker.close()


@pytest.fixture
async def publisher(broker: Broker) -> AsyncIterator[Publisher]:
    publisher = Publisher(broker, confirm_timeout=2.0)
    yield publisher
    await publisher.close()


def event_envelope(version: int, aggregate_id: uuid.UUID) -> Envelope:
    return Envelope(
        message_id=str(uuid.uuid4()),
        name="InvestorFundsAddedEvent",
        body=codec.encode(
            ev.InvestorFundsAddedEvent(investor_id=aggregate_id, amount=Decimal(version))
        ),
        aggregate_id=str(aggregate_id),
        headers={"aggregateVersion": str(version)},
    )


async def published(publisher: Publisher, failures: list[PublishFailed]) -> bool:
    """Whether an event published now was confirmed; a failure is kept in `failures`."""
    try:
        await publisher.publish_events([event_envelope(1, uuid.uuid4())])
    except PublishFailed as failed:
        failures.append(failed)
        return False
    return True


async def test_published_events_reach_every_bound_queue_in_order(
    broker: Broker, publisher: Publisher
) -> None:
    channel = await broker.channel()
    queues = [unique_name("events_a"), unique_name("events_b")]
    for name in queues:
        await QueueSpec(name, bound_to_events=True).declare(channel)
    await channel.close()
    investor = uuid.uuid4()
    sent = [event_envelope(version, investor) for version in range(1, 201)]

    await publisher.publish_events(sent)

    connection = await broker.connection()
    for name in queues:
        received = [from_amqp(m) for m in await rabbitmq.drain(connection, name, expected=200)]
        assert received == sent


async def test_a_publish_failing_before_it_is_written_ends_its_batch_in_order(
    broker: Broker, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (a probe): a publish of a batch that failed before it was written (a
    MemoryError building its frames, under a memory limit) let the publishes after it be
    written: an aggregate's later versions went out before the one that failed, which
    the relayer published again after them, and foreign consumers drop as a copy."""
    channel = await broker.channel()
    queue = unique_name("events_order")
    await QueueSpec(queue, bound_to_events=True).declare(channel)
    await channel.close()
    investor = uuid.uuid4()
    await publisher.publish_events([event_envelope(0, investor)])  # the channel open
    real = ChannelFrame.marshall
    publishes = 0

    def failing_the_third(frames: Any, channel_number: int, drain_future: Any = None) -> Any:
        nonlocal publishes
        if isinstance(frames[0], aiormq.spec.Basic.Publish):
            publishes += 1
            if publishes == 3:
                raise MemoryError
        return real(frames=frames, channel_number=channel_number, drain_future=drain_future)

    monkeypatch.setattr(ChannelFrame, "marshall", staticmethod(failing_the_third))
    with pytest.raises(MemoryError):
        await publisher.publish_events(
            [event_envelope(version, investor) for version in (1, 2, 3, 4, 5, 6)]
        )
    monkeypatch.undo()
    await publisher.publish_events([event_envelope(7, investor)])  # the last to arrive

    connection = await broker.connection()
    received = await rabbitmq.drain(connection, queue, expected=4)
    assert [from_amqp(m).headers["aggregateVersion"] for m in received] == ["0", "1", "2", "7"]


async def test_events_no_queue_takes_are_declared_for_or_reported_unroutable(
    empty_vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An event no queue receives would be lost: the relayer must not advance past it. The
    # topology is declared, and the event published again; if it cannot be, it failed.
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker)
    try:
        await publisher.publish_events([event_envelope(1, uuid.uuid4())])  # declared, routed
        assert (await rabbitmq.list_queues(empty_vhost.name))[topology.PROJECTOR_QUEUE][
            "messages_ready"
        ] == 1
        channel = await broker.channel()
        await channel.exchange_delete(topology.EVENTS_ROUTER)
        await channel.close()

        async def refused() -> None:
            raise Unavailable("broker", "the declarations refused")

        monkeypatch.setattr(publisher, "declare_topology", refused)
        with pytest.raises(PublishFailed, match="unroutable"):
            await publisher.publish_events([event_envelope(2, uuid.uuid4())])
    finally:
        await publisher.close()
        await broker.close()


async def test_sending_to_a_missing_queue_fails(publisher: Publisher) -> None:
    envelope = Envelope(message_id=str(uuid.uuid4()), name="CreateIssuer", body=b"{}")
    with pytest.raises(PublishFailed, match="unroutable") as failed:
        await publisher.send_to_queue(unique_name("no_such_queue"), envelope)
    assert not isinstance(failed.value, PublishUnconfirmed)  # returned: known not queued


@contextlib.asynccontextmanager
async def sending_through_a_proxy(
    vhost: rabbitmq.Vhost,
) -> AsyncIterator[tuple[rabbitmq.BrokerProxy, Publisher, AmqpCommandSender]]:
    """A publisher whose broker is reached through a relay (tests.support.relay), and a
    command sender on it that has sent one command."""
    proxy = rabbitmq.BrokerProxy()
    await proxy.start()
    broker = Broker([proxy.url(vhost.name)], Outages())
    publisher = Publisher(broker, confirm_timeout=1.0)
    try:
        sender = AmqpCommandSender(publisher)
        await sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4(), CAUSE)
        yield proxy, publisher, sender
    finally:
        await publisher.close()
        await broker.close()
        await proxy.close()


async def test_a_publish_written_and_never_confirmed_may_have_been_queued(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """A publish written before the broker fell silent is not known to be lost: the
    Commands API must not answer that it was not queued (6 commands so answered were
    applied); one that found no channel to be written on is known not to be."""
    async with sending_through_a_proxy(empty_vhost) as (proxy, _, sender):
        proxy.silence()
        written = Handing()
        HANDING.set(written)
        with pytest.raises(PublishUnconfirmed, match="not confirmed"):
            await sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4(), CAUSE)
        assert written.handed
        await proxy.cut()

        async def channel_gone() -> bool:
            unwritten = Handing()
            HANDING.set(unwritten)
            try:
                await sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4(), CAUSE)
            except PublishUnconfirmed:
                return False  # still the channel of the silenced connection
            except PublishFailed:
                assert not unwritten.handed
                return True
            raise AssertionError("confirmed through a cut connection")

        await wait_until(channel_gone, timeout=30, what="a publish that found no channel")


async def test_command_sender_declares_the_command_queue_and_sends_the_command(
    vhost: rabbitmq.Vhost, broker: Broker, publisher: Publisher
) -> None:
    command = CreateIssuer(uuid.uuid4())
    message_id = uuid.uuid4()
    cause = Cause(correlation_id="saga-1", causation_id="event-7")

    await AmqpCommandSender(publisher).send(command, message_id, cause)

    queues = await rabbitmq.list_queues(vhost.name)
    assert queues["CreateIssuer"]["durable"] is True
    assert queues["CreateIssuer"]["arguments"] == []
    [message] = await rabbitmq.drain(await broker.connection(), "CreateIssuer", expected=1)
    assert message.headers == {
        "_watermill_message_uuid": str(message_id),
        "name": "CreateIssuer",
        "correlation_id": "saga-1",
        "causation_id": "event-7",
    }
    assert message.body == codec.encode(command)
    assert message.message_id == str(message_id)
    assert message.delivery_mode == 2


async def test_calls_share_one_declaration_of_their_queue_which_their_deadlines_do_not_cut(
    empty_vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: each call declared its command's queue itself, so a flood of calls at
    start-up, or after one publish failed, put as many declarations on one channel, and
    one cut short by its call's deadline closed that channel under the others: the
    broker was logged as down while it answered. Declared again only once found gone."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=5.0)
    declared: list[str] = []
    declare = publisher.declare_command_queue
    let_declare = asyncio.Event()

    async def counted(name: str) -> None:
        declared.append(name)
        await let_declare.wait()
        await declare(name)

    monkeypatch.setattr(publisher, "declare_command_queue", counted)
    sender = AmqpCommandSender(publisher)

    def send() -> Awaitable[None]:
        return sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4(), CAUSE)

    try:
        with pytest.raises(TimeoutError):  # a call whose deadline passes while declaring
            await asyncio.wait_for(send(), 0.2)
        calls = [asyncio.create_task(send()) for _ in range(50)]
        let_declare.set()
        await asyncio.gather(*calls)
        assert declared == ["CreateIssuer"]
        assert not (await publisher._declaring.get()).is_closed

        # A publish that failed, its queue still there: not declared again.
        publish = publisher.send_to_queue

        async def unconfirmed(queue: str, envelope: Envelope) -> None:
            raise PublishFailed("CreateIssuer to queue 'CreateIssuer': not confirmed")

        monkeypatch.setattr(publisher, "send_to_queue", unconfirmed)
        with pytest.raises(PublishFailed):
            await send()
        monkeypatch.setattr(publisher, "send_to_queue", publish)
        await send()
        assert declared == ["CreateIssuer"]

        # Deleted under the service: returned unroutable once, then declared again.
        channel = await broker.channel()
        await channel.queue_delete("CreateIssuer")
        await channel.close()
        with pytest.raises(PublishFailed, match="unroutable"):
            await send()
        await send()
        assert declared == ["CreateIssuer", "CreateIssuer"]
    finally:
        await publisher.close()
        await broker.close()


# Within the confirm timeout (1 s) and a margin for a loaded machine, well before the
# connection attempt's own timeout (CONNECT_TIMEOUT, 10 s) would end it.
FAILS_FAST = 1.0 + 2.0


async def test_publishing_fails_fast_while_the_broker_is_unreachable(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    # Through a relay cut as a network partition would: reconnecting hangs unanswered.
    async with sending_through_a_proxy(empty_vhost) as (proxy, publisher, sender):
        await proxy.cut()

        started = time.monotonic()
        with pytest.raises(PublishFailed):
            await sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4(), CAUSE)
        assert time.monotonic() - started < FAILS_FAST
        started = time.monotonic()
        with pytest.raises(PublishFailed):
            await publisher.publish_events([event_envelope(1, uuid.uuid4())])
        assert time.monotonic() - started < FAILS_FAST


async def test_a_publisher_connects_to_the_second_broker_while_the_first_hangs(
    empty_vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: each publish cancelled the connection attempt at its own deadline,
    before the first broker's connect timeout passed, so the second broker was never
    tried: a process without consumers (the Commands API, the relayer) stayed
    disconnected for as long as its first broker was unreachable."""
    monkeypatch.setattr(connection_module, "CONNECT_TIMEOUT", 1.0)
    unreachable = rabbitmq.BrokerProxy()
    await unreachable.start()
    await unreachable.cut()  # connections to it hang unanswered, as to a host that is down
    broker = Broker([unreachable.url(empty_vhost.name), empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=0.3)  # less than a connect timeout
    sender = AmqpCommandSender(publisher)

    async def sent() -> bool:
        try:
            await sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4(), CAUSE)
        except PublishFailed:
            return False
        return True

    try:
        assert await wait_until(sent, timeout=10)
    finally:
        await publisher.close()
        await broker.close()
        await unreachable.close()


async def test_publisher_heals_after_the_broker_refused_its_channel(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    try:
        connection = await broker.connection()
        channel = await broker.channel()
        await QueueSpec(unique_name("events_probe"), bound_to_events=True).declare(channel)
        await channel.close()
        await publisher.declare_command_queue("CreateIssuer")
        first = Envelope(message_id=str(uuid.uuid4()), name="CreateIssuer", body=b"{}")
        await publisher.send_to_queue("CreateIssuer", first)

        # The connection stays open; the broker refuses what the channel does next.
        # (A channel caches the permission checks it made: publishing to `events`,
        # which it has not done yet, is checked again.)
        await rabbitmq.revoke_permissions(empty_vhost.name)
        try:
            refusals: list[PublishFailed] = []

            async def refused() -> bool:
                return not await published(publisher, refusals)

            await wait_until(refused, timeout=10, what="the broker to refuse a publish")
            assert isinstance(refusals[0], Unavailable)
            assert "ACCESS_REFUSED" in str(refusals[0])
        finally:
            await rabbitmq.grant_permissions(empty_vhost.name)

        healed = Envelope(message_id=str(uuid.uuid4()), name="CreateIssuer", body=b"{}")

        async def sent() -> bool:
            try:
                await publisher.send_to_queue("CreateIssuer", healed)
            except PublishFailed:
                return False
            return True

        await wait_until(sent, timeout=10, what="a publish through the same publisher")
        assert await broker.connection() is connection  # healed on the same connection
        messages = await rabbitmq.drain(connection, "CreateIssuer", expected=2)
        assert [m.message_id for m in messages] == [first.message_id, healed.message_id]
    finally:
        await publisher.close()
        await broker.close()


async def test_events_are_routed_again_once_the_topology_deleted_under_the_service_is_declared(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """Regression: with `events` and the service's router deleted by an operator, the
    publisher declared `events` again but nothing bound to it, and every publish came back
    unroutable: the relayer retried the same batch without end."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    try:
        await topology.declare_on(broker)
        await publisher.publish_events([event_envelope(1, uuid.uuid4())])
        channel = await broker.channel()
        for exchange in (topology.EVENTS_EXCHANGE, topology.EVENTS_ROUTER):
            await channel.exchange_delete(exchange)
        await channel.close()

        failures: list[PublishFailed] = []
        with capture_logs() as logs:  # tried again as the relayer tries its batch again
            await wait_until(
                lambda: published(publisher, failures), timeout=15, what="an event routed again"
            )

        queues = await rabbitmq.list_queues(empty_vhost.name)
    finally:
        await publisher.close()
        await broker.close()
    assert queues[topology.PROJECTOR_QUEUE]["messages_ready"] == 2  # before, and after
    # The publish to the deleted `events` closed the channel, and the channel opened next
    # is used once the whole topology is declared again: nothing came back unroutable.
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == []


async def test_events_published_after_the_broker_lost_its_topology_reach_every_queue(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """Regression: with the virtual host deleted and made again, the publisher reopened its
    channel and declared `events` alone; the events it published next were confirmed,
    routed to the queues of the consumers that had come back first and to no other, and
    the sagas waiting on the others stopped half way (8 and 9 in two such losses)."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    placed = Envelope(
        message_id=str(uuid.uuid4()),
        name="BidOnInvoicePlacedEvent",
        body=codec.encode(ev.BidOnInvoicePlacedEvent(uuid.uuid4(), uuid.uuid4(), Decimal("20"))),
        aggregate_id=str(uuid.uuid4()),
        headers={"aggregateVersion": "3"},
    )
    policy = topology.subscription("BidOnInvoicePlacedEvent").queue.name
    try:
        await topology.declare_on(broker)
        await publisher.publish_events([placed])
        await rabbitmq.vhost_made_again(empty_vhost.name)
        # The projector's consumer came back first: it declares its queue and bindings.
        channel = await broker.channel()
        await topology.PROJECTOR.queue.declare(channel)
        await channel.close()

        await wait_until(lambda: published(publisher, []), timeout=15, what="an event confirmed")
        await publisher.publish_events([placed])

        queues = await rabbitmq.list_queues(empty_vhost.name)
    finally:
        await publisher.close()
        await broker.close()
    assert queues[policy]["messages_ready"] == 1
    assert queues[topology.PROJECTOR_QUEUE]["messages_ready"] == 2  # the probe's event too


async def test_channels_opened_on_the_connection_the_topology_was_declared_on_declare_no_more(
    empty_vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (a probe): each of the publisher's channels declared the whole topology
    again as it first opened, one part after another, right after start-up had declared
    it: with the broker 200 ms away each way, the health probe waited behind it, and the
    broker was said down as the service started."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    declared: list[str] = []
    declare = publisher.declare_topology

    async def counted() -> None:
        declared.append("the topology")
        await declare()

    monkeypatch.setattr(publisher, "declare_topology", counted)
    try:
        connection = await broker.connection()
        await topology.declare_on(broker)
        publisher.declared_on(connection)
        assert await published(publisher, [])  # the events' channel opened
        await AmqpCommandSender(publisher).send(CreateIssuer(uuid.uuid4()), uuid.uuid4(), CAUSE)
        await publisher.probe()
        assert declared == []
        # A broker that lost its topology closed the connection: the next declares it.
        await rabbitmq.vhost_made_again(empty_vhost.name)
        await wait_until(lambda: published(publisher, []), timeout=15, what="an event confirmed")
        assert declared != []
        queues = await rabbitmq.list_queues(empty_vhost.name)
    finally:
        await publisher.close()
        await broker.close()
    assert queues[topology.PROJECTOR_QUEUE]["messages_ready"] >= 1


@pytest.mark.parametrize("busy", [False, True], ids=["write revoked", "all revoked, busy probe"])
async def test_the_probe_fails_while_the_broker_does_not_let_the_service_publish(
    empty_vhost: rabbitmq.Vhost, busy: bool
) -> None:
    """Regression: the probe only declared, which needs the configure permission: with
    the write permission alone revoked, every command failed while the probe passed, so
    the broker outage ended and began again every second, and `Commands` health stayed
    SERVING.

    Regression (a probe), `busy`: a channel kept busy remembers the permissions the
    broker granted it (RabbitMQ 3.10), and the probe's, used every second, passed for
    good once they were revoked: Commands SERVING for minutes while every command was
    refused, and a broker outage a refused command began said over. The probe's channel
    is renewed every PROBE_CHANNEL_AGE seconds; the connection stays open then."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    try:
        assert await probed(publisher)
        if busy:
            await rabbitmq.revoke_permissions(empty_vhost.name)
        else:
            await rabbitmq.grant_permissions(empty_vhost.name, write="")
            await rabbitmq.close_connections(empty_vhost.name)  # channels keep their checks
        try:

            async def refused() -> bool:
                return not await probed(publisher)

            # Probed every 0.2 s, as the health watch's every second keeps it busy.
            await wait_until(
                refused, timeout=PROBE_CHANNEL_AGE + 10, interval=0.2, what="the probe to fail"
            )
        finally:
            await rabbitmq.grant_permissions(empty_vhost.name)
        await wait_until(lambda: probed(publisher), timeout=10, what="the probe to pass again")
    finally:
        await publisher.close()
        await broker.close()


async def probed(publisher: Publisher, *, events: bool = False) -> bool:
    try:
        await (publisher.probe_events() if events else publisher.probe())
    except Unavailable:
        return False
    return True


async def test_the_probe_fails_from_a_refused_publish_to_events_until_one_is_confirmed(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """Regression: with the write permission on `events` alone revoked, the relayer's
    publishes were refused while the probe (which cannot publish to `events`) passed:
    the broker outage ended and began again every second, and health flapped with it."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    failures: list[PublishFailed] = []
    try:
        channel = await broker.channel()
        await QueueSpec(unique_name("events_probe"), bound_to_events=True).declare(channel)
        await channel.close()
        assert await published(publisher, failures)
        await rabbitmq.grant_permissions(empty_vhost.name, write="^(?!events$).*")
        try:
            await rabbitmq.close_connections(empty_vhost.name)  # channels keep their checks

            async def refused() -> bool:
                # A publish made as the broker closes the connection fails with
                # CONNECTION_FORCED; one on the connection opened again, refused.
                return not await published(publisher, failures) and (
                    "ACCESS_REFUSED" in str(failures[-1])
                )

            await wait_until(refused, timeout=10, what="a publish to events to be refused")
            # Its own publish is allowed, but not enough to end the outage; commands,
            # queued through the default exchange, still can be.
            assert not await probed(publisher, events=True)
            assert await probed(publisher)
        finally:
            await rabbitmq.grant_permissions(empty_vhost.name)
        # Until a publish to `events` is confirmed.
        assert not await probed(publisher, events=True)
        await wait_until(
            lambda: published(publisher, failures), timeout=10, what="a confirmed publish"
        )
        assert await probed(publisher, events=True)
    finally:
        await publisher.close()
        await broker.close()


@contextlib.asynccontextmanager
async def publishing(
    vhost: rabbitmq.Vhost, *, confirm_timeout: float = 2.0
) -> AsyncIterator[tuple[Broker, Publisher, str]]:
    """A broker and a publisher on `vhost`, and the name of a command queue; a queue
    bound to `events` too."""
    broker = Broker([vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=confirm_timeout)
    command = unique_name("CreateIssuer")
    try:
        channel = await broker.channel()
        await QueueSpec(unique_name("events_bound"), bound_to_events=True).declare(channel)
        await QueueSpec(command, bound_to_events=False).declare(channel)
        await channel.close()
        yield broker, publisher, command
    finally:
        await publisher.close()
        await broker.close()


@contextlib.asynccontextmanager
async def refusing_events(vhost: rabbitmq.Vhost) -> AsyncIterator[tuple[Broker, Publisher, str]]:
    """`publishing`, the write permission on `events` alone revoked."""
    async with publishing(vhost) as opened:
        broker = opened[0]
        closing = broker.current  # which the close below ends
        await rabbitmq.grant_permissions(vhost.name, write="^(?!events$).*")
        try:
            await rabbitmq.close_connections(vhost.name)  # channels keep their checks
            # Noticed before the test begins: noticed after, the connection a test took for
            # the one it keeps was the closed one (1 CI run in 3 under load).
            await wait_until(
                lambda: holds(closing is None or broker.current is not closing),
                what="the closed connection noticed",
            )
            yield opened
        finally:
            await rabbitmq.grant_permissions(vhost.name)


async def test_publishes_refused_together_leave_the_connection_and_its_consumers_open(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """Regression: with the write permission on `events` alone revoked, the publishes of
    a batch waiting for the channel when the broker closed it wrote their frames after
    the close was answered, an error of the whole connection ("expected
    'channel.open'"): it closed with every consumer's channel, 9 times in 45 s, and
    commands, which need only the default exchange, could not be queued meanwhile."""
    async with refusing_events(empty_vhost) as (broker, publisher, command):
        opened = await broker.connection()
        for batch in range(5):
            with pytest.raises(PublishFailed, match=r"ACCESS_REFUSED|closed"):
                await publisher.publish_events(
                    [event_envelope(version, uuid.uuid4()) for version in range(1, 51)]
                )
            await publisher.send_to_queue(command, Envelope(f"c-{batch}", "CreateIssuer", b"{}"))
        assert await broker.connection() is opened
        assert not opened.is_closed
        assert (await rabbitmq.list_queues(empty_vhost.name))[command]["messages_ready"] == 5


async def test_commands_queued_while_a_publish_to_events_is_refused_are_all_confirmed(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """Regression: events and commands shared one channel, which the broker closes when it
    refuses a publish: with the write permission on `events` alone revoked, the commands
    in flight beside the relayer's refused batch failed with it (retried, gRPC calls late
    by seconds)."""
    async with refusing_events(empty_vhost) as (_, publisher, command):
        sent = 0
        for batch in range(5):
            events = asyncio.create_task(
                publisher.publish_events(
                    [event_envelope(version, uuid.uuid4()) for version in range(1, 51)]
                )
            )
            commands = [
                publisher.send_to_queue(command, Envelope(f"c-{batch}-{n}", "CreateIssuer", b"{}"))
                for n in range(20)
            ]
            await asyncio.gather(*commands)  # none failed with the refused events
            sent += len(commands)
            with pytest.raises(PublishFailed, match=r"ACCESS_REFUSED|closed"):
                await events
        assert (await rabbitmq.list_queues(empty_vhost.name))[command]["messages_ready"] == sent


async def test_an_outage_found_to_be_a_refusal_of_events_says_so_once(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """Regression: an outage begun as a lost connection, and kept on by the refusal of
    `events` found once the connection was back, was said to have lasted 32 s more
    without a word of the refusal."""
    async with refusing_events(empty_vhost) as (_, publisher, _):
        outages = Outages()
        outages.check_with(BROKER, publisher.probe_events)
        failures: list[PublishFailed] = []
        with capture_logs() as logs:
            outages.failed(Unavailable(BROKER, "connection reset"), connection_lost=True)
            assert not await published(publisher, failures)
            for _ in range(3):
                await outages.check_once(within=5.0)
    # (The broker's own outages, of the connection the revocation closed, are its own.)
    said = [
        (line["event"], line["error"])
        for line in logs
        if line["event"] in ("broker unavailable", "broker still unavailable")
    ]
    assert said[0] == ("broker unavailable", "connection reset")
    [still] = [error for event, error in said if event == "broker still unavailable"]
    assert "ACCESS_REFUSED" in still and "'events'" in still


async def test_a_command_queue_the_broker_refuses_is_not_declared_at_each_call_nor_beside_probes(
    empty_vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: declared again at every call, on the probe's channel, the refused queue
    closed that channel under the probes in flight (22 of 94 failed: Commands NOT_SERVING
    and a broker outage that was none)."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    declared: list[str] = []
    declare = publisher.declare_command_queue

    async def counted(name: str) -> None:
        declared.append(name)
        await declare(name)

    monkeypatch.setattr(publisher, "declare_command_queue", counted)
    try:
        channel = await broker.channel()
        await channel.declare_queue("ApproveFinancing", durable=True, arguments={"x-max-length": 9})
        await channel.close()
        probes = await publisher._probe.get()
        sender = AmqpCommandSender(publisher)
        for _ in range(5):
            with pytest.raises(Refused, match="x-max-length"):
                await sender.send(ApproveFinancing(uuid.uuid4()), uuid.uuid4(), CAUSE)
        assert declared == ["ApproveFinancing"]
        assert not probes.is_closed
        assert await probed(publisher)
    finally:
        await publisher.close()
        await broker.close()


async def test_commands_do_not_wait_for_the_events_channel_being_opened(
    empty_vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the lanes opened under one lock, so a command waited for the whole
    topology to be declared again each time a refused publish closed the events'
    channel (560 ms at p99 where declarations were slow)."""
    async with publishing(empty_vhost, confirm_timeout=5.0) as (_, publisher, command):
        await publisher.send_to_queue(command, Envelope("c-0", "CreateIssuer", b"{}"))
        declaring, declared = asyncio.Event(), asyncio.Event()
        declare = publisher.declare_topology

        async def slow() -> None:
            declaring.set()
            await declared.wait()
            await declare()

        monkeypatch.setattr(publisher, "declare_topology", slow)
        events = asyncio.create_task(publisher.publish_events([event_envelope(1, uuid.uuid4())]))
        await asyncio.wait_for(declaring.wait(), 5)  # the events' channel is being opened
        await asyncio.wait_for(
            publisher.send_to_queue(command, Envelope("c-1", "CreateIssuer", b"{}")), 2
        )
        declared.set()
        await events


async def test_a_refused_probe_leaves_the_channel_publishes_share_open(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    """Regression: the probe published on the channel every publish shares, and the broker
    closes a channel whose publish it refuses, taking the publishes in flight with it."""
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    try:
        await rabbitmq.grant_permissions(empty_vhost.name, write="^(?!amq\\.default$).*")
        shared = await publisher.channel()
        assert not await probed(publisher)  # the probe publishes to the default exchange
        assert not shared.is_closed
        assert await publisher.channel() is shared
    finally:
        await rabbitmq.grant_permissions(empty_vhost.name)
        await publisher.close()
        await broker.close()


async def test_deferrals_are_declared_once_on_a_channel_and_again_once_deleted(
    empty_vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `financing_deferred` was declared before every deferral, a declaration
    that waited behind the channel's publishes: while a large backlog drained, it timed
    out, the broker was taken for gone (`/health` 503) and the message deferred twice."""
    declared: list[str] = []

    async def counted(*args: object, **kwargs: object) -> object:
        declared.append("financing_deferred")
        return await topology.declare_deferrals(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(publisher_module, "declare_deferrals", counted)
    broker = Broker([empty_vhost.url], Outages())
    publisher = Publisher(broker, confirm_timeout=2.0)
    queue = unique_name("deferred_back")

    async def defer(n: int) -> None:
        message = to_amqp(Envelope(f"m-{n}", "CreateIssuer", b"{}"))
        message.expiration = 60
        await publisher.defer(message, queue)

    try:
        for n in range(3):
            await defer(n)
        assert declared == ["financing_deferred"]
        channel = await broker.channel()
        await channel.queue_delete(topology.DEFERRALS)
        await channel.close()
        await defer(3)  # returned (no queue takes it): declared again, and published again
        await defer(4)
        queues = await rabbitmq.list_queues(empty_vhost.name)
    finally:
        await publisher.close()
        await broker.close()
    assert declared == ["financing_deferred"] * 2
    assert queues[topology.DEFERRALS]["messages_ready"] == 2
