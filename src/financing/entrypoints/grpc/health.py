"""Readiness of each side of the service, for the gRPC Health Checking Protocol.

Each gRPC port serves `grpc.health.v1.Health`: the service names are `""`
(the whole port) and the port's own service (`Commands` or `Queries`); any
other name answers NOT_FOUND. A side is SERVING only while it can do its job:
`Commands` while commands can be durably queued (the broker takes the
publisher's declarations), `Queries` while the read-model database answers.

`HealthWatch` probes those dependencies every second, so a lost dependency
shows as NOT_SERVING within a couple of seconds and SERVING again once it is
back, with or without traffic; the probes report to the outage log too, so an
outage is also logged as over when nobody was using the dependency. It probes
every other dependency the process uses as well (its outage check), so that the
outage log, `/health` and `financing_dependency_up` of a process that serves no
gRPC API (a projector's, a command handler's) tell a lost dependency while
nothing uses it: they told it only once an operation failed on it. A probe
that runs out of time while the process is too busy to read an answer (its event
loop's thread ran, or waited for a core, for BUSY_SHARE of the probe's time, or a
turn of its event loop takes BUSY_TURN) learns nothing: its dependency is then as
the operations that use it say (an outage they met, not yet over), BUSY_EXCUSES
times in a row at most.
While the service drains at shutdown every side is NOT_SERVING, and each Watch
call, once its client was sent NOT_SERVING, ends with UNAVAILABLE "the service is
shutting down" (grpclib's went on until the connection's close cut it, no status).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grpclib.const import Status
from grpclib.health.check import CheckBase
from grpclib.health.service import Health
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Stream

from financing.application.errors import Unavailable
from financing.application.retry import Outages
from financing.cpu import BUSY_SHARE, Since
from financing.logging import get_logger

log = get_logger(__name__)

PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 2.0
# A probe that ran out of time says nothing of its dependency when the process was too
# busy to read the answer: its event loop's thread ran on a core, or waited runnable for
# one, for BUSY_SHARE of the probe's time or more (a storm of calls on two cores made a
# broker and a database that answered everyone else look down for up to 104 s, `/health`
# 503 and the dependency gauges at 0; each turn of the loop was short, the probe's round
# trips many; other processes on the host took the cores from the thread as well), or a
# turn of its event loop takes BUSY_TURN or more.
BUSY_TURN = 0.1
# So many probes of a dependency in a row excused by a busy process, and the next one
# out of time counts as the dependency's failure: an outage that no operation reports
# (a broker that stops confirming while the process stays busy) is not hidden for long.
BUSY_EXCUSES = 3
# At shutdown, how long clients watching the health get to receive NOT_SERVING and
# the end of their calls before the listeners close.
WATCHERS_GRACE = 0.25
SHUTTING_DOWN = "the service is shutting down"


@dataclass(frozen=True)
class Probe:
    """A check of one dependency: `check` returns when it answers, raises Unavailable if not."""

    dependency: str
    check: Callable[[], Awaitable[object]]


class Readiness(CheckBase):
    """Whether one side of the service can do its job now (a grpclib health check)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._serving = False
        self._closed = False  # the service is shutting down
        self._watchers: set[asyncio.Event] = set()
        self._unwatched = asyncio.Event()
        self._unwatched.set()

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def watched(self) -> bool:
        return bool(self._watchers)

    @property
    def closed(self) -> bool:
        return self._closed

    def set(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        log.info("health changed", service=self.name, serving=serving)
        self._wake()

    def close(self) -> None:
        """Not SERVING any more, for good: each watcher is told and its call ends."""
        self._closed = True
        self.set(False)
        self._wake()

    async def unwatched(self) -> None:
        """Returns once no call watches this side."""
        await self._unwatched.wait()

    def _wake(self) -> None:
        for watcher in self._watchers:
            watcher.set()

    def __status__(self) -> bool:
        return self._serving

    async def __check__(self) -> bool:
        return self._serving

    async def __subscribe__(self) -> asyncio.Event:
        watcher = asyncio.Event()
        self._watchers.add(watcher)
        self._unwatched.clear()
        return watcher

    async def __unsubscribe__(self, event: asyncio.Event) -> None:
        self._watchers.discard(event)
        if not self._watchers:
            self._unwatched.set()


@dataclass(frozen=True)
class _Watched:
    readiness: Readiness
    probes: Sequence[Probe]


class HealthWatch:
    """Probes each side's dependencies and sets its readiness (a worker of the service)."""

    def __init__(
        self,
        outages: Outages,
        *,
        interval: float = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._outages = outages
        self._interval = interval
        self._timeout = timeout
        self._watched: list[_Watched] = []
        self._draining = False
        self._excused: dict[str, int] = {}  # busy timeouts in a row, by dependency

    def watch(self, readiness: Readiness, probes: Sequence[Probe]) -> None:
        self._watched.append(_Watched(readiness, probes))

    async def drain(self) -> None:
        """The service is shutting down: nothing is SERVING any more. Returns once every
        call watching the health was told and ended, WATCHERS_GRACE at most (a client
        that reads nothing)."""
        self._draining = True
        for watched in self._watched:
            watched.readiness.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WATCHERS_GRACE):
                for watched in self._watched:
                    await watched.readiness.unwatched()

    async def run(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(self._interval)  # the probing period

    async def probe_once(self) -> None:
        probed = {probe.check for watched in self._watched for probe in watched.probes}
        # A dependency an API reads, whose outage check asks more (the projector's writes
        # to the query database), is checked too: its privileges revoked were found only
        # by the next write.
        others = [
            Probe(dependency, check)
            for dependency, check in self._outages.checks().items()
            if check not in probed
        ]
        # Side by side: one silent dependency, given as long as its operations are, would
        # hold the others' probes (and the other side's readiness).
        await asyncio.gather(*map(self._ready, self._watched), *map(self._probe, others))

    async def _ready(self, watched: _Watched) -> None:
        results = await asyncio.gather(*map(self._probe, watched.probes))
        watched.readiness.set(all(results) and not self._draining)

    async def _probe(self, probe: Probe) -> bool:
        """Whether the dependency answered. A probe that ran out of time while the process
        itself was too busy to read an answer learns nothing: the dependency counts as
        what the operations that use it say (down while one of them failed on it, each
        within its own deadline, and no later one succeeded)."""
        since = Since()
        try:
            async with asyncio.timeout(
                self._outages.answer_within(probe.dependency, self._timeout)
            ):
                await probe.check()
        except Unavailable as error:
            self._excused.pop(probe.dependency, None)
            self._outages.failed(error)
            return False
        except TimeoutError:
            share = since.share()
            excused = self._excused.get(probe.dependency, 0)
            if excused < BUSY_EXCUSES and (share >= BUSY_SHARE or await _busy()):
                self._excused[probe.dependency] = excused + 1
                log.debug(
                    "a health probe ran out of time in a busy process",
                    dependency=probe.dependency,
                    cpu_share=round(share, 2),
                )
                return probe.dependency not in self._outages.down()
            self._excused.pop(probe.dependency, None)
            self._outages.failed(Unavailable(probe.dependency, "no answer to a health probe"))
            return False
        except Exception:
            log.exception("a health probe failed with a bug", dependency=probe.dependency)
            return False
        self._excused.pop(probe.dependency, None)
        self._outages.succeeded(probe.dependency, checked=True)
        return True


async def _busy() -> bool:
    """Whether a turn of the event loop takes BUSY_TURN or more now (the process starved
    of the CPU by others)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(0)
    return loop.time() - started >= BUSY_TURN


class _Health(Health):
    """grpclib's health service of one port, its Watch calls ended at shutdown."""

    def __init__(self, service: Any, readiness: Readiness) -> None:
        super().__init__({service: [readiness]})
        self._readiness = readiness

    async def Watch(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        """The side's status, and each change of it, until the service shuts down: then
        NOT_SERVING and the call's end (UNAVAILABLE). A name the port does not serve is
        SERVICE_UNKNOWN until then, as grpclib's."""
        request = await stream.recv_message()
        assert request is not None  # grpclib's request codec refuses a call without one
        known = request.service in self._checks
        watcher = await self._readiness.__subscribe__()
        try:
            sent = None
            while True:
                watcher.clear()
                status = _status(self._readiness) if known else HealthCheckResponse.SERVICE_UNKNOWN
                if status != sent:
                    await stream.send_message(HealthCheckResponse(status=status))
                    sent = status
                if self._readiness.closed:
                    break
                await watcher.wait()
        finally:
            await self._readiness.__unsubscribe__(watcher)
        await stream.send_trailing_metadata(status=Status.UNAVAILABLE, status_message=SHUTTING_DOWN)


def _status(readiness: Readiness) -> HealthCheckResponse.ServingStatus.ValueType:
    if readiness.serving:
        return HealthCheckResponse.SERVING
    return HealthCheckResponse.NOT_SERVING


def health_service(service: Any, readiness: Readiness) -> Health:
    """The health service of one port: `""` and the port's service name."""
    return _Health(service, readiness)
