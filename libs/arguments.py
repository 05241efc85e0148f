"""Types for command-line flags (argparse), shared by the CLI, the demo's peers and the benchmark:
a bad value is a usage error (exit 2) that names the flag and what it takes."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from urllib.parse import urlsplit


def number(kind: type[int] | type[float], low: float, *, above: bool = False, high: float | None = None) -> Callable:
    """A `kind` (int or float) of at least `low` (more than `low` when `above`) and at most `high`."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (value > low if above else value >= low) and (high is None or value <= high):
            return value
        if high is not None:
            if above:
                raise argparse.ArgumentTypeError(f"must be more than {low:g} and at most {high:g}")
            raise argparse.ArgumentTypeError(f"must be {low:g}..{high:g}")
        if above:
            raise argparse.ArgumentTypeError(f"must be more than {low:g}")
        raise argparse.ArgumentTypeError("must not be negative" if low == 0 else f"must be at least {low:g}")

    return parse


port = number(int, 0, high=65535)

REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_address(text: str) -> str:
    """A Redis URL redis-py can connect with: redis://, rediss:// or unix://. The message never
    repeats the URL, which may hold a password."""
    try:
        scheme = urlsplit(text).scheme
    except ValueError:
        scheme = ""
    if scheme not in REDIS_SCHEMES:
        raise argparse.ArgumentTypeError("expected redis://host:port/db, rediss://... or unix:///path")
    return text
