"""`financing dead-letters list | requeue | discard` as an operator runs them, on a vhost.

The dead letters are made as a consumer makes them (a message delivered on its
queue, then copied to the dead-letter queue with its reason); the commands run
as subprocesses with AMQP_ADDRESS naming the vhost.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from financing.adapters.rabbitmq import dead_letters as dead_letters_module
from financing.adapters.rabbitmq import topology
from financing.adapters.rabbitmq.connection import Broker
from financing.adapters.rabbitmq.dead_letters import (
    DEAD_LETTERED_AT_HEADER,
    EVERY,
    REASON_HEADER,
    SOURCE_QUEUE_HEADER,
    Selection,
    list_dead_letters,
)
from financing.adapters.rabbitmq.topology import DEAD_LETTER_QUEUE, UNROUTED
from financing.application.errors import Unavailable
from financing.application.retry import Outages
from financing.config import Settings
from financing.entrypoints.cli import dead_letters as cli_dead_letters
from tests.integration.test_rabbitmq_dead_letters import dead_letter, source_queues
from tests.support import rabbitmq
from tests.support.infra import holds, unique_name, wait_until
from tests.support.service import CommandLine, financing_command, run_cli

HEADINGS = ("DEAD-LETTERED AT", "SOURCE QUEUE", "NAME", "MESSAGE ID")
AGG_1 = "0b7c3f4e-1d2a-4c5b-8e9f-a1b2c3d4e5f6"
AGG_2 = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"


@dataclass(frozen=True)
class Seeded:
    """A vhost of its own with dead letters from two source queues: a-1 and a-2 from
    `queue_a`, b-1 from `queue_b`; a-1 concerns aggregate AGG_1, the others AGG_2."""

    vhost: rabbitmq.Vhost
    broker: Broker
    queue_a: str
    queue_b: str

    async def financing(self, *args: str, env: dict[str, str] | None = None) -> CommandLine:
        """`financing dead-letters ARGS` with AMQP_ADDRESS naming the vhost."""
        return await run_cli(
            {**os.environ, "AMQP_ADDRESS": self.vhost.url, **(env or {})}, "dead-letters", *args
        )

    async def remaining(self) -> list[str]:
        return [letter.message_id for letter in await list_dead_letters(self.broker)]


@pytest.fixture
async def seeded() -> AsyncIterator[Seeded]:
    async with rabbitmq.private_vhost("fin_cli_dead") as vhost:
        broker = Broker([vhost.url], Outages())
        try:
            queue_a, queue_b = unique_name("source_a"), unique_name("source_b")
            await source_queues(broker, queue_a, queue_b)
            await dead_letter(broker, queue_a, "a-1", "reason a1", {"aggregateID": AGG_1})
            await dead_letter(broker, queue_b, "b-1", "reason b1", {"aggregateID": AGG_2})
            await dead_letter(
                broker, queue_a, "a-2", "why a2", {"aggregateID": AGG_2, "correlation_id": "s-9"}
            )
            yield Seeded(vhost, broker, queue_a, queue_b)
        finally:
            await broker.close()


def shown_ids(run: CommandLine) -> list[str]:
    """The message ids of a listing, in order: the last column of each letter's line."""
    letters = run.stdout.splitlines()[1:-1]  # between the headings and the count
    return [line.split()[-1] for line in letters if not line.startswith(" ")]


async def test_the_listing_has_column_headings_and_each_letters_reason_and_ids(
    seeded: Seeded,
) -> None:
    run = await seeded.financing("list")

    assert run.exit_code == 0, run.describe()
    lines = run.stdout.splitlines()
    assert lines[0].split("  ")[0] == HEADINGS[0]
    assert [h in lines[0] for h in HEADINGS] == [True] * 4
    assert lines[1].split()[-3:] == [seeded.queue_a, "CreateIssuer", "a-1"]
    assert lines[2] == "    reason: reason a1"
    assert lines[3] == f"    concerns {AGG_1}, correlation a-1"  # no header: its own id
    assert f"    concerns {AGG_2}, correlation s-9" in lines
    assert lines[-1] == "3 dead letter(s)"


