"""The side-by-side bench's alternation and its count of blocks won."""

from __future__ import annotations

from scripts.bench_pair import after_lower, turns


def test_turns_alternate_so_that_each_side_goes_first_in_every_other_pair() -> None:
    assert turns(3) == ["before", "after", "after", "before", "before", "after"]
    assert turns(0) == []


def test_each_side_gets_as_many_turns_as_asked() -> None:
    order = turns(7)

    assert order.count("before") == order.count("after") == 7


def test_after_lower_counts_the_pairs_of_neighbouring_blocks_the_after_side_won() -> None:
    assert after_lower([10.0, 12.0, 9.0, 11.0], [9.0, 12.5, 8.0, 11.0]) == (2, 4)


def test_after_lower_pairs_only_blocks_that_both_sides_ran() -> None:
    assert after_lower([10.0, 12.0], [9.0]) == (1, 1)
