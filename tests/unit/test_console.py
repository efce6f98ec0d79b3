"""What the operator's commands print of what publishers wrote: one line stays one line."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from financing.application.moments import moment
from financing.entrypoints.cli.console import shown, table
from financing.entrypoints.cli.events import _row_lines


def test_what_a_terminal_would_act_on_is_escaped() -> None:
    """Regression: a message id with a newline and an escape sequence forged lines of
    `dead-letters list`, and a body with `\\r` and `ESC[2K` overwrote `tail`'s line."""
    assert shown("m-1\n2026-01-01  SellInvoice") == "m-1\\n2026-01-01  SellInvoice"
    assert shown("\r\x1b[2Kfake") == "\\r\\x1b[2Kfake"
    assert shown("a\tb\u2028c\x7f\x85") == "a\\tb\\u2028c\\x7f\\x85"


def test_printable_text_is_kept_as_it_is() -> None:
    text = 'InvoiceFinancedEvent  {"Name":"Société Générale ✓"}'
    assert shown(text) is text


def test_a_table_row_stays_one_line_whatever_its_cells_hold() -> None:
    rows = table(("NAME", "MESSAGE ID"), [("SellInvoice", "m-1\nforged  row")])
    assert len(rows) == 2
    assert rows[1] == "SellInvoice  m-1\\nforged  row"


def test_a_time_beyond_what_utc_holds_is_shown_as_written() -> None:
    """Regression: a publisher's `recorded_at` of 9999-12-31T23:59:59-01:00 (a valid time,
    after the last UTC date) ended `financing tail` with an OverflowError."""
    late = datetime.fromisoformat("9999-12-31T23:59:59-01:00")
    assert moment(late) == "9999-12-31T23:59:59.000-01:00"
    assert moment(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000Z"


def test_an_amount_of_a_read_model_row_is_shown_in_plain_notation() -> None:
    """Regression: `financing events` showed a balance of 10000 as `1E+4` (the driver's
    Decimal), beside `{"Amount":10000}` in the event's body."""
    row = ("investors", {"balance": Decimal("1E+4"), "reserved": Decimal("0.50")})
    lines = _row_lines(row, True)
    assert [line.split() for line in lines[1:]] == [["balance", "10000"], ["reserved", "0.5"]]
