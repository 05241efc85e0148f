"""A command started with standard output or input closed (`>&-`, `<&-`), as a cron line or a daemon's
child may start it: Python leaves sys.stdout / sys.stdin None there, where print() drops everything
silently and a read fails with a traceback. The output lost is an error (exit 1, its work done), and an
--out or a file read from '-' that cannot be used is refused before anything is sent (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NOWHERE = "127.0.0.1:9"  # discard: nothing answers gRPC there; a refusal must come before any call


def tokensend(redirect: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """`tokensend ARGV REDIRECT` in a shell, so that the descriptor is really closed in the child."""
    script = f'exec "$0" -m cli "$@" {redirect}'
    return subprocess.run(
        ["/bin/sh", "-c", script, sys.executable, *argv],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )


def test_output_printed_to_a_closed_stdout_fails_the_command_saying_it_was_lost() -> None:
    # It exited 0, the lines checked dropped without a word: a script read that as done and printed.
    done = tokensend(">&-", "config", "put", str(EXAMPLES / "connector-twilio.yaml"), "--dry-run")
    assert done.returncode == 1
    assert done.stderr.strip() == "tokensend: standard output is closed (>&-): what the command printed was lost"


def test_a_command_printing_nothing_to_stdout_runs_with_it_closed() -> None:
    done = tokensend(">&-", "config", "put", "-", "--dry-run", "--workspace", "demo", "--addr", NOWHERE)
    # Standard input is /dev/null here: empty, so the file is refused for what it holds, not for stdout.
    assert done.returncode == 2
    assert "holds no config" in done.stderr
    assert "Traceback" not in done.stderr


def dispatch_argv(recipients: str, *more: str) -> list[str]:
    return [
        "dispatch",
        recipients,
        "--content",
        str(EXAMPLES / "content-sms.yaml"),
        "--workspace",
        "demo",
        "--campaign",
        "spring",
        "--instance",
        "spring-9",
        "--channel",
        "sms",
        "--connector",
        "twilio",
        "--addr",
        NOWHERE,
        *more,
    ]


def test_dispatch_results_to_a_closed_stdout_are_refused_before_anything_is_sent() -> None:
    # It sent the first part, then failed on writing its results with an AttributeError traceback.
    done = tokensend(">&-", *dispatch_argv(str(EXAMPLES / "recipients.csv")))
    assert done.returncode == 2
    assert done.stderr.strip() == "tokensend: --out -: standard output is closed (>&-); give --out FILE"


def test_events_to_a_closed_stdout_are_refused_before_the_stream_opens() -> None:
    done = tokensend(">&-", "events", "--workspace", "demo", "--addr", NOWHERE)
    assert done.returncode == 2
    assert done.stderr.strip() == "tokensend: --out -: standard output is closed (>&-); give --out FILE"


@pytest.mark.parametrize(
    "argv",
    [
        dispatch_argv("-", "--format", "csv"),
        ["config", "put", "-", "--workspace", "demo", "--addr", NOWHERE],
        ["send-test", "--workspace", "demo", "--campaign", "spring", "--channel", "sms", "--connector", "twilio"]
        + ["--id", "cust-000001", "--content", "-", "--addr", NOWHERE],
    ],
    ids=["dispatch recipients", "config put", "send-test content"],
)
def test_a_file_read_from_a_closed_stdin_is_refused_naming_it(argv: list[str]) -> None:
    # `dispatch -` failed with an AttributeError traceback (exit 1), the others likewise.
    done = tokensend("<&-", *argv)
    assert done.returncode == 2
    assert done.stderr.strip() == "tokensend: - reads standard input, which is closed (<&-)"
