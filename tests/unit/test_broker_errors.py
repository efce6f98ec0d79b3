"""What aiormq leaves pending when a channel or its connection closes fails with a bare
`Exception`: that is the broker's doing (an outage), not a bug of the service."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import aiormq
import pytest
import structlog
from aiormq.base import FutureStore

from financing.adapters.rabbitmq import publisher as publisher_module
from financing.adapters.rabbitmq.connection import (
    Broker,
    SharedAttempt,
    is_broker_error,
    translated,
)
from financing.adapters.rabbitmq.publisher import Publisher, PublishFailed
from financing.application.errors import Refused, Unavailable
from financing.application.ports import Envelope
from financing.application.retry import Outages
from tests.support.infra import wait_until


async def rejected_as_aiormq_rejects(reason: BaseException | None = None) -> BaseException:
    """The exception a pending future of aiormq's is failed with as its channel or
    connection closes: a bare Exception, or what ended the connection's reader (a
    CancelledError when the broker missed its heartbeats)."""
    store = FutureStore(asyncio.get_running_loop())
    pending = asyncio.get_running_loop().create_future()
    store.add(pending)
    await store.reject_all(reason)
    error = pending.exception()
    assert error is not None
    return error


async def test_aiormqs_failure_of_what_a_closing_channel_left_pending_is_a_broker_error() -> None:
    error = await rejected_as_aiormq_rejects()

    assert is_broker_error(error)
    with pytest.raises(Unavailable, match="closed"), translated():
        raise error


def test_an_exception_with_a_message_or_of_another_type_is_not() -> None:
    assert not is_broker_error(Exception("a bug"))
    assert not is_broker_error(RuntimeError())
    assert not is_broker_error(ValueError("bad"))


class ClosingExchange:
    """An exchange whose publish fails as aiormq fails it when the connection closes."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def publish(self, *_: Any, **__: Any) -> None:
        raise self.error


class GivenChannel:
    """A side channel of the publisher's that is the test's."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    async def get(self) -> Any:
        return self.channel

    async def close(self) -> None:
        return None


class OpenedOn(Publisher):
    """A publisher whose channels and `events` exchange are the test's."""

    def __init__(self, *, channel: Any = None, exchange: Any = None) -> None:
        super().__init__(Broker(["amqp://nowhere/"], Outages()))
        self._given = (channel, exchange)
        self._probe = self._declaring = GivenChannel(channel)  # type: ignore[assignment]

    async def _opened(self, what: str, lane: Any) -> tuple[Any, Any]:
        return self._given


async def assert_unconfirmed_alone_and_in_a_batch(publisher: Publisher, says: str) -> None:
    envelope = Envelope(message_id="m-1", name="CreateIssuer", body=b"{}")
    for batch in ([envelope], [envelope, envelope]):
        with pytest.raises(PublishFailed, match=says):
            await publisher.publish_events(batch)


async def test_a_publish_failed_by_a_closing_connection_is_an_unconfirmed_publish() -> None:
    publisher = OpenedOn(exchange=ClosingExchange(await rejected_as_aiormq_rejects()))
    await assert_unconfirmed_alone_and_in_a_batch(publisher, "closed")


async def test_a_publish_failed_by_a_missed_heartbeat_is_an_unconfirmed_publish() -> None:
    """Regression: the CancelledError came out of the publisher as if its task were being
    cancelled; in the relayer that stopped the whole service."""
    error = await rejected_as_aiormq_rejects(asyncio.CancelledError())
    assert isinstance(error, asyncio.CancelledError)
    publisher = OpenedOn(exchange=ClosingExchange(error))
    await assert_unconfirmed_alone_and_in_a_batch(publisher, "heartbeats")


async def test_a_call_failed_by_a_missed_heartbeat_is_an_outage_and_a_cancel_a_cancel() -> None:
    error = await rejected_as_aiormq_rejects(asyncio.CancelledError())
    with pytest.raises(Unavailable, match="heartbeats"), translated():
        raise error

    started = asyncio.Event()

    async def cancelled_inside() -> None:
        with translated():
            started.set()
            await asyncio.Event().wait()

    waiting = asyncio.create_task(cancelled_inside())
    await asyncio.wait_for(started.wait(), 5)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


