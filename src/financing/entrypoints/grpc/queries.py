"""The Queries gRPC service (docs/contract.md section 1): the read models as replies.

Money leaves as a double here, at the edge; inside it is an exact Decimal.
Lists come in creation order, as the read models keep them. While the query
database cannot be reached the answer is UNAVAILABLE with the reason; a bug
is logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from financing import generated as pb
from financing.application.errors import Unavailable
from financing.application.read_models import ReadModelStore
from financing.application.retry import Outages
from financing.entrypoints.grpc import replies
from financing.entrypoints.grpc.calls import CallsInFlight
from financing.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")
Row = TypeVar("Row")


class QueriesService(pb.QueriesBase):
    """Each list is read, then written in protobuf's wire format by `replies`, which
    gives the loop a turn as it goes, rather than built as betterproto objects."""

    def __init__(self, read_models: ReadModelStore, outages: Outages) -> None:
        self._read_models = read_models
        self._outages = outages
        self._failed: set[str] = set()  # dependencies down at the last failed read
        self.calls = CallsInFlight()

    def __mapping__(self) -> dict[str, Handler]:
        lists: dict[str, Callable[[Stream[Any, Any]], Awaitable[None]]] = {
            "/Queries/AllInvestors": self._lister(
                "investors", self._read_models.investors, replies.investor
            ),
            "/Queries/AllInvoices": self._lister(
                "invoices", self._read_models.invoices, replies.invoice
            ),
            "/Queries/AllIssuers": self._lister(
                "issuers", self._read_models.issuers, replies.issuer
            ),
        }
        generated = super().__mapping__()
        assert generated.keys() == lists.keys(), "a Queries method without its lister"
        return {
            path: handler._replace(func=lists[path], reply_type=replies.Encoded)
            for path, handler in generated.items()
        }

    def _lister(
        self,
        what: str,
        read: Callable[[], Awaitable[Sequence[Row]]],
        item: Callable[[Row], bytes],
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def answer(stream: Stream[Any, Any]) -> None:
            await stream.recv_message()  # Empty
            # The rows are let go before the reply is sent: a caller that reads it slowly
            # holds only its bytes (about 100 a row), not the rows' objects (several
            # times that), for as long as it takes.
            reply = await replies.listed(await self._read(what, read), item)
            await stream.send_message(reply)

        return answer

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
