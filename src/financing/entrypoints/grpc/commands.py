"""The Commands gRPC listener: validate, assign ids, enqueue, answer once confirmed.

OK means the command is durably queued (the broker confirmed it), not that it
was applied: outcomes are learnt from events and read models. Invalid input is
answered INVALID_ARGUMENT naming the field and nothing is enqueued; when the
broker cannot take the command within the enqueue budget, the answer is
UNAVAILABLE; a bug is logged with its traceback and answered INTERNAL.

Every command starts a correlation: its id travels with the command and with
every message and event the command causes, and the answer carries it in its
`correlation-id` metadata (`financing trace` tells the story from it). A client
that sends a `correlation-id` of its own has it used instead; a call with an
`idempotency-key` gets one derived from the key, so that a retry's answer names
the saga the first call started.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

import betterproto
import structlog
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Status
from grpclib.events import RecvRequest, SendInitialMetadata, SendTrailingMetadata, listen
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline
from grpclib.server import Server

from financing.application.errors import Fault, Refused, Unavailable, Unconfirmed
from financing.application.messages import (
    ApproveFinancing,
    BidOnInvoice,
    Command,
    ReverseFinancing,
    SellInvoice,
)
from financing.application.ports import (
    HANDING,
    MAX_CORRELATION_ID_BYTES,
    Cause,
    CommandSender,
    Handing,
    usable_correlation_id,
)
from financing.application.retry import NO_BUG_RETRIES, GaveUp, Outages, retry
from financing.domain.ids import parse_id
from financing.domain.money import InvalidAmount, positive_amount
from financing.entrypoints.grpc.calls import CallsInFlight, TurnRefused
from financing.entrypoints.grpc.edge import Warnings
from financing.entrypoints.grpc.pushback import do_not_retry, retry_when_less_busy
from financing.generated import (
    ApproveFinancingCommand,
    BidOnInvoiceCommand,
    CommandsBase,
    Money,
    ReverseFinancingCommand,
    SellInvoiceCommand,
    Uuid,
)
from financing.logging import get_logger
from financing.metrics import GRPC_BUSY

log = get_logger(__name__)

# How long a call may keep trying to enqueue before it answers UNAVAILABLE.
ENQUEUE_BUDGET_SECONDS = 5.0
# Commands being queued at once, at most: a call beyond them waits its turn, up to
# BUSY_WAIT, then is answered UNAVAILABLE, nothing queued. Waiting among thousands for
# the broker, calls ran past their budget: a burst of 5,000 on a healthy broker was
# answered half UNAVAILABLE ("broker unavailable") after 5 s, 224 of those queued all the
# same, and 20,000 took 12 s each at the median.
MOST_ENQUEUEING = 256
# Seconds a call waits for its turn among them before it is answered busy. Answered at
# once, clients that retry at once kept the process busy reading their calls (36,000 a
# minute, 9 of them taken), the commands it had taken confirmed too late; waiting, such a
# client sends a call per call waiting per BUSY_WAIT (a connection's calls beyond a few
# are put aside unread meanwhile: `edge.GrpcServer`'s `busy`), and the turns go in the
# order the calls came.
BUSY_WAIT = 2.0
# The line saying calls were answered busy, at most once every so many seconds.
_BUSY = Warnings(10.0, log)
_REFUSED = Warnings(10.0, log)
# Commands the broker took without confirming them within the budget, by queue: a broker
# up and answering otherwise, so no outage is said (one begun so outlasted the broker's
# own outage, its commands in flight as it came back past their budget too); said alone,
# an instance whose other components had nothing to say answered every such call silently.
_UNCONFIRMED = Warnings(10.0, log)

CORRELATION_METADATA = "correlation-id"
# A client's name for one command, kept across its retries: the command's message id (and
# SellInvoice's invoice id) derive from it, so that a retry of a call whose answer was lost
# is a duplicate downstream, dropped, rather than a second command.
IDEMPOTENCY_METADATA = "idempotency-key"
_IDEMPOTENCY_NAMESPACE = uuid5(NAMESPACE_URL, "financing/idempotency-key")

# The correlation of the call being handled (each call runs in a task of its own).
_requested: ContextVar[str | None] = ContextVar("requested_correlation_id", default=None)
_correlation: ContextVar[str | None] = ContextVar("correlation_id", default=None)
_idempotency: ContextVar[object] = ContextVar("idempotency_key", default=None)
# The call's deadline (`grpc-timeout`), if it has one: a command is answered before it
# with what became of it. Cut by grpclib at the deadline, a call was answered
# DEADLINE_EXCEEDED with no message, though its command was often queued (73 of 89 with
# a 1 ms deadline).
_deadline: ContextVar[Deadline | None] = ContextVar("deadline", default=None)
# How long before the call's deadline a command not confirmed yet is answered: grpclib's
# cut, at the deadline, takes the place of an answer not written by then, and the event
# loop may run its timers a few milliseconds late.
DEADLINE_MARGIN = 0.01


def correlate(server: Server) -> None:
    """Take a client's `correlation-id` metadata in, and send each call's back."""

    async def received(event: RecvRequest) -> None:
        value = event.metadata.get(CORRELATION_METADATA)
        if _usable_metadata_id(value):
            _requested.set(str(value))
        keys = event.metadata.getall(IDEMPOTENCY_METADATA, [])
        _idempotency.set(keys[0] if len(keys) == 1 else _GivenTimes(len(keys)) if keys else None)
        _deadline.set(event.deadline)

    async def answering(event: SendInitialMetadata) -> None:
        correlation_id = _correlation.get()
        if correlation_id is not None:
            event.metadata[CORRELATION_METADATA] = correlation_id

    async def failing(event: SendTrailingMetadata) -> None:
        # An error is answered with trailers alone: no initial metadata is sent. A
        # command answered UNAVAILABLE may still have been queued, so its correlation
        # is what the client needs to trace it.
        correlation_id = _correlation.get()
        if correlation_id is not None and event.status is not Status.OK:
            event.metadata[CORRELATION_METADATA] = correlation_id

    listen(server, RecvRequest, received)
    listen(server, SendInitialMetadata, answering)
    listen(server, SendTrailingMetadata, failing)


def _usable_metadata_id(value: object) -> bool:
    """Whether a correlation id or an idempotency key from metadata can be kept: ASCII, as
    gRPC metadata is (other bytes arrive as Latin-1: `edge`), a usable id, and neither
    beginning nor ending with a space, which HTTP lets a proxy trim: `K` and ` K` were
    two keys, a retry through such a proxy applied twice, and a correlation id sent
    back so made strict HTTP/2 clients refuse the answer of a command applied."""
    text = str(value)
    return usable_correlation_id(value) and text.isascii() and text == text.strip(" ")


@dataclass(frozen=True)
class _GivenTimes:
    """An `idempotency-key` sent more than once in one call's metadata."""

    times: int


