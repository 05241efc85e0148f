"""`bench load` exits 1 when no call succeeded, as when it could not reach the dispatcher at all; a run with some
calls failed exits 0, as ghz does (its error rate is in the report)."""

from __future__ import annotations

import pytest

from bench import load
from bench.cli import load_main
from bench.load import no_success
from sandbox.processes import free_port


@pytest.mark.parametrize(
    ("report", "said"),
    [
        ({"count": 5, "status_codes": {"OK": 5}}, None),
        ({"count": 5, "status_codes": {"OK": 1, "UNAVAILABLE": 4}}, None),
        (
            {"count": 5, "status_codes": {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 4}},
            "no call succeeded: all 5 failed (UNAVAILABLE 4, DEADLINE_EXCEEDED 1); the report names their errors",
        ),
        (
            {"count": 0, "status_codes": {}, "skipped": 3},
            "no call was measured: the 3 that completed were warm-up calls (--skip-first)",
        ),
        (
            {"count": 0, "status_codes": {}, "skipped": 0},
            "no call completed: the run ended before any came back (-z, -n and -x set its length)",
        ),
    ],
)
def test_a_run_fails_when_no_call_in_it_succeeded(report: dict, said: str | None) -> None:
    assert no_success(report) == said


@pytest.mark.parametrize(("report", "code"), [({"count": 2, "status_codes": {"UNAVAILABLE": 2}}, 1), ({}, 1)])
def test_the_load_test_exits_1_when_no_call_succeeded(monkeypatch, report: dict, code: int, capsys) -> None:
    async def run(options: load.LoadOptions) -> dict:
        return {"end_reason": "normal", **report}

    monkeypatch.setattr(load, "main_async", run)
    assert load_main(["--target", "127.0.0.1:1", "--workspace", "w"]) == code
    assert capsys.readouterr().err.startswith("bench load: no call ")


def test_a_dispatcher_nothing_listens_for_ends_the_load_test_with_exit_status_1(monkeypatch) -> None:
    monkeypatch.setattr(load, "CONNECT_SECONDS", 0.3)
    target = f"127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as refused:
        load_main(["--target", target, "--workspace", "w", "-z", "1"])
    # A message as the exit code: Python prints it on stderr and exits 1.
    assert refused.value.code == (
        f"cannot reach a dispatcher at {target} in 0.3 s; is it running? (--target; --tls and --tls-ca-file if it "
        "serves TLS)"
    )
