"""Percentiles and latency summaries, kept free of I/O so they can be unit tested."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

DEFAULT_QUANTILES = (10, 25, 50, 75, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default).

    `values` need not be sorted. An empty sequence has no percentile: NaN.
    """
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """A latency distribution in seconds."""

    count: int
    mean: float
    minimum: float
    maximum: float
    p50: float
    p90: float
    p99: float

    def to_json(self, scale: float = 1000.0) -> dict[str, float | int]:
        """Scaled (milliseconds by default), rounded to microseconds of the scaled unit."""
        return {k: (v if k == "count" else _round(v * scale)) for k, v in asdict(self).items()}


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan, nan)
    return Summary(
        count=len(values),
        mean=sum(values) / len(values),
        minimum=min(values),
        maximum=max(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
    )


def quantiles(values: Sequence[float], qs: Iterable[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    return {f"p{q:g}": percentile(values, q) for q in qs}


def histogram(values: Sequence[float], buckets: int = 10) -> list[tuple[float, int]]:
    """ghz-style histogram: `buckets` equal-width bins from min to max, as (upper bound, count). As in ghz, a
    bin holds the values above the bound before it up to its own bound, included: a value on a bound is
    counted under that bound, not the next one."""
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [(high, len(values))]
    width = (high - low) / buckets
    uppers = [low + width * (i + 1) for i in range(buckets - 1)] + [high]
    counts = [0] * buckets
    for value in values:
        counts[bisect.bisect_left(uppers, value)] += 1
    return list(zip(uppers, counts, strict=True))


def batch_service_times(sent_at: Sequence[float], answered_at: Sequence[float], started_at: float) -> list[float]:
    """How long the server spent on each batch of a stream, as seen by the client.

    Batch i could start once its recipients were written and batch i-1 was answered (the dispatcher
    works through a stream in order), so its time is `answered[i] - max(answered[i-1], sent[i])`.
    """
    if len(sent_at) != len(answered_at):
        raise ValueError("one send time per answer")
    times = []
    previous = started_at
    for sent, answered in zip(sent_at, answered_at, strict=True):
        times.append(answered - max(previous, sent))
        previous = answered
    return times


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(numerator):
        return None
    return numerator / denominator


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)
