"""Output that cannot be written (a full disk: /dev/full, a file size limit) against the real services: the
command says where it could not write and what became of the work, exit 1, not an OSError traceback (and a
second one as the interpreter flushed standard output at exit)."""

# ruff: noqa: F811 - the fixtures of the CLI's other tests, imported

from __future__ import annotations

import asyncio
import errno
import io
import sys
from pathlib import Path

import pytest

from cli.exits import FAILED
from cli.main import main
from tests.integration.test_cli_config import WS as CONFIG_WS
from tests.integration.test_cli_config import suite, workspace_yaml  # noqa: F401
from tests.integration.test_cli_dispatch import dispatch_argv, email_content  # noqa: F401
from tests.integration.test_cli_events import (  # noqa: F401
    WS,
    events_argv,
    events_in,
    receipts,
    server,
    sms_receipts,
)

pytestmark = pytest.mark.integration
FULL = "/dev/full"  # every write fails with ENOSPC, as on a full disk


class FillsUp(io.StringIO):
    """Standard output on a disk that fills up after `lines` lines."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.room = lines

    def write(self, text: str) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= text.count("\n")
        return super().write(text)


async def run_cli(*argv: str) -> int:
    return await asyncio.wait_for(asyncio.to_thread(main, list(argv)), 60)


async def test_dispatch_results_that_cannot_be_written_stop_the_stream_saying_so(
    start_suite, tmp_path, capsys, email_content
) -> None:
    started = await start_suite()
    recipients = tmp_path / "audience.csv"
    recipients.write_text("anonymous_id\ncust-000001\ncust-000002\n")
    argv = dispatch_argv(started, recipients, email_content, "spring-full", "--out", FULL)
    # It ended in "OSError: [Errno 28] No space left on device", raised again as --out was closed.
    assert await run_cli(*argv) == FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        f"tokensend: cannot write to --out {FULL}: No space left on device: the stream was stopped, and the results "
        "not yet written are lost. Running the same command again (same --instance) sends only what was not sent"
    ) in err


async def test_events_that_cannot_be_written_name_the_last_one_written_to_resume_after(
    receipts, server, tmp_path, capsys
) -> None:
    await sms_receipts(receipts, ["sent", "delivered", "failed"])
    assert await run_cli(*events_argv(server, "--out", FULL)) == FAILED
    assert capsys.readouterr().err == (
        f"tokensend: cannot write to --out {FULL}: No space left on device; 0 event(s) written; none was written "
        "before it (the output may end in part of a line)\n"
    )

    # Two lines fit: the third event is where to go on from, not lost by resuming after it.
    filling = FillsUp(2)
    captured, sys.stdout = sys.stdout, filling
    try:
        assert await run_cli(*events_argv(server)) == FAILED
    finally:
        sys.stdout = captured
    written = [line for line in filling.getvalue().splitlines() if line]
    assert len(written) == 2
    second = written[1].split('"event_id": "')[1].split('"')[0]
    assert capsys.readouterr().err == (
        "tokensend: cannot write to standard output: No space left on device; 2 event(s) written; resume with "
        f"--after-id {second} (the output may end in part of a line)\n"
    )
    rest = tmp_path / "rest.jsonl"
    assert await run_cli(*events_argv(server, "--after-id", second, "--idle-seconds", "1", "--out", str(rest))) == 0
    assert [e["status"] for e in events_in(rest)] == ["DELIVERY_STATUS_FAILED"]


async def test_configs_are_all_saved_when_their_lines_cannot_be_printed(suite, tmp_path, capsys) -> None:
    api, resolver, dispatcher = suite
    config = tmp_path / "workspace.yaml"
    config.write_text(workspace_yaml(api.base_url))
    addrs = ("--resolver-addr", resolver, "--dispatcher-addr", dispatcher)
    full = open(FULL, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below; a line a write
    captured, sys.stdout = sys.stdout, full
    try:
        # The first save's line failed: an OSError traceback, the other two configs never saved.
        assert await run_cli("config", "put", str(config), *addrs) == FAILED
    finally:
        sys.stdout = captured
        full.close()
    assert capsys.readouterr().err == (
        "tokensend: cannot write to standard output: No space left on device (the 3 config(s) were saved all the "
        "same)\n"
    )
    assert await run_cli("config", "list", "--workspace", CONFIG_WS, *addrs) == 0
    listed = capsys.readouterr().out
    assert [line.split(":")[0] for line in listed.splitlines()] == ["pii-api email", "oauth crm", "connector sg"]


def test_standard_output_on_a_full_disk_exits_1_with_one_line_and_no_traceback(tmp_path) -> None:
    import subprocess

    content = Path(__file__).resolve().parents[2] / "examples" / "connector-twilio.yaml"
    with open(FULL, "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "cli", "config", "put", str(content), "--dry-run"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    # Was: a traceback, then "Exception ignored ... BrokenPipeError"-like noise as the interpreter flushed stdout.
    assert done.returncode == FAILED
    assert done.stderr == "tokensend: cannot write to standard output: No space left on device\n"
