"""The supervisor: runs the wired components, says when the service is ready, shuts it down.

Every component runs as a task. A component that stops (it crashed: none
returns normally) stops the whole process with exit code 1 rather than leave
it half alive; SIGINT/SIGTERM stop it cleanly with exit code 0. Shutdown
refuses new commands first, lets the ones in flight finish, stops the gRPC
listeners, then cancels the components, which finish what they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
from collections.abc import Sequence
from typing import Any

from financing import release
from financing.application.grace import SHUTDOWN_GRACE
from financing.entrypoints.bootstrap import Listener, Service, StartupError
from financing.entrypoints.listening import shown, unspecified
from financing.logging import get_logger

log = get_logger(__name__)

# How long the calls in flight may take to finish once clients are told to go elsewhere.
CALLS_GRACE = 5.0
# How long the components may take to stop: a worker's step finished within its grace,
# then what it did recorded within as long again (the relayer's marking).
COMPONENTS_GRACE = 2 * SHUTDOWN_GRACE


async def supervise(
    service: Service, stop: asyncio.Event, stopped_by: Sequence[signal.Signals] = ()
) -> int:
    """Run `service` until `stop` is set (exit code 0) or a component stops (1).
    `stopped_by`: the signals that set `stop`, the first of which the log names."""
    for listener in service.listeners:
        host, port = listener.address
        try:
            await listener.server.start(host, port)
        except OSError as error:
            raise StartupError(
                f"{listener.name} cannot listen on {shown(host, port)}: {error}"
            ) from error
    tasks: set[asyncio.Task[Any]] = {
        asyncio.create_task(run(), name=name) for name, run in service.workers.items()
    }
    stopping = asyncio.create_task(stop.wait(), name="signal")
    try:
        await _ready(service, tasks, stopping)
        done, _ = await asyncio.wait(tasks | {stopping}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = _report(done - {stopping})
        by = {"signal": stopped_by[0].name} if stopping in done and stopped_by else {}
        log.info("shutting down", exit_code=exit_code, **by)
    finally:
        await _shut_down(service, tasks, stopping)
    log.info("service stopped", exit_code=exit_code)
    return exit_code


async def _ready(
    service: Service, tasks: set[asyncio.Task[Any]], stopping: asyncio.Task[Any]
) -> None:
    """Log "service ready" once every consumer consumes, unless a crash or a signal comes first."""
    consuming = asyncio.ensure_future(
        asyncio.gather(*(e.wait() for e in service.consuming.values()))
    )
    await asyncio.wait({*tasks, stopping, consuming}, return_when=asyncio.FIRST_COMPLETED)
    if not consuming.done():
        consuming.cancel()
        # Its outcome taken, so that asyncio does not log it as never retrieved.
        await asyncio.gather(consuming, return_exceptions=True)
        return
    log.info(
        "service ready",
        release=release(),
        components=sorted(service.components),
        listening={listener.name: _bound(listener) for listener in service.listeners},
    )
    if (spare := address_space_to_spare()) is not None and spare < ADDRESS_SPACE_TO_SPARE:
        log.warning(
            "the address space the process may map leaves little beyond what it maps at"
            " rest: large lists and bursts will fail for want of memory (MemoryError);"
            " raise ulimit -v",
            spare_mib=spare >> 20,
            limit_mib=resource.getrlimit(resource.RLIMIT_AS)[0] >> 20,
        )


# What an address-space limit (ulimit -v) should leave beyond what the process maps once
# ready (its threads' stacks and allocator arenas, about 300 MiB): under a limit that
# left it 3 MiB, "service ready" and a healthy /health came first, then every list of
# 15,000 invoices failed, and the process died under load (SIGSEGV once).
ADDRESS_SPACE_TO_SPARE = 256 << 20


def address_space_to_spare() -> int | None:
    """Bytes the process may still map under its address-space limit; None without one."""
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return limit - int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _bound(listener: Listener) -> str:
    """`host:port` where `listener` listens: port 0 asks the system for a free port,
    which is what an operator must be told; `:port` where one socket takes IPv4 and IPv6
    clients alike (an unspecified host), as such an address is written."""
    host, port = listener.address
    # grpclib's server and the metrics endpoint both keep their asyncio server so.
    server = getattr(listener.server, "_server", None)
    for sock in getattr(server, "sockets", None) or ():
        port = sock.getsockname()[1]
        if (
            sock.family == socket.AF_INET6
            and unspecified(sock.getsockname()[0])
            and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        ):
            return f":{port}"
        break
    return shown(host, port)


def _report(crashed: set[asyncio.Task[Any]]) -> int:
    for task in crashed:
        error = task.exception() if not task.cancelled() else None
        log.critical(  # it stops the service: said at every LOGGER_LEVEL
            "component stopped, shutting the service down",
            component=task.get_name(),
            error=repr(error),
            exc_info=error,
        )
    return 1 if crashed else 0


async def _shut_down(
    service: Service, tasks: set[asyncio.Task[Any]], stopping: asyncio.Task[Any]
) -> None:
    if service.health is not None:
        await service.health.drain()
    # Clients are told to take their new calls elsewhere; the calls in flight finish
    # first (closing a listener cancels what it is answering), within one grace for all
    # the services.
    for listener in service.listeners:
        listener.server.go_away()
    await asyncio.gather(*(calls.drain(CALLS_GRACE) for calls in service.calls))
    for listener in service.listeners:
        listener.server.close()
    stopping.cancel()
    running = {task for task in tasks if not task.done()}  # the crashed are reported already
    for task in running:
        task.cancel()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(COMPONENTS_GRACE):
            await asyncio.gather(*running, stopping, return_exceptions=True)
            for listener in service.listeners:
                await listener.server.wait_closed()
    for task in running:
        if not task.done():
            log.error("component did not stop in time", component=task.get_name())
        elif not task.cancelled() and (error := task.exception()) is not None:
            log.error(
                "component failed while stopping",
                component=task.get_name(),
                error=repr(error),
                exc_info=error,
            )
