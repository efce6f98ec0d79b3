"""One way of writing a time for people: in UTC, to the millisecond."""

from __future__ import annotations

from datetime import UTC, datetime


def moment(at: datetime | None) -> str:
    """A time in UTC to the millisecond, as every command prints it."""
    if at is None:
        return "-"
    try:
        at = at.astimezone(UTC)
    except OverflowError:  # a publisher's time at the end of the calendar: shown as written
        return at.isoformat(timespec="milliseconds")
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
