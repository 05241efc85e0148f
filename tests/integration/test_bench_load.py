"""The load test against a running suite: a fixed rate for a fixed time, every tick a call."""

from __future__ import annotations

import pytest

from bench.load import LoadOptions, run_load

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("rate", "duration", "expected"), [(2.0, 2.0, 4), (8.0, 1.5, 12)])
async def test_a_fixed_rate_makes_every_scheduled_call_and_lasts_its_duration(start_suite, rate, duration, expected):
    suite = await start_suite()
    options = LoadOptions(
        target=f"127.0.0.1:{suite.dispatcher.port}",
        workspace=suite.workspace_id,
        concurrency=4,
        rate=rate,
        duration=duration,
        recipients_per_call=1,
        customers=20,
    )
    result = await run_load(options)
    data = result.to_json(options)
    assert (data["count"], data["not_started"], data["late_ticks"]) == (expected, 0, 0)
    assert data["status_codes"] == {"OK": expected} and data["dispatch_statuses"] == {"SENT": expected}
    assert duration <= data["seconds"] < duration + 1
    assert data["rps"] == pytest.approx(rate, rel=0.35)
