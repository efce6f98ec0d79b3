"""Acks of a channel coalesced into few frames, never acking what is not settled."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from structlog.testing import capture_logs

from financing.adapters.rabbitmq import consumer
from financing.adapters.rabbitmq.acks import ChannelAcks, ChannelClosing
from financing.adapters.rabbitmq.dead_letters import DeadLetters
from financing.application.errors import Fault
from financing.application.pipeline import Outcome
from financing.application.retry import GaveUp
from tests.support.infra import holds, wait_until


class Broker:
    """The broker's side of one channel, written to as aiormq does: a frame is put on
    a queue and its sender waits until a writer task has written it."""

    def __init__(self) -> None:
        self.unacked: set[int] = set()
        self.requested: set[int] = set()  # acks the consumer asked for
        self.frames: list[tuple[int, bool]] = []
        self.gate = asyncio.Event()  # frames are written while it is set
        self.gate.set()
        self.writing = asyncio.Event()  # a frame was queued
        self.failure: Exception | None = None
        self._queue: asyncio.Queue[tuple[tuple[int, bool] | int, asyncio.Future[None]]] = (
            asyncio.Queue()
        )
        self._writer = asyncio.create_task(self._write())

    def deliver(self, acks: ChannelAcks, *tags: int) -> None:
        for tag in tags:
            self.unacked.add(tag)
            acks.delivered(tag)

    async def ack(self, acks: ChannelAcks, tag: int) -> None:
        self.requested.add(tag)
        await acks.ack(tag)

    async def send_ack(self, tag: int, multiple: bool) -> None:
        await self._send((tag, multiple))

    async def send_nack(self, tag: int) -> None:
        await self._send(tag)

    async def _send(self, frame: tuple[int, bool] | int) -> None:
        written = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((frame, written))
        self.writing.set()
        await written

    async def _write(self) -> None:
        while True:
            frame, written = await self._queue.get()
            await self.gate.wait()
            try:
                self._apply(frame)
            except Exception as error:  # a failed check fails the sender, not the writer
                written.set_exception(error)
            else:
                written.set_result(None)

    def _apply(self, frame: tuple[int, bool] | int) -> None:
        if self.failure is not None:
            raise self.failure
        if isinstance(frame, int):  # a nack
            self.unacked.discard(frame)
            return
        self.frames.append(frame)
        tag, multiple = frame
        settled = {t for t in self.unacked if t <= tag} if multiple else {tag}
        assert settled <= self.unacked, f"ack of {tag} settles nothing"
        assert settled <= self.requested, f"{frame} acks {settled - self.requested}"
        self.unacked -= settled

    async def close(self) -> None:
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    broker = Broker()
    yield broker
    await broker.close()


@pytest.fixture
def acks(broker: Broker) -> ChannelAcks:
    return ChannelAcks(broker.send_ack)


async def test_acks_asked_while_one_is_written_go_in_one_frame(
    broker: Broker, acks: ChannelAcks
) -> None:
    broker.deliver(acks, 1, 2, 3, 4, 5)
    await asyncio.gather(*(broker.ack(acks, tag) for tag in (1, 3, 5, 2, 4)))
    assert broker.frames == [(1, False), (5, True)]
    assert acks.frames == 2
    assert broker.unacked == set()


async def test_once_the_channel_is_being_closed_no_settlement_is_written(
    broker: Broker, acks: ChannelAcks
) -> None:
    """A frame after a channel's Close makes the broker close the whole connection."""
    broker.deliver(acks, 1, 2, 3, 4)
    broker.gate.clear()  # the first frame on its way, not written yet
    first = asyncio.create_task(broker.ack(acks, 1))
    await broker.writing.wait()
    waiting = asyncio.create_task(broker.ack(acks, 3))  # for the frame after the first
    await wait_until(lambda: holds(3 in broker.requested), what="the second ack asked for")
    acks.close()
    broker.gate.set()
    await first  # written before the close began
    with pytest.raises(ChannelClosing):
        await waiting
    with pytest.raises(ChannelClosing):
        await broker.ack(acks, 2)
    nack = broker.send_nack(4)
    with pytest.raises(ChannelClosing):
        await acks.settle_otherwise(4, nack)
    assert broker.frames == [(1, False)]
    assert broker.unacked == {2, 3, 4}


