"""Envelopes on the wire: string headers, exact bodies, and what makes a message poison."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.envelopes import from_amqp, string_headers
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology import command_queue
from financing.application.errors import PoisonMessage
from financing.application.ports import Envelope
from financing.application.retry import Outages
from tests.support import rabbitmq
from tests.support.infra import unique_name


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    broker = Broker([amqp_url], Outages())
    yield broker
    await broker.close()


@pytest.fixture
async def connection(broker: Broker) -> AbstractConnection:
    return await broker.connection()


@pytest.fixture
async def queue(broker: Broker) -> str:
    name = unique_name("envelopes")
    channel = await broker.channel()
    await command_queue(name).declare(channel)
    await channel.close()
    return name


async def delivered(connection: AbstractConnection, queue: str) -> AbstractIncomingMessage:
    [message] = await rabbitmq.drain(connection, queue, expected=1)
    return message


async def test_envelope_round_trip_keeps_string_headers_and_exact_body(
    broker: Broker, connection: AbstractConnection, queue: str
) -> None:
    aggregate_id = str(uuid.uuid4())
    body = '{"InvoiceID":"x",  "Note": "fün €",\n"Amount": 10.50}'.encode()
    sent = Envelope(
        message_id=str(uuid.uuid4()),
        name="InvoiceFinancedEvent",
        body=body,
        aggregate_id=aggregate_id,
        headers={"aggregateVersion": "7", "correlation": "ünïcode"},
    )
    publisher = Publisher(broker)
    try:
        await publisher.send_to_queue(queue, sent)
    finally:
        await publisher.close()

    message = await delivered(connection, queue)
    assert message.headers == {
        "_watermill_message_uuid": sent.message_id,
        "name": "InvoiceFinancedEvent",
        "aggregateID": aggregate_id,
        "aggregateVersion": "7",
        "correlation": "ünïcode",
    }
    assert all(isinstance(value, str) for value in message.headers.values())
    assert message.body == body
    assert message.message_id == sent.message_id
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert from_amqp(message) == sent


async def test_message_with_only_the_watermill_headers_is_accepted(
    connection: AbstractConnection, queue: str
) -> None:
    message_id = str(uuid.uuid4())
    await rabbitmq.publish_raw(
        connection,
        queue,
        b'{"ID":"1b4e28ba-2fa1-11d2-883f-0016d3cca427"}',
        {"_watermill_message_uuid": message_id, "name": "CreateIssuer"},
    )
    envelope = from_amqp(await delivered(connection, queue))
    assert envelope == Envelope(
        message_id=message_id,
        name="CreateIssuer",
        body=b'{"ID":"1b4e28ba-2fa1-11d2-883f-0016d3cca427"}',
    )


async def test_the_amqp_message_id_property_stands_in_for_a_missing_watermill_header(
    connection: AbstractConnection, queue: str
) -> None:
    # A publisher that is not watermill sets the standard property, not the header.
    message_id = str(uuid.uuid4())
    await rabbitmq.publish_raw(
        connection,
        queue,
        b'{"ID":"1b4e28ba-2fa1-11d2-883f-0016d3cca427"}',
        {"name": "CreateIssuer"},
        message_id=message_id,
    )
    envelope = from_amqp(await delivered(connection, queue))
    assert envelope.message_id == message_id
    assert envelope.name == "CreateIssuer"


@pytest.mark.parametrize(
    "value",
    [
        3,
        True,
        1.5,
        Decimal("1.50"),
        {"nested": "table"},
        ["array"],
        bytearray(b"byte array"),
        datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        None,
    ],
    ids=lambda value: type(value).__name__,
)
async def test_non_string_header_makes_the_message_poison(
    connection: AbstractConnection, queue: str, value: Any
) -> None:
    await rabbitmq.publish_raw(
        connection,
        queue,
        b"{}",
        {"_watermill_message_uuid": str(uuid.uuid4()), "name": "CreateIssuer", "extra": value},
    )
    message = await delivered(connection, queue)
    with pytest.raises(PoisonMessage, match="header 'extra' is not a string"):
        from_amqp(message)


@pytest.mark.parametrize(
    "headers",
    [{"_watermill_message_uuid": "id-1"}, {"_watermill_message_uuid": "id-1", "name": ""}],
)
async def test_message_without_a_name_is_poison(
    connection: AbstractConnection, queue: str, headers: dict[str, str]
) -> None:
    await rabbitmq.publish_raw(connection, queue, b"{}", headers)
    message = await delivered(connection, queue)
    with pytest.raises(PoisonMessage, match="header name"):
        from_amqp(message)


@dataclass
class PropertylessDelivery:
    """A delivery as a raw AMQP client can publish it: headers, no message-id property.

    aio-pika stamps a message-id on everything it publishes, so such a
    delivery cannot be produced with it; the faults suite sends real ones.
    """

    headers: dict[str, Any]
    body: bytes = b"{}"
    message_id: str | None = None


@pytest.mark.parametrize(
    "headers",
    [{"name": "CreateIssuer"}, {"_watermill_message_uuid": "", "name": "CreateIssuer"}],
)
def test_message_without_id_header_or_property_is_poison(headers: dict[str, str]) -> None:
    delivery = cast(AbstractIncomingMessage, PropertylessDelivery(headers))
    with pytest.raises(PoisonMessage, match="_watermill_message_uuid and no message-id property"):
        from_amqp(delivery)


def test_long_string_header_is_a_string_only_when_it_is_utf8() -> None:
    # pamqp hands an AMQP long string over as bytes when it is not valid UTF-8.
    assert string_headers({"k": "text", "u": "ü".encode()}) == {"k": "text", "u": "ü"}
    with pytest.raises(PoisonMessage, match="header 'k' is not valid UTF-8"):
        string_headers({"k": b"\xff\xfe"})


async def test_a_redelivery_from_a_quorum_queue_is_read_without_the_broker_s_count(
    broker: Broker, connection: AbstractConnection
) -> None:
    # A quorum queue adds `x-delivery-count` (an integer) to every redelivery: the
    # broker's header, not the publisher's, so it does not make the message poison.
    name = unique_name("envelopes_quorum")
    channel = await broker.channel()
    await command_queue(name).of_type("quorum").declare(channel)
    await channel.close()
    sent = Envelope(message_id=str(uuid.uuid4()), name="CreateIssuer", body=b"{}")
    publisher = Publisher(broker)
    try:
        await publisher.send_to_queue(name, sent)
    finally:
        await publisher.close()
    reading = await connection.channel()
    queue = await reading.get_queue(name, ensure=False)
    first = await queue.get(no_ack=False, timeout=5)
    await first.reject(requeue=True)
    again = await queue.get(no_ack=False, timeout=5)
    try:
        assert (again.headers or {}).get("x-delivery-count") == 1
        assert from_amqp(again) == replace(sent, redelivered=True)
    finally:
        await again.ack()
        await reading.queue_delete(name)
        await reading.close()
