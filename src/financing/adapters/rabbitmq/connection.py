"""The connection to the broker, opened again whenever it is lost, and its errors translated.

aio-pika's robust connection restores channels by itself, but a channel the
broker closed while restoring it (permissions revoked for a moment, a queue
declared differently) stays closed for good. So this adapter manages
reconnection itself: `Broker` holds one plain connection and opens a new one
on demand when it is gone; every consumer and the publisher reopen their
channel through it when theirs closes. The outage is logged once when the
connection is lost and once when it is back (`retry.Outages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, Generic, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, UnderlayChannel
from aio_pika.tools import OneShotCallback
from yarl import URL

from financing import metrics
from financing.application.errors import (
    AwaitingOperator,
    Refused,
    Unavailable,
    said_of,
)
from financing.application.retry import Outages
from financing.config import AMQP_TLS_KEYS, broker_auth, broker_tls, split_url
from financing.logging import get_logger
from financing.tls_files import UnusableFiles, certificate_expiry

log = get_logger(__name__)

T = TypeVar("T")

BROKER = "broker"
CONNECT_TIMEOUT = 10.0
# Callers arriving this soon after a failed attempt share its failure rather than
# each waiting for an attempt of its own.
RECONNECT_INTERVAL = 0.5
# A connection the broker refused sooner than this after it opened (closed with an error
# of its own: a user's channel limit reached as the service opened its channels, 530
# NOT_ALLOWED) was no recovery: the next one is opened RECONNECT_INTERVAL later, twice as
# late after each such connection in a row, MAX_RECONNECT_WAIT at most. Reopened at once,
# it made 460 connections in 40 s, every consumer's channel opened and closed again with
# each. A connection lost otherwise (the network, a restart, an operator's close) is
# reopened at once, however young: held off too, the fault suite's flapping broker
# (every connection closed each 0.05-0.6 s) let 46 sagas through where 218 went.
SETTLED_AFTER = 10.0
MAX_RECONNECT_WAIT = 10.0
# How the broker says it refuses a connection (each a reply code of its own; 320
# CONNECTION_FORCED, an operator's close or a node stopping, is the base class alone).
_REFUSALS = (
    aiormq.exceptions.ConnectionNotAllowed,
    aiormq.exceptions.ConnectionResourceError,
    aiormq.exceptions.ConnectionChannelError,
    aiormq.exceptions.ConnectionInternalError,
    aiormq.exceptions.ConnectionCommandInvalid,
    aiormq.exceptions.ConnectionNotImplemented,
)
CLOSE_TIMEOUT = 2.0
# Seconds between heartbeats unless a broker URL asks for its own (`?heartbeat=`). The
# client library gives a connection up once no frame came for three times as long
# (plus one), so a connection the broker will never answer again (the node replaced
# behind the same address, a partition that drops its packets) is reopened within about
# 33 s, where the library's default of 60 s left it for three minutes.
HEARTBEAT = 10

# What the broker or the connection to it can raise.
BROKER_ERRORS: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def _left_pending_at_a_close(error: BaseException) -> bool:
    """aiormq fails what a closing channel or connection leaves pending (a publish waiting
    to be written, a confirm) with a bare `Exception`: no type of its own, no message."""
    return type(error) is Exception and not error.args


def _client_url(url: str, name: str) -> URL:
    """`url` as the AMQP client reads it: asking for HEARTBEAT unless it sets its own
    heartbeat, naming the connection `name` (what the broker's management shows) unless
    it names it, with its authentication mechanism, and without its TLS settings (the
    service makes the TLS context itself, `config.BrokerTls`)."""
    parsed = URL(url)
    query = {key: value for key, value in parsed.query.items() if key not in AMQP_TLS_KEYS}
    query.pop("auth_mechanism", None)
    query["auth"] = broker_auth(url)
    query.setdefault("heartbeat", str(HEARTBEAT))
    query.setdefault("name", name)
    return parsed.with_query(query)


async def _tls_context(url: str) -> ssl.SSLContext | None:
    """The TLS context of an amqps:// URL, its files read again (replaced certificates are
    taken at the next connection, and the expiry of the client certificate said then);
    None for an amqp:// one."""
    tls = broker_tls(url)
    if tls is None:
        return None
    context = await asyncio.to_thread(tls.context)
    if tls.certfile is not None:
        expires = await asyncio.to_thread(certificate_expiry, tls.certfile)
        if expires is not None:
            metrics.BROKER_TLS_CERTIFICATE_EXPIRY.labels(tls.certfile).set(expires)
    return context


