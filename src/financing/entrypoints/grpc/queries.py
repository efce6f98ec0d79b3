"""The Queries gRPC service (docs/contract.md section 1): the read models as replies.

Money leaves as a double here, at the edge; inside it is an exact Decimal.
Lists come in creation order, as the read models keep them. While the query
database cannot be reached the answer is UNAVAILABLE with the reason; a bug
is logged with its traceback and answered INTERNAL.

A list reply is as large as its read model: of each read model, the process reads and
writes at most LIST_BUILDS lists at a time, holds at most LIST_REPLIES (built or being
sent), at most LIST_CALLS_PER_CONNECTION of them for one connection and
LIST_CALLS_PER_HOST for the connections of one host (so that one caller's many calls,
or its replies it does not read, do not hold up others' lists), and gives a caller
REPLY_TIMEOUT to take its reply in. 100 calls of a list of 60,000
invoices on one connection (an ordinary client, or one that never granted a window)
kept the process busy for over a minute, every other caller's calls timed out, the
broker and the database were taken for gone, and it grew by 4 GB, 1.7 GB of which
stayed for as long as the callers kept their connections.

A call waits for its turn, in the order calls came, at most BUSY_WAIT; then it is
answered UNAVAILABLE (busy), nothing read. While calls wait the server is busy
(`busy`), and a connection's calls beyond a few begun meanwhile are put aside at the
edge (`edge.GrpcServer`). Waiting without bound, 2,000 calls in
flight from clients that retry at once queued behind each other until their
deadlines: 50 of 24,023 answered in a minute (0.8 a second), where one polite client
got 6.6 a second, and the process spent itself beginning and cutting calls.

Each read model is a compartment of its own, its builds and places its own: a lock held
on one table (an operator's `ALTER TABLE`, `VACUUM FULL`) keeps its lists waiting up to
FINANCING_DB_TIMEOUT, and the lists of the other tables are answered as ever. With one
build line and one set of places for every list, the calls of the locked table's list
waiting on it held them all, and the investors' and issuers' lists were refused as
"busy" until the first of those calls failed. While one call of a list whose last read
failed tries the database again, the others of that list are answered UNAVAILABLE at
once, with that failure, and so is a call that waited its turn while the calls ahead of
it failed: it became the one to try again, and waited as long once more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from financing import generated as pb
from financing.application.errors import Unavailable
from financing.application.read_models import ReadModelStore
from financing.application.retry import Outages
from financing.entrypoints.grpc import replies
from financing.entrypoints.grpc.calls import CallsInFlight, TurnRefused
from financing.entrypoints.grpc.edge import Warnings
from financing.entrypoints.grpc.pushback import retry_when_less_busy
from financing.logging import get_logger
from financing.metrics import GRPC_BUSY, LIST_REPLY_BYTES

log = get_logger(__name__)

T = TypeVar("T")
Row = TypeVar("Row")

# Lists of one read model read and written at once, by the whole process.
LIST_BUILDS = 2
# List replies of one read model held at once, built or being sent; a call waits for
# its turn.
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
# Seconds a call may wait for its turn before it is answered busy.
BUSY_WAIT = 2.0
# The read model each method lists.
LISTS = {"AllInvestors": "investors", "AllInvoices": "invoices", "AllIssuers": "issuers"}
_BUSY = Warnings(10.0, log)
# Seconds a read may have waited when its caller gives up on it (its deadline, gone)
# before a warning says so: callers whose deadlines are shorter than FINANCING_DB_TIMEOUT
# gave up on every read of a locked table, and nothing said the table was held.
SLOW_READ_SAID = 2.0
_SLOW = Warnings(10.0, log)


class QueriesService(pb.QueriesBase):
    """Each list is read, then written in protobuf's wire format by `replies`, which
    gives the loop a turn as it goes, rather than built as betterproto objects."""

    def __init__(
        self, read_models: ReadModelStore, outages: Outages, *, busy_wait: float = BUSY_WAIT
    ) -> None:
        self._read_models = read_models
        self._busy_wait = busy_wait
        self._outages = outages
        self._lists = {what: _List(what) for what in LISTS.values()}
        self.calls = CallsInFlight()

    def __mapping__(self) -> dict[str, Handler]:
        lists: dict[str, Callable[[Stream[Any, Any]], Awaitable[None]]] = {
            "/Queries/AllInvestors": self._lister(
                "AllInvestors", self._read_models.investors, replies.investor
            ),
            "/Queries/AllInvoices": self._lister(
                "AllInvoices", self._read_models.invoices, replies.invoice
            ),
            "/Queries/AllIssuers": self._lister(
                "AllIssuers", self._read_models.issuers, replies.issuer
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
        method: str,
        read: Callable[[], Awaitable[Sequence[Row]]],
        item: Callable[[Row], bytes],
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        listed = self._lists[LISTS[method]]

        async def answer(stream: Stream[Any, Any]) -> None:
            await stream.recv_message()  # Empty
            listed.refuse_while_tried(method)  # before it takes a place others need
            failures = listed.failures  # those met before it came
            peer = stream.peer.addr()
            turn = _Turn(listed, peer, peer[0] if isinstance(peer, tuple) else peer)
            try:
                await self._take(turn, method, listed)
                # The rows are let go before the reply is sent: a caller that reads it
                # slowly holds only its bytes (about 100 a row), not the rows' objects
                # (several times that), for as long as it takes.
                async with listed.building:
                    listed.refuse_while_tried(method)
                    listed.refuse_if_failed_since(method, failures)
                    reply = await replies.listed(await self._read(method, listed, read), item)
                LIST_REPLY_BYTES.labels(method).observe(len(reply.data))
                listed.bytes_held += len(reply.data)
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT):
                        await stream.send_message(reply)
                except TimeoutError:
                    raise GRPCError(
                        Status.DEADLINE_EXCEEDED,
                        f"the reply was not taken in within {REPLY_TIMEOUT:.0f} s",
                    ) from None
                finally:
                    listed.bytes_held -= len(reply.data)
            finally:
                turn.give_back()

        return answer

    def bytes_held(self, method: str) -> int:
        """Bytes of `method`'s list replies built and not yet taken in by their callers."""
        return self._lists[LISTS[method]].bytes_held

    def busy(self) -> bool:
        """Whether calls wait for their turn (`edge.GrpcServer`'s `busy`): those of one
        host may while others' are answered at once, and one host's calls beyond their
        places, begun without bound, kept the process beginning and refusing them."""
        return any(listed.waiting for listed in self._lists.values())

    async def _take(self, turn: _Turn, method: str, listed: _List) -> None:
        """`turn` taken: at once where there is room, else within the busy wait."""
        if turn.free():
            await turn.take()  # at once
            return
        listed.waiting += 1
        try:
            await self.calls.waited_turn(
                turn.take(), within=self._busy_wait, given_late=turn.give_back
            )
        except TurnRefused as refused:
            if refused.shutting_down:
                raise GRPCError(
                    Status.UNAVAILABLE, f"{method} not answered: the service is shutting down"
                ) from None
            failed = next(iter(listed.failed), None)
            if failed is not None:
                # The calls ahead of it wait on a database found down (a lock held on a
                # table), not on a crowd: said as the outage it is, which its own lines
                # say, where "busy" pointed an operator at the load.
                raise GRPCError(
                    Status.UNAVAILABLE,
                    f"{method} not answered: {failed} unavailable, the {method} calls"
                    " ahead of it waiting on it; try again later",
                ) from None
            _BUSY.warn("list calls answered UNAVAILABLE: the service is busy")
            GRPC_BUSY.labels("Queries", method).inc()
            retry_when_less_busy(self._busy_wait, listed.waiting, LIST_REPLIES)
            raise GRPCError(
                Status.UNAVAILABLE,
                f"{method} not answered: the service was busy answering {method} calls"
                f" ({listed.waiting} waiting for a turn) for the {self._busy_wait:g} s it"
                " waited; try again later",
            ) from None
        finally:
            listed.waiting -= 1

    async def _read(self, method: str, listed: _List, rows: Callable[[], Awaitable[T]]) -> T:
        # A call after one that failed tries the dependency again, and keeps its outage
        # open until it fails in its turn (`Outages.trying`): each call waiting up to
        # FINANCING_DB_TIMEOUT on a lock, the outage was said over 5 s after the last
        # failure, and begun again 5 s later, every 10 s while the lock was held. Only
        # a read of the same list ends what its own reads met: a lock on one table
        # leaves the others' reads working, whose successes said the outage over.
        trial = bool(listed.failed)  # the others of its list are refused meanwhile
        if trial:
            listed.tried = True
        began = time.monotonic()
        try:
            with self._outages.trying(next(iter(listed.failed), None)):
                result = await rows()
        except asyncio.CancelledError:
            waited = time.monotonic() - began
            if waited >= SLOW_READ_SAID:
                _SLOW.warn(
                    f"a read of {listed.what} was given up by its caller after {waited:.1f} s:"
                    " the query database answers it slowly (a lock held on its table?)",
                    kind=listed.what,
                )
            raise
        except Unavailable as error:
            listed.failed[error.dependency] = error.detail
            listed.failures += 1
            self._outages.failed(error)
            raise GRPCError(
                Status.UNAVAILABLE, _unavailable(method, error.dependency, error.detail)
            ) from None
        except Exception:
            log.exception("reading the read models failed with a bug", read_model=listed.what)
            raise GRPCError(
                Status.INTERNAL, f"reading {listed.what} failed: internal error"
            ) from None
        finally:
            if trial:
                listed.tried = False
        while listed.failed:
            self._outages.succeeded(listed.failed.popitem()[0])
        return result


