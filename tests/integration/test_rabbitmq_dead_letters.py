"""Dead letters: kept with their reason, listed without loss, requeued to their source."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustConnection

from financing.adapters.rabbitmq import (
    DEAD_LETTER_QUEUE,
    DeadLetters,
    Publisher,
    connect,
    declare_command_queue,
    list_dead_letters,
    requeue_dead_letters,
)
from tests.support import rabbitmq
from tests.support.infra import unique_name


@pytest.fixture
async def vhost() -> AsyncIterator[rabbitmq.Vhost]:
    # Its own vhost: each test starts with an empty dead-letter queue.
    async with rabbitmq.private_vhost("fin_dead_letters") as vhost:
        yield vhost


@pytest.fixture
async def connection(vhost: rabbitmq.Vhost) -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect(vhost.url)
    yield connection
    await connection.close()


async def dead_letter(
    connection: AbstractRobustConnection,
    queue: str,
    message_id: str,
    reason: str,
    extra: dict[str, object] | None = None,
) -> None:
    """Deliver one message on `queue`, then dead-letter it as a consumer would."""
    headers = {"_watermill_message_uuid": message_id, "name": "CreateIssuer", **(extra or {})}
    body = f'{{"ID": "{message_id}"}}'.encode()
    await rabbitmq.publish_raw(connection, queue, body, headers, message_id=message_id)
    channel = await connection.channel()
    publisher = await Publisher.open(connection)
    try:
        source = await channel.declare_queue(queue, passive=True)
        message = await source.get(no_ack=False)
        await DeadLetters(publisher).send(message, reason=reason, source_queue=queue)
        await message.ack()
    finally:
        await publisher.close()
        await channel.close()


async def source_queues(connection: AbstractRobustConnection, *names: str) -> None:
    channel = await connection.channel()
    for name in names:
        await declare_command_queue(channel, name)
    await channel.close()


async def test_dead_letters_are_listed_in_order_without_being_consumed(
    connection: AbstractRobustConnection,
) -> None:
    queue = unique_name("source")
    await source_queues(connection, queue)
    await dead_letter(connection, queue, "m-1", "first reason", {"aggregateVersion": 3})
    await dead_letter(connection, queue, "m-2", "second reason")
    await dead_letter(connection, queue, "m-3", "third reason")

    letters = await list_dead_letters(connection)

    assert [(d.message_id, d.reason, d.source_queue) for d in letters] == [
        ("m-1", "first reason", queue),
        ("m-2", "second reason", queue),
        ("m-3", "third reason", queue),
    ]
    assert letters[0].name == "CreateIssuer"
    assert letters[0].body == b'{"ID": "m-1"}'
    assert letters[0].headers == {
        "_watermill_message_uuid": "m-1",
        "name": "CreateIssuer",
        "aggregateVersion": "3",
    }
    assert letters[0].dead_lettered_at
    assert await list_dead_letters(connection) == letters
    assert [d.message_id for d in await list_dead_letters(connection, limit=2)] == ["m-1", "m-2"]
    assert await rabbitmq.queue_state(connection, DEAD_LETTER_QUEUE) == (3, 0)


async def test_dead_letter_copy_has_only_string_headers(
    vhost: rabbitmq.Vhost, connection: AbstractRobustConnection
) -> None:
    queue = unique_name("source")
    await source_queues(connection, queue)
    await dead_letter(connection, queue, "m-1", "bad header", {"count": 3, "flag": True})

    [message] = await rabbitmq.drain(connection, DEAD_LETTER_QUEUE, expected=1)

    assert message.headers["count"] == "3"
    assert message.headers["flag"] == "true"
    assert message.headers["x-death-reason"] == "bad header"
    assert message.headers["x-source-queue"] == queue
    assert all(isinstance(value, str) for value in message.headers.values())
    assert message.delivery_mode == 2
    queues = await rabbitmq.list_queues(vhost.name)
    assert queues[DEAD_LETTER_QUEUE]["durable"] is True
    assert queues[DEAD_LETTER_QUEUE]["arguments"] == []


async def test_requeue_sends_matching_dead_letters_back_to_their_source_queue(
    connection: AbstractRobustConnection,
) -> None:
    queue_a, queue_b = unique_name("source_a"), unique_name("source_b")
    await source_queues(connection, queue_a, queue_b)
    await dead_letter(connection, queue_a, "a-1", "reason a1", {"aggregateID": "agg-1"})
    await dead_letter(connection, queue_b, "b-1", "reason b1")
    await dead_letter(connection, queue_a, "a-2", "reason a2")
    await dead_letter(connection, queue_b, "b-2", "reason b2")

    assert await requeue_dead_letters(connection, source_queue=queue_a) == 2

    requeued = await rabbitmq.drain(connection, queue_a, expected=2)
    assert [m.message_id for m in requeued] == ["a-1", "a-2"]
    assert requeued[0].headers == {
        "_watermill_message_uuid": "a-1",
        "name": "CreateIssuer",
        "aggregateID": "agg-1",
    }
    assert requeued[0].body == b'{"ID": "a-1"}'
    assert [d.message_id for d in await list_dead_letters(connection)] == ["b-1", "b-2"]

    assert await requeue_dead_letters(connection, message_id="b-2") == 1
    assert [m.message_id for m in await rabbitmq.drain(connection, queue_b, expected=1)] == ["b-2"]
    assert [d.message_id for d in await list_dead_letters(connection)] == ["b-1"]

    assert await requeue_dead_letters(connection) == 1
    assert await list_dead_letters(connection) == []
    assert await rabbitmq.queue_state(connection, queue_a) == (0, 0)
    assert await rabbitmq.queue_state(connection, queue_b) == (1, 0)
