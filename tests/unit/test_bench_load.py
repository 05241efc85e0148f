"""The customers a load run's calls send to."""

from __future__ import annotations

import pytest

from bench.load import customer_numbers


def sent_to(calls: int, per: int, customers: int) -> list[int]:
    return [number for call in range(calls) for number in customer_numbers(call, per, customers)]


@pytest.mark.parametrize(
    ("customers", "per"), [(1, 1), (2, 1), (10, 1), (10, 3), (10, 5), (10, 9), (10, 10), (7, 4), (20_000, 10)]
)
def test_every_customer_in_turn_within_range(customers: int, per: int) -> None:
    sequence = sent_to(3 * customers, per, customers)
    assert all(1 <= number <= customers for number in sequence)
    # In turn: 1, 2, ..., customers, 1, 2, ... with no gap and no repeat before the wrap.
    assert sequence == [k % customers + 1 for k in range(len(sequence))]
    assert set(sequence) == set(range(1, customers + 1))


def test_calls_wrap_past_the_last_customer() -> None:
    assert customer_numbers(0, 3, 7) == [1, 2, 3]
    assert customer_numbers(2, 3, 7) == [7, 1, 2]
    assert customer_numbers(3, 3, 7) == [3, 4, 5]


def test_more_recipients_than_customers_stay_in_range() -> None:
    assert customer_numbers(0, 5, 2) == [1, 2, 1, 2, 1]
    assert customer_numbers(1, 5, 2) == [2, 1, 2, 1, 2]
