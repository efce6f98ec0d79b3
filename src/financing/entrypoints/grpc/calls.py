"""The calls a gRPC service is answering, so that shutting down lets them finish."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from financing.logging import get_logger

log = get_logger(__name__)


class TurnRefused(Exception):
    """A call was given no turn: none came within its wait, or the service began to shut
    down first (`shutting_down`). The call is answered at once, nothing done."""

    def __init__(self, *, shutting_down: bool) -> None:
        super().__init__("shutting down" if shutting_down else "busy")
        self.shutting_down = shutting_down


class CallsInFlight:
    """Counts the calls being answered; once draining, a new call is answered UNAVAILABLE.

    The listener's own close cancels the calls it is still answering, so the supervisor
    drains each service first (docs/reliability.md, "Clean shutdown").
    """

    def __init__(self) -> None:
        self._count = 0
        self.waiting = 0  # calls waiting for their turn
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self._count

    @property
    def draining_begun(self) -> bool:
        return self._draining.is_set()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        if self._draining.is_set():
            raise GRPCError(Status.UNAVAILABLE, "the service is shutting down")
        self._count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def draining(self) -> None:
        """Return once draining has begun: what a call still waits for before it does
        anything (its turn) is given up, and the call answered at once, nothing done."""
        await self._draining.wait()

    async def waited_turn(
        self, take: Awaitable[object], *, within: float, given_late: Callable[[], None]
    ) -> None:
        """Wait for `take` (a call's turn among a service's calls, in the order they came)
        at most `within` seconds, and no longer than until draining begins: TurnRefused
        then (told at once, a client retries elsewhere, rather than cut at the end of the
        grace or served as the process stops). `given_late`: what gives back a turn
        `take` got as the wait ended."""
        taking = asyncio.ensure_future(take)
        stopping = asyncio.ensure_future(self.draining())
        given = False
        self.waiting += 1
        try:
            await asyncio.wait(
                {taking, stopping}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
            given = taking.done() and not taking.cancelled()
        finally:
            self.waiting -= 1
            stopping.cancel()
            if not given:
                taking.cancel()
                if taking.done() and not taking.cancelled() and taking.exception() is None:
                    given_late()  # given as the call was cut (its deadline)
        if given:
            taking.result()  # raises what taking the turn raised
            return
        raise TurnRefused(shutting_down=self.draining_begun)

    async def drain(self, grace: float) -> None:
        """Refuse new calls and wait (at most `grace` seconds) for those in flight; say
        how many are still in flight then (the listener's close cuts them)."""
        self._draining.set()
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            if not self._count:
                return  # the last ended as the grace ran out, in the same turn
            log.warning(
                "calls still in flight at the end of the shutdown grace are cut",
                calls=self._count,
                grace_seconds=grace,
            )
