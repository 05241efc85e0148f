"""Stopping the benchmark or the demo stops what it started: SIGTERM acts as Ctrl-C, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOAD = ["bench", "load", "-z", "600", "-r", "5", "-c", "1", "--recipients", "1", "--customers", "1000"]


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid` and their command lines."""
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return {}
    found = {}
    for child in map(int, listed):
        try:
            found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.parametrize(
    ("argv", "suite"),
    [
        (LOAD, ("sandbox.pii_api", "sandbox.providers", "services.resolver", "services.dispatcher")),
        (["sandbox.demo", "--no-keep-running"], ("services.resolver", "services.receipts", "services.dispatcher")),
    ],
    ids=["bench load", "demo"],
)
def test_sigterm_stops_the_processes_it_started(argv, suite, redis_url, tmp_path) -> None:
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(
        [sys.executable, "-m", *argv, "--redis-url", redis_url], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        # As a background job of a script starts: Ctrl-C ignored, so SIGTERM cannot lean on it being set.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            started = children(run.pid)
            if all(any(f"-m {name}" in line for line in started.values()) for name in suite):
                break
            time.sleep(0.2)
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert len(started) >= len(suite), started
        time.sleep(1)  # at work: the load is running, or the demo is configuring its workspace

        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 130
        output = (tmp_path / "run.log").read_text()
        if argv[0] == "bench":
            assert "bench: interrupted; the processes it started are stopped" in output
        assert not [started[pid] for pid in started if running(pid)], output[-3000:]
    finally:
        # A failed run leaves nothing behind either.
        for pid in [*children(run.pid), *started]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
            run.wait()
        log.close()
