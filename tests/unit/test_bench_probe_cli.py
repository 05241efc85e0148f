"""What the benchmark commands refuse before they start anything, and what they say, not a traceback,
when a file cannot be written or read: exit 2 naming the flag or the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import ab, instructions, load, run
from bench.cli import main
from bench.load import LoadOptions, LoadResult, write_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nothing_runs(monkeypatch) -> list[str]:
    """Each command's run replaced by one that notes it was reached: a refusal must come before it."""
    reached: list[str] = []

    async def benchmark(options):
        reached.append("bench")
        raise AssertionError("the benchmark started")

    async def side_by_side(*args):
        reached.append("run")
        return []

    async def load_test(options):
        reached.append("load")
        return {"end_reason": "normal", "count": 1, "status_codes": {"OK": 1}}

    monkeypatch.setattr(run, "run_benchmark", benchmark)
    monkeypatch.setattr(ab, "run", side_by_side)
    monkeypatch.setattr(instructions, "run", side_by_side)
    monkeypatch.setattr(load, "main_async", load_test)
    monkeypatch.setattr(instructions.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return reached


def refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_dispatcher_cpu_this_process_may_not_use_is_refused_before_anything_starts(capsys, nothing_runs) -> None:
    # The dispatcher refused it at start-up, after the peers had started: a traceback, exit 1.
    cpu = str(max(os.sched_getaffinity(0)) + 1)
    said = refused(capsys, ["--dispatcher-cpus", cpu, "--only", "sms", "--sizes", "500"])
    assert said.startswith("python -m bench: error: argument --dispatcher-cpus: names CPUs this process may not use")
    said = refused(capsys, ["load", "--dispatcher-cpus", f"0,{cpu}", "-z", "1"])
    assert f"argument --dispatcher-cpus: names CPUs this process may not use: [{cpu}]" in said
    assert nothing_runs == []


@pytest.mark.parametrize("command", [[], ["ab", str(ROOT)], ["instructions"], ["instructions", "--dispatcher"]])
def test_a_results_dir_that_cannot_be_made_is_refused_before_the_run(tmp_path, capsys, nothing_runs, command) -> None:
    # Under a file: the run's mkdir failed with a traceback once the run (or the benchmark) had begun.
    (tmp_path / "notes").write_text("")
    folder = tmp_path / "notes" / "results"
    said = refused(capsys, [*command, "--results-dir", str(folder)])
    assert said.endswith(f"error: --results-dir: cannot write in {folder}: Not a directory")
    assert nothing_runs == []


@pytest.mark.parametrize("flag", ["--json", "-o"])
def test_a_report_file_that_cannot_be_opened_is_refused_before_the_run(tmp_path, capsys, nothing_runs, flag) -> None:
    # Its folder is there and writable, the name is not one a file can have: found after the run, before.
    path = tmp_path / ("r" * 300 + ".json")
    said = refused(capsys, ["load", "-z", "1", flag, str(path)])
    assert said.startswith(f"python -m bench load: error: {flag}")
    assert f"cannot write {path}: File name too long" in said
    assert nothing_runs == []


def test_a_report_file_already_there_is_not_emptied_by_the_check(tmp_path, nothing_runs) -> None:
    kept = tmp_path / "old.json"
    kept.write_text("{}")
    made = tmp_path / "new.csv"
    assert main(["load", "--target", "127.0.0.1:1", "--workspace", "w", "--json", str(kept), "-o", str(made)]) == 0
    assert kept.read_text() == "{}" and not made.exists()
    assert nothing_runs == ["load"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_report_file_that_fails_as_it_is_written_loses_neither_the_summary_nor_the_other_file(
    tmp_path, capsys
) -> None:
    # A full disk: the report was lost to a traceback, the summary unprinted, the CSV unwritten.
    options = LoadOptions(target="127.0.0.1:1", workspace="w", json_path="/dev/full", output_format="csv")
    options.output_path = str(tmp_path / "calls.csv")
    result = LoadResult(seconds=1.0)
    with pytest.raises(SystemExit) as exited:
        write_report(result.to_json(options), result, options)
    assert str(exited.value) == "bench load: cannot write --json /dev/full: No space left on device"
    assert "Summary:" in capsys.readouterr().out
    assert (tmp_path / "calls.csv").read_text().startswith("start_s,duration_ms,status")


def test_the_benchmark_table_is_printed_when_its_results_cannot_be_written(tmp_path, monkeypatch, capsys) -> None:
    from bench import report

    async def benchmark(options):
        return {"started_at": "2026-12-03T09:00:00+00:00", "machine": {}, "options": {}, "dispatch": []}

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "run_benchmark", benchmark)
    monkeypatch.setattr(report, "write_results", full)
    monkeypatch.setattr(report, "render", lambda results: "the table")
    assert main(["--only", "sms", "--sizes", "500", "--results-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "the table\n"
    assert captured.err == f"bench: cannot write the results in {tmp_path}: No space left on device\n"


def test_more_ids_a_call_than_resolve_contacts_takes_are_refused(capsys, nothing_runs) -> None:
    # The first such call came back INVALID_ARGUMENT mid-run, a traceback.
    said = refused(capsys, ["ab", str(ROOT), "--ids", "1,1001"])
    assert said.endswith("argument --ids: at most 1,000 IDs a call (ResolveContacts' limit)")
    assert refused(capsys, ["instructions", "--ids", "5000"]).endswith(
        "at most 1,000 IDs a call (ResolveContacts' limit)"
    )
    assert nothing_runs == []


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--emails", "5"], "--emails: for --dispatcher"),
        (["--batch", "100"], "--batch: for --dispatcher"),
        (["--dispatcher", "--calls", "5"], "--calls: for the resolver's instructions (without --dispatcher)"),
        (["--dispatcher", "--ids", "1"], "--ids: for the resolver's instructions (without --dispatcher)"),
    ],
)
def test_a_count_flag_of_the_other_count_is_refused_not_ignored(capsys, nothing_runs, flags, said) -> None:
    # `instructions --emails 5` counted the resolver's 200 calls a size under valgrind, --emails unread.
    assert refused(capsys, ["instructions", *flags]).endswith(f"error: {said}")
    assert nothing_runs == []


def test_instructions_keeps_its_defaults(tmp_path, monkeypatch) -> None:
    given = []

    async def counted(other, calls, sizes, redis_url, results_dir):
        given.append((calls, sizes))
        return []

    monkeypatch.setattr(instructions, "run", counted)
    monkeypatch.setattr(instructions.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    assert main(["instructions", "--results-dir", str(tmp_path)]) == 0
    assert given == [(200, (1, 100))]


def load_report(**fields: object) -> dict:
    report = {
        "schema": 1,
        "kind": "load",
        "started_at": "2026-12-03T09:00:00+00:00",
        "machine": {"commit": "aaa"},
        "load_schedule": {"kind": "const", "rate": 10.0},
        "count": 20,
        "rps": 10.0,
        "latency_ms": {"count": 20, "mean": 5.0, "minimum": 1.0, "maximum": 9.0, "p50": 5.0, "p90": 8.0, "p99": 9.0},
    }
    return {**report, **fields}


@pytest.mark.parametrize(
    ("edited", "said"),
    [
        (load_report(schema=2), "schema 2: not a results file this version of bench wrote"),
        (load_report(count="many"), "a value bench would not write (must be real number, not str)"),
        (load_report(rps="fast"), "a value bench would not write"),
    ],
)
def test_compare_names_a_load_report_it_cannot_read(tmp_path, capsys, edited, said) -> None:
    # A newer schema was read as this one (its figures shown as dashes); a value of another type
    # ended in a traceback, exit 1.
    (tmp_path / "old.json").write_text(json.dumps(load_report()))
    (tmp_path / "new.json").write_text(json.dumps(edited))
    assert main(["compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"{tmp_path / 'new.json'}: {said}") and captured.out == ""


def test_compare_names_a_run_with_a_value_of_another_type(tmp_path, capsys) -> None:
    entry = {"family": "sms", "system": "suite", "recipients": 500, "batch_ms": None, "throughput": 1.0}
    run_file = {"schema": 1, "started_at": "2026-12-03T09:00:00+00:00", "dispatch": [entry]}
    (tmp_path / "old.json").write_text(json.dumps({**run_file, "dispatch": [{**entry, "batch_ms": {}}]}))
    (tmp_path / "new.json").write_text(json.dumps(run_file))
    assert main(["compare", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 2
    assert capsys.readouterr().err.startswith(f"{tmp_path / 'new.json'}: a value bench would not write")


@pytest.mark.parametrize(
    ("edited", "said"),
    [
        ({k: v for k, v in load_report().items() if k != "count"}, "has no 'count'"),
        (load_report(schema=3), "schema 3"),
    ],
)
def test_report_names_a_file_it_cannot_read(tmp_path, capsys, edited, said) -> None:
    from bench import report

    path = tmp_path / "load.json"
    path.write_text(json.dumps(edited))
    assert report.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}: {said}")


@pytest.mark.parametrize("target", ["127.0.0.1:99999", "dispatcher:", "dispatcher:grpc", "[::1]:0", ":50052"])
def test_a_target_with_a_port_grpc_cannot_dial_is_refused_at_once(capsys, nothing_runs, target) -> None:
    # It waited 10 s for a channel, then said the dispatcher could not be reached: exit 1.
    said = refused(capsys, ["load", "--target", target, "--workspace", "w"])
    assert said.endswith(f"argument --target: expected HOST:PORT with a port of 1..65535, got {target!r}")
    assert nothing_runs == []


@pytest.mark.parametrize("target", ["dispatcher:50052", "[::1]:50052", "dns:///dispatcher:50052", "unix:/run/d.sock"])
def test_the_targets_grpc_dials_are_taken_as_given(nothing_runs, target) -> None:
    assert main(["load", "--target", target, "--workspace", "w"]) == 0
    assert nothing_runs == ["load"]


def test_a_file_that_is_not_a_py_spy_recording_is_named_not_summarised_as_empty(tmp_path) -> None:
    # A results JSON given by mistake printed an empty summary, exit 0.
    from bench.profiles import main as profiles_main

    path = tmp_path / "latest.json"
    path.write_text(json.dumps(load_report()))
    with pytest.raises(SystemExit) as refused:
        profiles_main([str(path)])
    assert str(refused.value).startswith(f"{path}: no stacks in it")
