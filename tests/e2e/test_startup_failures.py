"""A service started on a gRPC port another socket holds stops as operators see it: exit code 1, one line
naming the address and its variables, and nothing it opened before (its Redis connections, HTTP session,
config subscription) left open on the way out, which Python's dev mode would report."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LEFT_OPEN = ("Unclosed", "unclosed", "ResourceWarning", "Task was destroyed", "was never awaited", "Traceback")


async def run_on_a_taken_port(redis_url: str, *command: str, **settings: str) -> tuple[int, str, int]:
    """`command` run in dev mode (ResourceWarnings shown) against the test Redis, with the port a listening
    socket holds for `{port}` in its arguments and settings; its exit code, its stderr and the port."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
        env.update(
            TOKENSEND_DEV_MODE="true",
            TOKENSEND_REDIS_URL=redis_url,
            TOKENSEND_GRPC_HOST="127.0.0.1",
            TOKENSEND_HTTP_HOST="127.0.0.1",
            TOKENSEND_HTTP_PORT="0",
        )
        env.update({name: value.format(port=port) for name, value in settings.items()})
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "dev", *(part.format(port=port) for part in command),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stderr.decode(errors="replace"), port


@pytest.mark.parametrize("service", ["resolver", "dispatcher", "receipts"])
async def test_a_taken_grpc_port_stops_the_service_with_one_line_and_nothing_left_open(redis_url, service):
    code, said, port = await run_on_a_taken_port(redis_url, "-m", f"services.{service}", TOKENSEND_GRPC_PORT="{port}")
    assert code == 1, said
    assert f"{service}: cannot listen for gRPC on 127.0.0.1:{port} (TOKENSEND_GRPC_HOST, TOKENSEND_GRPC_PORT)" in said
    for warning in LEFT_OPEN:
        assert warning not in said, said


async def test_serve_all_with_a_taken_port_closes_the_services_it_had_started(redis_url):
    """The resolver serves, then the dispatcher cannot bind: both the resolver and what the dispatcher
    had opened close before the process exits."""
    code, said, port = await run_on_a_taken_port(
        redis_url,
        "-m", "cli.main", "serve", "all", "--resolver-port", "0", "--dispatcher-port", "{port}", "--receipts-port", "0",
    )  # fmt: skip
    assert code == 1, said
    assert f"serve all: cannot listen for gRPC on 127.0.0.1:{port} (TOKENSEND_GRPC_HOST, --dispatcher-port)" in said
    for warning in LEFT_OPEN:
        assert warning not in said, said