async def test_an_unsettled_delivery_is_never_covered_and_holds_back_no_other(
    broker: Broker, acks: ChannelAcks
) -> None:
    broker.deliver(acks, 1, 2, 3, 4)
    await asyncio.gather(*(broker.ack(acks, tag) for tag in (2, 3, 4)))
    assert broker.frames == [(2, False), (3, False), (4, False)]
    assert broker.unacked == {1}
    await broker.ack(acks, 1)
    assert broker.frames[-1] == (1, False)
    assert broker.unacked == set()


async def test_a_nack_on_its_way_is_not_covered_by_a_later_multiple_ack(
    broker: Broker, acks: ChannelAcks
) -> None:
    broker.deliver(acks, 1, 2, 3)
    nack_may_go = asyncio.Event()

    async def slow_nack() -> None:
        await nack_may_go.wait()
        await broker.send_nack(2)

    nack = asyncio.create_task(acks.settle_otherwise(2, slow_nack()))
    await asyncio.gather(broker.ack(acks, 1), broker.ack(acks, 3))
    assert broker.frames == [(1, False), (3, False)]
    nack_may_go.set()
    await nack
    broker.deliver(acks, 4, 5, 6)
    await asyncio.gather(*(broker.ack(acks, tag) for tag in (4, 5, 6)))
    assert broker.frames[-2:] == [(4, False), (6, True)]
    assert broker.unacked == set()


async def test_a_nack_that_failed_is_never_covered_by_a_multiple_ack(
    broker: Broker, acks: ChannelAcks
) -> None:
    """Regression: a nack that was never written (the connection blocked past the
    timeout) forgot its delivery all the same, and the next `multiple` ack covered it:
    the broker dropped a message that was to be delivered again."""
    broker.deliver(acks, 1, 2, 3, 4)

    async def nack_not_written() -> None:
        raise ConnectionError("the frame could not be queued")

    with pytest.raises(ConnectionError):
        await acks.settle_otherwise(1, nack_not_written())
    # 3 and 4 are asked for while 2's frame is written: one `multiple` frame would
    # carry both, and cover 1 with them.
    await asyncio.gather(*(broker.ack(acks, tag) for tag in (2, 3, 4)))
    assert broker.unacked == {1}
    assert broker.frames == [(2, False), (3, False), (4, False)]


class _Channel:
    is_closed = False


class _Unanswered:
    """A delivered message whose nack frame is never written."""

    delivery_tag = 1
    channel = _Channel()

    async def nack(self, requeue: bool = True) -> None:
        await asyncio.Event().wait()


async def test_a_delivery_that_could_not_be_given_back_gives_up_its_channel(
    monkeypatch: pytest.MonkeyPatch, acks: ChannelAcks
) -> None:
    """On a channel still open, the broker holds a message whose nack was not written
    until the channel closes: giving it up is what delivers the message again."""
    monkeypatch.setattr(consumer, "ACK_TIMEOUT", 0.05)
    acks.delivered(1)
    abandoned: list[str] = []
    delivery = consumer.AmqpDelivery(
        cast(AbstractIncomingMessage, _Unanswered()),
        "queue",
        cast(DeadLetters, None),
        acks,
        abandoned.append,
    )
    await asyncio.wait_for(delivery.release(), 5)
    assert abandoned == ["a delivery could not be given back on the open channel"]


async def test_acks_asked_while_a_slow_frame_is_written_wait_for_it_then_go_together(
    broker: Broker, acks: ChannelAcks
) -> None:
    broker.deliver(acks, 1, 2, 3)
    broker.gate.clear()
    first = asyncio.create_task(broker.ack(acks, 1))
    async with asyncio.timeout(5):
        await broker.writing.wait()
    later = asyncio.gather(broker.ack(acks, 2), broker.ack(acks, 3))
    broker.gate.set()
    await asyncio.gather(first, later)
    assert broker.frames == [(1, False), (3, True)]


