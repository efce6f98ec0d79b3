"""How many messages wait in each queue of the topology, and who reads it, for the metrics.

The dead letters waiting for an operator, the deferred deliveries, a queue growing
behind a slow consumer, and a queue no process reads at all (a split deployment
started without one of its components) are the broker's to know: the relayer's lag
and a process's own `financing_dependency_up` say nothing of them. Every process that
consumes reads them every DEPTH_INTERVAL, one passive declaration a queue on the
publisher's channel kept for such questions (`Publisher.queue_depth`), and exports
`financing_queue_messages_ready` and `financing_queue_consumers` by queue: the same
readings from each such process, so that a rule takes their `max`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology import CONSUMED_QUEUES, DEAD_LETTER_QUEUE, DEFERRALS
from financing.application.errors import Unavailable
from financing.logging import get_logger
from financing.metrics import QUEUE_CONSUMERS, QUEUE_MESSAGES_READY

log = get_logger(__name__)

# Seconds between two readings: a few passive declarations each (one per queue).
DEPTH_INTERVAL = 10.0

# Every queue of the topology: the dead letters' and the deferrals', then those consumed.
TOPOLOGY_QUEUES: tuple[str, ...] = (
    DEAD_LETTER_QUEUE,
    DEFERRALS,
    *(queue.name for queue in CONSUMED_QUEUES),
)


class DepthWatch:
    """Reads each queue's depth and consumers every DEPTH_INTERVAL into the gauges (a worker).

    While the broker cannot be asked, the gauges keep their last readings (the broker's
    `financing_dependency_up` says it is down); a queue the broker does not have (deleted
    under the service, until the topology watch declares it again) has none."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        interval: float = DEPTH_INTERVAL,
        queues: Sequence[str] = TOPOLOGY_QUEUES,
    ) -> None:
        self._publisher = publisher
        self._interval = interval
        self._queues = tuple(queues)

    async def run(self) -> None:
        while True:
            try:
                await self.read_once()
            except Unavailable as error:
                # The broker's outage, which the consumers and the publisher report.
                log.debug("reading the queues' depths failed", error=repr(error))
            await asyncio.sleep(self._interval)

    async def read_once(self) -> None:
        for name in self._queues:
            depth = await self._publisher.queue_depth(name)
            if depth is None:
                QUEUE_MESSAGES_READY.remove(name)  # nothing when it had none
                QUEUE_CONSUMERS.remove(name)
                continue
            QUEUE_MESSAGES_READY.labels(name).set(depth.waiting)
            QUEUE_CONSUMERS.labels(name).set(depth.consumers)
