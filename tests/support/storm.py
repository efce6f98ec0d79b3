"""`financing` under a redelivery storm: every delivery is handled N times at once.

    python -m tests.support.storm N serve [--components ...]

As a broker redelivering under failures would, every consumer (command
handlers, saga policies, integration handlers) runs each message N times
concurrently, and the projector applies each batch N times. Processing must
be idempotent: the outcome has to be the same as a normal run's. This lives
with the tests, not in the service: the storm is wired in through the
composition root's overrides.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from financing.application.pipeline import Decoded, Handler, HandlerPart, Outcome, OutcomeKind
from financing.application.read_models import (
    EMPTY,
    NOT_RECORDED,
    ForeignEvent,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    ReadModelStore,
)
from financing.domain.events import DomainEvent
from financing.entrypoints.bootstrap import Overrides
from financing.entrypoints.cli import main as cli_main

# When copies end differently, the outcome that says the most about what was done.
_PREFERRED = (OutcomeKind.PROCESSED, OutcomeKind.UNCHANGED, OutcomeKind.DUPLICATE)


def duplicated(times: int) -> HandlerPart:
    """Runs the handler `times` times concurrently; any copy's failure fails the delivery
    (which is then retried as a whole, finding the message processed)."""

    def part(inner: Handler) -> Handler:
        async def handler(message: Decoded) -> Outcome:
            results = await asyncio.gather(
                *(inner(message) for _ in range(times)), return_exceptions=True
            )
            outcomes: list[Outcome] = []
            for result in results:
                if isinstance(result, BaseException):
                    raise result
                outcomes.append(result)
            for kind in _PREFERRED:
                for outcome in outcomes:
                    if outcome.kind is kind:
                        return outcome
            return outcomes[0]

        return handler

    return part


@dataclass
class WrappedReadModels:
    """A read-model store passed through to `inner`; subclasses change how batches apply."""

    inner: ReadModelStore

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        return await self.inner.apply(batch, digests, recorded)

    async def digests(self, message_ids: Sequence[str]) -> Mapping[str, str]:
        return await self.inner.digests(message_ids)

    async def recorded_at(self, message_ids: Sequence[str]) -> Mapping[str, datetime]:
        return await self.inner.recorded_at(message_ids)

    async def foreign_events(self, after: int = 0, limit: int = 1000) -> list[ForeignEvent]:
        return await self.inner.foreign_events(after, limit)

    async def investors(self) -> list[InvestorRow]:
        return await self.inner.investors()

    async def invoices(self) -> list[InvoiceRow]:
        return await self.inner.invoices()

    async def issuers(self) -> list[IssuerRow]:
        return await self.inner.issuers()

    async def unlisted_invoices(self) -> list[UUID]:
        return await self.inner.unlisted_invoices()


@dataclass
class Repeated(WrappedReadModels):
    """Applies every batch `times` times, as a redelivery storm would."""

    times: int = 2

    async def apply(
        self,
        batch: Sequence[tuple[str, DomainEvent]],
        digests: Mapping[str, str] = EMPTY,
        recorded: Mapping[str, datetime] = NOT_RECORDED,
    ) -> AbstractSet[str]:
        fresh = await self.inner.apply(batch, digests, recorded)
        for _ in range(self.times - 1):
            await self.inner.apply(batch, digests, recorded)
        return fresh


def overrides(times: int) -> Overrides:
    return Overrides(
        handler_parts=(duplicated(times),),
        read_models=lambda store: Repeated(store, times),
    )


def main(argv: Sequence[str]) -> None:
    times = int(argv[0])
    if times < 1:
        raise SystemExit("N must be >= 1")
    cli_main(argv[1:], overrides=overrides(times))


if __name__ == "__main__":
    main(sys.argv[1:])
