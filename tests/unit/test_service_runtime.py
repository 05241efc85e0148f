"""How a service process runs: its event loop (TOKENSEND_EVENT_LOOP), the CPUs its threads run on
(TOKENSEND_CPU_AFFINITY) and its garbage collector once it serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The resolver, run as `python -m services.resolver` would run it (embedded store, throwaway key);
# once it serves, it reports its collector's settings, its event loop and the CPUs each of its threads
# (gRPC's among them) may run on, and stops itself with SIGTERM.
SERVICE = """
import asyncio, gc, os, signal, sys
from libs.server import run_service
from libs.settings import ResolverSettings
from services.resolver.server import ResolverDeps, build_server

async def build(settings, telemetry):
    started = await build_server(settings, ResolverDeps.from_settings(settings, telemetry))
    def report():
        loop = type(asyncio.get_running_loop())
        cpus = {",".join(map(str, sorted(os.sched_getaffinity(int(t))))) for t in os.listdir("/proc/self/task")}
        print(gc.get_threshold()[0], gc.get_freeze_count(), loop.__module__ + "." + loop.__name__, flush=True)
        print(len(os.listdir("/proc/self/task")), *sorted(cpus), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    asyncio.get_running_loop().call_later(0.2, report)
    return started

sys.exit(run_service("resolver", ResolverSettings, build))
"""


def serve_once(**settings: str) -> tuple[int, int, str, list[str]]:
    env = {
        **os.environ,
        "TOKENSEND_REDIS_URL": "memory://runtime-test",
        "TOKENSEND_DEV_MODE": "true",
        "TOKENSEND_GRPC_HOST": "127.0.0.1",
        "TOKENSEND_GRPC_PORT": "0",
        "TOKENSEND_GRACE_SECONDS": "0.1",
        **{"TOKENSEND_" + name.upper(): value for name, value in settings.items()},
    }
    done = subprocess.run(
        [sys.executable, "-c", SERVICE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.splitlines()
    threshold, frozen, loop = first.split()
    threads, *cpu_sets = second.split()
    assert int(threads) > 1  # gRPC's threads too
    return int(threshold), int(frozen), loop, cpu_sets


def test_a_serving_process_freezes_what_it_loaded_and_collects_young_objects_less_often():
    threshold, frozen, _, _ = serve_once()
    assert threshold == 10_000
    assert frozen > 10_000  # the modules, protobuf descriptors and server objects loaded at start


def test_services_run_on_uvloop_unless_told_to_use_asyncios_loop():
    assert serve_once()[2] == "uvloop.Loop"
    assert serve_once(event_loop="asyncio")[2] == "asyncio.unix_events._UnixSelectorEventLoop"


def test_an_unknown_event_loop_is_refused_by_name():
    env = {**os.environ, "TOKENSEND_DEV_MODE": "true", "TOKENSEND_EVENT_LOOP": "tokio"}
    done = subprocess.run(
        [sys.executable, "-c", SERVICE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "TOKENSEND_EVENT_LOOP" in done.stderr


def test_every_thread_of_a_service_runs_on_the_cpus_it_is_given_and_anywhere_allowed_without():
    allowed = sorted(os.sched_getaffinity(0))
    assert serve_once()[3] == [",".join(map(str, allowed))]
    assert serve_once(cpu_affinity=str(allowed[-1]))[3] == [str(allowed[-1])]


def test_a_thread_that_ends_while_the_process_is_being_bound_is_passed_over(monkeypatch):
    from libs import server

    bound: list[int] = []

    def bind(thread: int, cpus: frozenset[int]) -> None:
        if thread == 2:
            raise ProcessLookupError(thread)
        bound.append(thread)

    monkeypatch.setattr(server.os, "listdir", lambda path: ["1", "2", "3"])
    monkeypatch.setattr(server.os, "sched_setaffinity", bind)
    server.bind_to_cpus(frozenset({0}))
    assert bound == [1, 3]
    server.bind_to_cpus(frozenset())  # unset: nothing is bound
    assert bound == [1, 3]
