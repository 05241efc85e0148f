"""Argument types shared by the commands; a bad value is a usage error (exit 2) naming the flag."""

from __future__ import annotations

import argparse

from tokensend.common.v1 import common_pb2

from cli.documents import DocumentError, enum_full_name, enum_short_names
from libs.arguments import number

CHANNELS = enum_short_names(common_pb2.Channel.DESCRIPTOR)


def channel(value: str) -> int:
    """`email`, `EMAIL` or `CHANNEL_EMAIL` → the Channel number."""
    try:
        return common_pb2.Channel.Value(enum_full_name(common_pb2.Channel.DESCRIPTOR, value))
    except DocumentError:
        raise argparse.ArgumentTypeError(f"unknown channel {value!r}; expected one of {', '.join(CHANNELS)}") from None


def key_value(value: str) -> tuple[str, str]:
    """`tier=gold` → ("tier", "gold")."""
    key, sep, rest = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return key.strip(), rest


non_negative_int = number(int, 0)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts to the terminal; keeps texts with line breaks (examples, tables) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)