@pytest.mark.parametrize("encoding", ["PYTHONIOENCODING=ascii", "LC_ALL=C PYTHONUTF8=0"])
async def test_a_reason_the_outputs_encoding_cannot_carry_is_listed_escaped(
    seeded: Seeded, encoding: str
) -> None:
    """Regression: under a locale or an output encoding without it, a reason's character
    beyond ASCII stopped the listing after its first row (exit 1, a traceback)."""
    await dead_letter(seeded.broker, seeded.queue_b, "b-2", "Zoë 🚀 refused", {})
    env = dict(setting.split("=") for setting in encoding.split())
    run = await seeded.financing("list", env=env)
    assert run.exit_code == 0, run.describe()
    assert "    reason: Zo\\xeb \\U0001f680 refused" in run.stdout.splitlines(), run.describe()
    assert run.stdout.splitlines()[-1] == "4 dead letter(s)"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (("--queue", "A"), ["a-1", "a-2"]),
        (("--aggregate", AGG_2), ["b-1", "a-2"]),
        (("--queue", "A", "--aggregate", AGG_2), ["a-2"]),
        (("--queue", "A", "--aggregate", "5d41402a-bc4b-4a76-b971-9d911017c592"), []),
        (("--message-id", "b-1"), ["b-1"]),
        (("--message-id", "a-2", "--queue", "A"), ["a-2"]),
    ],
    ids=["by queue", "by aggregate", "by both", "none match", "by id", "by id and queue"],
)
async def test_the_listing_shows_only_the_letters_matching_every_filter(
    seeded: Seeded, filters: tuple[str, ...], expected: list[str]
) -> None:
    """Regression (a probe): a cut `requeue` names the letter that may still wait by its
    message id, which `list` could not select."""
    named = tuple(seeded.queue_a if value == "A" else value for value in filters)

    run = await seeded.financing("list", *named)

    assert run.exit_code == 0, run.describe()
    assert shown_ids(run) == expected, run.describe()
    assert run.stdout.splitlines()[-1] == f"{len(expected)} dead letter(s)"


@pytest.mark.parametrize(
    ("filters", "last"),
    [
        ((), "the oldest 2 dead letter(s) shown, of 3 waiting in financing_dead_letters"),
        (
            ("--queue", "A"),
            "the oldest 1 matching dead letter(s) shown, of 3 waiting in financing_dead_letters",
        ),
    ],
    ids=["all", "by queue"],
)
async def test_a_listing_cut_at_its_limit_says_it_is_not_all_of_them(
    seeded: Seeded, filters: tuple[str, ...], last: str
) -> None:
    """Regression: the listing ended with "100 dead letter(s)" whether 100 waited or
    190,000, read as the total."""
    named = tuple(seeded.queue_a if value == "A" else value for value in filters)
    limit = "2" if not filters else "1"

    run = await seeded.financing("list", "--limit", limit, *named)

    assert run.exit_code == 0, run.describe()
    assert run.stdout.splitlines()[-1] == f"{last}: --limit N shows more", run.describe()
    exact = await seeded.financing("list", "--limit", "3")
    assert exact.stdout.splitlines()[-1] == "3 dead letter(s)", exact.describe()


async def test_discard_removes_the_matching_letters_for_good_and_says_how_many(
    seeded: Seeded,
) -> None:
    run = await seeded.financing("discard", "--queue", seeded.queue_a)

    assert run.exit_code == 0, run.describe()
    assert run.stdout.strip() == "discarded 2 dead letter(s)"
    assert await seeded.remaining() == ["b-1"]
    assert await rabbitmq.queue_state(await seeded.broker.connection(), seeded.queue_a) == (0, 0)


async def test_discard_all_empties_the_dead_letter_queue(seeded: Seeded) -> None:
    run = await seeded.financing("discard", "--all")

    assert run.exit_code == 0, run.describe()
    assert run.stdout.strip() == "discarded 3 dead letter(s)"
    assert await seeded.remaining() == []


