"""`python -m bench compare`: runs side by side, matched by what they measured."""

from __future__ import annotations

import json

import pytest

from bench import compare
from bench.cli import main


def run(commit: str, throughput: float, dispatcher_us: float, providers_us: float, with_email: bool = True) -> dict:
    sms = {
        "family": "sms",
        "connector": "gateway",
        "system": "suite",
        "variant": "",
        "recipients": 20_000,
        "throughput": throughput,
        "batch_ms": {"p50": 100.0, "p99": 150.0},
        "cpu_us_per_message": {"dispatcher": dispatcher_us, "providers": providers_us},
    }
    email = {**sms, "family": "email", "connector": "sendgrid", "cpu_us_per_message": {"dispatcher": 50.0}}
    return {
        "schema": 1,
        "started_at": "2026-11-29T09:00:00+00:00",
        "machine": {"commit": commit},
        "dispatch": [sms, email] if with_email else [sms],
        "resolver_overhead": [{"ids_per_call": 100, "overhead_ms": {"p50": 2.0, "p99": 4.0}, "cpu_us_per_call": {}}],
        "targets": [{"name": "SMS suite / baseline @ 20,000", "value": 0.5}],
    }


def rows_by_metric(rows: list[tuple[str, ...]]) -> dict[tuple[str, str], tuple[str, ...]]:
    """(measurement, metric) → the row, the measurement carried down over its continuation rows."""
    found, title = {}, ""
    for row in rows:
        if row:
            title = row[0] or title
            found[(title, row[1])] = row
    return found


def test_runs_are_matched_and_the_change_is_last_against_first() -> None:
    # The second run's machine was slower (the providers spent 20 % more) and so was its code:
    # per message over the providers', the dispatcher went from 2.00 to 2.50.
    rows = rows_by_metric(compare.compare_rows([run("aaa", 1000.0, 200.0, 100.0), run("bbb", 800.0, 300.0, 120.0)]))
    sms = "SMS via gateway: suite x 20,000"
    assert rows[(sms, "msg/s")][2:] == ("1,000", "800", "-20 %")
    assert rows[(sms, "dispatcher ÷ providers")][2:] == ("2.00", "2.50", "+25 %")
    assert rows[(sms, "CPU us/msg all")][2:] == ("300", "420", "+40 %")
    assert rows[("resolver, 100 IDs a call", "overhead p99 ms")][2:] == ("4.0", "4.0", "+0 %")
    assert rows[("SMS suite / baseline @ 20,000", "target value")][2:] == ("0.50", "0.50", "+0 %")
    # Email measured no providers' CPU: no ÷ providers rows for it.
    assert ("Email via sendgrid: suite x 20,000", "dispatcher ÷ providers") not in rows


def test_a_measurement_one_run_lacks_shows_a_dash_and_no_change() -> None:
    rows = rows_by_metric(
        compare.compare_rows([run("aaa", 1000.0, 200.0, 100.0, with_email=False), run("bbb", 900.0, 200.0, 100.0)])
    )
    assert rows[("Email via sendgrid: suite x 20,000", "msg/s")][2:] == ("-", "900", "")


def test_files_and_directories_are_read_and_anything_else_is_named(tmp_path, capsys) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "latest.json").write_text(json.dumps(run("aaa", 1000.0, 200.0, 100.0)))
    (tmp_path / "new.json").write_text(json.dumps(run("bbb", 1100.0, 200.0, 100.0)))
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "new.json")]) == 0
    out = capsys.readouterr().out
    assert "aaa 2026-11-29T09:00" in out and "bbb 2026-11-29T09:00" in out and "+10 %" in out
    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "notes.json")]) == 2
    assert "notes.json: not a benchmark results file" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "old")]) == 2
    assert "usage: python -m bench compare OLD NEW" in capsys.readouterr().err


def test_runs_through_different_sms_connectors_are_not_paired() -> None:
    # One run sent its SMS through the custom gateway, the other through Twilio (`--sms-connector`):
    # different provider requests, so neither row's change is the code's.
    twilio = run("bbb", 700.0, 200.0, 100.0, with_email=False)
    twilio["dispatch"][0]["connector"] = "twilio"
    rows = rows_by_metric(compare.compare_rows([run("aaa", 1000.0, 200.0, 100.0, with_email=False), twilio]))
    assert rows[("SMS via gateway: suite x 20,000", "msg/s")][2:] == ("1,000", "-", "")
    assert rows[("SMS via twilio: suite x 20,000", "msg/s")][2:] == ("-", "700", "")


