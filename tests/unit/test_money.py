from __future__ import annotations

import decimal
import re
import subprocess
import sys
from decimal import Decimal
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from financing.domain.aggregates import Investor
from financing.domain.events import (
    BidOnInvoicePlacedEvent,
    InvestorCreatedEvent,
    InvestorFundsAddedEvent,
    InvestorFundsCommittedEvent,
    InvestorFundsReleasedEvent,
)
from financing.domain.money import (
    MAX_AMOUNT,
    InvalidAmount,
    add,
    decimal_places,
    from_double,
    negate,
    positive_amount,
    subtract,
    to_double,
    within_limits,
)


def test_a_double_reads_as_its_shortest_decimal_form() -> None:
    assert from_double(0.1) == Decimal("0.1")
    assert str(from_double(0.1)) == "0.1"
    assert from_double(20.0) == Decimal(20)


def test_point_one_plus_point_two_is_exactly_point_three() -> None:
    # docs/domain.md defect 1: float64 money drifts (0.1 + 0.2 != 0.3)
    assert from_double(0.1) + from_double(0.2) == Decimal("0.3")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_double_is_not_money(value: float) -> None:
    with pytest.raises(InvalidAmount, match="finite"):
        from_double(value)


@pytest.mark.parametrize(
    ("amount", "places"),
    [
        ("1", 0),
        ("100", 0),
        ("1E+2", 0),
        ("1.50", 1),
        ("0.1", 1),
        ("10.25", 2),
        ("10.001", 3),
        ("0.00", 0),
        ("-1.25", 2),
    ],
)
def test_decimal_places_count_only_significant_decimals(amount: str, places: int) -> None:
    assert decimal_places(Decimal(amount)) == places


def test_decimal_places_are_counted_beyond_the_context_precision() -> None:
    # 29 decimals: rounding to 28 digits would make this look like a whole number.
    assert decimal_places(Decimal("1.00000000000000000000000000001")) == 29


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.1, Decimal("0.1")),
        (10.0, Decimal("10")),
        (20.25, Decimal("20.25")),
        (999999999999.99, MAX_AMOUNT),
        (Decimal("0.01"), Decimal("0.01")),
        (Decimal("1.50"), Decimal("1.5")),
    ],
)
def test_a_positive_amount_with_at_most_two_decimals_is_accepted(
    value: float | Decimal, expected: Decimal
) -> None:
    assert positive_amount(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (0.0, "greater than 0"),
        (-0.0, "greater than 0"),
        (-5.0, "greater than 0"),
        (Decimal(0), "greater than 0"),
        (10.001, "at most 2 decimal places"),
        (Decimal("0.001"), "at most 2 decimal places"),
        (Decimal("1.00000000000000000000000000001"), "at most 2 decimal places"),
        (1e13, "at most"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (Decimal("NaN"), "finite"),
        (Decimal("-Infinity"), "finite"),
    ],
)
def test_an_amount_that_cannot_be_money_is_refused(value: float | Decimal, reason: str) -> None:
    with pytest.raises(InvalidAmount, match=reason):
        positive_amount(value)


@settings(max_examples=200, deadline=None)
@given(cents=st.integers(min_value=1, max_value=int(MAX_AMOUNT * 100)))
def test_every_amount_in_cents_survives_the_trip_through_a_double(cents: int) -> None:
    amount = Decimal(cents).scaleb(-2)
    assert from_double(to_double(amount)) == amount
    assert positive_amount(to_double(amount)) == amount


# Exact arithmetic without touching the process-wide decimal context


def test_importing_the_domain_leaves_the_process_wide_decimal_context_as_it_is() -> None:
    # In a fresh interpreter: this one has imported the domain long ago.
    script = (
        "import decimal\n"
        "import financing.domain.money, financing.domain.aggregates\n"
        "print(decimal.getcontext().prec, decimal.DefaultContext.prec)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["28", "28"]


def test_money_arithmetic_is_exact_whatever_the_callers_decimal_context() -> None:
    big, tiny = Decimal("1e15"), Decimal("1e-30")
    with decimal.localcontext(decimal.Context(prec=5)):
        assert add(big, tiny) == Decimal("1000000000000000.000000000000000000000000000001")
        assert subtract(big, tiny) == Decimal("999999999999999.999999999999999999999999999999")
        assert negate(add(big, tiny)) == Decimal("-1000000000000000.000000000000000000000000000001")


def test_an_investors_balances_stay_exact_to_46_digits_under_a_five_digit_context() -> None:
    investor_id, invoice_id = uuid4(), uuid4()
    big, tiny = Decimal("1e15"), Decimal("1e-30")
    with decimal.localcontext(decimal.Context(prec=5)):
        investor = Investor(investor_id).replay(
            [
                InvestorCreatedEvent(investor_id),
                InvestorFundsAddedEvent(investor_id, big),
                InvestorFundsAddedEvent(investor_id, tiny),
                BidOnInvoicePlacedEvent(investor_id, invoice_id, Decimal("3e-30")),
            ]
        )
        investor.place_bid(invoice_id, Decimal("123456789.000000000000000000000000000007"))
        investor.release_funds(tiny)
        investor.commit_funds(Decimal("2e-30"))
    assert investor.balance == Decimal("999999876543210.999999999999999999999999999992")
    assert investor.reserved == Decimal("123456789.000000000000000000000000000007")
    assert investor.committed == Decimal("2e-30")
    assert [type(event) for event in investor.changes] == [
        BidOnInvoicePlacedEvent,
        InvestorFundsReleasedEvent,
        InvestorFundsCommittedEvent,
    ]


@pytest.mark.parametrize(
    "amount", ["0", "0.00", "-5", "10.5", "1.50000", "999999999999.99", "-999999999999.99"]
)
def test_an_amount_in_cents_up_to_the_limit_either_side_of_zero_is_within_limits(
    amount: str,
) -> None:
    assert within_limits(Decimal(amount)) == Decimal(amount)


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        ("0.001", "must have at most 2 decimal places, got 0.001"),
        ("0.30000000000000004", "must have at most 2 decimal places"),
        ("1000000000000", "must be at most 999999999999.99, got 1000000000000"),
        ("9999999999999999.99", "must be at most 999999999999.99"),
        ("-1000000000000", "must be at least -999999999999.99, got -1000000000000"),
        ("1e999999999", "must be at most 999999999999.99, got 1E+999999999"),
        ("NaN", "finite"),
        ("Infinity", "finite"),
    ],
)
def test_an_amount_beyond_the_limits_is_refused_with_the_limit(amount: str, reason: str) -> None:
    with pytest.raises(InvalidAmount, match=re.escape(reason)):
        within_limits(Decimal(amount))


def test_a_refused_amount_of_many_digits_is_shown_short() -> None:
    with pytest.raises(InvalidAmount) as caught:
        within_limits(Decimal("1" * 10_000))
    assert str(caught.value) == f"must be at most {MAX_AMOUNT}, got {'1' * 37}..."
