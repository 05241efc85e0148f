"""`python -m bench --help` and the load test's help work; options parse as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import build_load_parser, build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [["--help"], ["load", "--help"], ["ab", "--help"]])
def test_help_runs(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m bench" in done.stdout


def test_sections_sizes_and_settings_parse() -> None:
    args = build_parser().parse_args(
        ["--quick", "--only", "sms,resolver", "--sizes", "1000,20_000", "--set", "send_concurrency=128"]
    )
    assert args.quick and args.only == ("sms", "resolver")
    assert args.sizes == (1000, 20_000)
    assert args.settings == [("TOKENSEND_SEND_CONCURRENCY", "128")]


def test_bad_options_are_refused(capsys) -> None:
    for argv in (["--only", "nope"], ["--sizes", "0"], ["--set", "novalue"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_load_options() -> None:
    args = build_load_parser().parse_args(["--target", "127.0.0.1:50052", "-c", "8", "-r", "100", "-z", "5"])
    assert (args.target, args.concurrency, args.rate, args.duration) == ("127.0.0.1:50052", 8, 100.0, 5.0)
