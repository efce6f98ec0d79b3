"""A delivery held in memory, for running the pipeline's parts without a broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from financing.application import codec
from financing.application.messages import Message
from financing.application.pipeline import Decoded, Outcome
from financing.application.ports import Envelope


@dataclass
class MemoryDelivery:
    """A `Delivery` whose settled outcomes are kept in `outcomes`."""

    envelope_: Envelope
    source: str = "memory"
    open: bool = True
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def name(self) -> str | None:
        return self.envelope_.name

    def envelope(self) -> Envelope:
        return self.envelope_

    def deliverable(self) -> bool:
        return self.open

    def log_fields(self) -> dict[str, Any]:
        return {"queue": self.source, "message_id": self.envelope_.message_id}

    async def settle(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def decoded(message: Message, message_id: str, aggregate_id: str | None = None) -> Decoded:
    """`message` as the pipeline hands it to a handler."""
    envelope = Envelope(
        message_id=message_id,
        name=codec.name_of(message),
        body=codec.encode(message),
        aggregate_id=aggregate_id,
    )
    return Decoded(MemoryDelivery(envelope), envelope, message)
