"""`financing populate` publishes its registrations a confirmed batch at a time, so that
however many are asked for, each batch is confirmed within the publisher's timeout, and
what it reports as published is what the broker holds."""

from __future__ import annotations

import contextlib
import os
from decimal import Decimal
from uuid import UUID

import pytest
from aio_pika.abc import AbstractConnection

from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.topology import subscription
from financing.application.messages import InvestorRegistered, IssuerRegistered
from financing.application.retry import Outages
from financing.entrypoints.cli import populate
from financing.entrypoints.cli.populate import BATCH, registrations
from tests.support import rabbitmq
from tests.support.service import free_port, run_cli


async def ready(connection: AbstractConnection, queue: str) -> int:
    state = await rabbitmq.queue_state(connection, queue)
    assert state is not None, f"no queue {queue}"
    return state[0]


async def test_each_batch_is_yielded_once_the_broker_holds_it() -> None:
    """Regression: every registration went in one publish with one 5 s timeout: 40,000
    of them failed with "broker unavailable", after half had been published, and no id
    was printed (a run again registered duplicates under new ids)."""
    async with rabbitmq.private_vhost("fin_populate") as vhost:
        broker = Broker([vhost.url], Outages())
        try:
            connection = await broker.connection()
            queues = {
                kind: subscription(kind.name()).queue.name
                for kind in (IssuerRegistered, InvestorRegistered)
            }
            sizes: list[int] = []
            held: list[tuple[int, int]] = []
            async for batch in registrations(
                [vhost.url], issuers=BATCH + 1, investors=BATCH, balance=Decimal(1)
            ):
                sizes.append(len(batch))
                held.append(
                    (
                        await ready(connection, queues[IssuerRegistered]),
                        await ready(connection, queues[InvestorRegistered]),
                    )
                )
        finally:
            await broker.close()

    assert sizes == [BATCH, BATCH, 1]
    assert held == [(BATCH, 0), (BATCH + 1, BATCH - 1), (BATCH + 1, BATCH)]


async def test_a_batch_is_made_only_when_the_one_before_is_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: every registration asked for was made before the first was published
    (about 280 MB a million: `--issuers 10000000` died of a MemoryError, having
    published nothing)."""
    made = 0

    def counted(name_: str, id: UUID) -> IssuerRegistered:
        nonlocal made
        made += 1
        return IssuerRegistered(id=id, name_=name_)

    monkeypatch.setattr(populate, "IssuerRegistered", counted)
    async with rabbitmq.private_vhost("fin_populate_lazy") as vhost:
        batches = registrations([vhost.url], issuers=10 * BATCH, investors=0, balance=Decimal(1))
        async with contextlib.aclosing(batches):
            first = await anext(batches)

    assert len(first) == BATCH
    assert made <= 2 * BATCH


async def test_each_registration_names_its_correlation_and_cause() -> None:
    """Regression: the registrations carried no `correlation_id` or `causation_id`,
    which every message the service publishes carries (docs/contract.md)."""
    async with rabbitmq.private_vhost("fin_populate_cause") as vhost:
        broker = Broker([vhost.url], Outages())
        try:
            connection = await broker.connection()
            queue = subscription(IssuerRegistered.name()).queue.name
            async for _ in registrations([vhost.url], issuers=1, investors=0, balance=Decimal(1)):
                pass
            channel = await connection.channel()
            message = await (await channel.get_queue(queue)).get(no_ack=True)
            await channel.close()
        finally:
            await broker.close()
    assert message is not None
    headers = message.headers
    assert headers["correlation_id"] == headers["causation_id"] == message.message_id


async def test_a_broker_never_reached_is_said_to_have_published_nothing() -> None:
    """Regression: with the broker refusing the connection, populate said that up to a
    batch more than the none it printed may have been published."""
    env = {**os.environ, "AMQP_ADDRESS": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}

    run = await run_cli(env, "populate", "--issuers", "1", "--investors", "1")

    assert run.exit_code == 1, run.describe()
    assert "0 of 2 registration(s) confirmed" in run.stderr, run.describe()
    assert "none was published" in run.stderr, run.describe()
    assert "may have been published" not in run.stderr, run.describe()
