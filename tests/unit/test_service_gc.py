"""A service process sets its garbage collector once it serves (libs.server.tune_gc)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The resolver, run as `python -m services.resolver` would run it (embedded store, throwaway key);
# once it serves, it reports its collector's settings and stops itself with SIGTERM.
SERVICE = """
import asyncio, gc, os, signal, sys
from libs.server import run_service
from libs.settings import ResolverSettings
from services.resolver.server import ResolverDeps, build_server

async def build(settings, telemetry):
    started = await build_server(settings, ResolverDeps.from_settings(settings, telemetry))
    def report():
        print(gc.get_threshold()[0], gc.get_freeze_count(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    asyncio.get_running_loop().call_later(0.2, report)
    return started

sys.exit(run_service("resolver", ResolverSettings, build))
"""


def test_a_serving_process_freezes_what_it_loaded_and_collects_young_objects_less_often():
    env = {
        **os.environ,
        "TOKENSEND_REDIS_URL": "memory://gc-test",
        "TOKENSEND_DEV_MODE": "true",
        "TOKENSEND_GRPC_HOST": "127.0.0.1",
        "TOKENSEND_GRPC_PORT": "0",
        "TOKENSEND_GRACE_SECONDS": "0.1",
    }
    done = subprocess.run(
        [sys.executable, "-c", SERVICE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    threshold, frozen = (int(x) for x in done.stdout.split())
    assert threshold == 10_000
    assert frozen > 10_000  # the modules, protobuf descriptors and server objects loaded at start
