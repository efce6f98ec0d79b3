"""The broker connection: lost and reopened, and each outage logged once when it starts
and once when it is over, however many consumers and publishers notice it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import aiormq
import pytest
from aio_pika.tools import OneShotCallback
from structlog.testing import capture_logs

from financing.adapters.rabbitmq.connection import (
    HEARTBEAT,
    PASSED_OVER,
    VHOST_REFUSED,
    Broker,
    _untrusted,
    close_channel,
    describe_url,
)
from financing.adapters.rabbitmq.consumer import Deliveries, QueueConsumer, consume
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology import command_queue
from financing.application import codec
from financing.application.errors import Unavailable
from financing.application.messages import CreateIssuer
from financing.application.pipeline import Decoded, Outcome, OutcomeKind, compose
from financing.application.ports import Envelope
from financing.application.retry import DELIVERIES, Outages
from financing.entrypoints.event_loop import new_event_loop
from tests.support import infra, rabbitmq
from tests.support.infra import unique_name, wait_until


@pytest.fixture
async def vhost() -> AsyncIterator[rabbitmq.Vhost]:
    # Its own vhost: the test closes every connection of it.
    async with rabbitmq.private_vhost("fin_connection") as vhost:
        yield vhost


def command() -> Envelope:
    return Envelope(
        message_id=str(uuid.uuid4()),
        name=CreateIssuer.name(),
        body=codec.encode(CreateIssuer(uuid.uuid4())),
    )


async def sends(publisher: Publisher, queue: str) -> bool:
    """Whether a command sent to `queue` now is confirmed."""
    try:
        await publisher.send_to_queue(queue, command())
    except Unavailable:  # PublishFailed included
        return False
    return True


def lines(logs: list[dict[str, Any]], event: str) -> list[tuple[int, dict[str, Any]]]:
    return [(index, line) for index, line in enumerate(logs) if line["event"] == event]


async def test_a_dropped_connection_is_logged_once_as_unavailable_and_once_as_reconnected(
    vhost: rabbitmq.Vhost,
) -> None:
    outages = Outages()
    broker = Broker([vhost.url], outages)
    publisher = Publisher(broker)
    dead_letters = DeadLetters(publisher, outages, DELIVERIES)
    queue = unique_name("cmd")
    await publisher.declare_command_queue(queue)
    handled: list[str] = []

    async def record(decoded: Decoded) -> Outcome:
        handled.append(decoded.envelope.message_id)
        return Outcome.processed()

    step = compose(
        record,
        names=frozenset({CreateIssuer.name()}),
        others=OutcomeKind.DEAD_LETTERED,
        policy=DELIVERIES,
        outages=outages,
    )
    # Two consumers and a publisher on the one connection: all notice the loss.
    consumers: list[QueueConsumer] = []
    tasks: list[asyncio.Task[None]] = []
    for _ in range(2):
        deliveries = Deliveries(step)
        consumer = QueueConsumer(
            broker, command_queue(queue), dead_letters, outages, deliveries.receive, prefetch=8
        )
        consumers.append(consumer)
        tasks.append(asyncio.create_task(consume(consumer, deliveries)))
    try:

        async def consuming() -> bool:
            for task in tasks:
                if task.done():
                    task.result()
            return all(consumer.consuming.is_set() for consumer in consumers)

        await wait_until(consuming, what="both consumers consuming")
        with capture_logs() as logs:
            await rabbitmq.close_connections(vhost.name)

            async def reconnected() -> bool:
                return bool(lines(logs, "broker reconnected"))

            await wait_until(reconnected, timeout=10, what="the reconnection logged")
            after = command()

            async def sent() -> bool:
                try:
                    await publisher.send_to_queue(queue, after)
                except Unavailable:
                    return False
                return True

            await wait_until(sent, timeout=10, what="publishing after the reconnection")

            async def processed() -> bool:
                return after.message_id in handled

            await wait_until(processed, timeout=10, what="a message after the reconnection")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        await publisher.close()
        await broker.close()

    [(lost_at, lost)] = lines(logs, "broker unavailable")
    [(back_at, back)] = lines(logs, "broker reconnected")
    assert lost_at < back_at
    assert lost["log_level"] == "warning"
    assert lost["dependency"] == "broker"
    assert "CONNECTION_FORCED" in lost["error"]
    assert back["log_level"] == "warning"
    assert back["dependency"] == "broker"
    assert isinstance(back["outage_seconds"], float)
    assert 0 <= back["outage_seconds"] < 10
    assert outages.down() == frozenset()


async def test_with_several_addresses_the_connection_moves_to_another_when_its_node_goes_away(
    vhost: rabbitmq.Vhost,
) -> None:
    # Two ways to the broker, as two nodes of a cluster would be.
    first, second = rabbitmq.BrokerProxy(), rabbitmq.BrokerProxy()
    await first.start()
    await second.start()
    broker = Broker([first.url(vhost.name), second.url(vhost.name)], Outages())
    publisher = Publisher(broker)
    queue = unique_name("fin_nodes")
    try:
        await publisher.declare_command_queue(queue)
        await publisher.send_to_queue(queue, command())  # through the first
        await first.close()  # that node is gone: refused from now on

        await wait_until(
            lambda: sends(publisher, queue),
            timeout=30.0,
            interval=0.2,
            what="a send through the other node",
        )

        async def both_queued() -> bool:
            ready: int = (await rabbitmq.list_queues(vhost.name))[queue]["messages_ready"]
            return ready == 2

        await wait_until(both_queued, what="both messages in the queue")
    finally:
        await publisher.close()
        await broker.close()
        await second.close()


async def test_a_broker_passed_over_for_the_next_is_named_in_the_log(
    vhost: rabbitmq.Vhost,
) -> None:
    """Regression (a probe): with a first broker URL that was broken and a second that
    worked, nothing said the first was broken until the second failed too."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # refuses once closed
    broken = f"amqp://guest:secret@127.0.0.1:{port}/{vhost.name}"
    broker = Broker([broken, infra.amqp_url(vhost.name)], Outages())
    try:
        with capture_logs() as logs:
            await broker.connection()
    finally:
        await broker.close()
    [(_, line)] = lines(logs, PASSED_OVER)
    assert line["log_level"] == "warning"
    assert f"127.0.0.1:{port}/{vhost.name}" in line["why"] and "secret" not in line["why"]
    assert line["broker"] == describe_url(infra.amqp_url(vhost.name))


