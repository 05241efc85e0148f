"""`python -m bench ab` and `instructions`: resolvers (and the dispatcher) counted or side by side, on real Redis."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ab import SideResult, report

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_names_both_trees_and_the_change() -> None:
    before = SideResult(cpu_seconds=0.002 * 4, latencies=[0.003, 0.004, 0.003, 0.005])
    after = SideResult(cpu_seconds=0.0015 * 4, latencies=[0.002, 0.003, 0.002, 0.004])
    rows = report(100, {"other": before, "this": after}, {"other": "aaaaaaa", "this": "bbbbbbb"})
    assert rows[0].startswith("| 100 | other (aaaaaaa) |     2,000 |")
    assert rows[1].startswith("| 100 | this (bbbbbbb) |     1,500 |")
    assert "-25.0 %" in rows[2]


def test_a_run_against_the_same_tree(redis_url, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "ab", str(ROOT), "--calls", "5", "--ids", "1,3", "--redis-url", redis_url,
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("resolver side by side: this tree (")
    assert sum(1 for line in lines if line.startswith("|   1 |")) == 3
    assert sum(1 for line in lines if line.startswith("|   3 | change |")) == 1


def test_a_tree_without_stubs_is_refused(tmp_path) -> None:
    (tmp_path / "services" / "resolver").mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "ab", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "make stubs" in done.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="counting instructions needs valgrind")
def test_instructions_are_counted_for_each_server(redis_url, tmp_path) -> None:
    done = subprocess.run(
        # Twenty calls, not three: a background task (a store check, a collection) landing in a count of
        # three moved a call's total by a fifth, more than five IDs add; twenty take no longer to run.
        [sys.executable, "-m", "bench", "instructions", "--calls", "20", "--ids", "1,5", "--redis-url", redis_url,
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith(("|   1 |", "|   5 |"))]
    counts = {(row[1].strip(), row[2].strip().split(" ")[0]): int(row[3].replace(",", "")) for row in rows}
    assert set(counts) == {("1", "bare"), ("1", "this"), ("5", "bare"), ("5", "this")}
    # A call does some work; the resolver does all the bare server does and more; five IDs cost more than one.
    assert 100_000 < counts["1", "bare"] < counts["1", "this"] < counts["5", "this"]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="counting instructions needs valgrind")
def test_instructions_are_counted_per_email_for_the_dispatcher(redis_url, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "instructions", "--dispatcher", "--emails", "200", "--batch", "100",
         "--redis-url", redis_url, "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| this (")]
    assert len(rows) == 1
    sent, per_email = int(rows[0][2].replace(",", "")), int(rows[0][3].replace(",", ""))
    # Every Email went out, and each cost the dispatcher some work, though far less than a call of its own.
    assert sent == 200
    assert 10_000 < per_email < 5_000_000
