"""Dead letters: kept with their reason, listed without loss, requeued to their source."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

import pytest
from aio_pika.abc import AbstractMessage

from financing.adapters.rabbitmq import dead_letters
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.dead_letters import (
    MAX_HEADER_CHARS,
    DeadLetters,
    Selection,
    Taken,
    discard_dead_letters,
    list_dead_letters,
    requeue_dead_letters,
)
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology import DEAD_LETTER_QUEUE, command_queue
from financing.application.errors import Unavailable
from financing.application.retry import DELIVERIES, Outages
from tests.support import infra, rabbitmq
from tests.support.infra import unique_name

# Why `requeue` leaves a letter whose copy is not the message refused.
LEFT_CHANGED = (
    "their copies are not the messages refused (headers kept as text, or a message id"
    " given to them: `list` says what): requeued, they would be processed"
    " as messages their publishers never sent; their publishers must send them again"
)


@pytest.fixture
async def vhost() -> AsyncIterator[rabbitmq.Vhost]:
    # Its own vhost: each test starts with an empty dead-letter queue.
    async with rabbitmq.private_vhost("fin_dead_letters") as vhost:
        yield vhost


@pytest.fixture
async def broker(vhost: rabbitmq.Vhost) -> AsyncIterator[Broker]:
    broker = Broker([vhost.url], Outages())
    yield broker
    await broker.close()


async def dead_letter(
    broker: Broker,
    queue: str,
    message_id: str,
    reason: str,
    extra: dict[str, object] | None = None,
    *,
    dead_letters: DeadLetters | None = None,
) -> None:
    """Deliver one message on `queue`, then dead-letter it as a consumer would (with
    `dead_letters`, or a `DeadLetters` of its own)."""
    headers = {"_watermill_message_uuid": message_id, "name": "CreateIssuer", **(extra or {})}
    body = f'{{"ID": "{message_id}"}}'.encode()
    connection = await broker.connection()
    await rabbitmq.publish_raw(connection, queue, body, headers, message_id=message_id)
    await keep_next(broker, queue, reason, dead_letters=dead_letters)


async def keep_next(
    broker: Broker, queue: str, reason: str, *, dead_letters: DeadLetters | None = None
) -> None:
    """Dead-letter the next message of `queue` as a consumer would (with `dead_letters`, or
    a `DeadLetters` of its own)."""
    channel = await broker.channel()
    publisher = Publisher(broker)
    try:
        source = await channel.declare_queue(queue, passive=True)
        message = await source.get(no_ack=False)
        keeper = dead_letters or DeadLetters(publisher, Outages(), DELIVERIES)
        assert await keeper.keep(message, reason=reason, source_queue=queue)
        await message.ack()
    finally:
        await publisher.close()
        await channel.close()


async def source_queues(broker: Broker, *names: str) -> None:
    channel = await broker.channel()
    for name in names:
        await command_queue(name).declare(channel)
    await channel.close()


async def test_dead_letters_are_listed_in_order_without_being_consumed(
    broker: Broker,
) -> None:
    queue = unique_name("source")
    await source_queues(broker, queue)
    await dead_letter(broker, queue, "m-1", "first reason", {"aggregateVersion": 3})
    await dead_letter(broker, queue, "m-2", "second reason")
    await dead_letter(broker, queue, "m-3", "third reason")

    letters = await list_dead_letters(broker)

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
    assert await list_dead_letters(broker) == letters
    assert [d.message_id for d in await list_dead_letters(broker, limit=2)] == ["m-1", "m-2"]
    assert await rabbitmq.queue_state(await broker.connection(), DEAD_LETTER_QUEUE) == (3, 0)


async def test_a_reading_takes_the_letters_there_when_it_starts_not_those_arriving(
    broker: Broker,
) -> None:
    """Regression: `dead-letters list` and `trace` read until the queue was empty: in a
    storm of dead letters they ran as long as the storm (80 s for 2,569 letters),
    holding every letter, and every other operator's command gave up after 30 s."""
    queue = unique_name("source")
    await source_queues(broker, queue)
    await dead_letter(broker, queue, "m-1", "before")
    await dead_letter(broker, queue, "m-2", "before")
    async with dead_letters._dead_letter_queue(broker) as letters:
        await dead_letter(broker, queue, "m-3", "while it reads")
        async with contextlib.aclosing(dead_letters._fetched(letters)) as found:
            read = [letter.message_id async for _, letter in found]
    assert read == ["m-1", "m-2"]
    assert [letter.message_id for letter in await list_dead_letters(broker)] == [
        "m-1",
        "m-2",
        "m-3",
    ]


