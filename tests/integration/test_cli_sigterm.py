"""SIGTERM (`timeout 60 tokensend events ...`, a CI job or a systemd unit stopped) ends a tail or a campaign
as Ctrl-C does: what came is written, stderr says where to go on from, exit 130. It ended the command at
once, silently: no resume ID, no summary."""

# ruff: noqa: F811 - the fixtures of the CLI's other tests, imported

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from cli.exits import INTERRUPTED
from tests.integration.test_cli_events import (  # noqa: F401
    events_argv,
    events_in,
    lines_written,
    receipts,
    server,
    sms_receipts,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def test_sigterm_ends_a_tail_as_ctrl_c_does_naming_the_id_to_resume_from(receipts, server, tmp_path) -> None:
    await sms_receipts(receipts, ["sent", "delivered"])
    out = tmp_path / "events.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli",
        *events_argv(server, "--out", str(out)),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert await lines_written(out, 2)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == INTERRUPTED
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    events = events_in(out)
    err = (await process.stderr.read()).decode()
    assert err == (
        f"tokensend: 2 event(s) written; resume with --after-id {events[-1]['event_id']}\ntokensend: interrupted\n"
    )
