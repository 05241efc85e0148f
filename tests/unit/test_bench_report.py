"""The benchmark's table, targets and JSON results, from a made-up run."""

from __future__ import annotations

import json

import pytest

from bench import report


def entry(family: str, system: str, size: int, throughput: float, rss: dict[str, int]) -> dict:
    return {
        "family": family,
        "connector": "gateway" if family == "sms" else "sendgrid",
        "system": system,
        "variant": "",
        "recipients": size,
        "throughput": throughput,
        "batch_ms": {"p50": 100.0, "p99": 150.0},
        "sent": size,
        "peak_rss_kb": rss,
        "cpu_us_per_message": {"resolver": 50.0, "dispatcher": 300.0} if system == "suite" else {"baseline": 120.0},
    }


def made_up_results() -> dict:
    small, large = 20_000, 200_000
    return {
        "started_at": "2025-01-01T00:00:00+00:00",
        "duration_seconds": 300,
        "machine": {"cores": 2, "python": "3.11", "commit": "abc"},
        "dispatch": [
            entry("sms", "suite", small, 900.0, {"resolver": 80_000, "dispatcher": 100_000}),
            entry("sms", "baseline", small, 1000.0, {"baseline": 60_000}),
            entry("sms", "suite", large, 700.0, {"resolver": 81_000, "dispatcher": 130_000}),
            entry("sms", "baseline", large, 1000.0, {"baseline": 60_000}),
            entry("email", "suite", small, 12_000.0, {"resolver": 80_000, "dispatcher": 100_000}),
            entry("email", "suite", large, 9_000.0, {"resolver": 80_000, "dispatcher": 110_000}),
        ],
        "resolver_overhead": [
            {
                "ids_per_call": 1,
                "calls": 10,
                "resolver_ms": {"p50": 2.0, "p99": 3.0},
                "direct_ms": {"p50": 0.5, "p99": 1.0},
                "overhead_ms": {"p50": 1.5, "p99": 2.0},
            },
            {
                "ids_per_call": 100,
                "calls": 10,
                "resolver_ms": {"p50": 6.0, "p99": 9.0},
                "direct_ms": {"p50": 1.0, "p99": 2.0},
                "overhead_ms": {"p50": 5.0, "p99": 7.0},
                "cpu_us_per_call": {"resolver": 4321.0},
            },
        ],
        "tracing": {
            "recipients": small,
            "off": {**entry("sms", "suite", small, 1000.0, {}), "variant": "tracing off"},
            "on": {**entry("sms", "suite", small, 950.0, {}), "variant": "tracing on"},
            "spans_exported": 123,
        },
    }


def by_name(targets: list[report.Target]) -> dict[str, report.Target]:
    return {t.name: t for t in targets}


def test_targets_are_computed_and_judged() -> None:
    targets = by_name(report.compute_targets(made_up_results()))
    assert targets["SMS suite / baseline @ 20,000"].value == 0.9
    assert targets["SMS suite / baseline @ 20,000"].met is True
    assert targets["SMS suite / baseline @ 200,000"].verdict() == "MISSED by 0.10"
    assert targets["Email suite / SMS baseline @ 20,000"].value == 12.0
    assert targets["Email suite / SMS baseline @ 200,000"].met is False
    assert targets["resolver overhead p99, 100 IDs (ms)"].verdict() == "MISSED by 2.00 ms"
    assert targets["tracing on / off"].value == 0.95 and targets["tracing on / off"].met
    assert targets["SMS dispatcher peak RSS 200,000 / 20,000"].value == 1.3
    assert targets["SMS dispatcher peak RSS 200,000 / 20,000"].met is False
    assert targets["Email dispatcher peak RSS 200,000 / 20,000"].met is True
    assert report.Target("x", None, ">=", 1).verdict() == "not measured"


