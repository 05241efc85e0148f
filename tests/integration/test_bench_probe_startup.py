"""A benchmark whose service refuses to start, or that is interrupted, says so, reports what it measured and
stops what it started, without a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from bench.cli import main
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[2]


def children() -> list[int]:
    """This process's living children (the peers and services a run starts)."""
    return children_of(os.getpid())


def children_of(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_a_setting_a_service_refuses_ends_the_run_with_its_reason(tmp_path, capsys) -> None:
    # The dispatcher refuses TOKENSEND_BATCH_SIZE=many: the run ended in a RuntimeError's traceback that
    # said it "did not become healthy in 120s", the service's own reason at its end.
    argv = ["--only", "sms", "--sizes", "500", "--set", "BATCH_SIZE=many", "--quiet"]
    argv += ["--redis-url", TEST_REDIS_URL, "--results-dir", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    first, *rest = err.splitlines()
    assert re.fullmatch(
        r"bench: dispatcher exited at startup \(code \d+\); the last lines of \S+/dispatcher\.log:", first
    )
    assert any("TOKENSEND_BATCH_SIZE" in line for line in rest)
    assert rest[-1] == "the processes it started are stopped"
    assert "Traceback" not in err
    assert children() == []


def living(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


async def test_an_interrupted_benchmark_prints_and_writes_the_measurements_it_completed(tmp_path) -> None:
    # SIGTERM (or Ctrl-C) in the second campaign of a run: the first one's figures were lost with it.
    argv = ["-m", "bench", "--only", "sms", "--sizes", "500,100000", "--redis-url", TEST_REDIS_URL]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, "--results-dir", str(tmp_path), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    progress = []
    async with asyncio.timeout(120):
        while not progress or not progress[-1].startswith("bench: sms suite x 100,000"):
            progress.append((await process.stderr.readline()).decode())
            assert progress[-1], "".join(progress)
    started = children_of(process.pid)
    await asyncio.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 130, err.decode()
    assert err.decode().endswith(
        "bench: interrupted; the table holds the measurements completed, the processes it started are stopped\n"
    )
    assert "interrupted: the measurements completed before it" in out.decode().splitlines()[0]
    assert "| SMS via gateway: suite " in out.decode() and "Traceback" not in err.decode()
    written = [p for p in tmp_path.glob("*.json")]
    assert len(written) == 1  # latest.json stays the last full run's
    results = json.loads(written[0].read_text())
    assert results["interrupted"] is True
    assert [(e["system"], e["recipients"]) for e in results["dispatch"]] == [("suite", 500)]
    assert started and living(started) == []
