"""A process of the suite a load test started that ends during the run (a dispatcher killed to see how the
load test reports it) has no CPU time left to read: it is left out of the CPU per call, and said to be,
rather than read as 0 and reported as negative CPU taken off the total."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bench import peers
from bench.load import render


async def test_a_process_that_ended_is_left_out_of_the_cpu_rather_than_negative(tmp_path: Path) -> None:
    async def start(name: str, code: str) -> peers.Peer:
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        return peers.Peer(name, process, tmp_path / f"{name}.log", 0)

    # Busy long enough to have CPU time to read, then the one ends; the other is still running.
    spin = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass\n"
    dispatcher = await start("dispatcher", spin)
    resolver = await start("resolver", spin + "time.sleep(30)")
    try:
        while any((peers.cpu_seconds(p.pid) or 0) < 0.1 for p in (dispatcher, resolver)):
            await asyncio.sleep(0.02)
        before = [p.cpu() for p in (dispatcher, resolver)]
        await dispatcher.process.wait()  # reaped: its /proc entry is gone
        spent = peers.cpu_since([dispatcher, resolver], before)
    finally:
        resolver.process.kill()
        await resolver.process.wait()
    # It read {"dispatcher": -0.1..., "resolver": ...}: "dispatcher -4.73 ... all -0.50" in a load report.
    assert list(spent) == ["resolver"]
    assert spent["resolver"] >= 0


def test_the_summary_names_the_processes_whose_cpu_was_not_measured() -> None:
    data = {
        "count": 0,
        "seconds": 1.0,
        "rps": 0.0,
        "messages_per_second": 0.0,
        "error_rate": 0.0,
        "recipient_error_rate": 0.0,
        "latency_ms": {"count": 0, "mean": None, "minimum": None, "maximum": None, "p50": None, "p90": None},
        "quantiles_ms": {},
        "histogram": [],
        "start_delay_ms": {"count": 0},
        "status_codes": {},
        "dispatch_statuses": {},
        "errors": {},
        "late_ticks": 0,
        "not_started": 0,
        "rate": 10.0,
        "cpu_ms_per_call": {"resolver": 2.0, "client": 1.0},
        "cpu_not_measured": ["dispatcher"],
    }
    line = next(line for line in render(data).splitlines() if line.startswith("CPU ms per call"))
    assert line.endswith("resolver 2.00, client 1.00; all 3.00 (dispatcher not measured: ended during the run)")
