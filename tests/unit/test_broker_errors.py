"""What aiormq leaves pending when a channel or its connection closes fails with a bare
`Exception`: that is the broker's doing (an outage), not a bug of the service."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiormq.base import FutureStore

from financing.adapters.rabbitmq.connection import Broker, is_broker_error, translated
from financing.adapters.rabbitmq.publisher import Publisher, PublishFailed
from financing.application.errors import Unavailable
from financing.application.ports import Envelope
from financing.application.retry import Outages


async def rejected_as_aiormq_rejects_on_close() -> BaseException:
    """The exception a pending future of a closing aiormq channel is failed with."""
    store = FutureStore(asyncio.get_running_loop())
    pending = asyncio.get_running_loop().create_future()
    store.add(pending)
    await store.reject_all(None)
    error = pending.exception()
    assert error is not None
    return error


async def test_aiormqs_failure_of_what_a_closing_channel_left_pending_is_a_broker_error() -> None:
    error = await rejected_as_aiormq_rejects_on_close()

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


class OpenedOnce(Publisher):
    def __init__(self, exchange: ClosingExchange) -> None:
        super().__init__(Broker(["amqp://nowhere/"], Outages()))
        self._exchange = exchange

    async def _opened(self, what: str) -> tuple[Any, Any]:
        return object(), self._exchange


async def test_a_publish_failed_by_a_closing_connection_is_an_unconfirmed_publish() -> None:
    publisher = OpenedOnce(ClosingExchange(await rejected_as_aiormq_rejects_on_close()))
    envelope = Envelope(message_id="m-1", name="CreateIssuer", body=b"{}")

    with pytest.raises(PublishFailed, match="closed"):
        await publisher.publish_events([envelope])
    with pytest.raises(PublishFailed, match="closed"):
        await publisher.publish_events([envelope, envelope])
