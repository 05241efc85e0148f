"""Retry delays shared by every outbound call: exponential backoff with full jitter, and Retry-After."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def full_jitter_delay(retry: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `retry` (1-based): uniform in [0, min(cap, base * 2**(retry-1))]."""
    ceiling = min(cap_s, base_s * (2 ** max(retry - 1, 0)))
    return (rng or random).uniform(0, ceiling)


MAX_RETRY_AFTER_SECONDS = 1e12


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        # However long, it is a wait asked for (past every limit: the call gives up at once rather than
        # backing off); held finite for the messages that quote it.
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
