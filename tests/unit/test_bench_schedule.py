"""The load test's schedules (ghz's --load-schedule): the rate at each moment and when each call is due."""

from __future__ import annotations

import itertools
import math

import pytest

from bench.schedule import Schedule


def due(schedule: Schedule, calls: int) -> list[float]:
    return list(itertools.islice(schedule.tick_times(), calls))


def test_const_is_one_rate_with_the_calls_evenly_spaced_from_the_start() -> None:
    plan = Schedule(start=4.0)
    assert due(plan, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert plan.rate_at(0) == plan.rate_at(3600) == 4.0
    assert plan.calls_by(2.1) == pytest.approx(8.4)
    assert plan.windows(10) == []


def test_step_adds_its_step_every_step_duration_until_the_end_then_holds() -> None:
    plan = Schedule("step", start=2, step=2, step_seconds=1, end=6)
    assert [plan.rate_at(t) for t in (0, 0.99, 1, 1.99, 2, 3, 100)] == [2, 2, 4, 4, 6, 6, 6]
    # 2 calls in the first second, 4 in the next, then 6 a second.
    assert due(plan, 13) == pytest.approx(
        [0, 0.5, 1, 1.25, 1.5, 1.75, 2, 2 + 1 / 6, 2 + 2 / 6, 2.5, 2 + 4 / 6, 2 + 5 / 6, 3]
    )
    assert plan.calls_by(3.5) == pytest.approx(2 + 4 + 6 + 3)


def test_a_step_past_the_end_is_cut_to_it() -> None:
    plan = Schedule("step", start=50, step=30, step_seconds=5, end=100)  # 50, 80, then 100 (not 110)
    assert [plan.rate_at(t) for t in (0, 5, 10, 60)] == [50, 80, 100, 100]


def test_a_step_down_to_a_max_duration_holds_the_rate_reached_then() -> None:
    # ghz's example: from 200 calls/s, 10 fewer every 5 s, held from 40 s on (at 120).
    plan = Schedule("step", start=200, step=-10, step_seconds=5, max_seconds=40)
    assert [plan.rate_at(t) for t in (0, 5, 39.9, 40, 1000)] == [200, 190, 130, 120, 120]
    assert plan.calls_by(45) == pytest.approx(5 * sum(range(200, 120, -10)) + 5 * 120)
    # A max duration between steps holds the step it falls in.
    assert Schedule("step", start=10, step=5, step_seconds=5, max_seconds=12).rate_at(30) == 20


def test_line_rises_continuously_and_its_calls_follow_the_area_under_it() -> None:
    plan = Schedule("line", start=1, step=2)  # rate 1 + 2t: t + t² calls by t
    assert [plan.rate_at(t) for t in (0, 0.5, 3)] == [1, 2, 7]
    ticks = due(plan, 7)
    assert ticks == pytest.approx([(-1 + math.sqrt(1 + 4 * n)) / 2 for n in range(7)])
    assert [plan.calls_by(t) for t in ticks] == pytest.approx(range(7))
    # Each second's window holds the rate the line set there on average.
    assert plan.windows(2.5) == [(0, 1, 2), (1, 2, 4), (2, 2.5, 5.5)]


def test_line_down_holds_its_end() -> None:
    plan = Schedule("line", start=10, step=-2, end=4)  # 10 to 4 in 3 s, then 4 a second
    assert [plan.rate_at(t) for t in (0, 1.5, 3, 9)] == [10, 7, 4, 4]
    assert plan.calls_by(5) == pytest.approx(30 - 9 + 2 * 4)
    ticks = due(plan, 40)
    assert ticks[29] == pytest.approx(5.0) and ticks[30] - ticks[29] == pytest.approx(0.25)


def test_line_with_a_max_duration_holds_the_rate_it_reached() -> None:
    plan = Schedule("line", start=5, step=5, end=100, max_seconds=2)
    assert [plan.rate_at(t) for t in (1, 2, 50)] == [10, 15, 15]


def test_step_windows_are_its_steps_the_last_cut_at_the_end_of_the_run() -> None:
    plan = Schedule("step", start=10, step=10, step_seconds=0.5, end=30)
    assert plan.windows(1.75) == [(0, 0.5, 10), (0.5, 1, 20), (1, 1.5, 30), (1.5, 1.75, 30)]
    assert plan.windows(1.0) == [(0, 0.5, 10), (0.5, 1, 20)]  # no empty window at 1.0


@pytest.mark.parametrize(
    "plan",
    [
        Schedule(start=20.0),
        Schedule("step", start=50, step=-10, step_seconds=5, end=10, max_seconds=12),
        Schedule("line", start=5, step=5, end=0.0, max_seconds=0.0),
    ],
)
def test_the_json_names_the_schedule_and_reads_back(plan: Schedule) -> None:
    assert Schedule.from_json(plan.to_json()) == plan


def test_the_summary_line_says_what_ran() -> None:
    assert Schedule(start=40).describe() == "const, 40 calls/s"
    assert Schedule(start=0).describe() == "const, as fast as the clients go (-r 0)"
    assert (
        Schedule("step", start=50, step=10, step_seconds=5, end=150).describe()
        == "step, from 50 calls/s, +10 every 5 s, held at 150"
    )
    assert (
        Schedule("line", start=200, step=-2, max_seconds=40).describe()
        == "line, from 200 calls/s, -2 a second, held from 40 s"
    )
