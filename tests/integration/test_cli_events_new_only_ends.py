"""A `tokensend events --new-only` tail that ends before any event says how to go on without missing one: from
where the receipts service said the stream began when it had opened (a service shutting down was told as one not
reached), and when it never opened, that nothing was read and what the choices are (it said "nothing to resume
from", as if running it again lost nothing)."""

# Fixtures imported by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest

from cli.commands.events import NEW_ONLY_NOT_BEGUN
from cli.exits import FAILED, INTERRUPTED
from libs.store import parse_stream_id
from tests.integration.test_cli_dispatch import ROOT
from tests.integration.test_cli_events import cli, events_argv, receipts, server  # noqa: F401 - fixtures
from tests.integration.test_receipts_harness import WS

pytestmark = pytest.mark.integration


async def tail_open(redis, seconds: float = 20) -> None:
    """Until the receipts service waits on Redis for the tail's next events: its stream has opened."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(client.get("cmd") == "xread" for client in await redis.client_list()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the tail's stream did not open")


class Silent:
    """A port that takes connections and never answers: a service whose stream never opens."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.address = ""
        self.connections: list[tuple[asyncio.Task, asyncio.StreamWriter]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.append((task, writer))
        self.connected.set()
        await reader.read()  # until the client goes, or the port closes


@pytest.fixture
async def silent() -> AsyncIterator[Silent]:
    port = Silent()
    listening = await asyncio.start_server(port.serve, "127.0.0.1", 0)
    port.address = f"127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    async with listening:
        yield port
        for _, writer in port.connections:
            writer.close()
        await asyncio.gather(*(task for task, _ in port.connections))


async def test_a_service_shutting_down_before_any_event_is_told_as_such_with_where_the_tail_began(
    receipts, server, capsys
) -> None:
    tail = asyncio.create_task(cli(*events_argv(server, "--new-only")))
    await tail_open(receipts.redis)
    await server.stop()
    assert await tail == FAILED
    err = capsys.readouterr().err
    began = err.rpartition("resume with --after-id ")[2].strip()
    assert parse_stream_id(began) == began, err
    assert err == (
        f"tokensend: the receipts service at {server.address} answered UNAVAILABLE: the receipts service is "
        f"shutting down: resume on another process with after_id {began}\n"
        f"0 event(s) written; resume with --after-id {began}\n"
    )


async def test_ctrl_c_before_any_event_names_where_the_tail_began(receipts, server) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *events_argv(server, "--new-only"), cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    try:
        await tail_open(receipts.redis)
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == INTERRUPTED
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = (await process.stderr.read()).decode()
    began = err.removeprefix("tokensend: 0 event(s) written; resume with --after-id ").partition("\n")[0]
    assert parse_stream_id(began) == began, err
    assert err.endswith("\ntokensend: interrupted\n")


async def test_ctrl_c_before_the_stream_opened_says_nothing_was_read_and_how_to_miss_nothing(silent) -> None:
    argv = ["events", "--workspace", WS, "--addr", silent.address, "--new-only"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *argv, cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.wait_for(silent.connected.wait(), 20)  # the call has begun
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == INTERRUPTED
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = (await process.stderr.read()).decode()
    assert err == f"tokensend: 0 event(s) written; {NEW_ONLY_NOT_BEGUN}\ntokensend: interrupted\n"


async def test_a_timeout_before_the_stream_opened_says_nothing_was_read_and_how_to_miss_nothing(silent, capsys) -> None:
    argv = ["events", "--workspace", WS, "--addr", silent.address, "--new-only", "--timeout", "1"]
    assert await cli(*argv) == FAILED
    assert capsys.readouterr().err == (
        f"tokensend: the receipts service at {silent.address} did not answer within 1s (DEADLINE_EXCEEDED; "
        f"--timeout)\n0 event(s) written; {NEW_ONLY_NOT_BEGUN}\n"
    )
