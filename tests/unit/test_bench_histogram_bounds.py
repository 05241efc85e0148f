"""The load report's histogram labels each bin by its upper bound, and counts a value on a bound under
that bound, as ghz does (each bin: above the previous bound, up to its own, included)."""

from __future__ import annotations

from bench.stats import histogram


def test_a_value_on_a_bound_is_counted_under_that_bound() -> None:
    # 0 to 10 in ten bins of 1: 5 is at most 5, so under 5, not under 6 as it was.
    bins = histogram([0.0, 5.0, 10.0])
    assert bins[4] == (5.0, 1)
    assert bins[5] == (6.0, 0)
    assert [count for _, count in bins] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 1]


def test_every_value_is_at_most_its_bins_bound_and_above_the_one_before() -> None:
    values = [0.001 * n for n in range(1, 1001)] + [0.0105, 0.25, 0.5]
    bins = histogram(values)
    assert sum(count for _, count in bins) == len(values)
    assert bins[-1][0] == max(values)
    previous = min(values) - 1
    remaining = sorted(values)
    for upper, count in bins:
        taken, remaining = remaining[:count], remaining[count:]
        assert all(previous < v <= upper for v in taken)
        previous = upper
