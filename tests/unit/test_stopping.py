"""A service stops whatever hangs: a background task that lets a cancellation go by is cancelled again,
a client that never closes is left behind, and a shutdown that does not finish ends the process."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libs import server, tasks
from libs.config_cache import ConfigCache
from libs.tasks import stop_task

ROOT = Path(__file__).resolve().parents[2]


def loses_cancellations(times: int, ended: list[str]):
    """A task that carries on after its first `times` cancellations, as one whose cancellation Python
    3.11's `asyncio.wait_for` dropped inside a library did."""

    async def run() -> None:
        lost = 0
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost == times:
                    ended.append("cancelled")
                    raise
                lost += 1

    return run


async def test_a_task_that_lets_a_cancellation_go_by_is_cancelled_again_until_it_ends(caplog) -> None:
    ended: list[str] = []
    task = asyncio.create_task(loses_cancellations(2, ended)())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="libs.tasks"):
        assert await asyncio.wait_for(stop_task(task, "the listener"), 5) is True
    assert ended == ["cancelled"] and task.cancelled()
    assert "the listener stopped only when cancelled 3 times" in caplog.text


async def test_a_task_that_never_ends_is_reported_and_left_after_its_patience(monkeypatch, caplog) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_SECONDS", 0.01)
    task = asyncio.create_task(loses_cancellations(10**9, [])())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="libs.tasks"):
        assert await asyncio.wait_for(stop_task(task, "the watch", patience=0.1), 5) is False
    assert "the watch did not stop within 0.1 s" in caplog.text
    assert not task.done()
    task.get_coro().close()  # the test's loop must close: the coroutine is dropped without running again


async def test_stopping_a_task_is_itself_cancellable() -> None:
    task = asyncio.create_task(loses_cancellations(10**9, [])())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(stop_task(task, "the keeper", patience=60))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    task.get_coro().close()


async def test_the_config_cache_closes_even_when_its_listener_lets_the_cancellation_go_by(monkeypatch) -> None:
    ended: list[str] = []
    cache = ConfigCache(redis=None, max_age_seconds=30)  # type: ignore[arg-type]
    monkeypatch.setattr(cache, "_listen", loses_cancellations(1, ended))
    cache._task = asyncio.create_task(cache._listen())
    await asyncio.sleep(0)
    closing = asyncio.create_task(cache.close())
    # Not a timeout around close(): its cancellation would reach the listener and end it anyway.
    done, _ = await asyncio.wait({closing}, timeout=2)
    assert done, "close() waited on a listener that let its cancellation go by"
    assert ended == ["cancelled"] and cache._task is None


async def test_a_client_that_never_closes_is_left_behind_and_the_rest_still_close(monkeypatch, caplog) -> None:
    monkeypatch.setattr(server, "CLOSE_SECONDS", 0.05)
    closed: list[str] = []

    async def close_redis() -> None:
        closed.append("redis")

    async def close_hung_peer() -> None:
        await asyncio.Event().wait()

    async def close_http() -> None:
        raise OSError("reset")

    with caplog.at_level(logging.WARNING, logger="libs.server"):
        await asyncio.wait_for(server.close_all([close_redis, close_hung_peer, close_http]), 5)
    assert closed == ["redis"]  # closed last, as the first opened
    assert "closing test_a_client_that_never_closes_is_left_behind_and_the_rest_still_close.close_hung_peer " in (
        caplog.text
    )
    assert "did not finish within 0 s; left behind" in caplog.text
    assert "close_http failed: OSError" in caplog.text


# A resolver process (embedded store) whose shutdown hangs in a step nothing bounds: it must still end,
# exit code 1, within its grace period and the shutdown slack.
HANGING_SHUTDOWN = """
import asyncio, os, signal, sys
from libs import server
from libs.settings import ResolverSettings
from services.resolver.server import ResolverDeps, build_server

server.SHUTDOWN_SLACK_SECONDS = 1.0

async def build(settings, telemetry):
    service, port = await build_server(settings, ResolverDeps.from_settings(settings, telemetry))
    async def never_winds_down():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
    service.winds_down.append(never_winds_down)
    asyncio.get_running_loop().call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
    return service, port

sys.exit(server.run_service("resolver", ResolverSettings, build))
"""


def test_a_shutdown_that_does_not_finish_ends_the_process_with_exit_code_1() -> None:
    env = {
        **os.environ,
        "TOKENSEND_REDIS_URL": "memory://shutdown-test",
        "TOKENSEND_DEV_MODE": "true",
        "TOKENSEND_GRPC_HOST": "127.0.0.1",
        "TOKENSEND_GRPC_PORT": "0",
        "TOKENSEND_GRACE_SECONDS": "0.1",
    }
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", HANGING_SHUTDOWN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "shutdown did not finish within 1 s; the process ends here (exit code 1)" in done.stderr
    assert time.monotonic() - began < 30


async def test_a_task_given_no_patience_still_has_its_cancellation_taken(caplog) -> None:
    # A caller out of time (the batch senders share one budget) stops the rest with patience 0: one that
    # honours its cancellation ends, without an error saying it was left.
    ended: list[str] = []
    task = asyncio.create_task(loses_cancellations(0, ended)())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="libs.tasks"):
        assert await stop_task(task, "a sender", patience=0) is True
    assert ended == ["cancelled"] and task.cancelled()
    assert caplog.text == ""


async def test_a_task_given_no_patience_that_runs_on_is_reported_as_cancelled_once(caplog) -> None:
    task = asyncio.create_task(loses_cancellations(10**9, [])())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="libs.tasks"):
        assert await stop_task(task, "a sender", patience=0) is False
    assert "a sender did not stop within 0.0 s of being cancelled once; left running" in caplog.text
    task.get_coro().close()
