"""`financing relay rewind --since WHEN`: relay again the events a broker lost.

The relayer moves its checkpoint past the events the broker confirmed; a broker
that loses them afterwards (its queues or its virtual host deleted, its data lost,
its definitions restored without their messages) leaves sagas stopped half way,
with nothing left to deliver. Rewinding moves the checkpoint back to just before
the first event recorded at or after WHEN, and the next relayer publishes those
events again, under the same message ids: a consumer takes those it processed as
copies, as long as it keeps their records (FINANCING_DEDUP_RETENTION); older
ones are refused unless `--any-age` says otherwise.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from financing.adapters.postgres.connection import COMMAND_DATABASE
from financing.adapters.postgres.outbox import RelayerRunning, rewind
from financing.application.moments import moment
from financing.config import ConfigError, Settings, parse_duration, said
from financing.entrypoints.cli.console import database


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """A time with its offset (ISO 8601: `2026-12-05T10:00:00Z`), or a duration before
    now (`2h`, `30m`, `1d`, or seconds)."""
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        if value.strip().startswith("-"):
            unsigned = value.strip()[1:].strip()
            what = "a time" if any(c in unsigned for c in "T:-") else "a duration before now"
            raise ValueError(f"{value!r}: {what} is written without a sign ({unsigned})") from None
        try:
            ago = parse_duration("--since", value)
        except ConfigError as error:
            if _is_duration(value):  # one out of range (`0m`): the range is what to say
                raise ValueError(str(error)) from None
            raise ValueError(
                f"{value!r} is neither a time with its offset (2026-12-05T10:00:00Z) nor a"
                " duration before now (2h, 30m, 1d, or seconds)"
            ) from None
        return (now or datetime.now(UTC)) - ago
    if at.tzinfo is None:
        raise ValueError(f"{value!r} has no offset: say which (Z for UTC, or +01:00)")
    return at


def _is_duration(value: str) -> bool:
    """Whether `value` is written as a duration, whatever its length."""
    try:
        parse_duration("--since", value, least=timedelta(0), most=timedelta.max)
    except ConfigError:
        return False
    return True


# How long before the deduplication records' retention runs out a rewind must start:
# its events are relayed once a relayer starts again, perhaps an hour later.
RETENTION_MARGIN = timedelta(hours=1)


async def run_rewind(settings: Settings, since: datetime, *, any_age: bool) -> int:
    kept_since = datetime.now(UTC) - settings.dedup_retention + RETENTION_MARGIN
    if settings.dedup_retention <= RETENTION_MARGIN and not any_age:
        print(
            "financing relay rewind: FINANCING_DEDUP_RETENTION"
            f" ({said(settings.dedup_retention)}, as the service has it) leaves no hour to spare:"
            " an event processed before the rewind could be applied twice; --any-age"
            " rewinds all the same",
            file=sys.stderr,
        )
        return 2
    if since < kept_since and not any_age:
        print(
            f"financing relay rewind: {moment(since)} is too close to the end of what consumers"
            f" keep the records of (FINANCING_DEDUP_RETENTION, {said(settings.dedup_retention)},"
            " as the service has it; an hour spared: since"
            f" {moment(kept_since)}): an event processed before then could be applied"
            " twice; --any-age rewinds all the same",
            file=sys.stderr,
        )
        return 2
    async with database(
        settings.command_db,
        COMMAND_DATABASE,
        "relay rewind",
        scans=True,
        schema="commands",
        migrates=True,
    ) as pool:
        try:
            rewound = await rewind(pool, since)
        except RelayerRunning as running:
            print(f"financing relay rewind: {running}", file=sys.stderr)
            return 1
    waiting = (
        f"{rewound.waiting} event(s) in all wait behind it to be relayed once a relayer starts"
    )
    if not rewound.found:
        print(f"nothing to relay again: no event was recorded since {moment(since)}")
    elif not rewound.again:
        print(
            "nothing moved: the relayer's checkpoint is already before the events recorded"
            f" since {moment(since)}; {waiting}"
        )
    else:
        print(
            f"the relayer's checkpoint moved back: {rewound.again} event(s) relayed before,"
            f" recorded since {moment(rewound.first)}, are relayed again once a relayer"
            f" starts (consumers take those they processed as copies); {waiting}, those of"
            " an earlier rewind and those never relayed included"
        )
    return 0
