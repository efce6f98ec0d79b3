"""Closing a consumer's or publisher's channel: a close that takes long is not cut."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractChannel

from financing.adapters.rabbitmq import connection
from financing.adapters.rabbitmq.connection import close_channel
from tests.support.infra import holds, wait_until


class SlowChannel:
    """A channel whose close is written only once `written` is set (a loaded process)."""

    def __init__(self) -> None:
        self.written = asyncio.Event()
        self.closed = False
        self.cut = False

    async def close(self, *_: Any) -> None:
        try:
            await self.written.wait()
        except asyncio.CancelledError:
            self.cut = True
            raise
        self.closed = True


async def test_a_close_that_takes_longer_than_its_wait_goes_on_by_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression (a probe): cut at its 2 s, a close under a loaded process left the
    channel open at the broker, its consumer the projector's queue's active one, its
    deliveries held: the read models stood still while the process consumed on a new
    channel."""
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 0.05)
    channel = SlowChannel()

    await close_channel(cast(AbstractChannel, channel))  # returns after its wait
    assert not channel.closed and not channel.cut
    channel.written.set()

    await wait_until(lambda: holds(channel.closed), what="the close to end by itself")
    assert not channel.cut
