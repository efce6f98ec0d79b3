"""Ids as text: a UUID is read only in the forms the reference's Go services accept
(`uuid.Parse`), with ASCII hex digits: hyphenated, the same with `urn:uuid:` (any case)
before it or braces around it, or 32 digits alone.

Python's `UUID()` is more lenient: it drops every hyphen and then reads the digits with
`int(..., 16)`, which also takes a `0x` prefix, a sign, underscores, surrounding
whitespace and non-ASCII digits; none of those is an id here.
"""

from __future__ import annotations

import re
from uuid import UUID, SafeUUID

_hyphenated = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
).fullmatch
_digits = re.compile(r"[0-9a-fA-F]{32}").fullmatch
_new = object.__new__
_set = object.__setattr__
_UNKNOWN = SafeUUID.unknown


def parse_id(text: str) -> UUID:
    """The UUID `text` writes; ValueError when it is not one."""
    if _hyphenated(text) is not None:
        # Built as `UUID(int=...)` builds it (its two slots), without the checks of its
        # constructor, which the match has made: this is the form of every id in a body
        # the service reads and every event a rebuild replays.
        uuid = _new(UUID)
        _set(uuid, "int", int(text.replace("-", ""), 16))
        _set(uuid, "is_safe", _UNKNOWN)
        return uuid
    inner = text
    if len(text) == 45 and text[:9].lower() == "urn:uuid:":
        inner = text[9:]
    elif len(text) == 38 and text[0] == "{" and text[-1] == "}":
        inner = text[1:-1]
    if _hyphenated(inner) is None and _digits(text) is None:
        raise ValueError(f"{text[:64]!r} is not a UUID")
    return UUID(inner)
