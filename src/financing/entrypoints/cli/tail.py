"""`financing tail`: every event published on `events`, live, one line each, until Ctrl-C.

    2025-06-01T12:00:01.123Z  InvoiceFinancedEvent  221ffa83-…  v2  correlation 7f0c…  {…}

The time is when the event was recorded in the event store (when it says so),
else when it arrived; the version is its aggregate's (`-` for an integration
event): a copy published again (a relayer that took over, a rewind) shows the
same one. SIGINT or SIGTERM end it with exit code 0; losing the broker ends it
with exit code 1, since what is published meanwhile cannot be followed.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from aio_pika.abc import AbstractIncomingMessage

from financing.adapters.rabbitmq.connection import connected, describe_url
from financing.adapters.rabbitmq.envelopes import from_amqp
from financing.adapters.rabbitmq.follow import follow_events
from financing.application.errors import PoisonMessage
from financing.application.moments import moment
from financing.application.ports import (
    AGGREGATE_VERSION_HEADER,
    CORRELATION_HEADER,
    RECORDED_AT_HEADER,
)
from financing.config import Settings
from financing.entrypoints.cli.console import shown


async def run_tail(settings: Settings) -> int:
    """Follow until cancelled (a signal: exit code 0), connecting included; Unavailable
    when the broker goes away."""
    async with connected(settings.amqp_urls, "tail") as broker:
        await follow_events(broker, _print, lambda: _announce(settings.amqp_urls))
    return 0


def _announce(amqp_urls: list[str]) -> None:
    brokers = ", ".join(describe_url(url) for url in amqp_urls)
    print(f"following events on {brokers} (Ctrl-C to stop)", file=sys.stderr, flush=True)


def _print(message: AbstractIncomingMessage) -> None:
    print(shown(line(message)), flush=True)


def line(message: AbstractIncomingMessage) -> str:
    """One readable line: time, name, aggregate id, correlation, body (`shown` escapes
    what a publisher put there that would break it)."""
    body = bytes(message.body).decode("utf-8", "replace")
    try:
        envelope = from_amqp(message)
    except PoisonMessage as error:
        return f"{moment(datetime.now(UTC))}  (unreadable message: {error})  {body}"
    recorded = envelope.headers.get(RECORDED_AT_HEADER)
    correlation = envelope.headers.get(CORRELATION_HEADER, "-")
    version = envelope.headers.get(AGGREGATE_VERSION_HEADER)
    return (
        f"{moment(_time(recorded))}  {envelope.name}  {envelope.aggregate_id or '-'}"
        f"  {'-' if version is None else f'v{version}'}  correlation {correlation}  {body}"
    )


def _time(recorded: str | None) -> datetime:
    try:
        return datetime.fromisoformat(recorded or "")
    except ValueError:
        return datetime.now(UTC)
