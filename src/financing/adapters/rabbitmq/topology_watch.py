"""The broker topology kept as declared while the service runs.

A consumer declares its queue and the queue's bindings when it opens its channel,
and hears of its queue's deletion (the broker cancels it); a publisher hears of a
deleted exchange, and of a deleted queue nobody consumes when it next publishes to it
(`financing_dead_letters`, `financing_deferred`). Nothing hears of a deleted binding:
the events it routed reach the other queues, and the consumer behind it waits for
good. So every process that consumes declares the whole topology again every
TOPOLOGY_INTERVAL (a declaration leaves what exists as it is), and at once when an
event arrives where only a missing binding can have sent it (`topology.unrouted`);
the two queues nobody consumes are looked for first, and one gone (an operator, a
policy's `expires`) is said once and counted (`topology.said_restored`). It runs on
the publisher's channels: no channel is opened for it while nothing is missing.

The reference projector's `events_query`, which start-up retires once no one reads
it, is looked at too: a reference projector still reading it when the service
started (its process stopped after the service's start, as a swap that starts the
new before stopping the old goes) leaves it bound to `events`, read by no one, and
growing until the broker's alarms block every publisher. Found unread by two
declarations in a row (a reference projector reconnecting is back within one), it
is retired as at start-up (`topology.retire_reference_projector`).
"""

from __future__ import annotations

import asyncio
import contextlib

from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.topology import (
    REFERENCE_PROJECTOR_QUEUE,
    ReferenceQueue,
    retire_reference_projector,
)
from financing.application.errors import Unavailable
from financing.logging import get_logger

log = get_logger(__name__)

# Seconds between two declarations of the topology: how long a deleted binding may
# leave events of its names behind its queue (`financing relay rewind` sends them again).
# Each costs about 60 frames to the broker, in each process that consumes.
TOPOLOGY_INTERVAL = 30.0


class TopologyWatch:
    """Declares the topology again, every TOPOLOGY_INTERVAL and when asked (a worker)."""

    def __init__(
        self, publisher: Publisher, broker: Broker, *, interval: float = TOPOLOGY_INTERVAL
    ) -> None:
        self._publisher = publisher
        self._broker = broker
        self._interval = interval
        self._asked = asyncio.Event()
        # Declarations in a row that found `events_query` read by no one; what became of
        # it when last looked at (`started`).
        self._unread = 0
        self._reference_queue = ReferenceQueue.ABSENT

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._asked.wait()  # or the interval runs out
            self._asked.clear()
            try:
                await self.declare_once()
            except Unavailable as error:
                # The broker's outage, which the consumers and the publisher report.
                log.debug("declaring the topology again failed", error=repr(error))

    def started(self, reference_queue: ReferenceQueue) -> None:
        """What start-up's declaration (`topology.declare_on`) made of `events_query`."""
        self._reference_queue = reference_queue

    def declare_soon(self) -> None:
        """Declare the topology now rather than at the next interval (a binding is missing)."""
        self._asked.set()

    async def declare_once(self) -> None:
        """The queues nobody consumes, each said if it was gone (`Publisher.restore`), then
        the whole topology (each part the broker refuses said, the others declared all the
        same)."""
        await self._publisher.restore_unconsumed()
        await self._publisher.declare_topology()
        await self._watch_reference_projector_queue()

    async def _watch_reference_projector_queue(self) -> None:
        """`events_query` retired once found unread by two declarations in a row, and once
        each time it was read again (a reference projector binds it again as it starts);
        tried again two declarations after a retirement that failed. Not looked for once
        found absent: each look for a queue the broker does not have is an error in the
        broker's log."""
        if self._reference_queue is ReferenceQueue.ABSENT:
            return
        depth = await self._publisher.queue_depth(REFERENCE_PROJECTOR_QUEUE)
        if depth is None:
            self._reference_queue = ReferenceQueue.ABSENT
            return
        if depth.consumers:
            self._unread, self._reference_queue = 0, ReferenceQueue.READ
            return
        self._unread += 1
        if self._unread < 2 or self._reference_queue is ReferenceQueue.RETIRED:
            return
        self._reference_queue = await retire_reference_projector(self._broker)
        if self._reference_queue is ReferenceQueue.FAILED:
            self._unread = 0