@pytest.mark.parametrize("command", ["discard", "requeue"])
async def test_an_unknown_message_id_is_said_and_exits_non_zero_leaving_every_letter(
    seeded: Seeded, command: str
) -> None:
    run = await seeded.financing(command, "--message-id", "no-such-id")

    assert run.exit_code == 1, run.describe()
    said = f"financing dead-letters {command}: no dead letter with message id 'no-such-id'"
    assert said in run.stderr
    assert await seeded.remaining() == ["a-1", "b-1", "a-2"]


@pytest.mark.parametrize("command", ["list", "discard", "requeue"])
async def test_a_queue_the_broker_does_not_have_is_said_and_exits_non_zero(
    seeded: Seeded, command: str
) -> None:
    """Regression: `list` and `discard` answered "0 dead letter(s)", exit 0, for a
    mistyped queue, as if it had none. (And the line began `financing dead-letters:`,
    where an operator's command's lines begin with its whole name.)"""
    run = await seeded.financing(command, "--queue", "NoSuchQueue")

    assert run.exit_code == 1, run.describe()
    said = f"financing dead-letters {command}: the broker has no queue named 'NoSuchQueue'"
    assert said in run.stderr
    assert await seeded.remaining() == ["a-1", "b-1", "a-2"]


async def test_the_letters_of_a_queue_gone_are_still_listed(seeded: Seeded) -> None:
    channel = await seeded.broker.channel()
    await channel.queue_delete(seeded.queue_b)
    await channel.close()

    run = await seeded.financing("list", "--queue", seeded.queue_b)

    assert run.exit_code == 0, run.describe()
    assert "b-1" in run.stdout
    assert run.stdout.splitlines()[-1] == "1 dead letter(s)"


async def test_requeue_leaves_the_letters_of_a_queue_gone_naming_it_and_requeues_the_rest(
    seeded: Seeded,
) -> None:
    """Regression: it stopped at the first such letter (NO_ROUTE, exit 1) without saying
    that the ones before were requeued, and every later run stopped there too."""
    channel = await seeded.broker.channel()
    await channel.queue_delete(seeded.queue_b)
    await channel.close()

    run = await seeded.financing("requeue")

    assert run.exit_code == 0, run.describe()
    assert run.stdout.splitlines() == [
        "requeued 2 dead letter(s)",
        f"left 1 dead letter(s): their queue {seeded.queue_b!r} does not exist",
    ]
    assert await seeded.remaining() == ["b-1"]
    named = await seeded.financing("requeue", "--message-id", "b-1")
    assert named.exit_code == 1, named.describe()  # the one named was not requeued
    assert await seeded.remaining() == ["b-1"]


async def test_requeue_leaves_the_letters_of_the_unrouted_messages(seeded: Seeded) -> None:
    """Regression: a message dead-lettered because its `name` was no string came back
    from a requeue with the name as text, which `financing_unrouted` ignores: lost."""
    await source_queues(seeded.broker, UNROUTED)
    await dead_letter(seeded.broker, UNROUTED, "u-1", "header 'name' is not a string")

    run = await seeded.financing("requeue")

    assert run.exit_code == 0, run.describe()
    assert (
        f"left 1 dead letter(s): from {UNROUTED!r}, which routes a requeued message nowhere"
        in run.stdout
    ), run.describe()
    assert await seeded.remaining() == ["u-1"]


