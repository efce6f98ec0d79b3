"""`financing broker hand-back`: a broker the reference used, given back to it as the
reference left it, with nothing of the service's taking copies of events."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.hand_back import (
    REFERENCE_COMMAND_QUEUES,
    REFERENCE_EVENT_QUEUES,
    StillConsumed,
    hand_back,
)
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application.retry import Outages
from tests.support import rabbitmq
from tests.support.infra import wait_until
from tests.support.service import run_cli

PLACED = "BidOnInvoicePlacedEvent"


@pytest.fixture
async def taken_over() -> AsyncIterator[tuple[rabbitmq.Vhost, Broker]]:
    """A broker the reference used (its queues, declared and bound as it declares them),
    then the service's topology declared on it, as its start-up does."""
    async with rabbitmq.private_vhost("fin_hand_back") as vhost:
        reference = await aio_pika.connect(vhost.url)
        channel = await reference.channel()
        events = await channel.declare_exchange(
            topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        for name in REFERENCE_COMMAND_QUEUES:
            await channel.declare_queue(name, durable=True)
        for name in (*REFERENCE_EVENT_QUEUES, topology.REFERENCE_PROJECTOR_QUEUE):
            queue = await channel.declare_queue(name, durable=True)
            await queue.bind(events, routing_key="")
        await reference.close()
        broker = Broker([vhost.url], Outages())
        try:
            await topology.declare_on(broker)
            yield vhost, broker
        finally:
            await broker.close()


async def publish_event(vhost: rabbitmq.Vhost, body: bytes) -> None:
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel()
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=False)
        await events.publish(aio_pika.Message(body, headers={"name": PLACED}), "")
    finally:
        await connection.close()


async def taken_from(vhost: rabbitmq.Vhost, queue: str) -> list[AbstractIncomingMessage]:
    """Every message of `queue`, taken, in order."""
    connection = await aio_pika.connect(vhost.url)
    taken = []
    try:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
    finally:
        await connection.close()
    return taken


async def waiting(vhost: rabbitmq.Vhost, queue: str) -> int:
    return int((await rabbitmq.list_queues(vhost.name))[queue]["messages_ready"])