def _untrusted(error: BaseException) -> str | None:
    """What an operator must mend, where `error` is a TLS handshake the service ended: the
    broker's certificate not trusted, or a port that does not speak TLS; else None."""
    cause: BaseException | None = error
    seen: set[int] = set()  # aiormq chains a reset during the handshake to itself
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                "the broker's certificate is not one the service trusts: it must chain to a"
                " CA of the URL's cacertfile (the system's without one), name the URL's"
                " host, and be valid now"
            )
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
            return "the port does not answer in TLS: a port without TLS takes an amqp:// URL"
        cause = cause.__cause__ or cause.__context__
    return None


def is_broker_error(error: BaseException) -> bool:
    """Whether `error` is the broker's or the connection's doing."""
    return isinstance(error, BROKER_ERRORS) or _left_pending_at_a_close(error)


def failed_by_a_lost_connection(error: BaseException) -> bool:
    """A CancelledError that nobody cancelling the current task raised: aiormq fails what
    is pending with the error that ended its connection's reader, which is a
    CancelledError when the broker missed its heartbeats (the reader was cancelled)."""
    task = asyncio.current_task()
    return isinstance(error, asyncio.CancelledError) and task is not None and not task.cancelling()


class SharedAttempt(Generic[T]):
    """One run of `attempt` at a time, which every caller meanwhile awaits and no caller's
    deadline or cancellation cancels. The run failed by a lost connection (aiormq's
    CancelledError, `failed_by_a_lost_connection`), or cancelled under its callers, is
    `lost(error)` for them."""

    def __init__(
        self,
        attempt: Callable[[], Coroutine[Any, Any, T]],
        lost: Callable[[BaseException], Unavailable],
    ) -> None:
        self._attempt = attempt
        self._lost = lost
        self._task: asyncio.Task[T] | None = None

    async def __call__(self) -> T:
        if self._task is None or self._task.done():
            # In a context of its own: run in the caller's, a connection opened for a
            # gRPC call or a delivery, its tasks and callbacks, logged that call's ids
            # (message, correlation) on the lines of outages long after it ended.
            self._task = asyncio.get_running_loop().create_task(
                self._attempt(), context=contextvars.Context()
            )
            self._task.add_done_callback(_retrieved)
        try:
            return await asyncio.shield(self._task)
        except asyncio.CancelledError as error:
            if not failed_by_a_lost_connection(error):
                raise  # the caller is cancelled
            raise self._lost(error) from error

    def cancel(self) -> asyncio.Task[T] | None:
        """Cancel the run under way; the task to wait for, if there was one."""
        if self._task is None or self._task.done():
            return None
        self._task.cancel()
        return self._task


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A shared attempt's failure is its callers' to raise; one left without callers is
    not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


@contextlib.contextmanager
def broker_errors_ignored() -> Iterator[None]:
    """Let a broker error inside the block go (closing, cancelling: nothing left to do)."""
    try:
        yield
    except Exception as error:
        if not is_broker_error(error):
            raise


def describe(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):  # `failed_by_a_lost_connection`
        return "the connection was lost (the broker missed its heartbeats)"
    if _left_pending_at_a_close(error):
        return "the channel or its connection closed"
    return said_of(error)


