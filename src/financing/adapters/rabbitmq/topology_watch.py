"""The broker topology kept as declared while the service runs.

A consumer declares its queue and the queue's bindings when it opens its channel,
and hears of its queue's deletion (the broker cancels it); a publisher hears of a
deleted exchange. Nothing hears of a deleted binding: the events it routed reach the
other queues, and the consumer behind it waits for good. Nor of the deletion of a
queue nobody consumes (`financing_dead_letters`, `financing_deferred`; an operator,
a policy's `expires`), and what that queue held goes with it. So the whole topology is
declared again every TOPOLOGY_INTERVAL (a declaration leaves what exists as it is),
and at once when an event arrives where only a missing binding can have sent it
(`topology.unrouted`); the two queues nobody consumes are looked for first, and one
gone is said once and counted (`financing_topology_restored_total`).
"""

from __future__ import annotations

import asyncio
import contextlib

from financing import metrics
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.publisher import Publisher
from financing.adapters.rabbitmq.queues import queue_exists
from financing.application.errors import Refused, Unavailable
from financing.logging import get_logger

log = get_logger(__name__)

# Seconds between two declarations of the topology: how long a deleted binding may
# leave events of its names behind its queue (`financing relay rewind` sends them again).
TOPOLOGY_INTERVAL = 10.0
# The queues no consumer of the service reads, whose deletion nobody else hears of.
UNCONSUMED = (topology.DEAD_LETTER_QUEUE, topology.DEFERRALS)


class TopologyWatch:
    """Declares the topology again, every TOPOLOGY_INTERVAL and when asked (a worker)."""

    def __init__(
        self, broker: Broker, publisher: Publisher, *, interval: float = TOPOLOGY_INTERVAL
    ) -> None:
        self._broker = broker
        self._publisher = publisher
        self._interval = interval
        self._asked = asyncio.Event()
        self._refused: str | None = None  # the refusal last said, until one succeeds

    def declare_soon(self) -> None:
        """Declare the topology now rather than at the next interval (a binding is missing)."""
        self._asked.set()

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
            except Refused as error:
                if error.detail != self._refused:
                    log.warning("the topology could not be declared again", error=error.detail)
                    self._refused = error.detail

    async def declare_once(self) -> None:
        """Look for the queues nobody consumes, declare the whole topology, then say which
        of them were gone (and made again, empty)."""
        gone = [name for name in UNCONSUMED if not await queue_exists(self._broker, name)]
        await self._publisher.declare_topology()
        self._refused = None
        for name in gone:
            metrics.TOPOLOGY_RESTORED.labels(name).inc()
            log.warning(
                "a queue of the service was deleted under it, with what it held; declared"
                " again (an operator, or a policy's `expires`: keep such policies off it)",
                queue=name,
            )