async def test_a_dead_letter_queue_deleted_meanwhile_is_declared_again(broker: Broker) -> None:
    """Regression: the queue was declared once per process; a copy sent after an operator
    deleted it came back unroutable, and dead-lettering was retried as an outage for ever."""
    queue = unique_name("source")
    await source_queues(broker, queue)
    publisher = Publisher(broker)
    dead_letters = DeadLetters(publisher, Outages(), DELIVERIES)
    try:
        await dead_letter(broker, queue, "m-1", "first", dead_letters=dead_letters)
        channel = await broker.channel()
        await channel.queue_delete(DEAD_LETTER_QUEUE)
        await channel.close()
        async with asyncio.timeout(10):
            await dead_letter(broker, queue, "m-2", "second", dead_letters=dead_letters)
    finally:
        await publisher.close()

    assert [d.message_id for d in await list_dead_letters(broker)] == ["m-2"]


async def test_reading_dead_letters_creates_no_queue_where_the_broker_has_none(
    vhost: rabbitmq.Vhost, broker: Broker
) -> None:
    """Regression: `financing trace` (and the dead-letter commands) declared the queue to
    read it, as a classic queue: run before a quorum deployment's first start, they made
    that start fail on a queue of the other type."""
    assert await list_dead_letters(broker) == []
    assert (await requeue_dead_letters(broker)).count == 0

    assert DEAD_LETTER_QUEUE not in await rabbitmq.list_queues(vhost.name)


async def test_dead_letters_of_a_quorum_queue_are_read_whatever_type_the_reader_declares(
    vhost: rabbitmq.Vhost, broker: Broker
) -> None:
    quorum = Broker([vhost.url], Outages(), queue_type="quorum")
    try:
        queue = unique_name("source")
        await source_queues(quorum, queue)
        publisher = Publisher(quorum)
        try:
            keeper = DeadLetters(publisher, Outages(), DELIVERIES)
            await dead_letter(quorum, queue, "m-1", "first", dead_letters=keeper)
        finally:
            await publisher.close()
        assert (await rabbitmq.list_queues(vhost.name))[DEAD_LETTER_QUEUE]["type"] == "quorum"

        letters = await list_dead_letters(broker)  # a reader that would declare it classic
    finally:
        await quorum.close()

    assert [(letter.message_id, letter.reason) for letter in letters] == [("m-1", "first")]