def test_one_table_with_every_row() -> None:
    results = made_up_results()
    results["targets"] = [t.to_json() for t in report.compute_targets(results)]
    text = report.render(results)
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    widths = {len(line) for line in table}
    assert len(widths) == 1  # every row of the one table is aligned
    assert sum(line.startswith("| SMS via gateway: suite ") for line in table) == 2
    assert any("res 78 / disp 98" in line for line in table)  # peak RSS in MB
    assert any("res 50 / disp 300" in line for line in table)  # CPU per message
    assert any("resolver, 100 IDs: overhead" in line for line in table)
    assert any("resolver, 100 IDs: ResolveContacts" in line and "res 4,321 per call" in line for line in table)
    one_id = next(line for line in table if "resolver, 1 ID: ResolveContacts" in line)
    assert [cell.strip() for cell in one_id.split("|")][7] == "-"  # results without the figure
    assert any("suite, tracing on" in line and "123 spans" in line for line in table)
    assert any(">= 0.8" in line and "MISSED by 0.10" in line for line in table)


def test_the_title_says_which_cpu_the_dispatcher_was_bound_to() -> None:
    results = made_up_results()
    assert "dispatcher on" not in report.render(results).splitlines()[0]  # a run from before the option
    results["options"] = {"dispatcher_cpus": ["1"]}
    assert report.render(results).splitlines()[0].endswith(", dispatcher on CPU 1")
    results["options"] = {"dispatcher_cpus": []}
    assert report.render(results).splitlines()[0].endswith(", dispatcher on any CPU")


def test_cpu_column_adds_the_whole_machine_when_peers_and_redis_were_measured() -> None:
    suite = entry("sms", "suite", 20_000, 900.0, {})
    suite["cpu_us_per_message"] = {
        "resolver": 40.0,
        "dispatcher": 180.0,
        "pii_api": 4.5,
        "providers": 75.0,
        "redis": 30.0,
    }
    baseline = entry("sms", "baseline", 20_000, 1000.0, {})
    baseline["cpu_us_per_message"] = {"baseline": 95.0, "pii_api": 4.0, "providers": 74.0}
    assert report._cpu(suite) == "res 40 / disp 180 / all 330"
    assert report._cpu(baseline) == "95 / all 173"
    assert report._cpu(entry("sms", "baseline", 20_000, 1000.0, {})) == "120"  # older results: no total


def test_results_json_and_latest(tmp_path) -> None:
    results = made_up_results()
    results["targets"] = [t.to_json() for t in report.compute_targets(results)]
    path = report.write_results(results, tmp_path / "results", "20250101T000000Z")
    assert path.name == "20250101T000000Z.json"
    saved = json.loads(path.read_text())
    assert saved == json.loads((tmp_path / "results" / "latest.json").read_text())
    assert saved["targets"][0]["name"].startswith("SMS suite / baseline")
    assert {"value", "op", "threshold", "met", "verdict"} <= set(saved["targets"][0])


def test_table_renders_separators_and_alignment() -> None:
    text = report.render_table(("a", "b"), [("x", "1"), report.SEPARATOR, ("longer", "22")])
    lines = text.splitlines()
    assert lines[0] == "| a      |  b |"
    assert lines[3].startswith("|--")
    assert lines[4] == "| longer | 22 |"


def test_a_baseline_run_in_two_halves_is_one_row_of_their_sums() -> None:
    from bench.run import baseline_entry

    def part(recipients: int, seconds: float, cpu: float, providers: float, rss: int) -> dict:
        return {
            "recipients": recipients,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "batch_times": [seconds / 2, seconds / 2],
            "statuses": {"200": recipients - 1, "500": 1},
            "peak_rss_kb": rss,
            "peers_cpu_seconds": {"providers": providers, "pii_api": 0.01},
        }

    # Before the suite the machine was fast, after it slow: the row is the whole, not either half.
    row = baseline_entry("sms", "gateway", [part(10_000, 1.0, 1.0, 0.8, 60_000), part(10_000, 3.0, 2.0, 1.2, 61_000)])
    assert (row["recipients"], row["seconds"], row["throughput"], row["parts"]) == (20_000, 4.0, 5_000.0, 2)
    assert row["cpu_us_per_message"] == {"baseline": 150.0, "providers": 100.0, "pii_api": 1.0}
    assert (row["sent"], row["statuses"], row["peak_rss_kb"]) == (
        19_998,
        {"200": 19_998, "500": 2},
        {"baseline": 61_000},
    )
    assert row["batch_ms"]["count"] == 4


