"""What a refusal tells the client's retries: gRPC's `grpc-retry-pushback-ms` trailer.

Clients with a retry policy (grpc-go, grpc-java, grpcio, grpc-dotnet, by gRPC's retry
design, A6) obey it on a status their policy retries: they wait that many milliseconds
before the next attempt, or make none when it is negative. Without it they retry at
their own backoff, whatever the answer said:

- A call answered busy (no turn within the busy wait) is told to come back after about
  as long again, as many times over as the calls still waiting fill the room there is
  for them (at most LONGEST_PUSHBACK), spread over half to one and a half times that,
  so that the clients refused together do not all come back together into the same
  crowd. Told the busy wait alone, thousands of clients retrying 5 times made 44,371
  attempts of 10,000 calls, and the process spent itself refusing them.
- A command answered "it may have been queued" without an `idempotency-key` is told
  not to be retried: a retry would be a second command (a second invoice sold, a second
  bid placed) wherever the first was queued. Under a key, a retry is the same command
  again, dropped as a duplicate downstream, and the client's own backoff applies.

Every other answer carries no pushback: the client's own backoff applies.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any, Protocol

PUSHBACK_HEADER = "grpc-retry-pushback-ms"
# The value that tells a client not to retry (any negative number, by A6).
NO_RETRY = -1

# The advice of the call being answered (each call runs in a task of its own).
_advice: ContextVar[int | None] = ContextVar("retry_pushback_ms", default=None)

_Headers = list[tuple[str, str]]


class _SendHeaders(Protocol):
    def __call__(
        self, headers: _Headers, end_stream: bool = False
    ) -> Coroutine[Any, Any, None]: ...


# The longest a busy answer asks a client to wait, in seconds.
LONGEST_PUSHBACK = 60.0


def retry_when_less_busy(busy_wait: float, waiting: int, room: int) -> None:
    """Advise the call's client, answered busy, to retry after `busy_wait` as many times
    over as the `waiting` calls fill the `room` there is for them (at most
    LONGEST_PUSHBACK), spread over half to one and a half times that."""
    seconds = min(LONGEST_PUSHBACK, busy_wait * max(1.0, waiting / room))
    _advice.set(round(seconds * 1000 * random.uniform(0.5, 1.5)))


def do_not_retry() -> None:
    """Advise the call's client not to retry it."""
    _advice.set(NO_RETRY)


def advised(send_headers: _SendHeaders) -> _SendHeaders:
    """`send_headers` (an HTTP/2 stream's, sending the headers of a call's answer), with
    the advice its handler gave added to the trailers of an error. At this level, not
    as metadata: grpclib refuses to send metadata whose key begins with `grpc-`, which
    gRPC keeps for its own fields, this one among them."""

    async def send(headers: _Headers, end_stream: bool = False) -> None:
        advice = _advice.get()
        if end_stream and advice is not None and _status(headers) not in (None, "0"):
            headers = [*headers, (PUSHBACK_HEADER, str(advice))]
        await send_headers(headers, end_stream)

    return send


def _status(headers: _Headers) -> str | None:
    return next((value for name, value in headers if name == "grpc-status"), None)
