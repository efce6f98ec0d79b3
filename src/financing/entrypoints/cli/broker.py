"""`financing broker hand-back`: the broker given back to the reference service.

Run with every instance of the service stopped, and the reference's processes too,
to go back to the reference on a broker it used. Binds the reference's handler queues
(`events_<Event>`) to `events` again; deletes `financing_events`, and every binding of
the service's with it; sends the deferred deliveries back to their queues, and the
messages of the reference's queues its consumers refuse (a header that is no string,
the broker's record of a dead-lettering) again with string headers only;
deletes `events_financing_projector`, `financing_unrouted` and `financing_deferred`;
keeps `financing_dead_letters`; declares the reference projector's `events_query`
again. When: docs/deployment.md, "Taking over from the reference, and handing back". Exit
code 0 once done; 1 while a queue it changes is being read (nothing is changed), or
when the broker cannot be reached.
"""

from __future__ import annotations

import sys

from financing.adapters.rabbitmq.connection import connected
from financing.adapters.rabbitmq.hand_back import StillConsumed, hand_back
from financing.config import Settings
from financing.entrypoints.cli.console import write_lines


async def run_hand_back(settings: Settings, command: str) -> int:
    async with connected(settings.amqp_urls, "broker hand-back") as broker:
        try:
            handed = await hand_back(broker)
        except StillConsumed as consumed:
            print(f"{command}: {consumed}", file=sys.stderr)
            return 1
    write_lines(
        [
            *(handed.done or ["nothing left to do: handed back already"]),
            handed.dead_letters,
            "the broker is the reference's again: start its processes",
        ]
    )
    return 0
