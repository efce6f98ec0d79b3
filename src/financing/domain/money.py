"""Exact money.

Amounts are `decimal.Decimal` everywhere inside the service; floats exist only
at the gRPC and JSON edges, where a double is read through its shortest decimal
form (so 0.1 is exactly 0.1, never 0.1000000000000000055...).
"""

from __future__ import annotations

import decimal
import math
from decimal import Decimal, InvalidOperation

ZERO = Decimal(0)

# Amounts are at most MAX_AMOUNT in cents, but an event store written before
# messages were held to that (codec.py) may hold amounts of up to 47
# significant digits (up to 1e16, with up to 31 decimals), and balances are
# sums of them. Decimal arithmetic rounds to its context's precision, 28
# digits by default, which would make balances drift. Money arithmetic goes
# through this context of its own (add, subtract, negate), whose precision
# keeps every sum exact; the process-wide decimal context is left as it is.
MONEY_PRECISION = 100
EXACT = decimal.Context(
    prec=MONEY_PRECISION,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

# Money is kept in cents at most; anything finer is rejected at the edge.
MAX_DECIMAL_PLACES = 2
# Large enough for any invoice, small enough that every amount and every sum of
# amounts survives the trip through a JSON number (a double) unchanged.
MAX_AMOUNT = Decimal("999999999999.99")


def add(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.add(a, b)


def subtract(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.subtract(a, b)


def negate(a: Decimal) -> Decimal:
    return EXACT.minus(a)


class InvalidAmount(ValueError):
    """An amount that cannot be money: not finite, not positive, too precise, too large."""


def from_double(value: float) -> Decimal:
    """The exact decimal a double stands for in its shortest form (0.1 -> Decimal('0.1'))."""
    if not math.isfinite(value):
        raise InvalidAmount("must be a finite number")
    return Decimal(repr(value))


def to_double(amount: Decimal) -> float:
    """The double whose shortest form is `amount` (exact for amounts up to MAX_AMOUNT)."""
    return float(amount)


def decimal_places(amount: Decimal) -> int:
    """Significant decimal places (1.50 has 1). Exact: `normalize()` would round
    to the context's 28 digits and hide a long tail of decimals."""
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)
    significant = "".join(map(str, digits)).rstrip("0")
    if not significant:
        return 0
    return max(0, -exponent - (len(digits) - len(significant)))


def positive_amount(value: float | Decimal) -> Decimal:
    """Validate a money amount supplied by a client: finite, > 0, at most 2 decimals."""
    try:
        amount = from_double(value) if isinstance(value, float) else Decimal(value)
    except InvalidOperation as exc:
        raise InvalidAmount("must be a number") from exc
    if not amount.is_finite():
        raise InvalidAmount("must be a finite number")
    if amount <= ZERO:
        raise InvalidAmount(f"must be greater than 0, got {amount}")
    return within_limits(amount)


def within_limits(amount: Decimal) -> Decimal:
    """`amount`, if money can be it: finite, with at most MAX_DECIMAL_PLACES decimal
    places, and at most MAX_AMOUNT either side of zero; InvalidAmount naming the limit
    otherwise: the rule for a client's amounts (with `positive_amount`). Whether an
    amount may be zero or negative is for the caller (a client's must be > 0) or the
    domain to say."""
    if not amount.is_finite():
        raise InvalidAmount("must be a finite number")
    if decimal_places(amount) > MAX_DECIMAL_PLACES:
        raise InvalidAmount(
            f"must have at most {MAX_DECIMAL_PLACES} decimal places, got {shown(amount)}"
        )
    return within_range(amount)


def within_range(amount: Decimal) -> Decimal:
    """`amount`, if at most MAX_AMOUNT either side of zero; InvalidAmount otherwise. The
    rule for amounts in messages (codec.py), which float-based producers, the
    reference's among them, write with more than cents (0.1 + 0.2 as
    0.30000000000000004): those are kept exactly, as written."""
    if amount.copy_abs() > MAX_AMOUNT:
        limit = f"at least {-MAX_AMOUNT}" if amount < ZERO else f"at most {MAX_AMOUNT}"
        raise InvalidAmount(f"must be {limit}, got {shown(amount)}")
    return amount


def shown(amount: Decimal, most: int = 40) -> str:
    """The amount as a reason shows it: a message's amount may have thousands of digits."""
    text = str(amount)
    return text if len(text) <= most else f"{text[: most - 3]}..."


def canonical(amount: Decimal) -> str:
    """Plain decimal notation without trailing zeros (15.0 -> 15), exactly: no rounding."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