async def test_dead_letter_copy_has_only_string_headers(
    vhost: rabbitmq.Vhost, broker: Broker
) -> None:
    queue = unique_name("source")
    await source_queues(broker, queue)
    await dead_letter(broker, queue, "m-1", "bad header", {"count": 3, "flag": True})

    [message] = await rabbitmq.drain(await broker.connection(), DEAD_LETTER_QUEUE, expected=1)

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
    broker: Broker,
) -> None:
    queue_a, queue_b = unique_name("source_a"), unique_name("source_b")
    await source_queues(broker, queue_a, queue_b)
    await dead_letter(broker, queue_a, "a-1", "reason a1", {"aggregateID": "agg-1"})
    await dead_letter(broker, queue_b, "b-1", "reason b1")
    await dead_letter(broker, queue_a, "a-2", "reason a2")
    await dead_letter(broker, queue_b, "b-2", "reason b2")

    assert (
        await requeue_dead_letters(broker, selection=Selection(source_queue=queue_a))
    ).count == 2

    requeued = await rabbitmq.drain(await broker.connection(), queue_a, expected=2)
    assert [m.message_id for m in requeued] == ["a-1", "a-2"]
    headers = dict(requeued[0].headers or {})
    # Marked as sent back by an operator: a rule that refused it judges it again.
    assert datetime.fromisoformat(str(headers.pop("x-requeued-at"))).tzinfo is not None
    assert headers == {
        "_watermill_message_uuid": "a-1",
        "name": "CreateIssuer",
        "aggregateID": "agg-1",
    }
    assert requeued[0].body == b'{"ID": "a-1"}'
    assert [d.message_id for d in await list_dead_letters(broker)] == ["b-1", "b-2"]

    assert (await requeue_dead_letters(broker, selection=Selection(message_id="b-2"))).count == 1
    [requeued_b] = await rabbitmq.drain(await broker.connection(), queue_b, expected=1)
    assert requeued_b.message_id == "b-2"
    assert [d.message_id for d in await list_dead_letters(broker)] == ["b-1"]

    assert (await requeue_dead_letters(broker)).count == 1
    assert await list_dead_letters(broker) == []
    assert await rabbitmq.queue_state(await broker.connection(), queue_a) == (0, 0)
    assert await rabbitmq.queue_state(await broker.connection(), queue_b) == (1, 0)


