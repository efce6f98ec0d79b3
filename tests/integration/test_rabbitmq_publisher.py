"""Publishing with confirms: order, unroutable messages, failing fast, sending commands."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from aio_pika.abc import AbstractRobustConnection

from financing.adapters.rabbitmq import (
    AmqpCommandSender,
    Publisher,
    PublishFailed,
    connect,
    declare_event_queue,
    from_amqp,
)
from financing.application import codec
from financing.application.messages import CreateIssuer
from financing.application.ports import Envelope
from financing.domain import events as ev
from tests.support import rabbitmq
from tests.support.infra import unique_name, wait_until


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
async def connection(vhost: rabbitmq.Vhost) -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect(vhost.url)
    yield connection
    await connection.close()


@pytest.fixture
async def publisher(connection: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    publisher = await Publisher.open(connection, confirm_timeout=2.0)
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


async def test_published_events_reach_every_bound_queue_in_order(
    connection: AbstractRobustConnection, publisher: Publisher
) -> None:
    channel = await connection.channel()
    queues = [unique_name("events_a"), unique_name("events_b")]
    for name in queues:
        await declare_event_queue(channel, name)
    await channel.close()
    investor = uuid.uuid4()
    sent = [event_envelope(version, investor) for version in range(1, 201)]

    await publisher.publish_events(sent)

    for name in queues:
        received = [from_amqp(m) for m in await rabbitmq.drain(connection, name, expected=200)]
        assert received == sent


async def test_events_with_no_queue_bound_are_reported_unroutable(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    # An event no queue receives would be lost: the relayer must not advance past it.
    connection = await connect(empty_vhost.url)
    try:
        publisher = await Publisher.open(connection)
        with pytest.raises(PublishFailed, match="unroutable"):
            await publisher.publish_events([event_envelope(1, uuid.uuid4())])
    finally:
        await connection.close()


async def test_sending_to_a_missing_queue_fails(publisher: Publisher) -> None:
    envelope = Envelope(message_id=str(uuid.uuid4()), name="CreateIssuer", body=b"{}")
    with pytest.raises(PublishFailed, match="unroutable"):
        await publisher.send_to_queue(unique_name("no_such_queue"), envelope)


async def test_command_sender_declares_the_command_queue_and_sends_the_command(
    vhost: rabbitmq.Vhost, connection: AbstractRobustConnection, publisher: Publisher
) -> None:
    command = CreateIssuer(uuid.uuid4())
    message_id = uuid.uuid4()

    await AmqpCommandSender(publisher).send(command, message_id)

    queues = await rabbitmq.list_queues(vhost.name)
    assert queues["CreateIssuer"]["durable"] is True
    assert queues["CreateIssuer"]["arguments"] == []
    [message] = await rabbitmq.drain(connection, "CreateIssuer", expected=1)
    assert message.headers == {"_watermill_message_uuid": str(message_id), "name": "CreateIssuer"}
    assert message.body == codec.encode(command)
    assert message.message_id == str(message_id)
    assert message.delivery_mode == 2


async def test_publishing_fails_fast_while_the_broker_is_unreachable(
    empty_vhost: rabbitmq.Vhost,
) -> None:
    # Reconnection far away: the broker stays unreachable for this test's duration.
    connection = await connect(empty_vhost.url + "?reconnect_interval=60")
    try:
        publisher = await Publisher.open(connection, confirm_timeout=1.0)
        sender = AmqpCommandSender(publisher)
        await sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4())
        await rabbitmq.close_connections(empty_vhost.name)

        async def disconnected() -> bool:
            return publisher.channel.is_closed

        await wait_until(disconnected, what="the client to notice the lost connection")
        started = time.monotonic()
        with pytest.raises(PublishFailed):
            await sender.send(CreateIssuer(uuid.uuid4()), uuid.uuid4())
        with pytest.raises(PublishFailed):
            await publisher.publish_events([event_envelope(1, uuid.uuid4())])
        assert time.monotonic() - started < 2.5
    finally:
        await connection.close()