def idempotency_key() -> str | None:
    """The call's `idempotency-key`, if it sent one; INVALID_ARGUMENT if it cannot be one
    (ignoring it would make a client's retries unsafe without telling it), or if the call
    sent several (which one names the command would be a guess)."""
    value = _idempotency.get()
    if value is None:
        return None
    if isinstance(value, _GivenTimes):
        raise invalid(IDEMPOTENCY_METADATA, f"sent {value.times} times; send one key")
    if not _usable_metadata_id(value):
        raise invalid(
            IDEMPOTENCY_METADATA,
            f"must be printable ASCII of 1 to {MAX_CORRELATION_ID_BYTES} characters, neither"
            " beginning nor ending with a space",
        )
    return str(value)


def _unsure(
    command: Command, what: str, key: str | None, status: Status = Status.UNAVAILABLE
) -> GRPCError:
    """UNAVAILABLE for a command that may have been queued all the same, saying what a
    retry does: a try was written, or may have been, and its confirm never came."""
    if key is not None:
        retry_is = f"a retry with the same {IDEMPOTENCY_METADATA} is not applied twice"
    else:
        retry_is = f"a retry without an {IDEMPOTENCY_METADATA} may apply it twice"
        do_not_retry()  # a client's retry policy would send it again
    return GRPCError(status, f"{command.name()} {what}: it may have been queued ({retry_is})")


def invalid(field: str, problem: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, f"{field}: {problem}")


def parse_uuid(value: Uuid, field: str) -> UUID:
    # A field sent with the wrong wire type decodes to a value of another type.
    if not isinstance(value, Uuid) or not isinstance(value.value, str):
        raise invalid(field, "is malformed")
    if not betterproto.serialized_on_wire(value) or not value.value:
        raise invalid(field, "is required")
    try:
        return parse_id(value.value)
    except ValueError:
        raise invalid(field, f"{value.value[:64]!r} is not a UUID") from None


