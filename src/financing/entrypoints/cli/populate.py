"""`financing populate`: publish Registering's integration events, like the reference's tool.

Publishes IssuerRegistered and InvestorRegistered on `events`. Their queues
are declared first (durable, as the service declares them), so the events wait
there even if the service is not running yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID, uuid4

from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import connected
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application import codec
from financing.application.messages import IntegrationEvent, InvestorRegistered, IssuerRegistered
from financing.application.ports import Envelope


@dataclass(frozen=True)
class Population:
    issuers: list[UUID]
    investors: list[UUID]


def _envelope(event: IntegrationEvent) -> Envelope:
    return Envelope(message_id=str(uuid4()), name=event.name(), body=codec.encode(event))


async def populate(
    amqp_urls: list[str],
    *,
    issuers: int,
    investors: int,
    balance: Decimal,
    queue_type: str = "classic",
) -> Population:
    async with connected(amqp_urls, queue_type) as broker:
        await topology.declare_on(broker)
        publisher = Publisher(broker)
        try:
            population = Population(
                issuers=[uuid4() for _ in range(issuers)],
                investors=[uuid4() for _ in range(investors)],
            )
            events: list[IntegrationEvent] = [
                IssuerRegistered(id=issuer, name_=f"Issuer {n}")
                for n, issuer in enumerate(population.issuers, start=1)
            ]
            events += [
                InvestorRegistered(id=investor, name_=f"Investor {n}", balance=balance)
                for n, investor in enumerate(population.investors, start=1)
            ]
            await publisher.publish_events([_envelope(event) for event in events])
            return population
        finally:
            await publisher.close()