async def test_a_connection_asks_for_a_ten_second_heartbeat_unless_its_url_sets_one(
    vhost: rabbitmq.Vhost,
) -> None:
    """Regression: the client library's default of 60 s left a connection the broker would
    never answer again in place for three minutes."""
    negotiated = []
    for url in (vhost.url, f"{vhost.url}?heartbeat=3"):
        broker = Broker([url], Outages())
        try:
            underlay = (await broker.connection()).transport
            assert underlay is not None
            negotiated.append(getattr(underlay.connection, "heartbeat_timeout", None))
        finally:
            await broker.close()
    assert negotiated == [HEARTBEAT, 3] == [10, 3]


async def test_a_connection_the_broker_never_answers_again_is_given_up_and_reopened(
    vhost: rabbitmq.Vhost,
) -> None:
    """A connection whose node was replaced behind the same address (or is behind a
    partition that drops its packets) is given up once its heartbeats stop, and the next
    use opens a new one, the outage logged once. With the library's default heartbeat that
    took three minutes; the service's own (HEARTBEAT) takes about 33 s, this test's 6 s."""
    proxy = rabbitmq.BrokerProxy()
    await proxy.start()
    outages = Outages()
    # A one-second heartbeat: given up after (1 + 1) x 3 s without a frame.
    broker = Broker([f"{proxy.url(vhost.name)}?heartbeat=1"], outages)
    publisher = Publisher(broker, confirm_timeout=1.0)
    queue = unique_name("fin_stranded")
    try:
        await publisher.declare_command_queue(queue)
        await publisher.send_to_queue(queue, command())
        stranded = await broker.connection()
        proxy.strand()  # the connection stays open at both ends; nothing goes through it

        with capture_logs() as logs:
            await wait_until(
                lambda: sends(publisher, queue),
                timeout=30.0,
                interval=0.2,
                what="a send on a new connection",
            )
        assert await broker.connection() is not stranded
        assert [line["event"] for line in logs if line["event"].startswith("broker ")] == [
            "broker unavailable",
            "broker reconnected",
        ]
    finally:
        await publisher.close()
        await broker.close()
        await proxy.close()


async def test_a_virtual_host_the_broker_will_not_open_is_an_outage_saying_why() -> None:
    """Regression: reported as `InvalidFrameError: Expected one of ['Connection.OpenOk'],
    got <Connection.Close object at 0x...>`, which says nothing of the vhost."""
    missing = unique_name("fin_no_such_vhost")
    broker = Broker([infra.amqp_url(missing)], Outages())
    with pytest.raises(Unavailable) as unavailable:
        await broker.connection()
    url = describe_url(infra.amqp_url(missing))
    assert str(unavailable.value) == f"broker unavailable: {url}: {VHOST_REFUSED}"


