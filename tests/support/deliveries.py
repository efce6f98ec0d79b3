"""A delivery held in memory, for running the pipeline's parts without a broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

from financing.application import codec
from financing.application.messages import Message
from financing.application.pipeline import Decoded, Outcome
from financing.application.ports import AGGREGATE_VERSION_HEADER, Envelope, event_message_id
from financing.domain.events import DomainEvent


@dataclass
class MemoryDelivery:
    """A `Delivery` held in memory: what a queue would deliver, and how it was settled."""

    message: Envelope
    source: str = "memory"
    open: bool = True  # False: its channel closed, it can no longer be settled
    settled: list[Outcome] = field(default_factory=list)
    waited: float = 0.0  # seconds since it was first deferred
    late: bool = False  # back from a deferral long after its delay
    past_wait_from: float | None = None  # its wait when its pass past its wait began

    @property
    def name(self) -> str | None:
        return self.message.name

    def envelope(self) -> Envelope:
        return self.message

    def deliverable(self) -> bool:
        return self.open

    def log_fields(self) -> dict[str, Any]:
        return {
            "queue": self.source,
            "name": self.message.name,
            "message_id": self.message.message_id,
            "aggregate_id": self.message.aggregate_id,
        }

    async def settle(self, outcome: Outcome) -> None:
        self.settled.append(outcome)


def envelope_of(
    message: Message, message_id: UUID | str | None = None, *, version: int | None = None
) -> Envelope:
    """`message` as it travels: a domain event carries its aggregate id in a header, and,
    given the `version` it was stored at, its version and the id the relayer derives."""
    aggregate_id = str(message.aggregate_id) if isinstance(message, DomainEvent) else None
    headers: dict[str, str] = {}
    if isinstance(message, DomainEvent) and version is not None:
        headers[AGGREGATE_VERSION_HEADER] = str(version)
        message_id = message_id or event_message_id(message.aggregate_id, version)
    return Envelope(
        message_id=str(message_id or uuid4()),
        name=codec.name_of(message),
        body=codec.encode(message),
        aggregate_id=aggregate_id,
        headers=headers,
    )


def decoded(
    message: Message, message_id: UUID | str | None = None, *, version: int | None = None
) -> Decoded:
    """`message` as the pipeline hands it to a handler."""
    envelope = envelope_of(message, message_id, version=version)
    return Decoded(MemoryDelivery(envelope), envelope, message)
