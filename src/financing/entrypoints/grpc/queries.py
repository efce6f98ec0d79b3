"""The Queries gRPC service (docs/contract.md section 1): the read models as replies.

Money leaves as a double here, at the edge; inside it is an exact Decimal.
Lists come in creation order, as the read models keep them. While the query
database cannot be reached the answer is UNAVAILABLE with the reason; a bug
is logged with its traceback and answered INTERNAL.

A list reply is as large as its read model: the process reads and writes at most
LIST_BUILDS of them at a time, holds at most LIST_REPLIES (built or being sent), at
most LIST_CALLS_PER_CONNECTION of them for one connection and LIST_CALLS_PER_HOST for
the connections of one host (so that one caller's many calls, or its replies it does
not read, do not hold up others' lists), and gives a caller REPLY_TIMEOUT to take
its reply in. 100 calls of a list of 60,000
invoices on one connection (an ordinary client, or one that never granted a window)
kept the process busy for over a minute, every other caller's calls timed out, the
broker and the database were taken for gone, and it grew by 4 GB, 1.7 GB of which
stayed for as long as the callers kept their connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
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

# Lists read and written at once, by the whole process.
LIST_BUILDS = 2
# List replies held at once, built or being sent; a call waits for its turn.
LIST_REPLIES = 16
# List calls of one connection past their turn at once (the others of it wait).
LIST_CALLS_PER_CONNECTION = 2
# And of all the connections of one host (address: clients behind one NAT or proxy
# share them): 8 connections each holding 2 replies they never read took every place,
# and every other caller's list waited 60 s. Half the places, so that one host can
# never hold up the others' lists, and the clients behind one address still have 8.
LIST_CALLS_PER_HOST = LIST_REPLIES // 2
# Seconds a caller has to take its reply in once it is built.
REPLY_TIMEOUT = 60.0


class QueriesService(pb.QueriesBase):
    """Each list is read, then written in protobuf's wire format by `replies`, which
    gives the loop a turn as it goes, rather than built as betterproto objects."""

    def __init__(self, read_models: ReadModelStore, outages: Outages) -> None:
        self._read_models = read_models
        self._outages = outages
        self._failed: set[str] = set()  # dependencies down at the last failed read
        self.calls = CallsInFlight()
        self._building = asyncio.Semaphore(LIST_BUILDS)
        self._holding = asyncio.Semaphore(LIST_REPLIES)
        self._connections: dict[object, _Turns] = {}  # by peer address
        self._hosts: dict[object, _Turns] = {}  # by peer host

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
            peer = stream.peer.addr()
            host = peer[0] if isinstance(peer, tuple) else peer
            async with (
                _turn(self._connections, peer, LIST_CALLS_PER_CONNECTION),
                _turn(self._hosts, host, LIST_CALLS_PER_HOST),
                self._holding,
            ):
                # The rows are let go before the reply is sent: a caller that reads it
                # slowly holds only its bytes (about 100 a row), not the rows' objects
                # (several times that), for as long as it takes.
                async with self._building:
                    reply = await replies.listed(await self._read(what, read), item)
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT):
                        await stream.send_message(reply)
                except TimeoutError:
                    raise GRPCError(
                        Status.DEADLINE_EXCEEDED,
                        f"the reply was not taken in within {REPLY_TIMEOUT:.0f} s",
                    ) from None

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


@dataclass
class _Turns:
    """The list calls of one connection or host: how many there are, and their places."""

    places: asyncio.Semaphore
    calls: int = 0


@contextlib.asynccontextmanager
async def _turn(turns_of: dict[object, _Turns], whose: object, places: int) -> AsyncIterator[None]:
    """One of the `places` of the list calls of `whose` (a connection, a host)."""
    turns = turns_of.get(whose)
    if turns is None:
        turns = turns_of[whose] = _Turns(asyncio.Semaphore(places))
    turns.calls += 1
    try:
        async with turns.places:
            yield
    finally:
        turns.calls -= 1
        if not turns.calls:
            del turns_of[whose]
