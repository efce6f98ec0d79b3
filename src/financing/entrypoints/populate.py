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
from financing.adapters.rabbitmq.publisher import Publisher
from financing.application import codec
from financing.application.messages import IntegrationEvent, InvestorRegistered, IssuerRegistered
from financing.application.ports import Envelope
from financing.application.processing import INTEGRATION_HANDLERS, event_queue


@dataclass(frozen=True)
class Population:
    issuers: list[UUID]
    investors: list[UUID]


def _envelope(event: IntegrationEvent) -> Envelope:
    return Envelope(message_id=str(uuid4()), name=event.name(), body=codec.encode(event))


async def populate(amqp_url: str, *, issuers: int, investors: int, balance: Decimal) -> Population:
    connection = await topology.connect(amqp_url)
    try:
        async with connection.channel() as channel:
            await topology.declare_events_exchange(channel)
            for name in INTEGRATION_HANDLERS:
                await topology.declare_event_queue(channel, event_queue(name))
        publisher = await Publisher.open(connection)
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
    finally:
        await connection.close()
