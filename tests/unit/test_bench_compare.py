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
    with pytest.raises(SystemExit, match="notes.json: not a benchmark results file"):
        main(["compare", str(tmp_path / "old"), str(tmp_path / "notes.json")])
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