async def test_requeue_routes_the_unrouted_letters_of_a_handled_name_again(seeded: Seeded) -> None:
    """Regression: an event that reached no queue because the binding of its queue was
    deleted under the service was dead-lettered from `financing_unrouted`, which a
    requeue refused: only a `relay rewind` with the service stopped sent it again."""
    await topology.declare_on(seeded.broker)  # the binding is there again
    await dead_letter(
        seeded.broker,
        UNROUTED,
        "u-2",
        "the binding of its queue was missing",
        {"name": "InvestorFundsReleasedEvent"},
    )

    run = await seeded.financing("requeue", "--queue", UNROUTED)

    assert run.exit_code == 0, run.describe()
    assert run.stdout.strip() == "requeued 1 dead letter(s)", run.describe()
    connection = await seeded.broker.connection()
    [routed] = await rabbitmq.drain(connection, topology.PROJECTOR_QUEUE, expected=1)
    assert routed.message_id == "u-2"
    assert await seeded.remaining() == ["a-1", "b-1", "a-2"]


@pytest.mark.parametrize("name", ["a" * 256, "tab\there"], ids=["too long", "a tab"])
async def test_a_queue_name_no_queue_can_have_is_a_usage_error(seeded: Seeded, name: str) -> None:
    """Regression: the AMQP client's ValueError ended the command with a traceback."""
    run = await seeded.financing("requeue", "--queue", name)

    assert run.exit_code == 2, run.describe()
    assert "is not a queue name" in run.stderr and "Traceback" not in run.stderr
    assert await seeded.remaining() == ["a-1", "b-1", "a-2"]


async def test_requeue_by_message_id_sends_that_letter_back_to_its_queue(
    seeded: Seeded,
) -> None:
    run = await seeded.financing("requeue", "--queue", seeded.queue_a, "--message-id", "a-2")

    assert run.exit_code == 0, run.describe()
    assert run.stdout.strip() == "requeued 1 dead letter(s)"
    assert await seeded.remaining() == ["a-1", "b-1"]
    connection = await seeded.broker.connection()
    [requeued] = await rabbitmq.drain(connection, seeded.queue_a, expected=1)
    assert requeued.message_id == "a-2"


async def test_requeue_leaves_letters_older_than_the_retention_unless_told_any_age(
    seeded: Seeded,
) -> None:
    """An older letter's message may have been applied since (a rebuild, another copy)
    and its deduplication record pruned: requeued, it could apply twice."""
    # A letter kept two hours ago, older than the shortest retention: made by hand, for a
    # consumer stamps its letters with the time it keeps them.
    connection = await seeded.broker.connection()
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    await rabbitmq.publish_raw(
        connection,
        DEAD_LETTER_QUEUE,
        b'{"ID": "old-1"}',
        {
            "_watermill_message_uuid": "old-1",
            "name": "CreateIssuer",
            REASON_HEADER: "an old reason",
            SOURCE_QUEUE_HEADER: seeded.queue_a,
            DEAD_LETTERED_AT_HEADER: two_hours_ago,
        },
        message_id="old-1",
    )
    hour = {"FINANCING_DEDUP_RETENTION": "1h"}

    kept = await seeded.financing("requeue", "--queue", seeded.queue_a, env=hour)
    assert kept.exit_code == 0, kept.describe()
    assert kept.stdout.splitlines()[0] == "requeued 2 dead letter(s)"
    assert "left 1 dead letter(s): older than FINANCING_DEDUP_RETENTION" in kept.stdout
    assert sorted(await seeded.remaining()) == ["b-1", "old-1"]
    # The letter named, left for its age: not requeued, and the exit code says so (it
    # said 0, as if it had been requeued).
    named = await seeded.financing("requeue", "--message-id", "old-1", env=hour)
    assert named.exit_code == 1, named.describe()
    assert "left 1 dead letter(s): older than FINANCING_DEDUP_RETENTION" in named.stdout

    forced = await seeded.financing("requeue", "--queue", seeded.queue_a, "--any-age", env=hour)
    assert forced.stdout.strip() == "requeued 1 dead letter(s)", forced.describe()
    assert await seeded.remaining() == ["b-1"]


