"""How the projector takes what arrives on `events`: once per message id, exact money, and
poison messages set aside without stopping the events behind them.

The projector consumes its queue in order, so once an event published after
another one is listed, the earlier one has been taken too: a duplicate counted
twice, or a poison message projected, would already show.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.acceptance import expected as ex
from tests.acceptance.bus import AGGREGATE_ID, EVENTS_EXCHANGE, MESSAGE_UUID, NAME
from tests.acceptance.driver import Financing, ListedInvestor, eventually_equal, new_id
from tests.acceptance.expected import money

pytestmark = pytest.mark.acceptance

# The projector's own queue (a name of ours: it carries x-single-active-consumer).
PROJECTOR_QUEUE = "events_financing_projector"


async def investor_listed(
    financing: Financing, investor_id: object, balance: object, *, what: str
) -> None:
    async def read() -> tuple[ListedInvestor, ...]:
        return (await financing.listing()).only([str(investor_id)]).investors

    await eventually_equal(
        read, (ListedInvestor(str(investor_id), money(str(balance)), money(0)),), what=what
    )


async def test_funds_added_delivered_twice_under_one_message_id_count_once(
    financing: Financing,
) -> None:
    investor_id = new_id()
    added = ex.investor_funds_added(investor_id, 10)
    await financing.publish_domain_events(ex.investor_created(investor_id))

    message_id = await financing.broker.publish_event(
        added.name, added.body, aggregate_id=added.aggregate_id
    )
    await financing.broker.publish_event(
        added.name, added.body, aggregate_id=added.aggregate_id, message_id=message_id
    )
    await financing.publish_domain_events(ex.investor_funds_added(investor_id, 1))

    # Counted twice, the balance would go 10, 20, 21 and never read 11.
    await investor_listed(financing, investor_id, 11, what="10 once, then 1")


async def test_creation_delivered_twice_under_one_message_id_lists_the_issuer_once(
    financing: Financing,
) -> None:
    issuer_id, later = new_id(), new_id()
    created = ex.issuer_created(issuer_id)

    message_id = await financing.broker.publish_event(
        created.name, created.body, aggregate_id=created.aggregate_id
    )
    await financing.broker.publish_event(
        created.name, created.body, aggregate_id=created.aggregate_id, message_id=message_id
    )
    await financing.publish_domain_events(ex.issuer_created(later))

    async def read() -> tuple[str, ...]:
        return (await financing.listing()).only([issuer_id, later]).issuers

    await eventually_equal(read, (str(issuer_id), str(later)), what="each issuer listed once")


async def test_three_additions_of_a_tenth_read_back_as_exactly_three_tenths(
    financing: Financing,
) -> None:
    investor_id = new_id()

    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        *(ex.investor_funds_added(investor_id, "0.1") for _ in range(3)),
    )

    # In binary floating point 0.1 + 0.1 + 0.1 is 0.30000000000000004.
    await investor_listed(financing, investor_id, "0.3", what="0.1 + 0.1 + 0.1")
    view = await financing.investor_view(investor_id)
    assert view is not None
    assert view.balance.amount == 0.3, repr(view.balance.amount)


async def test_a_tenth_and_two_tenths_read_back_as_exactly_three_tenths(
    financing: Financing,
) -> None:
    investor_id = new_id()

    await financing.publish_domain_events(
        ex.investor_created(investor_id),
        ex.investor_funds_added(investor_id, "0.1"),
        ex.investor_funds_added(investor_id, "0.2"),
    )

    await investor_listed(financing, investor_id, "0.3", what="0.1 + 0.2")
    view = await financing.investor_view(investor_id)
    assert view is not None
    assert view.balance.amount == 0.3, repr(view.balance.amount)


# (body, extra headers): each is refused by the projector as a whole message.
POISONS: dict[str, tuple[bytes, dict[str, Any]]] = {
    "bad_json": (b'{"Amount": ', {}),
    "non_string_header": (json.dumps({"Amount": 1000}).encode(), {"attempt": 1}),
}


@pytest.mark.parametrize("case", POISONS)
async def test_poison_event_is_dead_lettered_and_the_next_event_still_projects(
    financing: Financing, case: str
) -> None:
    body, extra = POISONS[case]
    investor_id = new_id()
    await financing.publish_domain_events(
        ex.investor_created(investor_id), ex.investor_funds_added(investor_id, 5)
    )
    letters_since = financing.dead_letters.mark()

    poison_id = str(new_id())
    await financing.broker.publish(
        EVENTS_EXCHANGE,
        "",
        body,
        {
            MESSAGE_UUID: poison_id,
            NAME: "InvestorFundsAddedEvent",
            AGGREGATE_ID: str(investor_id),
            **extra,
        },
    )
    await financing.publish_domain_events(ex.investor_funds_added(investor_id, 2))

    letter = await financing.dead_letter(
        since=letters_since, source_queue=PROJECTOR_QUEUE, message_id=poison_id
    )
    assert letter.body == body
    # The poison added nothing; the event behind it was projected.
    await investor_listed(financing, investor_id, 7, what="5, then 2 behind the poison")
