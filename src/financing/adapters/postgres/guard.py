"""The writes of a database held while it lacks a unique index they rely on.

Without `events_stream_version` two writers can both append one version of an
aggregate, and without a consumer's record key a copy of a message is applied
twice, with no statement failing. The statements whose plain INSERTs rely on a key
name it besides, so that they fail without it (42P10); the other writes are held
here. The database's inspection (`inspection.Inspection`: each second from its
check, every 5 s at least while its pool is busy) sets what it lacks
(`schema.require_indexes`) and clears it once the index is back; the event store
and the projector's read models refuse each write meanwhile, as an outage of
their database, so that nothing is written unguarded.
"""

from __future__ import annotations

from financing.application.errors import AwaitingOperator


class WriteGuard:
    """What keeps a database's writes from going on now, if anything."""

    __slots__ = ("lacking",)

    def __init__(self) -> None:
        self.lacking: AwaitingOperator | None = None

    def check(self) -> None:
        """AwaitingOperator, as the watch found it, while the writes are held."""
        lacking = self.lacking
        if lacking is not None:
            # A new error each time: one raised again keeps every traceback it went through.
            raise AwaitingOperator(lacking.dependency, lacking.detail)


# A guard that holds nothing back (writers the watch does not look after).
UNGUARDED = WriteGuard()
