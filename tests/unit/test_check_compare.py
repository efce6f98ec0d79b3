"""`financing check` compares the live read models with a replay: the rows only the event
store's events make in their order, the rows another relayer's events make or change by
id (the live projector took the two kinds of events as they came; a replay runs the
store's first)."""

from __future__ import annotations

from uuid import UUID, uuid4

from financing.application.read_models import InMemoryReadModels
from financing.domain import events as ev
from financing.entrypoints.cli.check import _rows, compare, compare_unlisted


async def issuers(*ids: UUID) -> InMemoryReadModels:
    models = InMemoryReadModels()
    await models.apply([(str(uuid4()), ev.IssuerCreatedEvent(issuer)) for issuer in ids])
    return models


async def test_a_row_missing_beside_one_too_many_of_another_kind_is_a_difference() -> None:
    """Regression (review): only the total of each table was counted, and each kind of
    row compared as far as the shorter went: live read models missing a row of the store
    and holding one of another relayer that no replay gives were reported the same."""
    ours, missing, stray = uuid4(), uuid4(), uuid4()
    replay = await issuers(ours, missing)
    live = await issuers(ours, stray)
    stores = await _rows(replay)

    differences = compare(await _rows(live), stores, stores, touched=set())

    # Regression (a probe): with no event of another relayer, the stray row was said to
    # be one "another relayer's events make or change".
    assert differences == [
        f"issuers: {missing} missing, a replay has IssuerRow(id=UUID('{missing}'))",
        f"issuers no event of the store makes: {stray} not in a replay:"
        f" IssuerRow(id=UUID('{stray}'))",
    ]


async def test_one_row_missing_is_one_difference_naming_it_wherever_it_was_listed() -> None:
    """Regression (a probe): rows were compared place by place, so one invoice row
    deleted from the read models made every row listed after it a difference (1,106),
    and the one missing went unnamed."""
    ids = [uuid4() for _ in range(20)]
    replay = await issuers(*ids)
    live = await issuers(*ids[:3], *ids[4:])
    stores = await _rows(replay)

    differences = compare(await _rows(live), stores, stores, touched=set())

    assert differences == [
        f"issuers: {ids[3]} missing, a replay has IssuerRow(id=UUID('{ids[3]}'))"
    ]


async def test_the_same_rows_listed_in_another_order_are_one_difference() -> None:
    first, second, third = uuid4(), uuid4(), uuid4()
    replay = await issuers(first, second, third)
    live = await issuers(first, third, second)
    stores = await _rows(replay)

    differences = compare(await _rows(live), stores, stores, touched=set())

    assert differences == [
        f"issuers: listed in another order than a replay from place 1: {third} where a"
        f" replay lists {second} (projected late: a dead letter requeued, a binding"
        " restored, a rewind after a queue lost; `financing projections rebuild` lists"
        " them in the store's order)"
    ]


async def test_a_row_of_the_store_another_relayers_event_made_first_is_compared_by_id() -> None:
    """The live projector made a row of the store's aggregate when another relayer's event
    about it came before the store's own: its place in the list differs from a replay's,
    its content does not."""
    first, early = uuid4(), uuid4()
    live = await issuers(early, first)
    replay = await issuers(first, early)
    stores = await _rows(replay)

    live_rows = await _rows(live)
    assert compare(live_rows, stores, stores, touched={early}) == []
    assert compare(live_rows, stores, stores, touched=set()) != []


def test_an_unlisted_invoice_held_by_one_side_only_is_a_difference() -> None:
    both, live_only, replay_only = uuid4(), uuid4(), uuid4()

    differences = compare_unlisted([both, live_only], [replay_only, both])

    assert differences == [
        f"invoices unlisted: {live_only} (no creation projected), a replay has no such row",
        f"invoices unlisted in a replay: {replay_only} (no creation projected), not in the"
        " read models",
    ]
    assert compare_unlisted([both], [both]) == []