def _unavailable(method: str, dependency: str, detail: str) -> str:
    """Named as the other answers of either API name theirs (`SellInvoice not queued:
    broker unavailable`, `AllIssuers not answered: the service was busy ...`)."""
    return f"{method} not answered: {dependency} unavailable, try again: {detail}"


@dataclass(eq=False)
class _List:
    """One read model's lists: their builds and places, and what their last read failed
    on."""

    what: str
    building: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LIST_BUILDS))
    holding: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LIST_REPLIES))
    connections: dict[object, _Places] = field(default_factory=dict)  # by peer address
    hosts: dict[object, _Places] = field(default_factory=dict)  # by peer host
    waiting: int = 0  # calls waiting for their turn
    bytes_held: int = 0  # of replies built and not yet taken in
    failed: dict[str, str] = field(default_factory=dict)  # detail, by dependency
    failures: int = 0  # reads failed so far
    tried: bool = False  # a read tries the database again after a failure

    def refuse_if_failed_since(self, method: str, failures: int) -> None:
        """UNAVAILABLE at once, with the failure, where reads failed while the call
        waited its turn (`failures`: those before it came): others came to try again."""
        if self.failed and self.failures != failures:
            self._refuse(method, "met by the calls ahead of it")

    def refuse_while_tried(self, method: str) -> None:
        """UNAVAILABLE at once, with the failure, while another call tries again."""
        if self.tried and self.failed:
            self._refuse(method, f"another {method} call is trying it")

    def _refuse(self, method: str, why: str) -> None:
        dependency, detail = next(iter(self.failed.items()))
        raise GRPCError(Status.UNAVAILABLE, f"{_unavailable(method, dependency, detail)} ({why})")


