"""The number types every command line shares (libs/arguments.py)."""

from __future__ import annotations

import argparse

import pytest

from libs import arguments
from libs.arguments import number, port


@pytest.mark.parametrize(
    ("kind", "low", "options", "text", "expected"),
    [
        (int, 1, {}, "1", 1),
        (int, 1, {}, "20_000", 20_000),
        (int, 0, {}, "0", 0),
        (float, 0, {"above": True}, "0.25", 0.25),
        (int, 1, {"high": 10}, "10", 10),
    ],
)
def test_values_in_range_parse(kind, low, options, text, expected) -> None:
    assert number(kind, low, **options)(text) == expected


@pytest.mark.parametrize(
    ("kind", "low", "options", "text", "says"),
    [
        (int, 1, {}, "0", "must be at least 1"),
        (int, 0, {}, "-1", "must not be negative"),
        (float, 0, {"above": True}, "0", "must be more than 0"),
        (int, 1, {"high": 10}, "11", "must be 1..10"),
        (int, 1, {"high": 10}, "0", "must be 1..10"),
        (int, 0, {}, "1.5", "expected a whole number, got '1.5'"),
        (float, 0, {}, "fast", "expected a number, got 'fast'"),
        (float, 0, {}, "nan", "expected a finite number, got 'nan'"),
        (float, 0, {}, "inf", "expected a finite number, got 'inf'"),
    ],
)
def test_values_out_of_range_are_refused(kind, low, options, text, says) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{says}$".replace(".", r"\.").replace("(", r"\(")):
        number(kind, low, **options)(text)


def test_ports() -> None:
    assert port("0") == 0 and port("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be 0\.\.65535"):
        port("65536")


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://:secret@cache.example:6380/1", "unix:///tmp/r.sock"]
)
def test_a_redis_url_redis_py_can_use_is_taken(url: str) -> None:
    assert arguments.redis_address(url) == url


@pytest.mark.parametrize("url", ["notaurl", "http://127.0.0.1:6379", "redis//x", "https://[::1/x"])
def test_anything_else_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        arguments.redis_address(url)
    assert url not in str(refused.value)
