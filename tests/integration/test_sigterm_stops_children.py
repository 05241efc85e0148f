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


DISPATCHER_LOG = ROOT / "bench" / "results" / "load-logs" / "dispatcher.log"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize(
    ("argv", "suite", "at_work"),
    [
        # At work: the dispatcher has logged a batch of the load (its log is appended to, run after run).
        (LOAD, ("sandbox.pii_api", "sandbox.providers", "services.resolver", "services.dispatcher"), "batch of 1 "),
        # At work: the campaign is being sent.
        (["sandbox.demo", "--no-keep-running"], ("services.resolver", "services.receipts", "services.dispatcher"),
         "sending campaign"),
    ],
    ids=["bench load", "demo"],
)  # fmt: skip
def test_sigterm_stops_the_processes_it_started(argv, suite, at_work, redis_url, tmp_path) -> None:
    output = tmp_path / "run.log"
    dispatcher_log_offset = _size(DISPATCHER_LOG)
    log = output.open("wb")
    # As a background job of a script starts: Ctrl-C ignored, so SIGTERM cannot lean on it being set.
    # Ignored here and inherited, not set by a preexec_fn: that forces a real fork() of this process,
    # where other tests' gRPC is running, and gRPC's fork handlers can abort the child before it execs
    # ("Epoll1Poller ... epoll_wait error: Bad file descriptor", grpc/grpc#43055).
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", *argv, "--redis-url", redis_url], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    finally:
        signal.signal(signal.SIGINT, interrupt)
    started: dict[int, str] = {}

    def at_work_now() -> bool:
        said = output.read_text(errors="replace") + _read_from(DISPATCHER_LOG, dispatcher_log_offset)
        return at_work in said

    try:

        def every_service_seen() -> bool:
            return all(any(f"-m {name}" in line for line in started.values()) for name in suite)

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            started.update(children(run.pid))
            if every_service_seen() and at_work_now():
                break
            time.sleep(0.2)
        assert run.poll() is None and at_work_now(), output.read_text(errors="replace")[-3000:]
        # Only processes seen can be checked for being gone: each service must have been seen.
        assert every_service_seen(), sorted(started.values())

        run.send_signal(signal.SIGTERM)
        try:
            code = run.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        said = output.read_text(errors="replace")
        assert code == 130, said[-3000:]
        if argv[0] == "bench":
            # The load test's own words: its report covers what completed, and its suite is gone.
            said_at_end = "the report covers the calls that completed; the processes it started are stopped"
            assert said_at_end in said, said[-3000:]
        assert not [started[pid] for pid in started if running(pid)], said[-3000:]
    finally:
        # A failed run leaves nothing behind either.
        for pid in [*children(run.pid), *started]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
            run.wait()
        log.close()
