"""`bench load`'s exit status against a dispatcher: 1 with a line on stderr when no call succeeded (it exited 0,
the report's error rate the only sign), 0 when some did, failed calls or not (as ghz), the report written either
way."""

# The fixture imported by name is the tests' parameter, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from bench.cli import load_main
from tests.integration.test_bench_load import SlowDispatcher, serve_dispatcher  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration


class FailsFromThe(SlowDispatcher):
    """Answers the calls before the `first` failing one, refuses the rest UNAVAILABLE."""

    def __init__(self, first: int) -> None:
        super().__init__(0.0)
        self.first = first

    async def Dispatch(self, request, context):  # noqa: N802 - the RPC's name
        if int(request.campaign_instance_id.rsplit("-", 1)[1]) >= self.first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "storage unavailable")
        return await super().Dispatch(request, context)


def load_argv(target: str, report: Path) -> list[str]:
    calls = ["-c", "2", "-r", "20", "-n", "6", "--recipients", "1"]
    return ["--target", target, "--workspace", "w", *calls, "--json", str(report)]


async def test_a_run_in_which_every_call_failed_exits_1_saying_so(serve_dispatcher, tmp_path, capsys) -> None:
    target = await serve_dispatcher(FailsFromThe(0))
    report = tmp_path / "load.json"
    assert await asyncio.to_thread(load_main, load_argv(target, report)) == 1
    data = json.loads(report.read_text())
    assert data["status_codes"] == {"UNAVAILABLE": 6}
    captured = capsys.readouterr()
    assert "Status code distribution:" in captured.out  # the report is printed all the same
    said = "no call succeeded: all 6 failed (UNAVAILABLE 6); the report names their errors"
    assert captured.err == f"bench load: {said}\n"


async def test_a_run_with_some_calls_failed_exits_0_as_ghz(serve_dispatcher, tmp_path, capsys) -> None:
    target = await serve_dispatcher(FailsFromThe(3))
    report = tmp_path / "load.json"
    assert await asyncio.to_thread(load_main, load_argv(target, report)) == 0
    assert json.loads(report.read_text())["status_codes"] == {"OK": 3, "UNAVAILABLE": 3}
    assert capsys.readouterr().err == ""
