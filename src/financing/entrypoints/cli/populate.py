"""`financing populate`: publish Registering's integration events, like the reference's tool.

Publishes IssuerRegistered and InvestorRegistered on `events`. Their queues
are declared first (durable, as the service declares them), so the events wait
there even if the service is not running yet.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID, uuid4

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import connected
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application import codec
from financing.application.grace import stop_if_asked
from financing.application.messages import IntegrationEvent, InvestorRegistered, IssuerRegistered
from financing.application.ports import Cause, Envelope

Registration = IssuerRegistered | InvestorRegistered

# Registrations published and confirmed together: a batch's confirms come back well
# within the publisher's timeout, however many registrations are asked for.
BATCH = 500


@dataclass(frozen=True)
class Population:
    issuers: list[UUID]
    investors: list[UUID]


def _envelope(event: IntegrationEvent) -> Envelope:
    """A registration as Registering would publish it, starting a correlation of its own
    (as every message the service publishes, it names its correlation and cause)."""
    message_id = str(uuid4())
    return Envelope(
        message_id=message_id,
        name=event.name(),
        body=codec.encode(event),
        headers=Cause(correlation_id=message_id, causation_id=message_id).headers(),
    )


async def registrations(
    amqp_urls: list[str],
    *,
    issuers: int,
    investors: int,
    balance: Decimal,
    queue_type: str = "classic",
    progress: Progress | None = None,
) -> AsyncIterator[list[Registration]]:
    """Publish the registrations (issuers first), yielding each batch once confirmed: when
    the broker fails part way, what was yielded is what was published, and a batch more
    may have been if `progress` says publishing began."""
    progress = progress or Progress()
    async with connected(amqp_urls, "populate", queue_type) as broker:
        await topology.declare_on(broker)
        publisher = Publisher(broker)
        # Made a batch at a time: millions asked for take no more memory than one batch.
        events: Iterator[Registration] = itertools.chain(
            (IssuerRegistered(id=uuid4(), name_=f"Issuer {n}") for n in range(1, issuers + 1)),
            (
                InvestorRegistered(id=uuid4(), name_=f"Investor {n}", balance=balance)
                for n in range(1, investors + 1)
            ),
        )
        try:
            while batch := list(itertools.islice(events, BATCH)):
                stop_if_asked()
                progress.publishing = True
                await publisher.publish_events([_envelope(event) for event in batch])
                yield batch
        finally:
            await publisher.close()


@dataclass
class Progress:
    """How far `registrations` got: whether it began publishing (before, a failure
    connecting or declaring the topology published nothing)."""

    publishing: bool = False


async def populate(
    amqp_urls: list[str],
    *,
    issuers: int,
    investors: int,
    balance: Decimal,
    queue_type: str = "classic",
) -> Population:
    """Every registration published; their ids."""
    population = Population([], [])
    async for batch in registrations(
        amqp_urls, issuers=issuers, investors=investors, balance=balance, queue_type=queue_type
    ):
        for event in batch:
            registered = isinstance(event, IssuerRegistered)
            (population.issuers if registered else population.investors).append(event.id)
    return population
