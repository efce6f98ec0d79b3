"""Ids read from text: the forms Go's uuid.Parse accepts, and nothing Python's UUID()
would also let through."""

from __future__ import annotations

import copy
import pickle
from uuid import UUID

import pytest

from financing.domain.ids import parse_id

ID = UUID("285b43fc-6745-4718-9d32-31572ac0fe01")
DIGITS = ID.hex


@pytest.mark.parametrize(
    "text",
    [
        str(ID),
        str(ID).upper(),
        f"urn:uuid:{ID}",
        f"URN:UUID:{ID}",
        f"{{{ID}}}",
        DIGITS,
        DIGITS.upper(),
    ],
)
def test_the_forms_the_reference_accepts_are_read(text: str) -> None:
    assert parse_id(text) == ID


@pytest.mark.parametrize(
    "text",
    [
        "0x" + DIGITS[2:],  # a prefix int() reads
        "+" + DIGITS[1:],  # a sign
        " " + DIGITS[1:],  # surrounding whitespace
        DIGITS[:31] + " ",
        DIGITS[:4] + "_" + DIGITS[5:],  # an underscore between digits
        "\u0663" + DIGITS[1:],  # a non-ASCII digit
        DIGITS[:8] + "-" + DIGITS[8:],  # a hyphen, but not the others
        f"urn:uuid:{DIGITS}",  # the prefix before undashed digits
        f"{{{DIGITS}}}",  # braces around undashed digits
        f"uuid:{ID}",
        f"{ID}0",
        "",
    ],
)
def test_anything_else_is_not_an_id(text: str) -> None:
    with pytest.raises(ValueError, match="is not a UUID"):
        parse_id(text)


def test_an_id_read_from_text_is_a_uuid_like_any_other() -> None:
    read = parse_id(str(ID))

    assert type(read) is UUID
    assert read == ID and hash(read) == hash(ID) and str(read) == str(ID)
    assert read.version == ID.version and read.is_safe is ID.is_safe
    assert pickle.loads(pickle.dumps(read)) == ID
    assert copy.deepcopy(read) == ID
