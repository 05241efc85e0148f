"""The benchmark's arithmetic: percentiles, batch times, histograms, /proc parsing, py-spy summaries."""

from __future__ import annotations

import math

import pytest

from bench.peers import parse_stat_cpu, parse_status_kb
from bench.profiles import area_of, frame_name, parse_collapsed, summarize_stacks
from bench.stats import batch_service_times, histogram, percentile, quantiles, ratio, summarize


def test_percentile_interpolates_like_numpy() -> None:
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 10
    assert percentile(values, 50) == 5.5
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile([3, 1, 2], 50) == 2  # unsorted input


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([7.5], 99) == 7.5
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summary_in_milliseconds() -> None:
    summary = summarize([0.001, 0.002, 0.003, 0.004])
    assert summary.count == 4
    as_json = summary.to_json()
    assert as_json["p50"] == 2.5 and as_json["minimum"] == 1.0 and as_json["maximum"] == 4.0
    assert as_json["mean"] == 2.5
    assert summarize([]).to_json()["p99"] is None  # NaN never reaches the JSON


def test_quantiles_are_named() -> None:
    assert list(quantiles([1.0, 2.0], (50, 99.9))) == ["p50", "p99.9"]


def test_batch_service_times_count_from_when_a_batch_could_start() -> None:
    # Batch 1 sent at 0.0, answered at 1.0; batch 2 sent at 0.1 (waited for batch 1), answered at 1.5;
    # batch 3 sent late at 2.0, answered at 2.4.
    times = batch_service_times([0.0, 0.1, 2.0], [1.0, 1.5, 2.4], started_at=0.0)
    assert times == pytest.approx([1.0, 0.5, 0.4])
    with pytest.raises(ValueError):
        batch_service_times([0.0], [], 0.0)


def test_histogram_bins_cover_every_value() -> None:
    bins = histogram([0.0, 0.1, 0.2, 1.0], buckets=4)
    assert sum(count for _, count in bins) == 4
    assert bins[-1][0] == pytest.approx(1.0)
    assert histogram([2.0, 2.0]) == [(2.0, 2)]
    assert histogram([]) == []


def test_ratio_guards() -> None:
    assert ratio(3, 2) == 1.5
    assert ratio(1, 0) is None and ratio(None, 1) is None


def test_proc_parsing() -> None:
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n"
    assert parse_status_kb(status, "VmHWM") == 123456
    assert parse_status_kb(status, "VmSwap") is None
    # The command name may hold spaces and parentheses; utime and stime are fields 14 and 15.
    stat = "42 (python -m (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0"
    import os

    assert parse_stat_cpu(stat) == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))


def test_profile_summary_by_component() -> None:
    lines = [
        "main (services/dispatcher/__main__.py:10);send (services/dispatcher/campaign.py:5);"
        "_request (aiohttp/client.py:100) 30",
        "main (services/dispatcher/__main__.py:10);execute (asyncio/client.py:3);"
        "pack_command (asyncio/connection.py:9) 10",
        "main (services/dispatcher/__main__.py:10);select (selectors.py:468) 60",  # idle: left out
        "garbage line without a count",
    ]
    summary = summarize_stacks(parse_collapsed(lines))
    assert summary.samples == 40
    assert dict(summary.by_area) == {"aiohttp": 30, "Redis client": 10}
    assert summary.self_time[0] == ("_request (aiohttp/client.py)", 30)
    assert frame_name("f (a/b/c/d.py:12)") == "f (c/d.py)"
    assert area_of(("x (json/decoder.py:1)",)) == "asyncio / other"


def test_a_profile_that_cannot_be_read_is_named(tmp_path) -> None:
    from bench.profiles import main

    missing = tmp_path / "nothing.txt"
    with pytest.raises(SystemExit) as refused:
        main([str(missing)])
    assert str(refused.value) == f"{missing}: cannot be read (No such file or directory)"