def test_tracing_runs_in_two_halves_per_side_are_one_row_each() -> None:
    from bench.run import suite_entry

    def part(recipients: int, seconds: float, dispatcher: float, rss: int | None) -> dict:
        return {
            "recipients": recipients,
            "seconds": seconds,
            "batch_times": [seconds / 4] * 4,
            "sent": recipients,
            "statuses": {"SENT": recipients},
            "peak_rss_kb": {"resolver": 90_000, "dispatcher": rss},
            "cpu_seconds": {"dispatcher": dispatcher, "providers": seconds / 2},
        }

    row = suite_entry("sms", "gateway", "tracing on", [part(10_000, 2.0, 1.5, 130_000), part(10_000, 3.0, 2.5, None)])
    assert (row["system"], row["variant"], row["recipients"], row["parts"]) == ("suite", "tracing on", 20_000, 2)
    assert (row["seconds"], row["throughput"], row["sent"]) == (5.0, 4_000.0, 20_000)
    assert row["cpu_us_per_message"] == {"dispatcher": 200.0, "providers": 125.0}
    assert row["peak_rss_kb"] == {"resolver": 90_000, "dispatcher": 130_000}
    assert row["batch_ms"]["count"] == 8


def test_tracing_alternates_off_and_on_twice_so_a_bending_drift_reads_alike_on_both_sides(tmp_path) -> None:
    import asyncio

    from bench.run import TRACING_ROUNDS, Bench, RunOptions

    bench = Bench(RunOptions(sizes=(20_000,), results_dir=tmp_path, progress=False))
    runs: list[tuple[str, int]] = []
    # The machine slows steadily, then speeds up again: each run takes its position's time.
    pace = iter([1.0, 1.2, 1.4, 1.6, 1.6, 1.4, 1.2, 1.0])

    async def suite_part(family: str, size: int, trace_file: str = "", variant: str = "") -> dict:
        runs.append(("on" if trace_file else "off", size))
        seconds = next(pace) * size / 5_000
        return {
            "recipients": size,
            "seconds": seconds,
            "batch_times": [seconds],
            "sent": size,
            "statuses": {"SENT": size},
            "peak_rss_kb": {"resolver": 1, "dispatcher": 1},
            "cpu_seconds": {"dispatcher": 1.0},
        }

    bench.suite_part = suite_part  # type: ignore[method-assign]
    tracing = asyncio.run(bench.tracing())
    assert TRACING_ROUNDS == 2
    assert runs == [("off", 10_000), ("on", 10_000), ("on", 10_000), ("off", 10_000)] * 2
    assert (tracing["recipients"], tracing["on"]["recipients"], tracing["off"]["parts"]) == (40_000, 40_000, 4)
    assert tracing["ratio"] == 1.0


def test_cpu_budgets_compare_the_whole_machines_per_sms() -> None:
    results = made_up_results()
    suite, baseline = results["dispatch"][0], results["dispatch"][1]
    # The machine ran 20 % slower during the suite: the providers' CPU per SMS says so and is taken out.
    suite["cpu_us_per_message"] = {"dispatcher": 240.0, "resolver": 36.0, "providers": 180.0, "redis": 24.0}
    baseline["cpu_us_per_message"] = {"baseline": 170.0, "providers": 150.0}
    # 200,000: no peers measured, so no totals and no row
    assert report.budget_ratios(results) == [(20_000, 0.8)]
    table = report.render(results)
    row = next(line for line in table.splitlines() if "SMS CPU budgets, baseline / suite @ 20,000" in line)
    assert row.rstrip(" |").endswith("0.80")
    assert "200,000" not in "".join(line for line in table.splitlines() if "CPU budgets" in line)


def test_the_tracing_budget_takes_the_machines_speed_out_of_on_and_off() -> None:
    def side(variant: str, dispatcher: float, providers: float) -> dict:
        row = entry("sms", "suite", 20_000, 5_000.0, {"resolver": 90_000, "dispatcher": 130_000})
        row["variant"] = variant
        row["cpu_us_per_message"] = {"dispatcher": dispatcher, "providers": providers}
        return row

    # "on" ran on a slower stretch: its providers dearer too. In their units: off 2.5, on 2.6.
    results = {"tracing": {"off": side("tracing off", 150.0, 100.0), "on": side("tracing on", 192.0, 120.0)}}
    assert report.tracing_budget_ratio(results) == pytest.approx(2.5 / 2.6)
    row = next(line for line in report.render(results).splitlines() if "Tracing CPU budget, off / on" in line)
    assert row.rstrip(" |").endswith("0.96")
    results["tracing"]["on"]["cpu_us_per_message"]["providers"] = 0  # measured without the peers
    assert report.tracing_budget_ratio(results) is None


