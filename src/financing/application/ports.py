"""Ports: what the handlers need from the outside world, as protocols.

Adapters implement them on PostgreSQL and RabbitMQ; `application.memory`
implements them in memory for fast tests of the domain and handlers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from hashlib import blake2b, sha1
from typing import Protocol, TypeVar
from uuid import UUID

from financing.application import codec
from financing.application.messages import Command
from financing.domain.aggregates import Aggregate
from financing.domain.events import DomainEvent

A = TypeVar("A", bound=Aggregate)
B = TypeVar("B", bound=Aggregate)

# Namespace of the deterministic message ids this service derives.
MESSAGE_NAMESPACE = UUID("5d1a6c2e-8f0b-4f4e-9a51-6f1f7d0e2b3c")


def event_message_id(aggregate_id: UUID, version: int) -> str:
    """The message id of a stored event: the same event always gets the same id."""
    return _name_based(f"event/{aggregate_id}/{version}")


def derived_message_id(source_message_id: str, command_name: str) -> UUID:
    """The id of a command sent in reaction to a message: a redelivery sends the same id."""
    return UUID(_name_based(f"command/{source_message_id}/{command_name}"))


def _name_based(name: str) -> str:
    """The name-based (version 5) UUID of `name` in MESSAGE_NAMESPACE, as text: what
    `str(uuid.uuid5(MESSAGE_NAMESPACE, name))` gives, at half its cost (the relayer and
    a replay derive one per event)."""
    digest = bytearray(sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50  # version 5
    digest[8] = digest[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_BYTES = MESSAGE_NAMESPACE.bytes


# Message metadata of every message the service publishes (string headers, as
# watermill's CorrelationID middleware names the first).
CORRELATION_HEADER = "correlation_id"
CAUSATION_HEADER = "causation_id"
RECORDED_AT_HEADER = "recorded_at"
# When an operator sent the message back from the dead letters (`dead-letters requeue`):
# a message a rule refused is judged again only then.
REQUEUED_AT_HEADER = "x-requeued-at"
AGGREGATE_VERSION_HEADER = "aggregateVersion"
# The event store an event was relayed from (its name, commands schema 5): the projector
# keeps the read models of one store (`ProjectedStore`).
EVENT_STORE_HEADER = "eventStore"
# A correlation id is stored and indexed with every event and record it causes.
MAX_CORRELATION_ID_BYTES = 255


def usable_correlation_id(value: object) -> bool:
    """Whether a correlation id from outside (a header, gRPC metadata) can be kept as it is:
    text, printable, at most MAX_CORRELATION_ID_BYTES; otherwise a new correlation starts."""
    return (
        isinstance(value, str)
        and value.isprintable()
        and 0 < len(value.encode("utf-8", "surrogatepass")) <= MAX_CORRELATION_ID_BYTES
    )


@dataclass(frozen=True)
class Cause:
    """Why some work happens: the correlation (the saga of one command) it belongs to,
    and the message that caused it."""

    correlation_id: str
    causation_id: str

    @classmethod
    def of(cls, envelope: Envelope) -> Cause:
        """The cause of whatever handling `envelope` produces. A message without a
        correlation id (from a foreign publisher) starts a correlation of its own."""
        return cls(envelope.correlation_id, envelope.message_id)

    def headers(self) -> dict[str, str]:
        return {CORRELATION_HEADER: self.correlation_id, CAUSATION_HEADER: self.causation_id}


@dataclass(frozen=True)
class Envelope:
    """A message as it travels: id, name, string headers and the JSON body."""

    message_id: str
    name: str
    body: bytes
    aggregate_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Delivered before and not settled then (its consumer's channel or process ended
    # first): what that delivery did may be half done.
    redelivered: bool = False

    @property
    def requeued(self) -> bool:
        """Whether an operator sent it back from the dead letters."""
        return REQUEUED_AT_HEADER in self.headers

    @property
    def correlation_id(self) -> str:
        """The correlation the message belongs to; its own id when it carries none."""
        value = self.headers.get(CORRELATION_HEADER)
        return value if value is not None and usable_correlation_id(value) else self.message_id


@dataclass(frozen=True)
class StoredEvent:
    """A domain event as recorded in the event store."""

    position: int  # order of recording; the store reads events back in commit order
    aggregate_type: str
    aggregate_id: UUID
    version: int
    name: str
    body: str  # the JSON text as stored; encoded only to be published
    correlation_id: str | None = None
    causation_id: str | None = None
    recorded_at: datetime | None = None
    # The id of the transaction that recorded it: with `position`, its place in commit order.
    transaction_id: int = 0

    @property
    def message_id(self) -> str:
        return event_message_id(self.aggregate_id, self.version)

    @property
    def event(self) -> DomainEvent:
        event = codec.decode(self.name, self.body, self.aggregate_id)
        assert isinstance(event, DomainEvent)
        return event

    def envelope(self, store: str | None = None) -> Envelope:
        """The event as relayed; `store`, the name of the event store relaying it."""
        headers = {
            AGGREGATE_VERSION_HEADER: str(self.version),
            "aggregateType": self.aggregate_type,
        }
        if store is not None:
            headers[EVENT_STORE_HEADER] = store
        if self.correlation_id:
            headers[CORRELATION_HEADER] = self.correlation_id
        if self.causation_id:
            headers[CAUSATION_HEADER] = self.causation_id
        if self.recorded_at is not None:
            headers[RECORDED_AT_HEADER] = self.recorded_at.isoformat()
        return Envelope(
            message_id=self.message_id,
            name=self.name,
            body=self.body.encode(),
            aggregate_id=str(self.aggregate_id),
            headers=headers,
        )


class ProjectedStore(Protocol):
    """The event store whose read models the query database holds."""

    async def require(self, store: str) -> None:
        """Return if the read models are those of event store `store` (recorded as such
        if they were of none yet); AwaitingOperator if they are another's."""
        ...