async def test_a_virtual_host_refused_after_the_broker_accepted_the_service_is_an_outage(
    vhost: rabbitmq.Vhost,
) -> None:
    """Its permissions revoked, or the vhost deleted and made again, a reconnection
    waits for it like for any outage, saying why."""
    outages = Outages()
    broker = Broker([vhost.url], outages)
    await broker.connection()
    await rabbitmq.revoke_permissions(vhost.name)
    try:
        await rabbitmq.close_connections(vhost.name)

        async def refused_as_an_outage() -> bool:
            try:
                await broker.connection()
            except Unavailable as error:
                return VHOST_REFUSED in str(error)
            return False

        await wait_until(refused_as_an_outage, what="the reconnection refused as an outage")
    finally:
        await rabbitmq.grant_permissions(vhost.name)
    await broker.close()


async def test_a_connection_the_broker_ends_is_closed_not_left_to_the_collector(
    vhost: rabbitmq.Vhost,
) -> None:
    """Regression: a connection the broker closed stayed open in aio-pika's eyes; its
    finaliser scheduled the close, and when it ran outside the event loop (the collector
    in another thread, or between two tests) it warned that the close was never awaited."""
    broker = Broker([vhost.url], Outages())
    connection = await broker.connection()
    await rabbitmq.close_connections(vhost.name)

    async def closed() -> bool:
        return connection.is_closed  # what aio-pika's finaliser checks

    await wait_until(closed, what="the connection the broker ended closed")
    await broker.close()


async def test_a_connection_the_broker_refuses_is_closed_not_left_to_the_collector(
    vhost: rabbitmq.Vhost,
) -> None:
    """Regression: aio-pika left a connection that failed to open to its finaliser, which
    scheduled its close whenever the collector came by, and on a stopped loop warned that
    the close was never awaited (the one warning of the whole suite)."""

    def closes() -> set[asyncio.Task[Any]]:
        gc.collect()  # a connection object left behind is finalised now
        tasks = asyncio.all_tasks()
        return {task for task in tasks if "Connection.close" in repr(task.get_coro())}

    before = closes()  # those of what the tests before left
    broker = Broker([vhost.url.rsplit("/", 1)[0] + "/" + unique_name("absent")], Outages())
    with pytest.raises(Unavailable):
        await broker.connection()
    assert closes() - before == set()
    await broker.close()


async def test_a_connection_the_broker_ends_as_channels_open_is_reopened_later_each_time(
    vhost: rabbitmq.Vhost,
) -> None:
    """Regression: a user's channel limit below what the service opens: the broker ended
    each connection as the channel past the limit opened (530 NOT_ALLOWED), and every
    caller reopened it at once: 460 connections in 40 s, an outage and a reconnection
    logged with each, the broker hammered."""
    async with rabbitmq.limited_user(vhost.name, {"max-channels": 1}) as url:
        broker = Broker([url], Outages())
        refusals: list[str] = []
        with capture_logs() as logs:
            started = time.monotonic()

            async def a_third_connection_refused() -> bool:
                # A caller trying every 20 ms, as the service's consumers and health
                # probe do together.
                try:
                    await broker.channel()
                    await broker.channel()  # one past the limit: the connection ends
                except Unavailable as error:
                    refusals.append(str(error))
                return len(lines(logs, "connected to broker")) >= 3 and not broker.connected

            try:
                await wait_until(
                    a_third_connection_refused, timeout=10, interval=0.02, what="a third refusal"
                )
            finally:
                await broker.close()
    waited = time.monotonic() - started
    # Reopened 0.5 s, then 1 s, after connections that lasted an instant (reopened at once,
    # the third came with the third try); the tries meanwhile were refused.
    assert waited >= 1.4, (waited, len(refusals))
    assert len(refusals) >= 10, (waited, len(refusals))
    assert any("maximum allowed user limit" in refusal for refusal in refusals), refusals


async def test_a_connection_closed_by_an_operator_is_reopened_at_once_however_young(
    vhost: rabbitmq.Vhost,
) -> None:
    """Held off as a refusal is, a flapping broker (the fault suite's: every connection
    closed each 0.05-0.6 s) let 46 sagas through where 218 went reopened at once."""
    broker = Broker([vhost.url], Outages())
    try:
        for _ in range(3):
            await broker.connection()
            await rabbitmq.close_connections(vhost.name)  # CONNECTION_FORCED, an instant old

            async def lost() -> bool:
                return not broker.connected

            await wait_until(lost, what="the close noticed")
            await broker.connection()  # not held off: Unavailable would fail the test
    finally:
        await broker.close()


def channel_watchers() -> int:
    """How many callbacks aio-pika's channels left alive, to run when a channel closes."""
    gc.collect()
    return sum(isinstance(thing, OneShotCallback) for thing in gc.get_objects())