def test_the_bare_loops_own_email_over_sms_rate_is_shown_beside_the_email_target() -> None:
    results = made_up_results()
    assert report.bare_email_ratios(results) == []  # no Email baseline: no row
    results["dispatch"].append(entry("email", "baseline", 20_000, 7_500.0, {"baseline": 60_000}))
    tracing_off = {**entry("email", "baseline", 200_000, 99_000.0, {}), "variant": "tracing off"}
    results["dispatch"].append(tracing_off)  # a variant is not the bare loop's own rate
    assert report.bare_email_ratios(results) == [(20_000, 7.5)]
    row = next(line for line in report.render(results).splitlines() if "Email baseline / SMS baseline" in line)
    assert "@ 20,000" in row
    assert row.rstrip(" |").endswith("7.50")


def test_a_miss_too_small_for_two_decimals_is_shown_with_four() -> None:
    target = report.Target("tracing on / off", 0.8997, ">=", 0.9)
    assert target.verdict() == "MISSED by 0.0003"
    assert report._value(0.8997, 0.9) == "0.8997"
    assert report._value(0.87, 0.9) == "0.87"
    assert report.Target("x", 0.97, ">=", 0.9).verdict() == "met"


def test_an_earlier_run_is_shown_from_its_file_or_folder(tmp_path, capsys) -> None:
    results = made_up_results()
    results["schema"] = 1
    report.write_results(results, tmp_path / "results", "20250101T000000Z")
    assert report.main([str(tmp_path / "results")]) == 0
    assert "SMS suite / baseline @ 20,000" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "(FileNotFoundError)"), ("{bad", "(JSONDecodeError)"), ("{}", "(no schema 1)"), ("[1]", "(no schema 1)")],
)
def test_what_is_not_a_results_file_is_refused_naming_it(content, says, tmp_path, capsys) -> None:
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    assert report.main([str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: not a benchmark results file {says}\n"


def test_the_bare_servers_reading_is_shown_beside_the_resolvers_without_a_target() -> None:
    results = made_up_results()
    hundred = results["resolver_overhead"][1]
    hundred["bare_resolver_ms"] = {"p50": 3.0, "p99": 4.5}
    hundred["bare_overhead_ms"] = {"p50": 2.0, "p99": 2.5}
    hundred["cpu_us_per_call"]["bare_resolver"] = 1234.0
    results["targets"] = [t.to_json() for t in report.compute_targets(results)]
    table = report.render(results).splitlines()
    assert any("resolver, 100 IDs: bare gRPC server" in line and "bare 1,234 per call" in line for line in table)
    assert any("resolver, 100 IDs: bare server's overhead" in line and "2.5" in line for line in table)
    reading = next(line for line in table if line.startswith("| bare server's overhead p99, 100 IDs (ms)"))
    assert [cell.strip() for cell in reading.split("|")][8:10] == ["", "2.50"]  # no target, only the reading
    assert "bare server's overhead p99" not in {t["name"] for t in results["targets"]}
    # Results from before the bare server was measured have none of its rows.
    assert not any("bare" in line for line in report.render(made_up_results()).splitlines()[:-1])


def test_the_email_greeting_by_name_is_a_row_of_its_own_and_no_target_reads_it() -> None:
    results = made_up_results()
    named = {**entry("email", "suite", 20_000, 3_000.0, {"resolver": 1, "dispatcher": 900_000}), "variant": "by name"}
    results["dispatch"].insert(0, named)  # first, so a look-up by family and size alone would find it
    targets = by_name(report.compute_targets(results))
    assert targets["Email suite / SMS baseline @ 20,000"].value == 12.0
    assert targets["Email dispatcher peak RSS 200,000 / 20,000"].met is True
    table = report.render(results).splitlines()
    assert any(line.startswith("| Email via sendgrid: suite, by name ") and "3,000" in line for line in table)
