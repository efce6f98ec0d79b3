"""The broker handed back to the reference: what the service added to it, taken away.

On a broker the reference used, the service keeps the reference's queues (the
command queues, the `events_<Event>` queues of its handlers) and adds its own
(docs/contract.md section 2): `events` feeds `financing_events`, a headers exchange
that routes each name to the queues that handle it, and the reference's handler
queues lose their plain binding to `events` for bindings there; its projector reads
`events_financing_projector`; deferred deliveries wait in `financing_deferred`, and
come back to their queue dead-lettered by the broker, with an `x-death` header that
is no string. Stopped, the service leaves all of this: `events_financing_projector`
takes a copy of every event for good, and the reference's consumers refuse a message
with a header that is no string and take it again at once, for ever.

`hand_back` undoes it, with every instance of the service stopped (and the
reference's, while it runs): the reference's handler queues bound to `events` again,
`financing_events` deleted (and with it every binding of the service's), the deferred
deliveries sent back to their queues and the messages of the reference's queues that
its consumers refuse sent again with string headers only (the broker's dead-lettering
records left out), the others left in their places, and the service's queues and
exchanges deleted, but `financing_dead_letters`, which is kept with what it holds for
the operator. The reference projector's `events_query` is declared and bound again,
as the reference declares it, so that it misses nothing published before the
reference's projector starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from financing.adapters.rabbitmq.connection import Broker, close_channel, translated
from financing.adapters.rabbitmq.dead_letters import dead_letter_of, whole_copy_of
from financing.adapters.rabbitmq.envelopes import (
    BROKER_HEADERS,
    DELIVERY_COUNT_HEADER,
    header_text,
)
from financing.adapters.rabbitmq.queues import (
    delete_queue,
    exchange_exists,
    existing_queue,
    queue_depth,
    queue_exists,
)
from financing.adapters.rabbitmq.topology import (
    COMMAND_NAMES,
    DEAD_LETTER_QUEUE,
    DEAD_LETTERS,
    DEFERRALS,
    EVENTS_EXCHANGE,
    EVENTS_ROUTER,
    PROJECTOR_QUEUE,
    REFERENCE_PROJECTOR_QUEUE,
    ROUTED_MESSAGES,
    UNROUTED,
    declare_events_exchange,
    on_a_channel,
    subscription,
)
from financing.application.grace import finish_on_cancel

# The reference's queues the service reads: its handlers' queues, fed by `events`, and
# its command queues.
REFERENCE_EVENT_QUEUES = tuple(
    sorted({subscription(name).queue.name for name in ROUTED_MESSAGES} - COMMAND_NAMES)
)
REFERENCE_COMMAND_QUEUES = tuple(sorted(COMMAND_NAMES))
# The queues only the service reads.
SERVICE_QUEUES = (PROJECTOR_QUEUE, UNROUTED)


class StillConsumed(Exception):
    """A queue the hand-back changes is being read: an instance of the service (or of
    the reference) still runs."""


@dataclass
class HandedBack:
    """What a hand-back changed, a line each (none when it found nothing left to do),
    and what became of the dead letters."""

    done: list[str]
    dead_letters: str


async def hand_back(broker: Broker) -> HandedBack:
    """Take away what the service added to the broker (this module's docstring), and say
    only what it changed: run again, it finds nothing left to do."""
    done: list[str] = []
    await _refuse_if_consumed(broker)
    await on_a_channel(broker.channel, declare_events_exchange)  # as the reference declares it
    # The reference's queues are bound to `events` again before the router goes: without
    # the router, they were. (They are bound all the same: AMQP does not tell whether a
    # binding exists, and one an operator removed since is made again, unsaid.)
    routed = await exchange_exists(broker, EVENTS_ROUTER)
    bound = []
    for name in REFERENCE_EVENT_QUEUES:
        async with existing_queue(broker, name) as queue:
            if queue is not None:
                with translated():
                    await queue.bind(EVENTS_EXCHANGE, routing_key="")
                bound.append(name)
    await on_a_channel(broker.channel, lambda channel: channel.exchange_delete(EVENTS_ROUTER))
    if routed:
        done.append(
            f"bound to {EVENTS_EXCHANGE!r} again, as the reference binds them:"
            f" {', '.join(bound) or 'none (the broker has none of them)'}; exchange"
            f" {EVENTS_ROUTER!r} deleted, and every binding of the service's with it"
        )
    await _sent_again(broker, done)
    await _deleted(broker, done)
    # Declared and bound however it is found: the service kept a retired one (holding
    # messages when it took over) unbound, which would miss every event published until
    # the reference's projector declares it again.
    existed = await queue_exists(broker, REFERENCE_PROJECTOR_QUEUE)
    await on_a_channel(broker.channel, partial(_reference_projector_queue, existed=existed))
    if not existed or routed:
        done.append(
            f"queue {REFERENCE_PROJECTOR_QUEUE!r}, the reference projector's,"
            f" {'bound' if existed else 'declared and bound'} to {EVENTS_EXCHANGE!r}"
            " again, as the reference declares it"
        )
    letters = await queue_depth(broker, DEAD_LETTER_QUEUE)
    kept = (
        "none"
        if letters is None
        else f"kept, with {letters.waiting} dead letter(s) (`financing dead-letters` reads"
        " it; delete it once what it holds is of no use)"
    )
    return HandedBack(done, f"queue {DEAD_LETTER_QUEUE!r}: {kept}")


async def _reference_projector_queue(channel: AbstractChannel, *, existed: bool) -> None:
    """`events_query` bound to `events`, declared as the reference declares it where the
    broker has none; one there is bound as it is: declared again, a quorum one was refused
    (its type not the declaration's), and the hand-back stopped there at every run."""
    if existed:
        queue = await channel.declare_queue(REFERENCE_PROJECTOR_QUEUE, passive=True)
    else:
        queue = await channel.declare_queue(REFERENCE_PROJECTOR_QUEUE, durable=True)
    await queue.bind(await declare_events_exchange(channel), routing_key="")


async def _refuse_if_consumed(broker: Broker) -> None:
    """StillConsumed when a queue the hand-back reads, moves or deletes has a consumer."""
    names = (*SERVICE_QUEUES, DEFERRALS, *REFERENCE_COMMAND_QUEUES, *REFERENCE_EVENT_QUEUES)
    read = [
        f"{depth.name} ({depth.consumers})"
        for depth in [await queue_depth(broker, name) for name in names]
        if depth is not None and depth.consumers
    ]
    if read:
        raise StillConsumed(
            f"queues are being read (consumers): {', '.join(read)}; stop every instance of"
            " the service, and the reference's processes, until the hand-back is done"
        )


async def _sent_again(broker: Broker, done: list[str]) -> None:
    """The deferred deliveries sent back to their queues; and each message of the
    reference's queues that the reference's consumers refuse (a header that is no string:
    the broker's records of a dead-lettering) sent again to its queue with string headers
    only, the others left where they are (fetched unacked, they go back to their places
    when the channel closes). Published on a confirming channel of its own: the service's
    publisher would declare the topology this takes away."""
    channel = await broker.channel(publisher_confirms=True)
    try:
        moved, kept = 0, 0
        queues: dict[str, bool] = {}  # whether the broker has it
        async with _taken(broker, DEFERRALS) as messages:
            async for message in messages:
                queue = message.routing_key or ""
                if queue and queue not in queues:
                    queues[queue] = await queue_exists(broker, queue)
                if queues.get(queue, False):
                    await finish_on_cancel(_moved(channel, message, queue))
                    moved += 1
                else:
                    await finish_on_cancel(_kept_as_a_dead_letter(broker, channel, message))
                    kept += 1
        if moved or kept:
            done.append(
                f"{moved} deferred message(s) sent back to their queues, to be handled by"
                f" the reference at once (it does not wait for an aggregate); {kept} deferred"
                f" for a queue the broker has no longer kept in {DEAD_LETTER_QUEUE}"
            )
        cleaned = 0
        for name in (*REFERENCE_COMMAND_QUEUES, *REFERENCE_EVENT_QUEUES):
            async with _taken(broker, name) as messages:
                async for message in messages:
                    if _refused_by_the_reference(message):
                        await finish_on_cancel(_moved(channel, message, name))
                        cleaned += 1
        if cleaned:
            done.append(
                f"{cleaned} message(s) of the reference's queues with a header that is no"
                " string (the broker's records of a dead-lettering), which the reference's"
                " consumers refuse, sent again to their queue with string headers only; the"
                " others left where they are"
            )
    finally:
        await close_channel(channel)


def _refused_by_the_reference(message: AbstractIncomingMessage) -> bool:
    """Whether `message` carries a header the reference's consumers refuse: one that is no
    string, or a broker's record of a dead-lettering. Not the count a quorum queue adds to
    each delivery (`x-delivery-count`), which no copy can shed: taken for a record, every
    message of a quorum queue was sent again at each hand-back."""
    return any(
        key != DELIVERY_COUNT_HEADER and (key in BROKER_HEADERS or not isinstance(value, str))
        for key, value in (message.headers or {}).items()
    )


@contextlib.asynccontextmanager
async def _taken(
    broker: Broker, name: str
) -> AsyncIterator[AsyncIterator[AbstractIncomingMessage]]:
    """The messages of queue `name` there when it was looked at, each fetched unacked (an
    empty iterator when the broker has no such queue)."""
    async with existing_queue(broker, name) as queue:

        async def messages() -> AsyncIterator[AbstractIncomingMessage]:
            waiting = 0 if queue is None else queue.declaration_result.message_count or 0
            for _ in range(waiting):
                assert queue is not None
                with translated():
                    message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    return
                yield message

        yield messages()


async def _moved(channel: AbstractChannel, message: AbstractIncomingMessage, queue: str) -> None:
    """`message` sent again to `queue` with string headers only, every property kept but
    its expiration (`_sent`)."""
    strings = {
        key: header_text(value)
        for key, value in (message.headers or {}).items()
        if key not in BROKER_HEADERS
    }
    await _sent(channel, message, whole_copy_of(message, strings), queue)


async def _kept_as_a_dead_letter(
    broker: Broker, channel: AbstractChannel, message: AbstractIncomingMessage
) -> None:
    """A deferred `message` whose queue the broker has no longer (the broker would drop
    it as it expired) put in the dead-letter queue, with the reason, rather than lost."""
    if not await queue_exists(broker, DEAD_LETTER_QUEUE):
        await on_a_channel(broker.channel, DEAD_LETTERS.of_type(broker.queue_type).declare)
    queue = message.routing_key or ""
    reason = (
        f"deferred for queue {queue!r}, which the broker has no longer when the broker was"
        " handed back to the reference"
    )
    copy = dead_letter_of(message, reason=reason, source_queue=queue)
    await _sent(channel, message, copy, DEAD_LETTER_QUEUE)


async def _sent(
    channel: AbstractChannel,
    message: AbstractIncomingMessage,
    copy: aio_pika.Message,
    queue: str,
) -> None:
    """`copy` of `message` published (confirmed) to `queue`, then `message` acked."""
    with translated():
        await channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)
        await message.ack()


async def _deleted(broker: Broker, done: list[str]) -> None:
    """The service's queues and exchanges deleted; the dead letters kept."""
    gone: list[str] = []
    projector_gone = False
    for name in (PROJECTOR_QUEUE, UNROUTED, DEFERRALS):
        async with existing_queue(broker, name) as queue:
            if queue is not None:
                held = queue.declaration_result.message_count or 0
                with translated():
                    await delete_queue(broker, queue, if_unused=True, if_empty=False)
                gone.append(f"{name} ({held} message(s))")
                projector_gone = projector_gone or name == PROJECTOR_QUEUE
    exchanges = [name for name in (UNROUTED, DEFERRALS) if await exchange_exists(broker, name)]

    async def exchanges_deleted(channel: AbstractChannel) -> None:
        for exchange in exchanges:
            await channel.exchange_delete(exchange)

    await on_a_channel(broker.channel, exchanges_deleted)
    if gone:
        # It may hold a reference relayer's events too, which the service projected; the
        # reference's projector, its queue retired meanwhile, never got them.
        why = (
            f" (what {PROJECTOR_QUEUE} held was for the service's read models; events a"
            f" reference relayer published while {REFERENCE_PROJECTOR_QUEUE} was retired"
            " reached them alone, not the reference's)"
        )
        done.append(f"queues deleted: {', '.join(gone)}{why if projector_gone else ''}")
    if exchanges:
        done.append(f"exchanges deleted: {', '.join(map(repr, exchanges))}")