async def test_channels_closed_by_the_service_or_the_broker_leave_nothing_on_the_connection(
    vhost: rabbitmq.Vhost,
) -> None:
    """Regression: each channel opened and closed left its callbacks on the connection for
    the connection's life (about 4 kB): a queue the broker refused, looked at again on a
    new channel every 10 s, cost 1.5 MB an hour."""
    broker = Broker([vhost.url], Outages())
    try:
        kept = await broker.channel()
        queue = unique_name("limited")
        await kept.declare_queue(queue, durable=True, arguments={"x-max-length": 5})

        async def refused_and_closed() -> None:
            refused = await broker.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await refused.declare_queue(queue, durable=True)  # the broker closes it
            await close_channel(refused)
            closed = await broker.channel()
            await close_channel(closed)

        await refused_and_closed()  # whatever the first use creates once
        before = channel_watchers()
        for _ in range(50):
            await refused_and_closed()
        assert channel_watchers() - before < 10
        assert broker.connected  # the connection's own close watched still
        await kept.declare_queue(queue, passive=True)
    finally:
        await broker.close()


@contextlib.asynccontextmanager
async def closing_at_once(*, reset: bool) -> AsyncIterator[str]:
    """A broker URL whose port closes each connection as soon as it is made, before a
    word (`reset`: with an RST), as a proxy or a load balancer with no broker behind it
    does."""

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0)
    try:
        yield f"amqp://guest:guest@127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_port_that_closes_connections_at_once_is_an_outage(reset: bool) -> None:
    """Regression (a probe): a connection closed before its first frame raised
    StopAsyncIteration out of the AMQP client (on the service's loop, now and then),
    taken for a bug: the service exited 1; and one reset in the handshake chained its
    errors to each other, which the look for a TLS refusal followed round for ever, the
    process hung at full CPU (SIGTERM too)."""

    async def attempts() -> None:
        async with closing_at_once(reset=reset) as url:
            broker = Broker([url], Outages())
            try:
                for _ in range(40):
                    with pytest.raises(Unavailable, match=r"broker unavailable: amqp://127"):
                        async with asyncio.timeout(10):
                            await broker.connection()
                    broker._held_off = None  # the next attempt at once, not after a hold-off
            finally:
                await broker.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(attempts())


def test_an_error_chained_to_itself_is_looked_through_once() -> None:
    reset = ConnectionResetError("Connection reset by peer")
    error = aiormq.exceptions.AMQPConnectionError("Server connection reset")
    error.__cause__ = reset
    reset.__context__ = error  # as aiormq chains them: `raise self._exception from e`
    looking = threading.Thread(target=_untrusted, args=(error,), daemon=True)
    looking.start()
    looking.join(timeout=5)
    assert not looking.is_alive(), "the look went round the chain"


@pytest.mark.parametrize(
    ("refuse", "allow", "says"),
    [
        # The user's password changed, its connections closed ("rotate").
        (
            ("change_password", "{user}", "another"),
            ("change_password", "{user}", "{user}"),
            "ACCESS_REFUSED",
        ),
        # A connection limit set on the virtual host, its connections closed.
        (
            ("set_vhost_limits", "-p", "{vhost}", '{{"max-connections": 0}}'),
            ("clear_vhost_limits", "-p", "{vhost}"),
            "530 NOT_ALLOWED",
        ),
    ],
)
async def test_a_broker_that_refuses_the_service_after_its_connection_was_closed_is_said_so(
    vhost: rabbitmq.Vhost, refuse: tuple[str, ...], allow: tuple[str, ...], says: str
) -> None:
    """Regression (a probe): an operator who closed the service's connections and changed
    its password, or set a connection limit, got "broker unavailable: CONNECTION_FORCED"
    and, 30 s later, "broker reconnected": the refusal in between was said by nothing
    but `financing status`."""
    async with rabbitmq.limited_user(vhost.name, {}) as url:
        user = url.split("//", 1)[1].split(":", 1)[0]
        outages = Outages()
        broker = Broker([url], outages)
        try:
            await broker.connection()
            with capture_logs() as logs:
                fill = {"user": user, "vhost": vhost.name}
                await rabbitmq.rabbitmqctl(*(a.format(**fill) for a in refuse))
                await rabbitmq.close_connections(vhost.name)

                async def refused() -> bool:
                    try:
                        await broker.connection()
                    except Unavailable as error:
                        outages.failed(error, connection_lost=True)
                    return any(line["event"] == "broker still unavailable" for line in logs)

                await wait_until(refused, what="the refusal said")
                await rabbitmq.rabbitmqctl(*(a.format(**fill) for a in allow))

                async def back() -> bool:
                    with suppress(Unavailable):
                        await broker.connection()
                    await outages.check_once(within=5)
                    return not outages.down()

                await wait_until(back, what="the broker taken back")
        finally:
            await broker.close()
    said = [
        (line["event"], line.get("error", "")) for line in logs if line["log_level"] == "warning"
    ]
    assert [event for event, _ in said] == [
        "broker unavailable",
        "broker still unavailable",
        "broker reconnected",
    ], said
    assert says in said[1][1], said
