"""What the fairness tests read: a gauge's value by workspace, and a condition awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from opentelemetry.sdk.metrics.export import InMemoryMetricReader


def waiting_by_workspace(reader: InMemoryMetricReader, name: str) -> dict[str, int]:
    """The gauge `name` (`tokensend.pii_api.waiting`, `tokensend.sends.waiting`) by workspace ("" for the
    0 observed when none wait)."""
    data = reader.get_metrics_data()
    return {
        point.attributes.get("tokensend.workspace_id", ""): point.value
        for rm in (data.resource_metrics if data is not None else ())
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    }


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)