def load_report(commit: str, rps: float, p99: float, **settings: object) -> dict:
    return {
        "schema": 1,
        "kind": "load",
        "started_at": "2026-12-03T09:00:00+00:00",
        "machine": {"commit": commit},
        "target": "127.0.0.1:50051",
        "concurrency": 8,
        "load_schedule": {"kind": "const", "rate": 100.0},
        "recipients_per_call": 1,
        "count": 1000,
        "rps": rps,
        "messages_per_second": rps,
        "error_rate": 0.0,
        "recipient_error_rate": 0.01,
        "latency_ms": {"count": 1000, "mean": 5.0, "minimum": 1.0, "maximum": 40.0, "p50": 4.0, "p90": 8.0, "p99": p99},
        "start_delay_ms": {"p99": 0.5},
        "cpu_ms_per_call": {"dispatcher": 1.5},
        "peak_rss_kb": {"dispatcher": 131072},
        **settings,
    }


def test_load_reports_compare_rates_latencies_and_cpu_and_name_the_settings_that_differ() -> None:
    rows = rows_by_metric(compare.load_rows([load_report("aaa", 100.0, 20.0), load_report("bbb", 90.0, 30.0)]))
    assert rows[("calls", "calls/s")][2:] == ("100.00", "90.00", "-10 %")
    assert rows[("latency", "p99 ms")][2:] == ("20.0", "30.0", "+50 %")
    assert rows[("latency", "average ms")][2:] == ("5.0", "5.0", "+0 %")
    assert rows[("calls", "recipient error rate")][2:4] == ("1.00 %", "1.00 %")
    assert rows[("CPU per call", "dispatcher ms")][2:4] == ("1.5", "1.5")
    assert rows[("peak RSS", "dispatcher MB")][2:4] == ("128", "128")
    assert not any(title.startswith("settings") for title, _ in rows)
    # Another concurrency and schedule measured another load: said before any figure.
    other = load_report("bbb", 90.0, 30.0, concurrency=16, load_schedule={"kind": "step", "start": 10.0})
    rows = compare.load_rows([load_report("aaa", 100.0, 20.0), other])
    assert rows[0][:4] == ("settings: concurrency", "differs", "8", "16")
    assert rows[1][:4] == ("load_schedule", "differs", "kind=const,rate=100.0", "kind=step,start=10.0")


def test_a_load_report_and_a_benchmark_run_are_not_compared(tmp_path, capsys) -> None:
    (tmp_path / "load.json").write_text(json.dumps(load_report("aaa", 100.0, 20.0)))
    (tmp_path / "run.json").write_text(json.dumps(run("bbb", 1000.0, 200.0, 100.0)))
    assert main(["compare", str(tmp_path / "load.json"), str(tmp_path / "run.json")]) == 2
    assert "cannot put a load report beside a benchmark run" in capsys.readouterr().err
    # A report written before load reports said their kind still reads as one.
    legacy = {k: v for k, v in load_report("ccc", 80.0, 25.0).items() if k not in ("schema", "kind", "machine")}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    assert main(["compare", str(tmp_path / "old.json"), str(tmp_path / "load.json")]) == 0
    out = capsys.readouterr().out
    assert "calls/s" in out and "+25 %" in out


def _drop(path: tuple[str | int, ...]) -> dict:
    results = run("bbb", 1100.0, 200.0, 100.0)
    results["tracing"] = {"off": dict(results["dispatch"][0])}
    *parents, key = path
    data = results
    for step in parents:
        data = data[step]
    del data[key]
    return results


@pytest.mark.parametrize(
    ("path", "said"),
    [
        (("dispatch", 1, "batch_ms"), "dispatch[1] has no 'batch_ms'"),
        (("dispatch", 0, "family"), "dispatch[0] has no 'family'"),
        (("dispatch", 0, "recipients"), "dispatch[0] has no 'recipients'"),
        (("tracing", "off", "system"), "tracing.off has no 'system'"),
        (("resolver_overhead", 0, "overhead_ms"), "resolver_overhead[0] has no 'overhead_ms'"),
        (("resolver_overhead", 0, "ids_per_call"), "resolver_overhead[0] has no 'ids_per_call'"),
        (("targets", 0, "name"), "targets[0] has no 'name'"),
    ],
)
def test_a_run_missing_a_key_is_a_usage_error_naming_the_file_and_the_key(tmp_path, capsys, path, said) -> None:
    (tmp_path / "old.json").write_text(json.dumps(run("aaa", 1000.0, 200.0, 100.0)))
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(_drop(path)))
    assert main(["compare", str(tmp_path / "old.json"), str(edited)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"{edited}: {said}: not a results file this version of bench wrote\n"
    assert captured.out == ""


def test_an_entry_that_is_not_an_object_is_named(tmp_path, capsys) -> None:
    foreign = run("bbb", 1100.0, 200.0, 100.0)
    foreign["dispatch"] = ["sms"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "latest.json").write_text(json.dumps(foreign))
    (tmp_path / "new.json").write_text(json.dumps(run("aaa", 1000.0, 200.0, 100.0)))
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "new.json")]) == 2
    said = "dispatch[0] is not an object: not a results file this version of bench wrote"
    assert capsys.readouterr().err == f"{tmp_path / 'old' / 'latest.json'}: {said}\n"