def describe_url(url: str) -> str:
    """The broker URL without credentials: safe to log. Settings check the URLs they
    give (`config.parse_amqp_urls`); one that cannot be read is not shown at all."""
    try:
        parts = split_url(url, "broker URL")
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a broker URL that cannot be read)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path or '/'}"


UNVERIFIED = (
    "the broker's certificate is not verified (verify=verify_none or no_verify_ssl=1):"
    " whoever stands between the service and the broker can read and change what they say"
)


def unverified(urls: Sequence[str]) -> list[str]:
    """The amqps:// URLs of `urls` whose broker's certificate is not verified."""
    return [url for url in urls if (tls := broker_tls(url)) is not None and not tls.verify]


PASSED_OVER = "connected past brokers of AMQP_ADDRESS that did not take the connection"
CLOSED_AT_ONCE = (
    "the connection was closed before the broker said anything (a proxy or load balancer"
    " with no broker behind it, a broker starting or stopping)"
)
VHOST_REFUSED = (
    "the broker would not open the URL's virtual host (530 NOT_ALLOWED): it does not exist,"
    " the user has no permission on it, or a connection limit is reached (rabbitmqctl"
    " list_vhosts, list_permissions, list_vhost_limits)"
)


def _vhost_refused(error: aiormq.exceptions.InvalidFrameError) -> bool:
    """Whether the broker answered the opening of the virtual host by closing the
    connection, which aiormq reports as an unexpected frame, its reason left out. Some
    of the reasons clear by themselves (a connection limit), so it is an outage."""
    text = str(error)
    return "Connection.OpenOk" in text and "Connection.Close " in text


# How RabbitMQ words a PRECONDITION_FAILED for a limit: "queue limit in vhost 'v' (10) is
# reached", "queue limit in cluster (N) is reached".
_LIMIT_REACHED = re.compile(r"limit in (vhost|cluster)\b.* is reached")


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Broker errors raised inside the block, as the application's error types.

    A declaration the broker refuses because the entity exists with other
    arguments (PRECONDITION_FAILED) does not cure itself: it is `Refused`. One it
    refuses with the same code because a limit the operator set is reached (the
    queues of a vhost) is an outage, which ends once the limit is raised: taken for a
    refusal, a dead letter that could not be kept came back at once, hundreds of times
    a second, and every command was answered INTERNAL.

    The CancelledError aiormq fails a call with when the broker missed its heartbeats
    (`failed_by_a_lost_connection`) is an outage too: raised as it is, it ended the loop
    that made the call as if the loop were being cancelled (the health probe's, and with
    it the service).
    """
    try:
        yield
    except asyncio.CancelledError as error:
        if not failed_by_a_lost_connection(error):
            raise
        raise Unavailable(BROKER, describe(error)) from error
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        if _LIMIT_REACHED.search(str(error)):
            raise Unavailable(BROKER, describe(error)) from error
        raise Refused(BROKER, describe(error)) from error
    except Exception as error:
        if not is_broker_error(error):
            raise
        raise Unavailable(BROKER, describe(error)) from error


class _SilentOnceClosed:
    """The lock of an aiormq channel, which each publish and each request takes before it
    writes its frames, refusing its caller once the broker has closed the channel.

    Once the broker closes a channel (a publish it refuses: `events` without the write
    permission, an exchange gone), a client may send nothing more on it but its
    `Channel.CloseOk`; a frame that comes after is an error of the whole connection
    (CHANNEL_ERROR "expected 'channel.open'"), which closes it with every consumer's
    channel. aiormq 7.2 answers the close at once but marks the channel closed only
    later, and a publish waiting for the lock meanwhile (those of a batch put in flight
    together, a command's beside the relayer's) wrote its frames after the answer: the
    connection closed 9 times in 45 s while the relayer's publishes were refused, every
    consumer of the process with it. aiormq's requests look at the close before they
    write; its publishes do not: this lock looks for them (ChannelInvalidStateError, a
    broker error the caller retries on a new channel)."""

    def __init__(self, closed: asyncio.Event) -> None:
        self._lock = asyncio.Lock()
        self._closed = closed

    @classmethod
    def guard(cls, channel: aiormq.abc.AbstractChannel) -> None:
        """Give `channel`, newly opened and unused, this lock for aiormq's own."""
        # aiormq's private names, pinned with its version: a test writes on a channel the
        # broker closed, and fails if they change.
        closed = channel._Channel__close_event  # type: ignore[attr-defined]
        channel._Channel__lock = cls(closed)  # type: ignore[attr-defined]

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        if self._closed.is_set():
            self._lock.release()
            raise aiormq.exceptions.ChannelInvalidStateError("the broker closed the channel")

    async def __aexit__(self, *_: object) -> None:
        self._lock.release()