async def test_a_failed_frame_fails_the_acks_it_carried_and_not_the_next(
    broker: Broker, acks: ChannelAcks
) -> None:
    broker.deliver(acks, 1, 2, 3)
    broker.failure = ConnectionError("channel closed")
    results = await asyncio.gather(broker.ack(acks, 1), broker.ack(acks, 2), return_exceptions=True)
    assert [type(result) for result in results] == [ConnectionError, ConnectionError]
    broker.failure = None
    await broker.ack(acks, 3)
    assert broker.frames == [(3, False)]


@pytest.mark.parametrize("seed", range(20))
async def test_acks_in_any_order_settle_exactly_the_deliveries_acked(
    broker: Broker, acks: ChannelAcks, seed: int
) -> None:
    rng = random.Random(seed)
    tags = list(range(1, 61))
    broker.deliver(acks, *tags)
    given_back = set(rng.sample(tags, 6))
    order = [tag for tag in tags if tag not in given_back]
    rng.shuffle(order)
    while order:
        size = rng.randint(1, 8)
        group, order = order[:size], order[size:]
        await asyncio.gather(*(broker.ack(acks, tag) for tag in group))
        if given_back and rng.random() < 0.3:
            tag = given_back.pop()
            await acks.settle_otherwise(tag, broker.send_nack(tag))
    for tag in given_back:
        await acks.settle_otherwise(tag, broker.send_nack(tag))
    assert broker.unacked == set()


async def test_acks_carried_by_a_writer_that_is_cancelled_fail_at_once() -> None:
    """Regression: the acks a writer carried in the frame it was writing when its own
    deadline cancelled it were failed by no one: their callers waited for their own
    deadlines."""
    first_written = asyncio.Event()
    first_may_go = asyncio.Event()
    carrying = asyncio.Event()

    async def send_ack(tag: int, multiple: bool) -> None:
        if not first_written.is_set():
            await first_may_go.wait()
            first_written.set()
            return
        carrying.set()
        await asyncio.Event().wait()  # the connection blocked

    acks = ChannelAcks(send_ack)
    for tag in (1, 2, 3):
        acks.delivered(tag)
    writer = asyncio.create_task(acks.ack(1))
    carried = [asyncio.create_task(acks.ack(tag)) for tag in (2, 3)]

    async def queued() -> bool:
        return len(acks._ready) == 2

    await wait_until(queued, timeout=5, what="acks waiting for the frame on its way")
    first_may_go.set()
    await asyncio.wait_for(carrying.wait(), 5)
    writer.cancel()
    for ack in carried:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(ack, 1)


class _FailingDeadLetters:
    """Dead letters whose keeping fails as a bug does once the retries gave up."""

    async def keep(self, *_: object, **__: object) -> bool:
        raise GaveUp(ValueError("a bug"), Fault.BUG, 3)


class _Given:
    """A delivered message that records being given back."""

    delivery_tag = 1
    channel = _Channel()
    message_id = "m-1"

    def __init__(self) -> None:
        self.headers: dict[str, object] = {}
        self.requeued: list[bool] = []

    async def nack(self, requeue: bool = True) -> None:
        self.requeued.append(requeue)


async def test_a_delivery_whose_dead_lettering_fails_with_a_bug_is_given_back_not_raised(
    monkeypatch: pytest.MonkeyPatch, acks: ChannelAcks
) -> None:
    """Regression: raised from settling, the bug stopped the projector (which settles a
    batch together) and the service with it, again at each start, while every other
    consumer gave the message back."""
    monkeypatch.setattr(consumer, "RELEASE_PAUSE", 0.0)
    acks.delivered(1)
    message = _Given()
    delivery = consumer.AmqpDelivery(
        cast(AbstractIncomingMessage, message),
        "queue",
        cast(DeadLetters, _FailingDeadLetters()),
        acks,
        lambda why: pytest.fail(f"the channel was given up: {why}"),
    )
    with capture_logs() as logs:
        await asyncio.wait_for(delivery.settle(Outcome.dead_letter("poison")), 5)
    assert message.requeued == [True]
    assert [line["event"] for line in logs if line["log_level"] == "error"] == [
        "settling a delivery failed"
    ]
