"""The operator's dead-letter tools: `financing dead-letters list` shows each dead letter with
its reason and source queue, and `financing dead-letters requeue` sends it back once the
cause is fixed.

The CLI runs as a subprocess with the environment of the deployment, as an
operator would run it beside the service. The dead letters stay in their
queue for it: this test's observer does not take them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractConnection

from tests.acceptance import expected as ex
from tests.faults.hostile import (
    DEAD_LETTER_QUEUE,
    Observer,
    driving,
    observing,
)
from tests.faults.workload import Deployment, deployment
from tests.support import infra
from tests.support.rabbitmq import queue_state
from tests.support.service import CommandLine, run_cli

# How long a dead letter may take: a SellInvoice waits about a second for its issuer first.
DEAD_LETTER_WITHIN = 20.0


@pytest.fixture(scope="module")
async def operated_target() -> AsyncIterator[tuple[Deployment, Observer]]:
    async with (
        deployment("dead_letters_cli") as target,
        observing(target, take_dead_letters=False) as observer,
    ):
        yield target, observer


async def dead_letters_waiting(connection: AbstractConnection, count: int) -> None:
    async def arrived() -> bool:
        state = await queue_state(connection, DEAD_LETTER_QUEUE)
        return state is not None and state[0] >= count

    await infra.wait_until(
        arrived, timeout=DEAD_LETTER_WITHIN, what=f"{count} message(s) in {DEAD_LETTER_QUEUE}"
    )


async def cli(target: Deployment, *args: str) -> CommandLine:
    run = await run_cli(target.service.env, *args)
    assert run.exit_code == 0, run.describe()
    return run


async def test_a_sale_by_an_unregistered_issuer_is_listed_and_requeued_once_the_issuer_exists(
    operated_target: tuple[Deployment, Observer],
) -> None:
    target, observer = operated_target
    connection = observer.broker.connection
    async with driving(target, observer) as financing:
        issuer_id = uuid.uuid4()
        invoice_id = await financing.sell_invoice(issuer_id, 25)
        poison_id = await financing.broker.publish_event("IssuerRegistered", b"{not json")
        await dead_letters_waiting(connection, 2)

        listed = await cli(target, "dead-letters", "list", "--bodies")

        assert "2 dead letter(s)" in listed.stdout, listed.describe()
        [sale] = [block for block in _letters(listed.stdout) if "  SellInvoice  " in block[0]]
        assert f"issuer {issuer_id} is not registered" in sale[1], listed.describe()
        assert str(invoice_id) in sale[2]
        [poison] = [b for b in _letters(listed.stdout) if "events_IssuerRegistered" in b[0]]
        assert poison_id in poison[0] and "not valid JSON" in poison[1], listed.describe()
        # Listing leaves the letters where they are.
        assert await queue_state(connection, DEAD_LETTER_QUEUE) == (2, 0)

        since = financing.events.mark()
        await financing.publish_issuer_registered(issuer_id)
        # A requeued sale retries for about a second (RetryPolicy's conflict limit) before
        # it is dead-lettered again: the issuer must exist first.
        await ex.expect_events(financing.events, [ex.issuer_created(issuer_id)], since=since)
        since = financing.events.mark()
        requeued = await cli(target, "dead-letters", "requeue", "--queue", "SellInvoice")

        assert "requeued 1 dead letter(s)" in requeued.stdout, requeued.describe()
        await ex.expect_events(
            financing.events, [ex.invoice_created(invoice_id, issuer_id, 25)], since=since
        )

        async def listed_invoice() -> bool:
            return await financing.invoice_state(invoice_id) == ("AVAILABLE", None, None)

        await infra.wait_until(listed_invoice, what="the requeued invoice in the read model")
        remaining = await cli(target, "dead-letters", "list")
        assert "1 dead letter(s)" in remaining.stdout, remaining.describe()
        assert "events_IssuerRegistered" in remaining.stdout
    assert target.service.running


async def test_a_requeued_message_that_still_fails_is_dead_lettered_again_with_its_reason(
    operated_target: tuple[Deployment, Observer],
) -> None:
    target, observer = operated_target
    connection = observer.broker.connection
    before = await queue_state(connection, DEAD_LETTER_QUEUE)
    waiting = 0 if before is None else before[0]
    async with driving(target, observer) as financing:
        investor_id = uuid.uuid4()
        body = {"ID": str(investor_id), "Balance": -1}
        message_id = await financing.broker.send_command("CreateInvestor", body)
        await dead_letters_waiting(connection, waiting + 1)

        requeued = await cli(target, "dead-letters", "requeue", "--message-id", message_id)

        assert "requeued 1 dead letter(s)" in requeued.stdout, requeued.describe()
        await dead_letters_waiting(connection, waiting + 1)
        listed = await cli(target, "dead-letters", "list", "--bodies")
        [letter] = [b for b in _letters(listed.stdout) if message_id in b[0]]
        assert "  CreateInvestor  " in letter[0], listed.describe()
        assert "balance must be >= 0" in letter[1], listed.describe()
        assert json.loads(letter[2].removeprefix("    body: ")) == body
    assert target.service.running


async def test_a_refused_bid_requeued_once_funds_are_back_is_judged_again_and_placed(
    operated_target: tuple[Deployment, Observer],
) -> None:
    """A refusal is recorded, so that a copy is not judged again; a copy an operator
    requeues is."""
    target, observer = operated_target
    async with driving(target, observer) as financing:
        financed = await financing.finance_invoice(asking_price=10, bid=10, balance=10)
        investor_id = financed.investor_id
        other, _ = await financing.put_invoice_on_sale(5)
        await financing.bid(investor_id, other, 5)

        async def refused() -> bool:
            listed = await cli(target, "dead-letters", "list", "--aggregate", str(other))
            return "balance 0 is less than the bid 5" in listed.stdout

        await infra.wait_until(refused, timeout=DEAD_LETTER_WITHIN, what="the bid refused")
        await financing.reverse_financed(financed)
        since = financing.events.mark()

        requeued = await cli(target, "dead-letters", "requeue", "--aggregate", str(other))

        assert "requeued 1 dead letter(s)" in requeued.stdout, requeued.describe()
        await ex.expect_events(
            financing.events,
            [
                ex.bid_on_invoice_placed(investor_id, other, 5),
                ex.invoice_financed(other, 5, investor_id, 5),
            ],
            since=since,
        )
    assert target.service.running


def _letters(stdout: str) -> list[list[str]]:
    """The listing's blocks: a heading line, then its `reason:` and `body:` lines."""
    blocks: list[list[str]] = []
    for line in stdout.splitlines():
        if line.startswith("    ") and blocks:
            blocks[-1].append(line)
        elif line and not line.endswith("dead letter(s)"):
            blocks.append([line])
    return blocks
