"""--frequency-cap N/SECONDS past the proto's bounds is refused saying which bound (a number past uint32
failed as "invalid frequency_cap value: '3/86400000000'", one past 366 days only at the dispatcher)."""

from __future__ import annotations

import argparse

import pytest

from cli.commands.dispatch import frequency_cap


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("3/86400000000", "SECONDS must be at most 31622400 (366 days)"),
        ("3/31622401", "SECONDS must be at most 31622400 (366 days)"),
        ("4294967296/60", "N must be at most 4294967295"),
        ("0/60", "N and SECONDS must be at least 1"),
    ],
)
def test_a_cap_past_its_bounds_is_refused_naming_the_bound(given: str, said: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        frequency_cap(given)
    assert str(refused.value) == said


def test_the_bounds_themselves_are_taken() -> None:
    cap = frequency_cap("4294967295/31622400")
    assert (cap.max_messages, cap.window_seconds) == (4294967295, 31622400)
