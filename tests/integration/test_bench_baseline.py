"""`python -m bench.baseline` against the real sample peers: its warm-up batch is sent but not counted, and it
keeps two batches in flight as the suite does."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import pytest

from bench import peers

pytestmark = pytest.mark.integration


async def test_the_warm_up_batch_is_sent_before_the_clock_and_left_out_of_every_count(tmp_path) -> None:
    ballast = b"\x01" * (300 * 1024 * 1024)  # this process's peak, far above the baseline's own
    pii = await peers.start_pii_api(tmp_path, customers=1_000)
    providers = await peers.start_providers(tmp_path)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.baseline",
            "--pii-api", f"http://127.0.0.1:{pii.port}", "--providers", f"http://127.0.0.1:{providers.port}",
            "--recipients", "600", "--batch", "500",
            "--watch", f"providers={providers.pid}", "--watch", f"pii_api={pii.pid}",
            cwd=peers.ROOT, env=peers.clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()[-3000:]
        report = json.loads(out)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{providers.port}/_admin/stats") as reply:
                stats = await reply.json()
    finally:
        await providers.stop()
        await pii.stop()
    del ballast
    assert stats["requests"] == {"custom": 500 + 600}  # the warm-up reached the provider
    assert report["statuses"] == {"200": 600} and len(report["batch_times"]) == 2  # and was not counted
    assert set(report["peers_cpu_seconds"]) == {"providers", "pii_api"}
    assert report["peers_cpu_seconds"]["providers"] > 0
    # Its own peak memory: getrusage's maxrss also counts the peak of the process that spawned it.
    assert 0 < report["peak_rss_kb"] < 250 * 1024, report["peak_rss_kb"]


async def test_two_batches_are_in_flight_as_in_the_suites_stream(tmp_path) -> None:
    pii = await peers.start_pii_api(tmp_path, customers=2_000)
    providers = await peers.start_providers(tmp_path)
    base = f"http://127.0.0.1:{providers.port}"
    try:
        async with aiohttp.ClientSession() as http:
            # Slow enough that two batches overlap whenever both are sent at once.
            async with http.post(f"{base}/_admin/faults/sendgrid", json={"latency_ms": 300}) as reply:
                assert reply.status == 200
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.baseline", "--family", "email", "--warmup", "0",
                "--pii-api", f"http://127.0.0.1:{pii.port}", "--providers", base,
                "--recipients", "2000", "--batch", "500",
                cwd=peers.ROOT, env=peers.clean_env(), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode == 0, err.decode()[-3000:]
            async with http.get(f"{base}/_admin/stats") as reply:
                stats = await reply.json()
    finally:
        await providers.stop()
        await pii.stop()
    report = json.loads(out)
    assert report["statuses"] == {"202": 2000} and len(report["batch_times"]) == 4
    assert stats["requests"] == {"sendgrid": 4}
    assert stats["peak_in_flight"] == {"sendgrid": 2}  # the default: never one at a time, never more than two


def test_a_watched_process_needs_a_name_and_a_pid(capsys) -> None:
    from bench.baseline import main

    with pytest.raises(SystemExit) as stopped:
        main(["--pii-api", "x", "--providers", "y", "--watch", "providers"])
    assert stopped.value.code == 2
    assert "--watch: expected NAME=PID, got 'providers'" in capsys.readouterr().err