@dataclass(frozen=True)
class Processed:
    """What became of a processed message, kept with the record that deduplicates it."""

    name: str = ""  # the message's name
    # Or "unchanged": a rule said there was nothing to do; or REFUSED: a rule refused it
    # (it was dead-lettered).
    outcome: str = "processed"
    detail: str = ""  # the rule, for an unchanged or refused outcome
    events: int = 0  # events appended
    # The message's body digested (`body_digest`): a copy of the message has the same, a
    # different message reusing its id does not. Empty where unknown (records of releases
    # that kept none).
    digest: str = ""


PROCESSED = Processed()
REFUSED = "refused"  # Processed.outcome of a message a rule refused


def body_digest(body: bytes) -> str:
    """A message body's digest, as a processed record keeps it."""
    return blake2b(body, digest_size=16).hexdigest()


@dataclass(frozen=True)
class RelayedEvent:
    """A domain event as its consumer received it from this service's relayer: what the
    event store must hold for a unit of work acting on it to take effect."""

    aggregate_id: UUID
    version: int
    name: str
    body: str

    def not_held(self) -> str:
        """Why a unit of work acting on the event did nothing (EventNotInStore)."""
        return (
            f"{self.name} {event_message_id(self.aggregate_id, self.version)} is not an event"
            f" of this service's event store: the store holds no such event at version"
            f" {self.version} of {self.aggregate_id} (another publisher's under the id the"
            " store would derive, or relayed by a store since restored without it); acting"
            " on it would change aggregates for an event that never happened"
        )


class UnitOfWork(Protocol):
    """One atomic change: reads first, then the appends and the processed mark.

    The writes take effect together when the unit of work ends, or not at all;
    implementations perform none of them before then, so that their commit-order
    key is taken after everything the unit of work read. Reads see what was
    committed when each runs.
    """

    async def recorded(self, consumer: str, message_id: str) -> Processed | None:
        """What became of `message_id` when `consumer` processed it (committed); None if
        it has not."""
        ...

    async def load(self, cls: type[A], aggregate_id: UUID) -> A:
        """The aggregate's current state; a new, empty one (version 0) if none."""
        ...

    async def load_both(
        self, first: type[A], first_id: UUID, second: type[B], second_id: UUID
    ) -> tuple[A, B]:
        """Two aggregates' current states, as `load` gives each, read together (a handler
        that checks one exists before it changes the other)."""
        ...

    async def save(self, aggregate: Aggregate) -> None:
        """Append `aggregate.changes`, expecting the stream at `aggregate.stored_version`.

        The unit of work raises ConcurrencyConflict as it ends if another writer
        appended first.
        """
        ...

    async def record(self, consumer: str, message_id: str, what: Processed = PROCESSED) -> None:
        """Mark `message_id` processed by `consumer`, committed with the appends, with
        what became of it."""
        ...

    async def acting_on(self, event: RelayedEvent) -> None:
        """The unit of work acts on `event`: its writes take effect only if the store
        holds that event (the same aggregate, version, name and body), checked as they
        are committed; otherwise none does and the unit of work raises EventNotInStore."""
        ...