class LeavingNothingBehind(aio_pika.Channel):
    """aio-pika's channel, which leaves nothing on its connection once closed.

    aio-pika 10.2 has each channel watch its connection's close through
    `closing`, which aiormq 7.2 makes anew at each look: an observer, whose
    callback on the connection stays until the observer is cancelled. aio-pika
    never cancels it (it removes its callback from another, new observer), so
    each channel opened and closed left its callbacks on the connection (about
    4 kB) for as long as the connection lived: a queue the broker refused, looked
    at again every 10 s on a new channel, cost 1.5 MB an hour. This is aio-pika's
    own opening with the observer kept, and cancelled once the channel closes; and
    with the channel silent once the broker closed it (`_SilentOnceClosed`)."""

    async def _open(self) -> None:
        transport = self._connection.transport
        if transport is None:
            raise aio_pika.exceptions.ChannelInvalidStateError("No active transport in channel")
        await transport.ready()
        connection = transport.connection
        on_close = OneShotCallback(self._on_close)
        await connection.ready()
        watching = connection.closing  # the connection's close, for this channel alone
        watching.add_done_callback(on_close)
        try:
            channel = await connection.channel(
                publisher_confirms=self.publisher_confirms,
                on_return_raises=self.on_return_raises,
                channel_number=self._channel_number,
            )
        except BaseException:
            watching.cancel()
            raise
        _SilentOnceClosed.guard(channel)
        closed = channel.closing
        closed.add_done_callback(on_close)  # first: the channel's own close says why
        closed.add_done_callback(lambda _: watching.cancel())
        self._channel = underlay = UnderlayChannel(channel=channel, close_callback=on_close)
        try:
            await self._on_open()
        except BaseException as error:
            await underlay.close(error)
            self._channel = None
            raise
        if self._closed.done():
            self._closed = asyncio.get_running_loop().create_future()


