"""A circuit breaker per PII API endpoint, so a failing API fails fast instead of holding every batch."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Endpoints whose failures are remembered: every distinct URL a config or a Test screen calls has one.
ENDPOINTS_KEPT = 4096


@dataclass
class _State:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False
    ended: asyncio.Event | None = None  # set when the probe out ends, whatever its verdict


def _end_probe(s: _State) -> None:
    s.probing = False
    if s.ended is not None:
        s.ended.set()
        s.ended = None


class CircuitBreaker:
    """Closed → open after `threshold` consecutive failures; after `open_seconds` one
    probe call is let through (half-open): success closes, failure reopens."""

    def __init__(self, threshold: int, open_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = threshold
        self._open_seconds = open_seconds
        self._clock = clock
        # Only endpoints with failures have a state; at most ENDPOINTS_KEPT, the oldest dropped first.
        self._states: OrderedDict[str, _State] = OrderedDict()

    def state(self, endpoint: str) -> str:
        s = self._states.get(endpoint)
        if s is None or s.opened_at is None:
            return "closed"
        if s.probing or self._clock() - s.opened_at >= self._open_seconds:
            return "half_open"
        return "open"

    def open_endpoints(self) -> list[str]:
        """Endpoints currently failing fast or probing, for the circuit-state metric. Read from the metric
        reader's thread while the event loop adds and drops endpoints: over a copy, or the dict may change
        size mid-iteration and the reading be lost."""
        return [e for e in list(self._states) if self.state(e) != "closed"]

    def allow(self, endpoint: str) -> bool:
        """Whether a call may go out now; in half-open state only one probe at a time."""
        s = self._states.get(endpoint)
        if s is None or s.opened_at is None:
            return True
        if s.probing or self._clock() - s.opened_at < self._open_seconds:
            return False
        s.probing, s.ended = True, asyncio.Event()
        return True

    async def probe_ended(self, endpoint: str, timeout: float) -> bool:
        """Waits at most `timeout` seconds for the probe out on `endpoint` to end; whether it did (or
        none was out). Calls held back by a probe learn its verdict instead of failing as if the API
        were still down: the API may well be back, and the probe is what finds out."""
        s = self._states.get(endpoint)
        if s is None or not s.probing or s.ended is None:
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(s.ended.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def record_success(self, endpoint: str) -> None:
        s = self._states.pop(endpoint, None)
        if s is not None:
            _end_probe(s)

    def record_failure(self, endpoint: str) -> None:
        s = self._states.get(endpoint)
        if s is None:
            s = self._states[endpoint] = _State()
            while len(self._states) > ENDPOINTS_KEPT:
                _end_probe(self._states.popitem(last=False)[1])
        s.failures += 1
        if s.probing or s.failures >= self._threshold:
            s.opened_at = self._clock()
            _end_probe(s)

    def probing(self, endpoint: str) -> bool:
        """Whether a probe is out: right after `allow`, whether that call is the probe."""
        s = self._states.get(endpoint)
        return s is not None and s.probing

    def release_probe(self, endpoint: str) -> None:
        """A probe that ended without a verdict (e.g. a 4xx about the request) frees the slot."""
        s = self._states.get(endpoint)
        if s is not None:
            _end_probe(s)
