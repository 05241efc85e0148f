"""The fixtures' teardown steps: a hang is reported with every task's stack and left behind."""

from __future__ import annotations

import asyncio

import pytest

from tests import conftest


async def test_a_hanging_step_is_reported_and_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "TEARDOWN_STEP_SECONDS", 0.05)
    release = asyncio.Event()

    async def stuck() -> None:
        try:
            await release.wait()
        except asyncio.CancelledError:
            await release.wait()  # ignores the cancellation, as a hung teardown might

    with pytest.warns(RuntimeWarning, match="teardown step 'stop' did not finish") as caught:
        await asyncio.wait_for(conftest.bounded_teardown(stuck(), "stop"), 5)
    assert "in stuck" in str(caught[0].message)  # the stuck task's stack is in the report
    release.set()  # the test's own loop must close
    await asyncio.sleep(0.01)


async def test_a_step_that_ends_or_fails_is_awaited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "TEARDOWN_STEP_SECONDS", 5)
    await conftest.bounded_teardown(asyncio.sleep(0.01), "quick")

    async def broken() -> None:
        raise OSError("closing failed")

    with pytest.raises(OSError, match="closing failed"):
        await conftest.bounded_teardown(broken(), "broken")