class ClosedIfNotOpened(aio_pika.Connection):
    """A connection that closes itself when it fails to open. aio-pika leaves that to
    the connection's finaliser, which schedules the close on the loop whenever the
    collector comes by (every refused attempt of an outage), and on a loop that has
    stopped only warns that the close was never awaited. Its channels leave nothing
    behind on it (`LeavingNothingBehind`)."""

    CHANNEL_CLASS = LeavingNothingBehind

    async def connect(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aio-pika's signature
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise


class Broker:
    """One connection to the first broker of `urls` that answers, reopened on demand."""

    def __init__(
        self,
        urls: Sequence[str],
        outages: Outages,
        *,
        queue_type: str = "classic",
        announced: bool = True,
        name: str = "financing",
        gauged: bool = True,
    ) -> None:
        """`name`: the connection's, as the broker's management shows it; `gauged`:
        whether `financing_broker_connected` says whether it is open (the process's main
        connection; the relayer's, opened by its first publish, left it at 0)."""
        if not urls:
            raise ValueError("at least one broker URL is needed")
        self._urls = tuple(urls)
        self._name = name
        # The type of the queues declared on this broker (FINANCING_QUEUE_TYPE).
        self.queue_type = queue_type
        self._outages = outages
        self._connection: AbstractConnection | None = None
        self._opening = SharedAttempt(self._open_once, self._cut_short)
        self._accepted_once = False
        # Whether the first connection is logged at INFO (the service's); an operator's
        # command says what it did on its own output.
        self._announced = announced
        self._closing = False
        # Until when no new connection is tried, and why (the last attempt failed, or the
        # last connection was lost too soon).
        self._held_off: tuple[float, Unavailable] | None = None
        self._opened_at = 0.0  # when the connection of the moment opened (monotonic)
        self._unsettled = 0  # connections lost too soon, in a row (SETTLED_AFTER)
        self._lost: set[asyncio.Task[None]] = set()  # the closes of connections that ended
        self._let_go: set[AbstractConnection] = set()  # closed by `let_go`, no outage
        self._gauge = metrics.BROKER_CONNECTED if gauged else None
        if self._gauge is not None:
            self._gauge.set(0)
        # What looks at each connection opened after the first, before it is used.
        self._looks: list[Callable[[AbstractConnection], Awaitable[None]]] = []
        for url in unverified(self._urls) if announced else ():
            log.warning(UNVERIFIED, broker=describe_url(url))

    @property
    def connected(self) -> bool:
        return self._connection is not None and _open(self._connection)

    @property
    def current(self) -> AbstractConnection | None:
        """The connection open now, if one is: another once it was lost and opened again."""
        return self._connection if self.connected else None

    async def connection(self) -> AbstractConnection:
        """The open connection, or a new one; Unavailable when no broker answers.

        Before the broker ever accepted the service, refused credentials are
        `Refused` (a misconfiguration); afterwards they are an outage, as when
        an operator changes permissions.

        One attempt at a time, shared by every caller, which a caller's own deadline does
        not cancel: trying the URLs in turn takes up to CONNECT_TIMEOUT for each broker
        that does not answer, longer than a publish waits, and an attempt each caller
        cancelled at its deadline never reached the second URL (a process without
        consumers stayed disconnected while its first broker was unreachable).
        """
        if self._connection is not None and _open(self._connection):
            return self._connection
        return await self._opening()

    def on_reopened(self, look: Callable[[AbstractConnection], Awaitable[None]]) -> None:
        """`look` is run on each connection opened after the first one (the broker's
        connection lost, then opened again), before any caller has it: nothing is
        declared on it before the look ends. A failing look fails the attempt, whose
        connection is closed (the next attempt looks again)."""
        self._looks.append(look)

    async def _looked_at(self, connection: AbstractConnection) -> None:
        try:
            with translated():
                for look in self._looks:
                    await look(connection)
        except BaseException:
            await _closed_quietly(connection)
            raise

    def _cut_short(self, error: BaseException) -> Unavailable:
        why = "the connection is closing" if self._closing else describe(error)
        return Unavailable(BROKER, why)

    async def _open_once(self) -> AbstractConnection:
        if self._connection is not None and _open(self._connection):
            return self._connection
        if self._closing:
            raise Unavailable(BROKER, "the connection is closing")
        if self._held_off is not None and time.monotonic() < self._held_off[0]:
            held_off = self._held_off[1]  # of its kind: one awaiting an operator still does
            raise type(held_off)(BROKER, held_off.detail)
        try:
            connection = await self._connect()
            if self._accepted_once:
                await self._looked_at(connection)
        except Unavailable as error:
            self._held_off = (time.monotonic() + RECONNECT_INTERVAL, error)
            raise
        self._held_off = None
        connection.close_callbacks.add(self._on_close)
        self._connection = connection
        self._opened_at = time.monotonic()
        if self._gauge is not None:
            self._gauge.set(1)
        self._accepted_once = True
        self._outages.succeeded(BROKER)
        return connection

    async def _connect(self) -> AbstractConnection:
        failures: list[str] = []
        # The brokers that refused the service: for their TLS (a certificate the service
        # does not trust, a port without TLS), for the URL's TLS files (changed since
        # start-up), for its credentials or for its virtual host (a password changed, a
        # permission or a connection limit set) since they first took it. An outage
        # begun as a connection was lost was said for that alone (CONNECTION_FORCED),
        # and the refusals after it never.
        refused = 0
        for url in self._urls:
            try:
                connection = await aio_pika.connect(
                    _client_url(url, self._name),
                    timeout=CONNECT_TIMEOUT,
                    connection_class=ClosedIfNotOpened,
                    ssl_context=await _tls_context(url),
                )
            except UnusableFiles as error:  # the URL's files changed since start-up
                refused += 1
                failures.append(f"{describe_url(url)}: AMQP_ADDRESS {error}")
            except aiormq.exceptions.ProbableAuthenticationError as error:
                if not self._accepted_once:
                    raise Refused(BROKER, f"{describe_url(url)}: {describe(error)}") from error
                refused += 1
                failures.append(f"{describe_url(url)}: {describe(error)}")
            except aiormq.exceptions.InvalidFrameError as error:
                vhost_refused = _vhost_refused(error)
                refused += vhost_refused and self._accepted_once
                why = VHOST_REFUSED if vhost_refused else describe(error)
                failures.append(f"{describe_url(url)}: {why}")
            except StopAsyncIteration:  # aiormq's reader found the stream over at once
                failures.append(f"{describe_url(url)}: {CLOSED_AT_ONCE}")
            except BROKER_ERRORS as error:
                untrusted = _untrusted(error)
                why = describe(error) if untrusted is None else f"{describe(error)}: {untrusted}"
                if untrusted is not None:
                    if not self._accepted_once:
                        raise Refused(BROKER, f"{describe_url(url)}: {why}") from error
                    refused += 1
                failures.append(f"{describe_url(url)}: {why}")
            else:
                # Said once; a reconnection is logged by the outage it ends.
                (log.info if self._announced and not self._accepted_once else log.debug)(
                    "connected to broker", broker=describe_url(url)
                )
                if failures and self._announced:
                    # A broker of AMQP_ADDRESS that is broken would go unseen while the
                    # next one answers, until the next one fails too.
                    log.warning(PASSED_OVER, broker=describe_url(url), why="; ".join(failures))
                return connection
        if refused == len(self._urls):
            # Said once, where the outage began otherwise (a node restarted with a
            # certificate the service does not trust was said only to have restarted).
            raise AwaitingOperator(BROKER, "; ".join(failures))
        raise Unavailable(BROKER, "; ".join(failures))

    async def let_go(self) -> None:
        """Close the connection of the moment, which the process does not need for a while
        (a relayer standing by), as no outage: the next caller opens another. Kept, a
        standby's held a broker's connection limit: a vhost's `max-connections` set to
        what the service holds left the newly elected relayer none, and nothing was
        relayed until the limit was raised."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._gauge is not None:
            self._gauge.set(0)
        self._let_go.add(connection)
        with broker_errors_ignored():
            await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)

    def _on_close(self, connection: Any, error: BaseException | None = None) -> None:
        if connection in self._let_go:
            self._let_go.discard(connection)
            return
        why = describe(error) if error else "connection closed"
        if connection is self._connection:
            self._connection = None  # the next caller opens a new one
            if self._gauge is not None:
                self._gauge.set(0)
            self._hold_off_if_refused(why, refused=isinstance(error, _REFUSALS))
        if not connection.close_called:
            # The broker or the network ended it: aio-pika leaves its close to the
            # finaliser, which outside a running loop only warns that the close was never
            # awaited. Closed here, once this callback is over (the close waits for it).
            closing = asyncio.ensure_future(_closed_quietly(connection))
            self._lost.add(closing)
            closing.add_done_callback(self._lost.discard)
        if self._closing:
            return
        self._outages.failed(Unavailable(BROKER, why), connection_lost=True)

    def _hold_off_if_refused(self, why: str, *, refused: bool) -> None:
        """The connection of the moment is lost: the next one waits if the broker refused
        it soon after it opened (SETTLED_AFTER), for longer the more such connections
        came in a row."""
        now = time.monotonic()
        if not refused or now - self._opened_at >= SETTLED_AFTER:
            self._unsettled = 0
            return
        self._unsettled += 1
        wait = min(RECONNECT_INTERVAL * 2 ** min(self._unsettled - 1, 16), MAX_RECONNECT_WAIT)
        self._held_off = (now + wait, Unavailable(BROKER, why))

    async def channel(
        self, *, publisher_confirms: bool = False, prefetch: int | None = None
    ) -> AbstractChannel:
        """A new channel on the connection (reopened first if it was lost)."""
        connection = await self.connection()
        try:
            with translated():
                channel = await connection.channel(
                    publisher_confirms=publisher_confirms, on_return_raises=publisher_confirms
                )
        except RuntimeError as error:  # aiormq's word for a connection that has just closed
            if _open(connection):
                raise
            raise Unavailable(BROKER, describe(error)) from error
        if prefetch is not None:
            try:
                with translated():
                    await channel.set_qos(prefetch_count=prefetch)
            except BaseException:
                await close_channel(channel)
                raise
        return channel

    async def close(self) -> None:
        self._closing = True
        opening = self._opening.cancel()  # an attempt under way closes what it opened
        if opening is not None:
            await asyncio.wait([opening], timeout=CLOSE_TIMEOUT)
        connection, self._connection = self._connection, None
        if connection is not None:
            with broker_errors_ignored():
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)
        if self._lost:
            await asyncio.wait(self._lost, timeout=CLOSE_TIMEOUT)


async def _closed_quietly(connection: AbstractConnection) -> None:
    with broker_errors_ignored():
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)


def _open(connection: AbstractConnection) -> bool:
    """Whether the connection can still carry channels (aio-pika may not know it is lost)."""
    transport = getattr(connection, "transport", None)  # aio-pika's UnderlayConnection
    if connection.is_closed or transport is None:
        return False
    return not transport.connection.is_closed


@contextlib.asynccontextmanager
async def connected(
    urls: Sequence[str], command: str, queue_type: str = "classic"
) -> AsyncIterator[Broker]:
    """A broker connection for one command-line task, closed afterwards; named after its
    `command` (`financing status`), as its database sessions are, so that the broker's
    list of connections tells it from the service's (`financing`)."""
    broker = Broker(
        urls, Outages(), queue_type=queue_type, announced=False, name=f"financing {command}"
    )
    try:
        await broker.connection()
        yield broker
    finally:
        await broker.close()


# Closes of channels that took longer than CLOSE_TIMEOUT, kept until they end.
_CLOSING: set[asyncio.Future[None]] = set()


async def close_channel(channel: AbstractChannel) -> None:
    """Close a channel, also while disconnected; unacked messages go back to their queue.

    Waited for CLOSE_TIMEOUT at most; a close that takes longer goes on by itself. Cut
    there, under a loaded process (calls retried by thousands of clients), its
    Channel.Close was never written: the broker kept the channel open, with its consumer
    and the deliveries it held, and that consumer stayed the projector's queue's active
    one while the process consumed on a new channel: the read models stood still until
    the broker's consumer timeout (30 min)."""
    closing = asyncio.ensure_future(_closed(channel))
    try:
        await asyncio.wait_for(asyncio.shield(closing), CLOSE_TIMEOUT)
    except TimeoutError:
        _CLOSING.add(closing)
        closing.add_done_callback(_CLOSING.discard)


async def _closed(channel: AbstractChannel) -> None:
    with broker_errors_ignored():
        await channel.close()