async def test_the_broker_is_handed_back_as_the_reference_left_it(
    taken_over: tuple[rabbitmq.Vhost, Broker],
) -> None:
    """Regression: stopped for good (a rollback to the reference), the service left
    `events` feeding its own exchange and queues: its projector's queue took a copy of
    every event the reference published, for ever; and the deliveries it had deferred
    came back to the reference's queues with the broker's `x-death`, a header that is no
    string, which the reference's consumers refuse and take again at once, for ever."""
    vhost, broker = taken_over
    publisher = Publisher(broker)
    try:
        bid = aio_pika.Message(b'{"bid": 1}', headers={"name": "BidOnInvoice"})
        await publisher.send_message_to_queue("BidOnInvoice", bid)
        # Back at once, with the broker's x-death (first: the broker expires the head only).
        back = aio_pika.Message(b'{"sell": 1}', headers={"name": "SellInvoice"}, expiration=0.01)
        await publisher.defer(back, "SellInvoice")
        later = aio_pika.Message(
            b'{"bid": 2}',
            headers={"name": "BidOnInvoice"},
            expiration=60,
            reply_to="replies",
            type="bid",
            app_id="bidder",
        )
        await publisher.defer(later, "BidOnInvoice")  # waits a minute in financing_deferred
        # Deferred for a queue deleted since: the broker would drop it as it expired.
        await publisher.send_message_to_queue(
            topology.DEAD_LETTER_QUEUE, aio_pika.Message(b"{}")
        )  # a dead letter already there, kept
        gone = aio_pika.Message(b'{"gone": 1}', headers={"name": "Gone"}, expiration=60)
        await publisher.defer(gone, "Gone")
    finally:
        await publisher.close()
    await publish_event(vhost, b'{"placed": 1}')

    async def came_back() -> bool:
        return await waiting(vhost, "SellInvoice") == 1

    await wait_until(came_back, timeout=10, what="the expired deferral back in its queue")

    handed = await hand_back(broker)

    said = "\n".join(handed.done)
    assert "1 deferred message(s) sent back to their queues" in said, said
    assert "1 deferred for a queue the broker has no longer kept in" in said, said
    # The sell back with its x-death; the others left where they are.
    assert "1 message(s) of the reference's queues with a header that is no string" in said
    assert "events_financing_projector (1 message(s))" in said, said
    assert handed.dead_letters.endswith(
        "kept, with 2 dead letter(s)"
        " (`financing dead-letters` reads it; delete it once what it holds is of no use)"
    )
    bindings = await rabbitmq.list_bindings_with_arguments(vhost.name)
    assert sorted(bindings) == sorted(
        (topology.EVENTS_EXCHANGE, name, "", "")
        for name in (*REFERENCE_EVENT_QUEUES, topology.REFERENCE_PROJECTOR_QUEUE)
    )
    exchanges = await rabbitmq.list_exchanges(vhost.name)
    assert not {topology.EVENTS_ROUTER, topology.UNROUTED, topology.DEFERRALS} & set(exchanges)
    queues = set(await rabbitmq.list_queues(vhost.name))
    assert queues == {
        *REFERENCE_COMMAND_QUEUES,
        *REFERENCE_EVENT_QUEUES,
        topology.REFERENCE_PROJECTOR_QUEUE,
        topology.DEAD_LETTER_QUEUE,
    }
    [sell] = await taken_from(vhost, "SellInvoice")
    assert sell.body == b'{"sell": 1}'
    assert all(isinstance(value, str) for value in sell.headers.values()), sell.headers
    assert "x-death" not in sell.headers
    bids = await taken_from(vhost, "BidOnInvoice")
    assert [message.body for message in bids] == [b'{"bid": 1}', b'{"bid": 2}']
    assert [message.expiration for message in bids] == [None, None]
    assert (bids[1].reply_to, bids[1].type, bids[1].app_id) == ("replies", "bid", "bidder")
    earlier, letter = await taken_from(vhost, topology.DEAD_LETTER_QUEUE)
    assert earlier.body == b"{}"  # kept where it was
    assert letter.body == b'{"gone": 1}'
    assert letter.headers["x-source-queue"] == "Gone"
    assert "which the broker has no longer" in str(letter.headers["x-death-reason"])

    # Each reference queue takes each event once, straight from `events`.
    await publish_event(vhost, b'{"placed": 2}')
    placed = await taken_from(vhost, f"events_{PLACED}")
    assert [message.body for message in placed] == [b'{"placed": 1}', b'{"placed": 2}']
    [projected] = await taken_from(vhost, topology.REFERENCE_PROJECTOR_QUEUE)
    assert projected.body == b'{"placed": 2}'


async def test_a_hand_back_while_the_service_still_runs_changes_nothing(
    taken_over: tuple[rabbitmq.Vhost, Broker],
) -> None:
    vhost, broker = taken_over
    before = sorted(await rabbitmq.list_bindings_with_arguments(vhost.name))
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel()
        projector = await channel.get_queue(topology.PROJECTOR_QUEUE, ensure=False)

        async def projected(message: AbstractIncomingMessage) -> None:
            await message.ack()

        await projector.consume(projected)
        with pytest.raises(StillConsumed, match=r"events_financing_projector \(1\)"):
            await hand_back(broker)
        env = {**os.environ, "AMQP_ADDRESS": vhost.url}
        refused = await run_cli(env, "broker", "hand-back")
    finally:
        await connection.close()
    assert sorted(await rabbitmq.list_bindings_with_arguments(vhost.name)) == before
    assert refused.exit_code == 1, refused.describe()
    assert refused.stderr.startswith("financing broker hand-back: queues are being read")

    handed = await run_cli(env, "broker", "hand-back")
    assert handed.exit_code == 0, handed.describe()
    assert handed.stdout.splitlines()[-1] == (
        "the broker is the reference's again: start its processes"
    )
    # Regression (a probe): run again, it said every step again, as if the first run had
    # left them undone.
    again = await run_cli(env, "broker", "hand-back")
    assert again.exit_code == 0, again.describe()
    assert again.stdout.splitlines() == [
        "nothing left to do: handed back already",
        f"queue {topology.DEAD_LETTER_QUEUE!r}: kept, with 0 dead letter(s) (`financing"
        " dead-letters` reads it; delete it once what it holds is of no use)",
        "the broker is the reference's again: start its processes",
    ]
    assert (await hand_back(broker)).done == []


