"""FINANCING_QUEUE_TYPE=quorum: every queue the service declares is a quorum queue, and a
saga runs through them; a classic queue already there (the reference's) stops start-up
with a message that names it and says what to do."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import aio_pika
import pytest

from financing.adapters.rabbitmq import topology
from tests.acceptance.driver import financing_for
from tests.acceptance.system import local_system
from tests.acceptance.test_reference_topology import declare_reference_queues, finance_and_reverse
from tests.support import rabbitmq
from tests.support.deployment import LocalDeployment, local_deployment

pytestmark = [pytest.mark.acceptance, pytest.mark.own_service]

QUORUM = {"FINANCING_QUEUE_TYPE": "quorum"}


def vhost_of(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url).path.lstrip("/"))


async def test_every_queue_is_a_quorum_queue_and_a_saga_runs_through_them() -> None:
    async with local_system(env=QUORUM) as system, financing_for(system) as financing:
        await finance_and_reverse(financing)
        queues = await rabbitmq.list_queues(vhost_of(system.amqp_url))

    ours = {spec.name for spec in topology.CONSUMED_QUEUES} | {topology.DEAD_LETTER_QUEUE}
    assert ours <= set(queues)
    assert {name: queues[name]["type"] for name in ours} == dict.fromkeys(ours, "quorum")
    # The projector still has one active consumer at a time.
    assert ["x-single-active-consumer", "bool", True] in queues[topology.PROJECTOR_QUEUE][
        "arguments"
    ]


async def test_a_classic_queue_of_the_reference_stops_a_quorum_start_up_naming_it() -> None:
    async def prepare(deployment: LocalDeployment) -> None:
        connection = await aio_pika.connect(deployment.amqp_url)
        try:
            await declare_reference_queues(await connection.channel())
        finally:
            await connection.close()

    with pytest.raises(AssertionError) as failed:
        async with local_deployment("fin_acc_quorum", extra_env=QUORUM, before_start=prepare):
            pass

    message = str(failed.value)
    assert "financing serve exited with 2 before it was ready" in message, message
    # Every one named at once, before any queue of the service was made quorum.
    assert "exist as classic queues, and FINANCING_QUEUE_TYPE asks for quorum" in message
    assert "'CreateIssuer'" in message and "'events_BidOnInvoicePlacedEvent'" in message
    assert "rabbitmqctl delete_queue" in message
