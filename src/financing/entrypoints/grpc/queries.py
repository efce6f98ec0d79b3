"""The Queries gRPC service (docs/contract.md section 1): the read models as replies.

Money leaves as a double here, at the edge; inside it is an exact Decimal.
Lists come in creation order, as the read models keep them. While the query
database cannot be reached the answer is UNAVAILABLE with the reason; a bug
is logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar
from uuid import UUID

from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from financing import generated as pb
from financing.application.errors import Unavailable
from financing.application.read_models import (
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    ReadModelStore,
)
from financing.application.retry import Outages
from financing.domain.events import Bid
from financing.domain.money import to_double
from financing.entrypoints.grpc.calls import CallsInFlight
from financing.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")


class QueriesService(pb.QueriesBase):
    def __init__(self, read_models: ReadModelStore, outages: Outages) -> None:
        self._read_models = read_models
        self._outages = outages
        self._failed: set[str] = set()  # dependencies down at the last failed read
        self.calls = CallsInFlight()

    async def all_investors(self, _: Empty) -> pb.AllInvestorsReply:
        rows = await self._read("investors", self._read_models.investors)
        return pb.AllInvestorsReply(investors=[investor(row) for row in rows])

    async def all_invoices(self, _: Empty) -> pb.AllInvoicesReply:
        rows = await self._read("invoices", self._read_models.invoices)
        return pb.AllInvoicesReply(invoices=[invoice(row) for row in rows])

    async def all_issuers(self, _: Empty) -> pb.AllIssuersReply:
        rows = await self._read("issuers", self._read_models.issuers)
        return pb.AllIssuersReply(issuers=[issuer(row) for row in rows])

    async def _read(self, what: str, rows: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await rows()
        except Unavailable as error:
            self._failed.add(error.dependency)
            self._outages.failed(error)
            raise GRPCError(
                Status.UNAVAILABLE, f"{error.dependency} unavailable, try again: {error.detail}"
            ) from None
        except Exception:
            log.exception("reading the read models failed with a bug", read_model=what)
            raise GRPCError(Status.INTERNAL, f"reading {what} failed: internal error") from None
        while self._failed:
            self._outages.succeeded(self._failed.pop())
        return result


def uuid(value: UUID) -> pb.Uuid:
    return pb.Uuid(value=str(value))


def investor(row: InvestorRow) -> pb.Investor:
    return pb.Investor(
        id=uuid(row.id),
        balance=pb.Money(amount=to_double(row.balance)),
        reserved=pb.Money(amount=to_double(row.reserved)),
    )


def bid(value: Bid) -> pb.Bid:
    return pb.Bid(
        investor_id=uuid(value.investor_id), amount=pb.Money(amount=to_double(value.amount))
    )


def invoice(row: InvoiceRow) -> pb.Invoice:
    return pb.Invoice(
        id=uuid(row.id),
        issuer_id=uuid(row.issuer_id),
        asking_price=pb.Money(amount=to_double(row.asking_price)),
        status=pb.InvoiceStatus.from_string(row.status.value),
        # Left None (absent on the wire) until the invoice is financed.
        winning_bid=bid(row.winning_bid) if row.winning_bid is not None else None,
    )


def issuer(row: IssuerRow) -> pb.Issuer:
    return pb.Issuer(id=uuid(row.id))