def parse_money(value: Money, field: str) -> Decimal:
    if not isinstance(value, Money) or not isinstance(value.amount, float):
        raise invalid(field, "is malformed")
    if not betterproto.serialized_on_wire(value):
        raise invalid(field, "is required")
    try:
        return positive_amount(value.amount)
    except InvalidAmount as exc:
        raise invalid(field, f"amount {exc}") from None


class CommandsService(CommandsBase):
    def __init__(
        self,
        sender: CommandSender,
        outages: Outages,
        *,
        new_id: Callable[[], UUID] = uuid4,
        budget: float = ENQUEUE_BUDGET_SECONDS,
        most_enqueueing: int = MOST_ENQUEUEING,
        busy_wait: float = BUSY_WAIT,
    ) -> None:
        self._sender = sender
        self._outages = outages
        self._new_id = new_id
        self._budget = budget
        self._most = most_enqueueing
        self._turns = asyncio.Semaphore(most_enqueueing)  # first come, first served
        self._busy_wait = busy_wait
        self.calls = CallsInFlight()

    async def sell_invoice(self, sell_invoice_command: SellInvoiceCommand) -> Uuid:
        issuer_id = parse_uuid(sell_invoice_command.issuer_id, "issuer_id")
        asking_price = parse_money(sell_invoice_command.asking_price, "asking_price")
        key = idempotency_key()
        invoice_id = (
            self._new_id() if key is None else uuid5(_IDEMPOTENCY_NAMESPACE, f"invoice:{key}")
        )
        await self._enqueue(SellInvoice(invoice_id, issuer_id, asking_price))
        return Uuid(value=str(invoice_id))

    async def bid_on_invoice(self, bid_on_invoice_command: BidOnInvoiceCommand) -> Empty:
        investor_id = parse_uuid(bid_on_invoice_command.investor_id, "investor_id")
        invoice_id = parse_uuid(bid_on_invoice_command.invoice_id, "invoice_id")
        bid = parse_money(bid_on_invoice_command.bid, "bid")
        await self._enqueue(BidOnInvoice(investor_id, invoice_id, bid))
        return Empty()

    async def approve_financing(self, approve_financing_command: ApproveFinancingCommand) -> Empty:
        invoice_id = parse_uuid(approve_financing_command.invoice_id, "invoice_id")
        await self._enqueue(ApproveFinancing(invoice_id))
        return Empty()

    async def reverse_financing(self, reverse_financing_command: ReverseFinancingCommand) -> Empty:
        invoice_id = parse_uuid(reverse_financing_command.invoice_id, "invoice_id")
        await self._enqueue(ReverseFinancing(invoice_id))
        return Empty()

    async def _enqueue(self, command: Command) -> None:
        """Send while the broker is unavailable, within the budget; the message id is
        fixed first, so a retry that duplicates an enqueue that did go through is
        deduplicated downstream."""
        key = idempotency_key()
        if key is None:
            message_id, correlation = uuid4(), uuid4()
        else:  # a retry's answer names the saga the first call started
            message_id = uuid5(_IDEMPOTENCY_NAMESPACE, f"{command.name()}:{key}")
            correlation = uuid5(_IDEMPOTENCY_NAMESPACE, f"correlation:{command.name()}:{key}")
        correlation_id = _requested.get() or str(correlation)
        _correlation.set(correlation_id)
        structlog.contextvars.bind_contextvars(
            correlation_id=correlation_id, name=command.name(), message_id=str(message_id)
        )
        cause = Cause(correlation_id=correlation_id, causation_id=correlation_id)
        await self._turn(command)
        # Whether a try may have queued it (written, its confirm lost or cut short): then
        # no later failure may say that nothing was queued.
        unconfirmed = False
        handing = Handing()
        HANDING.set(handing)  # this call's own context: its task's

        async def send() -> None:
            nonlocal unconfirmed
            handing.handed = False
            try:
                await self._sender.send(command, message_id, cause)
            except Unconfirmed:
                unconfirmed = True
                raise
            except (Unavailable, Refused):  # the sender's judgment: nothing of it queued
                raise
            except BaseException:  # the budget ran out during this try, or a bug
                unconfirmed = unconfirmed or handing.handed
                raise

        budget, within, status = self._budget, f"within {self._budget:g} s", Status.UNAVAILABLE
        deadline = _deadline.get()
        left = math.inf if deadline is None else deadline.time_remaining() - DEADLINE_MARGIN
        if left < budget:
            budget = max(0.0, left)
            within, status = "before the call's deadline", Status.DEADLINE_EXCEEDED
        try:
            if budget <= 0:
                # No time left to have it confirmed: not tried, so not queued (tried with
                # a budget of nothing, 45 of 118 such calls with a 5 ms deadline were
                # queued, their answers the client's own, saying nothing).
                raise TimeoutError
            async with asyncio.timeout(budget):
                await retry(
                    send,
                    policy=NO_BUG_RETRIES,
                    outages=self._outages,
                    what=f"enqueueing {command.name()}",
                    deadline=time.monotonic() + budget,
                )
        except TimeoutError:
            log.debug("command not confirmed in time", name=command.name(), handed=unconfirmed)
            if unconfirmed:
                if status is Status.UNAVAILABLE:  # the broker slow, not the caller hasty
                    _UNCONFIRMED.warn(
                        "commands answered UNAVAILABLE, maybe queued: the broker did not"
                        " confirm them in time (a broker overloaded or blocked, or a quorum"
                        " queue without a leader, its members down)",
                        kind=command.name(),
                        queue=command.name(),
                        budget_seconds=self._budget,
                    )
                raise _unsure(command, f"not confirmed {within}", key, status) from None
            # No try got as far as the broker's client: waiting for a channel, for the
            # broker to come back, or for this process's turn to send it.
            raise GRPCError(
                status, f"{command.name()} not queued: not sent to the broker {within}"
            ) from None
        except GaveUp as gave_up:
            raise self._gave_up(command, message_id, key, gave_up, unconfirmed) from None
        finally:
            self._turns.release()

    def busy(self) -> bool:
        """Whether a call begun now would wait for its turn (`edge.GrpcServer`'s `busy`)."""
        return self._turns.locked()

    async def _turn(self, command: Command) -> None:
        """A turn among the commands being queued: at once while there is room, else
        once one of them is done, in the order the calls came. UNAVAILABLE, nothing
        queued, when none came within the busy wait, or once the service begins to shut
        down (told at once, a client retries elsewhere, rather than cut at the end of
        the grace or queued as the process stops)."""
        if not self._turns.locked():
            await self._turns.acquire()  # at once
            return
        try:
            await self.calls.waited_turn(
                self._turns.acquire(), within=self._busy_wait, given_late=self._turns.release
            )
        except TurnRefused as refused:
            if refused.shutting_down:
                raise GRPCError(
                    Status.UNAVAILABLE,
                    f"{command.name()} not queued: the service is shutting down",
                ) from None
            _BUSY.warn("commands answered UNAVAILABLE, not queued: the service is busy")
            GRPC_BUSY.labels("Commands", command.name()).inc()
            retry_when_less_busy(self._busy_wait, self.calls.waiting, self._most)
            raise GRPCError(
                Status.UNAVAILABLE,
                f"{command.name()} not queued: the service was busy queueing {self._most}"
                f" commands for the {self._busy_wait:g} s it waited; try again later",
            ) from None

    def _gave_up(
        self,
        command: Command,
        message_id: UUID,
        key: str | None,
        gave_up: GaveUp,
        unconfirmed: bool,
    ) -> GRPCError:
        """The answer to a call whose tries stopped: whatever stopped the last one, a call
        an earlier try of which may have queued the command is told so."""
        refused = isinstance(gave_up.error, Refused)
        if refused:
            # The broker refuses the command's queue (declared again with other
            # arguments, of another type): the operator's to mend, not a bug.
            _REFUSED.warn(f"commands could not be queued: {gave_up.error}")
        elif gave_up.fault is not Fault.UNAVAILABLE:
            log.error(
                "enqueue failed with a bug",
                name=command.name(),
                message_id=str(message_id),
                exc_info=gave_up.error,
            )
        if unconfirmed:
            log.debug("command not confirmed", name=command.name(), reason=str(gave_up.error))
            if refused:
                return _unsure(command, "not confirmed before the broker refused its queue", key)
            if gave_up.fault is not Fault.UNAVAILABLE:
                return _unsure(command, "not confirmed: internal error", key, Status.INTERNAL)
            return _unsure(command, "not confirmed before the broker became unavailable", key)
        if refused:
            return GRPCError(
                Status.UNAVAILABLE, f"{command.name()} not queued: the broker refuses its queue"
            )
        if gave_up.fault is Fault.UNAVAILABLE:
            return self._unavailable(command, str(gave_up.error))
        return GRPCError(Status.INTERNAL, f"{command.name()} not queued: internal error")

    def _unavailable(self, command: Command, why: str) -> GRPCError:
        log.debug("command not queued", name=command.name(), reason=why)
        return GRPCError(Status.UNAVAILABLE, f"{command.name()} not queued: broker unavailable")
