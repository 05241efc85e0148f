"""The benchmark commands' printed output that cannot be written (a full disk: /dev/full) or goes to a
standard output closed before they began (`>&-`): one line naming it and exit 1, not an OSError traceback
(or, closed, exit 0 with the summary dropped without a word). The report files are written all the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import LoadOptions, LoadResult

ROOT = Path(__file__).resolve().parents[2]
FULL = "/dev/full"  # every write fails with ENOSPC, as on a full disk


@pytest.fixture
def load_report(tmp_path) -> Path:
    path = tmp_path / "load.json"
    data = LoadResult(seconds=1.0).to_json(LoadOptions(target="127.0.0.1:50052", workspace="w"))
    path.write_text(json.dumps(data | {"started_at": "2026-12-03T18:00:00+00:00", "machine": {}}))
    return path


def run(redirect: str, *argv: str) -> subprocess.CompletedProcess[str]:
    script = f'exec "$0" "$@" {redirect}'
    return subprocess.run(
        ["/bin/sh", "-c", script, sys.executable, *argv],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("command", "prog"),
    [(["-m", "bench", "compare"], "bench"), (["-m", "bench.report"], "bench.report")],
    ids=["compare", "report"],
)
def test_printed_output_on_a_full_disk_is_one_line_exit_1(load_report, command, prog) -> None:
    files = [str(load_report)] * (2 if "compare" in command else 1)
    done = run(f"> {FULL}", *command, *files)
    assert done.returncode == 1
    assert done.stderr == f"{prog}: cannot write to standard output: No space left on device\n"


def test_printed_output_to_a_closed_stdout_is_said_to_be_lost(load_report) -> None:
    done = run(">&-", "-m", "bench.report", str(load_report))
    assert done.returncode == 1
    assert done.stderr == "bench.report: standard output is closed (>&-): what it printed was lost\n"
