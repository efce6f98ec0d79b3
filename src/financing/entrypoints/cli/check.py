"""`financing check`: verify the invariants from the event store, then the read models.

The read models are compared row by row, in order, with a fresh in-memory
projection of the same events: what the live projector built must be exactly
what a replay builds. The rows are read first, with the events projected by then
(`PostgresReadModels.view`); an event of the store not projected by then is in
flight, counted and left out of the replay, so that a check under load compares
like with like. The events of another relayer (a reference relayer's),
which are in no event store of this service, are replayed after the store's, in
the order the projector kept them (`foreign_events`); the rows they make or
change are compared by id, as the live projector interleaved their events with
the store's as they came.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

import asyncpg

from financing.adapters.postgres.connection import QUERY_DATABASE, acquired
from financing.adapters.postgres.event_store import PostgresEventStore
from financing.adapters.postgres.projected_store import (
    ProjectsAnotherStore,
    refuse_another,
    store_of,
)
from financing.adapters.postgres.read_models import PostgresReadModels, ProjectedView
from financing.application.invariants import Checker, Report
from financing.application.pipeline import event_digest
from financing.application.ports import StoredEvent
from financing.application.read_models import (
    ForeignEvent,
    InMemoryReadModels,
    InvestorRow,
    InvoiceRow,
    IssuerRow,
    ReadModelStore,
    apply_foreign,
    kept_foreign,
)
from financing.domain.events import DomainEvent


@dataclass
class CheckResult:
    invariants: Report
    read_model_differences: list[str] = field(default_factory=list)
    read_models_compared: bool = False
    unprojected: int = 0  # events of the store not projected when the rows were read
    # Why the read models are of another event store (projected_store), if they are.
    another_store: str | None = None
    # The events of another relayer the read models hold for aggregates of this event
    # store: copies of its events published again without the relayer's headers?
    foreign_on_store: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.invariants.ok
            and not self.read_model_differences
            and not self.unprojected
            and self.another_store is None
            and not self.foreign_on_store
        )

    def lines(self) -> list[str]:
        out = self.invariants.lines()
        if self.another_store is not None:
            out.append(f"read models of another event store: {self.another_store}")
        if self.read_models_compared:
            out.append(f"events not projected yet: {self.unprojected}")
            out.append(f"read-model differences from a replay: {len(self.read_model_differences)}")
            out += [f"  DIFFERENT {line}" for line in self.read_model_differences]
            out.append(
                "events of another relayer on this store's aggregates:"
                f" {len(self.foreign_on_store)}"
            )
            out += [f"  FOREIGN {line}" for line in self.foreign_on_store]
        out.append("OK" if self.ok else "FAILED")
        return out


# Events checked and replayed together: the store is read in batches, never held whole.
BATCH = 1_000
# An event of the store is taken for projected when the rows are read if the read models
# record it among those projected in the last twice RECENT seconds, or if it was recorded
# RECENT seconds before or earlier (records are pruned after the retention; the margin
# covers clocks of the two databases' servers apart). Compared with rows read seconds
# after the store, 10 of 20 checks under load showed the rows the live projection had
# made meanwhile as differences from the replay.
RECENT = 60.0


async def run_check(
    event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool | None = None
) -> CheckResult:
    store = PostgresEventStore(event_store_pool)
    checker = Checker()
    # Every event once (the store's ids are unique, and so are the journal's): no record
    # of their ids, which took 165 MB a million events.
    replay = InMemoryReadModels(remember=False)
    live = None if query_pool is None else PostgresReadModels(query_pool)
    view = None if live is None else await live.view(2 * RECENT)
    # The ids of the events of another relayer the live read models keep: one the store
    # also holds is replayed as the store's, as a rebuild does (the other is a copy).
    journal = await _kept(live) if live is not None else {}
    in_store: set[str] = set()
    # Another relayer's events kept under the ids of the store's, saying otherwise.
    forged: dict[str, tuple[StoredEvent, ForeignEvent]] = {}
    aggregates: set[UUID] = set()  # the store's
    unprojected = 0
    batch: list[tuple[str, DomainEvent]] = []
    async for stored in store.read_all():
        # Each decoded and its id derived once: both are computed at each ask.
        event, message_id = stored.event, stored.message_id
        checker.add(event, stored.recorded_at, message_id=message_id, caused_by=stored.causation_id)
        aggregates.add(stored.aggregate_id)
        if view is not None and not _projected_by(view, stored):
            unprojected += 1
            continue
        batch.append((message_id, event))
        if (kept := journal.get(message_id)) is not None:
            in_store.add(message_id)
            if kept.digest != event_digest(event):
                forged[message_id] = (stored, kept)
        if len(batch) == BATCH:
            await replay.apply(batch)
            batch = []
    await replay.apply(batch)
    result = CheckResult(invariants=checker.report(), unprojected=unprojected)
    if query_pool is not None:
        result.another_store = await _another_store(event_store_pool, query_pool)
    if live is not None and view is not None:
        stores = await _rows(replay)  # the rows the event store makes
        touched = await _replay_foreign(
            live, replay, skip=in_store, store=aggregates, on_store=result.foreign_on_store
        )
        result.read_models_compared = True
        viewed = (view.investors, view.invoices, view.issuers)
        result.read_model_differences = compare(viewed, await _rows(replay), stores, touched)
        result.read_model_differences += compare_unlisted(
            view.unlisted, await replay.unlisted_invoices()
        )
        result.foreign_on_store[:0] = _applied_in_place(forged, result.read_model_differences)
    return result


async def _another_store(event_store_pool: asyncpg.Pool, query_pool: asyncpg.Pool) -> str | None:
    """Why the read models are those of another event store, if they are."""
    store = await store_of(event_store_pool)
    async with acquired(query_pool, QUERY_DATABASE) as conn:
        try:
            await refuse_another(conn, store)
        except ProjectsAnotherStore as another:
            return another.detail
    return None


def _projected_by(view: ProjectedView, stored: StoredEvent) -> bool:
    """Whether `stored` was projected when `view` was read (RECENT)."""
    if stored.message_id in view.projected or stored.recorded_at is None:
        return True
    return stored.recorded_at < view.at - timedelta(seconds=RECENT)


async def _kept(live: ReadModelStore) -> dict[str, ForeignEvent]:
    """The events of another relayer the live read models keep, by message id."""
    return {kept.message_id: kept async for batch in kept_foreign(live, BATCH) for kept in batch}


def _applied_in_place(
    forged: dict[str, tuple[StoredEvent, ForeignEvent]], differences: list[str]
) -> list[str]:
    """Of the events of another relayer kept under the ids of the store's events and
    saying otherwise, those whose aggregate's rows differ from a replay: applied in place
    of the store's, which was taken for a copy. Once a rebuild applied the store's, the
    rows agree and it is no longer said, whatever the records of then."""
    differing = " ".join(differences)
    return [
        f"{kept.event.name()} {message_id} (kept at {kept.position}) is under the message id"
        f" of this store's {stored.name} at version {stored.version} of aggregate"
        f" {stored.aggregate_id}, and says otherwise: published under the id the store"
        " derives for a version before the store recorded it, it was applied, and the"
        " store's event taken for its copy; `financing projections rebuild` applies the"
        " store's"
        for message_id, (stored, kept) in forged.items()
        if str(stored.aggregate_id) in differing
    ]


async def _replay_foreign(
    live: ReadModelStore,
    replay: ReadModelStore,
    skip: set[str],
    store: AbstractSet[UUID],
    on_store: list[str],
) -> set[UUID]:
    """Apply the events of another relayer `live` keeps to `replay`, in the order kept,
    but those in `skip`; the ids of the rows they may make or change. Each for an
    aggregate of `store` (the event store's) is said in `on_store`: another relayer's
    events are of aggregates of another store, and such an event is likely a copy of
    one of this store's published again without the relayer's headers, under a new
    message id, which the projector applied a second time (the policies refuse it)."""
    touched: set[UUID] = set()
    async for batch in kept_foreign(live, BATCH):
        fresh = [kept for kept in batch if kept.message_id not in skip]
        await apply_foreign(replay, fresh)
        for kept in fresh:
            touched |= _named(kept.event)
            if kept.event.aggregate_id in store:
                on_store.append(
                    f"{kept.event.name()} {kept.message_id} (kept at {kept.position}) is of"
                    f" aggregate {kept.event.aggregate_id}, a stream of this event store: a"
                    " copy of its event published again without this service's relayer"
                    " headers? The read models applied it"
                )
    return touched


def _named(value: object) -> set[UUID]:
    """The ids an event names (its aggregate's, a bid's investor, an invoice's issuer):
    the rows it may make or change."""
    found = {value.aggregate_id} if isinstance(value, DomainEvent) else set()
    for each in dataclasses.fields(value):  # type: ignore[arg-type]
        part = getattr(value, each.name)
        if isinstance(part, UUID):
            found.add(part)
        elif dataclasses.is_dataclass(part):
            found |= _named(part)
    return found


Row = InvestorRow | InvoiceRow | IssuerRow
Rows = tuple[Sequence[Row], Sequence[Row], Sequence[Row]]
TABLES = ("investors", "invoices", "issuers")


async def _rows(models: ReadModelStore) -> Rows:
    return await models.investors(), await models.invoices(), await models.issuers()


def compare(live: Rows, replay: Rows, stores: Rows, touched: AbstractSet[UUID]) -> list[str]:
    """Row-by-row differences between the live read models and a replay, each row named by
    its id: the rows only the event store's events make (`stores`, less those an event of
    another relayer names, `touched`) in list order too, the others by id alone (the live
    projector interleaved the two kinds of events as they came, a replay runs the store's
    first)."""
    differences: list[str] = []
    others = "another relayer's events make or change" if touched else "no event of the store makes"
    for name, got, want, own in zip(TABLES, live, replay, stores, strict=True):
        ours = {row.id for row in own} - touched
        differences += _rows_apart(name, _of(got, ours), _of(want, ours), in_order=True)
        differences += _rows_apart(f"{name} {others}", _but(got, ours), _but(want, ours))
    return differences


def _rows_apart(
    part: str, mine: Sequence[Row], wanted: Sequence[Row], *, in_order: bool = False
) -> list[str]:
    """The rows only one side holds and those that differ, by id; with `in_order`, where
    both hold the same rows, the first place their lists part. Compared place by place,
    one row missing made every row after it a difference: 1,106 for one invoice, which
    went unnamed."""
    have = {row.id: row for row in mine}
    expected = {row.id: row for row in wanted}
    said = [f"{part}: {row.id} missing, a replay has {row}" for row in wanted if row.id not in have]
    said += [f"{part}: {row.id} not in a replay: {row}" for row in mine if row.id not in expected]
    said += [
        f"{part}: {row} != replay {expected[row.id]}"
        for row in mine
        if row.id in expected and row != expected[row.id]
    ]
    if in_order and not said:
        for index, (row, other) in enumerate(zip(mine, wanted, strict=False)):
            if row.id != other.id:
                said.append(
                    f"{part}: listed in another order than a replay from place {index}:"
                    f" {row.id} where a replay lists {other.id} (projected late: a dead"
                    " letter requeued, a binding restored, a rewind after a queue lost;"
                    " `financing projections rebuild` lists them in the store's order)"
                )
                break
    return said


def compare_unlisted(live: Sequence[UUID], replay: Sequence[UUID]) -> list[str]:
    """The unlisted invoices (rows later events made, their creation not projected) that
    only one of the live read models and a replay holds: no list shows such a row (events
    of another event store make them, say), so `compare` cannot see it."""
    lives, replayed = set(live), set(replay)
    return [
        *(
            f"invoices unlisted: {invoice} (no creation projected), a replay has no such row"
            for invoice in live
            if invoice not in replayed
        ),
        *(
            f"invoices unlisted in a replay: {invoice} (no creation projected), not in the"
            " read models"
            for invoice in replay
            if invoice not in lives
        ),
    ]


def _of(rows: Sequence[Row], ids: AbstractSet[UUID]) -> list[Row]:
    return [row for row in rows if row.id in ids]


def _but(rows: Sequence[Row], ids: AbstractSet[UUID]) -> list[Row]:
    return [row for row in rows if row.id not in ids]