class DeclaringOnALostConnection:
    """A channel whose declaration fails as aiormq fails it when the broker missed its
    heartbeats."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def declare_exchange(self, *_: Any, **__: Any) -> object:
        raise self.error

    async def declare_queue(self, *_: Any, **__: Any) -> object:
        raise self.error


async def test_a_probe_failed_by_a_missed_heartbeat_is_a_failed_probe() -> None:
    """Regression: the probe's declaration raised aiormq's CancelledError as it was, so
    the probe's callers (the health probe every second, the outage watch) ended as if
    they were being cancelled, and the supervisor stopped the service (exit 1) in the
    outage it was meant to ride out."""
    error = await rejected_as_aiormq_rejects(asyncio.CancelledError())
    publisher = OpenedOn(channel=DeclaringOnALostConnection(error))
    with pytest.raises(Unavailable, match="heartbeats"):
        await asyncio.wait_for(publisher.probe(), 5)
    with pytest.raises(PublishFailed, match="heartbeats"):
        await asyncio.wait_for(publisher.declare_command_queue("CreateIssuer"), 5)
    await publisher.close()


async def test_a_probe_cancelled_under_its_callers_fails_them() -> None:
    channel = SlowChannel()
    publisher = OpenedOn(channel=channel)
    probing = asyncio.create_task(publisher.probe())

    async def declaring() -> bool:
        return channel.declarations == 1

    await wait_until(declaring, timeout=5, what="the probe's declaration")
    assert publisher._probing is not None
    publisher._probing.cancel()  # as the publisher's close() cancels it
    with pytest.raises(PublishFailed, match="cancelled"):
        await asyncio.wait_for(probing, 5)
    await publisher.close()


async def test_a_publisher_whose_task_is_cancelled_is_cancelled() -> None:
    started = asyncio.Event()

    class Hanging(ClosingExchange):
        async def publish(self, *_: Any, **__: Any) -> None:
            started.set()
            await asyncio.Event().wait()

    publisher = OpenedOn(exchange=Hanging(RuntimeError()))
    envelope = Envelope(message_id="m-1", name="CreateIssuer", body=b"{}")
    for envelopes in ([envelope], [envelope, envelope]):
        started.clear()
        publishing = asyncio.create_task(publisher.publish_events(envelopes))
        await asyncio.wait_for(started.wait(), 5)
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing


class RecordingExchange:
    """The default exchange: it confirms every publish at once."""

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, _: Any, routing_key: str, **__: Any) -> None:
        self.published.append(routing_key)


class SlowChannel:
    """A publishing channel whose broker is slow to answer a declaration."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.declarations = 0
        self.cancelled = 0
        self.default_exchange = RecordingExchange()

    async def declare_exchange(self, *_: Any, **__: Any) -> object:
        self.declarations += 1
        try:
            await self.answer.wait()
        except asyncio.CancelledError:
            self.cancelled += 1  # aiormq would close the channel here
            raise
        return object()


async def test_a_probe_past_its_callers_deadline_is_not_cancelled_and_is_shared() -> None:
    """Regression: the watch's one-second deadline cancelled the probe's declaration, and
    aiormq closes a channel whose call is cancelled: the publishing channel every publish
    uses was closed every second while the broker was slow."""
    channel = SlowChannel()
    publisher = OpenedOn(channel=channel)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await publisher.probe()
    assert (channel.declarations, channel.cancelled) == (1, 0)
    channel.answer.set()
    await asyncio.wait_for(publisher.probe(), 5)  # the first, answered, or a new one
    assert channel.cancelled == 0
    assert channel.default_exchange.published  # the probe also needs the write permission
    await publisher.close()