async def test_a_broker_without_events_is_handed_back_all_the_same(
    taken_over: tuple[rabbitmq.Vhost, Broker],
) -> None:
    """Regression: the reference's queues were bound to `events` before it was declared:
    a broker without it (deleted by an operator) failed every hand-back, "unavailable"."""
    vhost, broker = taken_over
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(topology.EVENTS_EXCHANGE)
    finally:
        await connection.close()

    await hand_back(broker)

    assert topology.EVENTS_EXCHANGE in await rabbitmq.list_exchanges(vhost.name)
    bindings = await rabbitmq.list_bindings_with_arguments(vhost.name)
    assert (topology.EVENTS_EXCHANGE, f"events_{PLACED}", "", "") in bindings


async def test_the_reference_projectors_queue_the_service_retired_is_bound_again(
    taken_over: tuple[rabbitmq.Vhost, Broker],
) -> None:
    """Regression (a review): the queue was declared and bound only when absent, so one
    the service had retired (unbound, kept for what it held) stayed unbound, and missed
    every event published until the reference's projector declared it again."""
    vhost, broker = taken_over
    # As the service leaves it when it takes over: kept for what it held, unbound.
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(topology.REFERENCE_PROJECTOR_QUEUE, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"before": 1}'), topology.REFERENCE_PROJECTOR_QUEUE
        )
    finally:
        await connection.close()
    unbound = await rabbitmq.list_bindings_with_arguments(vhost.name)
    assert (topology.EVENTS_EXCHANGE, topology.REFERENCE_PROJECTOR_QUEUE, "", "") not in unbound

    handed = await hand_back(broker)

    assert (
        f"queue {topology.REFERENCE_PROJECTOR_QUEUE!r}, the reference projector's, bound to"
        f" {topology.EVENTS_EXCHANGE!r} again, as the reference declares it" in handed.done
    ), handed.done
    await publish_event(vhost, b'{"after": 1}')
    kept = await taken_from(vhost, topology.REFERENCE_PROJECTOR_QUEUE)
    assert [message.body for message in kept] == [b'{"before": 1}', b'{"after": 1}']


async def test_a_quorum_deployment_is_handed_back_whole() -> None:
    """Regression (probes with FINANCING_QUEUE_TYPE=quorum): the service's queues were
    deleted "if unused", which RabbitMQ 3.x refuses for a quorum queue with an error that
    closes the whole connection: the hand-back stopped half way, said as the broker being
    unavailable, at every run; a quorum `events_query` the service had retired holding
    messages was declared again as a classic one, refused likewise; and the count a
    quorum queue adds to each delivery was taken for a record of a dead-lettering, every
    waiting command sent again at each run."""
    async with rabbitmq.private_vhost("fin_hand_back_q") as vhost:
        plain = await aio_pika.connect(vhost.url)
        channel = await plain.channel()
        events = await channel.declare_exchange(
            topology.EVENTS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        kept = await channel.declare_queue(
            topology.REFERENCE_PROJECTOR_QUEUE,
            durable=True,
            arguments={"x-queue-type": "quorum"},
        )
        await kept.bind(events, routing_key="")
        await events.publish(aio_pika.Message(b"{}", headers={"name": PLACED}), "")
        await plain.close()
        broker = Broker([vhost.url], Outages(), queue_type="quorum")
        try:
            await topology.declare_on(broker)  # retires it: unbound, kept for what it holds
            publisher = Publisher(broker)
            try:
                command = aio_pika.Message(b"{}", headers={"name": "CreateIssuer"})
                await publisher.send_message_to_queue("CreateIssuer", command)
            finally:
                await publisher.close()
            handed = await hand_back(broker)
            again = await hand_back(broker)
        finally:
            await broker.close()
        left = await rabbitmq.list_queues(vhost.name)
        bindings = await rabbitmq.list_bindings_with_arguments(vhost.name)
        commands = await taken_from(vhost, "CreateIssuer")
    said = "\n".join(handed.done)
    assert "events_financing_projector (0 message(s))" in said, said
    assert "header that is no string" not in said, said
    assert "bound to 'events' again" in said, said
    for name in (topology.PROJECTOR_QUEUE, topology.UNROUTED, topology.DEFERRALS):
        assert name not in left, sorted(left)
    assert topology.DEAD_LETTER_QUEUE in left  # the dead letters are kept
    assert len(commands) == 1  # left where it is, for the reference's handler
    assert (topology.EVENTS_EXCHANGE, topology.REFERENCE_PROJECTOR_QUEUE, "", "") in bindings
    assert not [line for line in again.done if "header that is no string" in line], again
