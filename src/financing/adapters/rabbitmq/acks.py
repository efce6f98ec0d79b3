"""Acks of one consuming channel, coalesced into as few frames as the outcomes allow.

A delivery is acked only once its outcome is final, but many deliveries of a
channel reach that point together (a projector's batch, the handlers of a
busy queue). An ack with no frame on its way is written at once; the acks
asked for while one is being written are written together right after it, by
the same caller: one `basic.ack` with `multiple` set for the longest run of
the oldest unsettled deliveries that are all to be acked, and a single ack for
each other one. A slow delivery never holds back the acks of later ones
(the broker would stop delivering once the prefetch window filled up): those
are acked one by one until it is settled.

A delivery given back (`basic.nack` with requeue) stays unsettled until its
frame is written, and for good if it was not, so no `multiple` ack can cover it.
Delivery tags count every delivery of the channel, so one `ChannelAcks` serves
one channel that one consumer consumes from.

Once the channel is being closed (`close`), no frame is written any more: aiormq
writes a channel's frames until the broker's answer to its Close arrives, and a
frame the broker reads after a channel's Close is a breach of the protocol for
which it closes the whole connection, every consumer's and publisher's channel.
Under load that answer took seconds, and acks asked for meanwhile followed the
Close: every consumer and the publisher stopped for 13 to 47 s, logged as the
broker's outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping

# basic_ack(delivery_tag, multiple) of the channel: one frame, written when awaited.
SendAck = Callable[[int, bool], Awaitable[None]]


class ChannelClosing(ConnectionError):
    """The channel is being closed: its unsettled deliveries come back from the broker."""


class ChannelAcks:
    def __init__(self, send_ack: SendAck) -> None:
        self._send_ack = send_ack
        # Delivered and not settled yet, in delivery order (tags only grow), each with
        # what its delivery was noted with (`delivered`).
        self._unsettled: dict[int, object] = {}
        # Acks asked for while frames were on their way, for the next frames.
        self._ready: dict[int, asyncio.Future[None]] = {}
        self._writing = False
        self._closing = False
        self.frames = 0  # ack frames written: what coalescing saves is visible in tests

    def delivered(self, tag: int, noted: object = None) -> None:
        """Delivery `tag` is in hand, `noted` with it (when its event was recorded)."""
        self._unsettled[tag] = noted

    def oldest_unsettled(self) -> object:
        """What the oldest delivery in hand was noted with, of those noted with any."""
        return next((noted for noted in self._unsettled.values() if noted is not None), None)

    def close(self) -> None:
        """The channel is about to be closed: from now on nothing is written on it, every
        settlement asked for failing with ChannelClosing."""
        self._closing = True

    async def ack(self, tag: int) -> None:
        """Ack delivery `tag`; returns once a frame that acks it is written.

        With no frame on its way, the ack is written at once, by its caller.
        Acks asked for meanwhile wait, and that caller then writes them too, in
        as few frames as they allow."""
        if self._writing:
            done = self._ready.get(tag)
            if done is None:
                done = self._ready[tag] = asyncio.get_running_loop().create_future()
            await done
            return
        self._writing = True
        ready: dict[int, asyncio.Future[None]] = {}  # the acks of the frames on their way
        try:
            await self._write({tag: None})
            while self._ready:
                ready, self._ready = self._ready, {}
                try:
                    await self._write(ready)
                except Exception as error:
                    # The channel failed: the broker delivers these again.
                    for done in ready.values():
                        if not done.done():  # its waiter may have given up
                            done.set_exception(error)
                    continue
                for done in ready.values():
                    if not done.done():
                        done.set_result(None)
        finally:
            # Cancelled (its caller's deadline) or failed: the acks it was to write are
            # failed at once, those of the frames on their way included.
            self._writing = False
            left, self._ready = {**ready, **self._ready}, {}
            for done in left.values():
                if not done.done():
                    done.set_exception(ConnectionError("the ack frame before it failed"))

    async def settle_otherwise(self, tag: int, send: Awaitable[None]) -> None:
        """Write another settlement of `tag` (a nack), then forget it; until then, and
        for good if it failed, no `multiple` ack covers it (the message would be acked
        unprocessed: a nack that failed leaves it for the broker to deliver again once
        its channel is closed)."""
        if self._closing:
            if isinstance(send, Coroutine):
                send.close()  # never begun
            raise ChannelClosing("the channel is being closed")
        await send
        self._unsettled.pop(tag, None)

    async def _write(self, ready: Mapping[int, object]) -> None:
        for tag, multiple in self._frames(ready):
            if self._closing:
                raise ChannelClosing("the channel is being closed")
            await self._send_ack(tag, multiple)
            self.frames += 1
        for tag in ready:
            self._unsettled.pop(tag, None)

    def _frames(self, ready: Mapping[int, object]) -> list[tuple[int, bool]]:
        """(tag, multiple) of the frames that ack `ready`: one `multiple` for the run of
        ready tags at the head of the unsettled ones, one frame for each other tag."""
        head: list[int] = []
        for tag in self._unsettled:
            if tag not in ready:
                break
            head.append(tag)
        frames = [(head[-1], len(head) > 1)] if head else []
        covered = set(head)
        frames.extend((tag, False) for tag in sorted(ready) if tag not in covered)
        return frames