async def test_requeue_reads_the_letters_once_so_that_no_other_reader_can_fail_it_after(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: after requeueing, a second pass browsed every letter to count those
    older than the retention, taking the readers' lock again: another reader that took it
    in between made the command exit 1, "try again", though every letter was requeued."""
    readings: list[None] = []
    reading = dead_letters_module._read_alone

    def counted(broker: Broker) -> Any:
        readings.append(None)
        return reading(broker)

    monkeypatch.setattr(dead_letters_module, "_read_alone", counted)
    settings = Settings.from_env({"AMQP_ADDRESS": seeded.vhost.url})

    assert await cli_dead_letters.requeue(settings, EVERY) == 0
    assert len(readings) == 1
    assert await seeded.remaining() == []


@pytest.mark.parametrize("verb", ["requeue", "discard"])
async def test_a_command_cut_off_by_the_broker_says_how_far_it_got_and_the_letter_in_hand(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    """Regression (a probe): the broker's connection lost part way, a requeue said the
    outage alone, though it had requeued hundreds, and the letter whose ack was lost with
    the connection waited again beside its requeued copy, sent twice by the next run."""
    acks = 0
    ack = aio_pika.IncomingMessage.ack

    async def cut_at_the_second(self: aio_pika.IncomingMessage, multiple: bool = False) -> None:
        nonlocal acks
        acks += 1
        if acks == 2:
            channel = self.channel
            await rabbitmq.close_connections(seeded.vhost.name)
            # The broker closes the connection once rabbitmqctl is done asking: an ack
            # written before it does is taken, and the command did all it was asked.
            await wait_until(lambda: holds(channel.is_closed), what="the connection closed")
        await ack(self, multiple)

    monkeypatch.setattr(aio_pika.IncomingMessage, "ack", cut_at_the_second)
    settings = Settings.from_env({"AMQP_ADDRESS": seeded.vhost.url})
    command = cli_dead_letters.requeue if verb == "requeue" else cli_dead_letters.discard
    selection = Selection(source_queue=seeded.queue_a)

    with pytest.raises(Unavailable):
        await command(settings, selection)

    done = "requeued" if verb == "requeue" else "discarded"
    said = capsys.readouterr().out.splitlines()  # the service's log lines among them
    count = said.index(f"{done} 1 dead letter(s) before the command failed")
    last, in_hand = said[count + 1 : count + 3]
    # An ack has no answer: the one counted last may not have reached the broker.
    assert last == (
        f"the last counted, the dead letter a-1 from {seeded.queue_a}, may still wait: its"
        " ack may not have reached the broker"
    ), last
    assert in_hand.startswith(f"the dead letter a-2 from {seeded.queue_a} was in hand: "), in_hand
    assert await seeded.remaining() == ["b-1", "a-2"]
    if verb == "requeue":  # the copy of the letter in hand was queued: its letter waits too
        copies = await rabbitmq.drain(await seeded.broker.connection(), seeded.queue_a, expected=2)
        assert [copy.message_id for copy in copies] == ["a-1", "a-2"]


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
async def test_a_command_started_with_its_output_closed_does_its_work_and_exits_0(
    seeded: Seeded, closed: str
) -> None:
    """Regression: started with stdout closed (`>&-`), the command's first socket took
    descriptor 1 and the event loop's library aborted the process as it closed it
    (SIGABRT); started with stderr closed, every command exited 1 at once, unable to
    log, whatever it was asked."""
    args = [*financing_command(), "dead-letters", "discard", "--message-id", "a-1"]
    process = await asyncio.create_subprocess_shell(
        f"exec {shlex.join(args)} {closed}",
        env={**os.environ, "AMQP_ADDRESS": seeded.vhost.url},
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(process.wait(), 60) == 0
    assert sorted(await seeded.remaining()) == ["a-2", "b-1"]


async def test_requeue_leaves_the_topology_as_it_finds_it(seeded: Seeded) -> None:
    """Regression (a probe): requeue declared the service's whole topology first, as the
    service does: it made again a queue the operator had deleted (and requeued its
    letters there, where `--queue` for it said there was none), and on a broker handed back
    to the reference it would make the service's exchanges and queues again, which take
    a copy of every event for ever."""
    await topology.declare_on(seeded.broker)
    gone = topology.subscription("InvoiceReversedEvent").queue.name
    await dead_letter(seeded.broker, gone, "r-1", "reason r1", {})
    channel = await seeded.broker.channel()
    await channel.queue_delete(gone)
    await channel.exchange_delete(topology.EVENTS_ROUTER)
    await channel.close()

    run = await seeded.financing("requeue")

    assert run.exit_code == 0, run.describe()
    assert run.stdout.splitlines() == [
        "requeued 3 dead letter(s)",
        f"left 1 dead letter(s): their queue {gone!r} does not exist",
    ]
    assert gone not in await rabbitmq.list_queues(seeded.vhost.name)
    assert topology.EVENTS_ROUTER not in await rabbitmq.list_exchanges(seeded.vhost.name)


async def test_a_listing_says_when_its_reads_count_against_a_quorum_queues_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression (a probe with quorum queues): each list gives every letter it read back
    to the queue, which a quorum queue counts as a delivery; past a delivery limit
    (RabbitMQ 4's default: 20) the letters were dropped, without a word."""
    monkeypatch.setattr(cli_dead_letters, "GIVEN_BACK_SAID", 2)
    async with rabbitmq.private_vhost("fin_cli_dead_q") as vhost:
        broker = Broker([vhost.url], Outages(), queue_type="quorum")
        try:
            await source_queues(broker, "source_q")
            await dead_letter(broker, "source_q", "q-1", "a reason", {})
        finally:
            await broker.close()
        settings = Settings.from_env({"AMQP_ADDRESS": vhost.url, "FINANCING_QUEUE_TYPE": "quorum"})
        said = []
        for _ in range(3):
            assert await cli_dead_letters.list_letters(settings, EVERY, 100, False) == 0
            said.append(capsys.readouterr().err)
    assert said[:2] == ["", ""], said
    assert "read 2 time(s) before" in said[2] and "docs/scaling.md" in said[2], said


async def test_a_listing_cut_at_its_limit_on_a_quorum_queue_does_not_call_them_the_oldest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression (a probe with quorum queues): two lists of 4 of 20 letters each said
    "the oldest 4" and showed others each time: a quorum queue puts the letters a list
    reads back at its end."""
    async with rabbitmq.private_vhost("fin_cli_dead_q") as vhost:
        broker = Broker([vhost.url], Outages(), queue_type="quorum")
        try:
            await source_queues(broker, "source_q")
            for n in range(3):
                await dead_letter(broker, "source_q", f"q-{n}", "a reason", {})
        finally:
            await broker.close()
        settings = Settings.from_env({"AMQP_ADDRESS": vhost.url, "FINANCING_QUEUE_TYPE": "quorum"})
        assert await cli_dead_letters.list_letters(settings, EVERY, 2, False) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "2 dead letter(s) shown, of 3 waiting in financing_dead_letters, not the oldest"
        " (a quorum queue puts the letters each list reads at its end): --limit N shows more"
    )


async def test_requeue_leaves_a_letter_kept_changed_and_the_listing_says_what_changed(
    seeded: Seeded,
) -> None:
    """Regression: a letter whose message was refused for a header that is no string was
    requeued with that header as text, and applied."""
    await dead_letter(seeded.broker, seeded.queue_b, "b-2", "not a string", {"n": 7})

    listing = await seeded.financing("list", "--queue", seeded.queue_b)
    run = await seeded.financing("requeue", "--queue", seeded.queue_b)

    assert "    kept changed, not requeued: header 'n' kept as text" in listing.stdout.splitlines()
    assert run.exit_code == 0, run.describe()
    assert run.stdout.splitlines() == [
        "requeued 1 dead letter(s)",
        "left 1 dead letter(s): their copies are not the messages refused (headers kept as"
        " text, or a message id given to them: `list` says what): requeued, they would be"
        " processed as messages their publishers never sent; their publishers must send"
        " them again",
    ]
    assert await seeded.remaining() == ["a-1", "a-2", "b-2"]