async def test_a_refused_publish_to_events_fails_the_probe_only_while_the_relayer_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused publish to `events` fails the probe until one is confirmed, but not for
    good: an instance whose relayer stopped trying (a standby took over) must not stay
    in an outage that only a publish it will never make could end."""
    channel = SlowChannel()
    channel.answer.set()
    refusal = aiormq.exceptions.ChannelAccessRefused("ACCESS_REFUSED - access to exchange 'events'")
    publisher = OpenedOn(channel=channel, exchange=ClosingExchange(refusal))
    envelope = Envelope(message_id="m-1", name="CreateIssuer", body=b"{}")
    with pytest.raises(PublishFailed):
        await publisher.publish_events([envelope])
    with pytest.raises(PublishFailed, match="none has been confirmed since"):
        await publisher.probe_events()
    # Commands are still queued (through the default exchange): their readiness holds.
    await asyncio.wait_for(publisher.probe(), 5)
    monkeypatch.setattr(publisher_module, "REFUSAL_REMEMBERED", 0.0)
    await asyncio.wait_for(publisher.probe_events(), 5)
    await publisher.close()


async def test_a_publish_to_events_lost_with_the_connection_is_no_refusal() -> None:
    """Regression: an outage begun as a lost connection was said to be kept on by a
    refusal of `events` naming the lost connection (CONNECTION_FORCED), and the refusal
    that followed was never named."""
    channel = SlowChannel()
    channel.answer.set()
    publisher = OpenedOn(
        channel=channel, exchange=ClosingExchange(await rejected_as_aiormq_rejects())
    )
    with pytest.raises(PublishFailed) as lost:
        await publisher.publish_events(
            [Envelope(message_id="m-1", name="CreateIssuer", body=b"{}")]
        )
    assert not lost.value.refused
    await asyncio.wait_for(publisher.probe_events(), 5)  # the probe's to find
    await publisher.close()


def _precondition_failed(text: str) -> aiormq.exceptions.ChannelPreconditionFailed:
    """What aiormq raises for the broker's Channel.Close with code 406 and `text`."""
    return aiormq.exceptions.ChannelPreconditionFailed(text)


@pytest.mark.parametrize(
    "text",
    [
        "PRECONDITION_FAILED - cannot declare queue 'financing_dead_letters': queue limit in"
        " vhost 'v' (10) is reached",
        "PRECONDITION_FAILED - cannot declare queue 'q': queue limit in cluster (100) is reached",
    ],
)
def test_a_declaration_refused_for_a_limit_reached_is_an_outage(text: str) -> None:
    """Regression: taken for a refusal (PRECONDITION_FAILED, as for other arguments), a dead
    letter that could not be kept came back at once, hundreds of times a second, and every
    command was answered INTERNAL, until the operator raised the limit."""
    with pytest.raises(Unavailable) as raised, translated():
        raise _precondition_failed(text)
    assert not isinstance(raised.value, Refused)
    assert "limit" in raised.value.detail


def test_a_declaration_refused_for_other_arguments_is_a_refusal() -> None:
    text = (
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost 'v':"
        " received none but current is the value 'quorum'"
    )
    with pytest.raises(Refused), translated():
        raise _precondition_failed(text)


async def test_a_shared_attempt_runs_in_a_context_of_its_own_not_its_first_callers() -> None:
    """Regression: a broker connection opened for a gRPC call ran in that call's context:
    the outage lines of the connection, 33 s later, named its message and correlation."""
    seen: dict[str, object] = {}

    async def attempt() -> None:
        seen.update(structlog.contextvars.get_contextvars())

    with structlog.contextvars.bound_contextvars(message_id="m-1", correlation_id="c-1"):
        await SharedAttempt(attempt, lambda error: Unavailable("broker", str(error)))()
    assert seen == {}


async def test_publishes_whose_turn_never_came_are_closed_not_left_to_a_warning() -> None:
    """Regression (a probe): a relayer's publishes cancelled before their first step (a
    lost lock, a failure before them) were never awaited, and Python said so as they
    were collected: `RuntimeWarning: coroutine 'Exchange.publish' was never awaited`
    in the service's log."""
    relaying: list[asyncio.Task[list[object]]] = []

    async def publish(then: str = "waits") -> object:
        if then == "fails":
            raise MemoryError
        if then == "cuts short":  # the relayer's task cancelled as its first is written
            relaying[0].cancel()
        if then != "acks":
            await asyncio.Event().wait()
        return "ack"

    failed_first = [publish("acks"), publish("fails"), publish(), publish()]
    results = await asyncio.wait_for(publisher_module._in_turn(failed_first), 5)
    assert isinstance(results[1], MemoryError)
    assert all(isinstance(result, asyncio.CancelledError) for result in results[2:]), results

    cut_short = [publish("cuts short"), publish(), publish(), publish()]
    relaying.append(asyncio.ensure_future(publisher_module._in_turn(cut_short)))
    with pytest.raises(asyncio.CancelledError):
        await relaying[0]

    for never_begun in (failed_first[2:], cut_short[1:]):
        states = {inspect.getcoroutinestate(p) for p in never_begun}
        assert states == {inspect.CORO_CLOSED}, states