async def test_a_requeue_stopped_while_it_publishes_finishes_that_letter_first(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: Ctrl-C between a letter's confirmed copy and its ack left the message
    both requeued and dead-lettered (a second copy at the next requeue)."""
    queue = unique_name("source")
    await source_queues(broker, queue)
    await dead_letter(broker, queue, "m-1", "first reason")
    await dead_letter(broker, queue, "m-2", "second reason")
    publishing, go_on = asyncio.Event(), asyncio.Event()
    publish = Publisher.send_message_to_queue

    async def held(self: Publisher, queue: str, message: AbstractMessage) -> None:
        publishing.set()
        await go_on.wait()
        await publish(self, queue, message)

    monkeypatch.setattr(Publisher, "send_message_to_queue", held)
    taken = Taken()
    requeueing = asyncio.create_task(requeue_dead_letters(broker, taken=taken))
    await publishing.wait()

    requeueing.cancel()  # as a signal does
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await requeueing

    assert taken.count == 1
    assert [letter.message_id for letter in await list_dead_letters(broker)] == ["m-2"]
    [requeued] = await rabbitmq.drain(await broker.connection(), queue, expected=1)
    assert requeued.message_id == "m-1"


async def test_one_command_at_a_time_reads_the_dead_letters(
    broker: Broker, vhost: rabbitmq.Vhost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a reader holds each letter it fetched until it is done, so a second
    reader meanwhile missed them: `discard --all` said it discarded some and left the
    rest, a `list` or `status` showed fewer. The second now waits for the first."""
    queue = unique_name("source")
    await source_queues(broker, queue)
    for message_id in ("m-1", "m-2", "m-3"):
        await dead_letter(broker, queue, message_id, "why")
    monkeypatch.setattr(dead_letters, "READER_WAIT", 0.5)
    other = Broker([vhost.url], Outages())
    try:
        async with dead_letters._read_alone(other):  # another command, reading
            with pytest.raises(Unavailable) as busy:
                await discard_dead_letters(broker)
            # The broker answers: said as another reader, not as an outage.
            assert str(busy.value).startswith("another command (dead-letters list,"), busy.value
            with pytest.raises(Unavailable, match="reading the dead letters"):
                await list_dead_letters(broker)
            assert await dead_letters.being_read(broker)
        assert not await dead_letters.being_read(broker)

        monkeypatch.setattr(dead_letters, "READER_WAIT", 30.0)
        async with dead_letters._read_alone(other):
            discarding = asyncio.create_task(discard_dead_letters(broker))
            await asyncio.wait([discarding], timeout=dead_letters.READER_POLL * 3)
            assert not discarding.done()
        assert (await discarding).count == 3
    finally:
        await other.close()
    assert await list_dead_letters(broker) == []


async def test_a_reason_of_any_length_is_kept_shortened_to_fit_one_header_frame(
    broker: Broker,
) -> None:
    """An exception's text can be of any length; a header frame over the broker's frame
    size closes the whole connection, so the reason kept is at most MAX_REASON_CHARS."""
    queue = unique_name("source")
    await source_queues(broker, queue)
    await dead_letter(broker, queue, "m-long", "why " * 50_000)  # 200,000 characters

    [letter] = await list_dead_letters(broker)
    assert letter.message_id == "m-long"
    assert letter.reason.startswith("why why")
    assert len(letter.reason) <= dead_letters.MAX_REASON_CHARS == 2000


async def test_a_letter_of_a_message_without_an_id_is_listed_without_one_and_not_requeued(
    broker: Broker, vhost: rabbitmq.Vhost
) -> None:
    """Regression: the AMQP client gave the copy of a message with no id (poison, its
    copies could not be told apart) an id of its own; `list` showed it as the message's,
    and `requeue` sent the message back under it, where it was processed (two copies
    of one message, two ids: processed twice)."""
    queue = unique_name("source")
    await source_queues(broker, queue)
    await rabbitmq.publish_without_properties(
        infra.AMQP_HOST,
        infra.AMQP_PORT,
        vhost.name,
        exchange="",
        routing_key=queue,
        body=b'{"ID": "8d1c5f3e-7a52-4c55-9a59-0c1f3f3b6e21"}',
        headers={"name": "CreateIssuer"},
    )
    await keep_next(broker, queue, "PoisonMessage: no message id")

    [letter] = await list_dead_letters(broker)
    assert (letter.message_id, letter.changed) == ("", ("no message id",))
    taken = await requeue_dead_letters(broker)
    assert taken.count == 0
    assert list(taken.left) == [LEFT_CHANGED]
    assert await rabbitmq.queue_state(await broker.connection(), queue) == (0, 0)
    assert [d.reason for d in await list_dead_letters(broker)] == ["PoisonMessage: no message id"]


async def test_a_letter_whose_headers_were_kept_as_text_is_not_requeued_as_sent(
    broker: Broker,
) -> None:
    """Regression: a message refused for a header that is no string was kept with that
    header as text, and `requeue` sent that copy back, which the service processed (an
    integer `_watermill_message_uuid` as the id "12345", bytes that are not UTF-8 as an
    id with replacement characters): a message its publisher never sent."""
    queue = unique_name("source")
    await source_queues(broker, queue)
    await dead_letter(broker, queue, "m-1", "header 'flag' is not a string", {"flag": True})
    not_utf8 = bytearray(b"\xff\xfe")  # a byte array ('x'), and not UTF-8 either
    await dead_letter(broker, queue, "m-2", "header 'raw' is not UTF-8", {"raw": not_utf8})
    await dead_letter(broker, queue, "m-3", "long", {"trace": "t" * (MAX_HEADER_CHARS + 1)})
    await dead_letter(broker, queue, "m-4", "refused by a rule", {"note": "café"})

    assert [(d.message_id, d.changed) for d in await list_dead_letters(broker)] == [
        ("m-1", ("header 'flag' kept as text",)),
        ("m-2", ("header 'raw' kept as text",)),
        ("m-3", (f"header 'trace' cut to {MAX_HEADER_CHARS} characters",)),
        ("m-4", ()),
    ]
    taken = await requeue_dead_letters(broker)
    assert (taken.count, dict(taken.left)) == (1, {LEFT_CHANGED: 3})
    [requeued] = await rabbitmq.drain(await broker.connection(), queue, expected=1)
    assert requeued.message_id == "m-4"
    assert [d.message_id for d in await list_dead_letters(broker)] == ["m-1", "m-2", "m-3"]