class EventStore(Protocol):
    def unit_of_work(self, cause: Cause | None = None) -> AbstractAsyncContextManager[UnitOfWork]:
        """An atomic change: its writes take effect when the block exits normally,
        none of them otherwise.

        The events it appends, and the record of the message it processes, keep
        `cause` (correlation and causation ids).
        """
        ...

    async def stream(
        self, aggregate_id: UUID, *, from_version: int = 1, last: int | None = None
    ) -> list[StoredEvent]:
        """The events of one aggregate from version `from_version` on, in version order;
        the `last` of them only, when given (a stream's end without reading it whole)."""
        ...

    async def forget_refusal(self, consumer: str, message_id: str) -> None:
        """Remove the record of `consumer` refusing `message_id` (REFUSED), if there is
        one, so that the message is judged again."""
        ...

    def read_all(
        self, batch_size: int = 500, after: StoredEvent | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Every committed event that the relayer could relay now, in commit order (the
        order of relaying): a transaction still running holds back the later ones. With
        `after` (an event it gave before), the events that follow it."""
        ...


class CommandSender(Protocol):
    async def send(self, command: Command, message_id: UUID, cause: Cause) -> None:
        """Enqueue `command`, carrying `cause`; returns once the broker holds it durably.

        Raises Unconfirmed where the command may be held all the same; a send cut short
        tells whether it got so far through the caller's `Handing` (HANDING)."""
        ...


class Handing:
    """Whether a send its caller awaits was handed to the broker's client: from then on,
    cut short (the caller's deadline) it may have been queued; before, it was not. Set
    by the caller in its context (HANDING) around its send; marked by the sender."""

    def __init__(self) -> None:
        self.handed = False


HANDING: ContextVar[Handing | None] = ContextVar("handing", default=None)


def handed() -> None:
    """Mark the caller's `Handing`, if it keeps one: what is sent now may be written."""
    handing = HANDING.get()
    if handing is not None:
        handing.handed = True


class EventPublisher(Protocol):
    async def publish_events(self, envelopes: Sequence[Envelope]) -> None:
        """Publish to every consumer of events, in order; returns once the broker holds all.

        Raises Unavailable (nothing is known to be published) when it cannot.
        """
        ...


@dataclass(frozen=True)
class OtherSession:
    """Another session of a database, as the server shows it to the service's role: a
    role without pg_read_all_stats is not shown the client, state and transaction of
    another role's sessions (None then)."""

    pid: int  # its server process
    user: str
    application: str  # its application_name
    client: str | None  # its client's address, "local" for a socket
    state: str | None  # "idle in transaction": a transaction left open
    open_for: float | None  # seconds since its transaction began; None outside one
    idle_for: float | None = None  # seconds since it last sent a statement, when idle

    @property
    def name(self) -> str:
        return f"session {self.pid}"

    def describe(self) -> str:
        if self.state is None:
            seen = (
                "its client, state and transaction are not shown to this role: grant it"
                " pg_read_all_stats"
            )
        else:
            seen = f"from {self.client}, {self.state}"
            if self.open_for is not None:
                seen += f", its transaction open for {self.open_for:.0f} s"
        return f"{self.name} (user {self.user!r}, application {self.application!r}, {seen})"

    def behind(self) -> str:
        """What events wait behind, when this session holds relaying back."""
        return f"the open transaction of {self.describe()}"


@dataclass(frozen=True)
class PreparedTransaction:
    """A prepared transaction (two-phase commit) of a database: no session holds it, and
    it stays until a COMMIT PREPARED or ROLLBACK PREPARED names it."""

    gid: str  # the name it was prepared under
    owner: str
    prepared_for: float  # seconds since it was prepared

    @property
    def name(self) -> str:
        return f"prepared transaction {self.gid!r}"

    def describe(self) -> str:
        return (
            f"{self.name} (owner {self.owner!r}, prepared {self.prepared_for:.0f} s ago:"
            f" COMMIT PREPARED or ROLLBACK PREPARED {self.gid!r} ends it)"
        )

    def behind(self) -> str:
        """What events wait behind, when this transaction holds relaying back."""
        return f"the {self.describe()}"


# What relaying may wait for: a session's open transaction, or a prepared one.
Holder = OtherSession | PreparedTransaction


class Outbox(Protocol):
    """Committed events not yet relayed, in commit order, without gaps."""

    async def pending(self, limit: int, after: StoredEvent | None = None) -> list[StoredEvent]:
        """Up to `limit` events after the checkpoint, in commit order; after `after`, an
        event it gave before, when given (the relayer reads on from the events it
        relayed before it moves the checkpoint past them)."""
        ...

    async def lag(self) -> tuple[int, float]:
        """How many events are not relayed yet, and how old the oldest of them is (seconds)."""
        ...

    async def held_back_by(self, waited: float) -> Holder | None:
        """The transaction an event not relayed yet has waited `waited` seconds for, if
        one has (a relayer merely behind waits for none)."""
        ...

    async def mark_relayed(self, events: Sequence[StoredEvent]) -> None:
        """Move the checkpoint past `events`, which must be the next ones `pending` gave.

        Raises ValueError rather than move past an event that is not among them.
        """
        ...

    async def missing(self, events: Sequence[StoredEvent]) -> list[StoredEvent]:
        """Those of `events`, which it gave before, that it no longer holds as it gave
        them (the same position, transaction and time of recording)."""
        ...


class RelayerLock(Protocol):
    """Elects the one relayer among every instance sharing an event store."""

    async def acquire(self, answered: Callable[[str], None] = lambda _: None) -> None:
        """Return once this instance holds the lock; Unavailable if the store is unreachable.
        `answered(dependency)` each time the store answers while another instance holds
        it: a standby's wait is an operation that works, not one still failing."""
        ...

    async def lost(self) -> None:
        """Return once the lock is no longer held (connection lost or released)."""
        ...

    async def release(self) -> None:
        """Give the lock up; safe to call when it is not held."""
        ...


class WakeUp(Protocol):
    """A signal that events were committed, so the relayer need not wait for its next poll."""

    def clear(self) -> None: ...

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a poll interval, not a deadline
        """Return when woken (True), or after `timeout` seconds (False)."""
        ...