@dataclass
class _Places:
    """The list calls of one connection or host: how many there are, and their places."""

    places: asyncio.Semaphore
    calls: int = 0


class _Turn:
    """One list call's places: one of its connection's, one of its host's and one of the
    replies', taken in that order and given back together."""

    def __init__(self, listed: _List, peer: object, host: object) -> None:
        self._holding = listed.holding
        self._of = [
            (listed.connections, peer, LIST_CALLS_PER_CONNECTION),
            (listed.hosts, host, LIST_CALLS_PER_HOST),
        ]
        self._places: list[_Places] = []
        for places_of, whose, most in self._of:
            places = places_of.get(whose)
            if places is None:
                places = places_of[whose] = _Places(asyncio.Semaphore(most))
            places.calls += 1
            self._places.append(places)
        self._held: list[asyncio.Semaphore] = []
        self._given_back = False

    def free(self) -> bool:
        """Whether every place is free: taken at once."""
        return not any(p.places.locked() for p in self._places) and not self._holding.locked()

    async def take(self) -> None:
        for semaphore in (*(p.places for p in self._places), self._holding):
            await semaphore.acquire()
            self._held.append(semaphore)

    def give_back(self) -> None:
        """Every place taken given back (once; what is still being taken is cancelled by
        the caller first)."""
        for semaphore in reversed(self._held):
            semaphore.release()
        self._held.clear()
        if self._given_back:
            return
        self._given_back = True
        for (places_of, whose, _), places in zip(self._of, self._places, strict=True):
            places.calls -= 1
            if not places.calls:
                del places_of[whose]
