"""Argument types shared by the commands; a bad value is a usage error (exit 2) naming the flag."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Sequence

from tokensend.common.v1 import common_pb2

from cli.documents import DocumentError, enum_full_name, enum_short_names
from libs.anonymous_ids import RULE, valid_anonymous_id
from libs.arguments import number

CHANNELS = enum_short_names(common_pb2.Channel.DESCRIPTOR)


def channel(value: str) -> int:
    """`email`, `EMAIL` or `CHANNEL_EMAIL` → the Channel number."""
    try:
        return common_pb2.Channel.Value(enum_full_name(common_pb2.Channel.DESCRIPTOR, value))
    except DocumentError:
        raise argparse.ArgumentTypeError(f"unknown channel {value!r}; expected one of {', '.join(CHANNELS)}") from None


def key_value(value: str) -> tuple[str, str]:
    """`tier=gold` → ("tier", "gold"). The text is never repeated: an attribute's value may be personal data,
    and one given without its name (`--attr jane@example.com`) is nothing else."""
    key, sep, rest = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError("expected NAME=VALUE, the attribute's name, '=' and its value (not shown)")
    return key.strip(), rest


def anonymous_id(value: str) -> str:
    """An anonymous ID as the services take it; the space around a pasted one is dropped, as no ID holds any.
    The text is never repeated: what was pasted in an ID's place may be an address."""
    text = value.strip()
    if not text:
        raise argparse.ArgumentTypeError("is empty")
    if not is_text(text):
        raise argparse.ArgumentTypeError(NOT_TEXT)
    if not valid_anonymous_id(text):
        raise argparse.ArgumentTypeError(f"{RULE} (the ID given is not shown)")
    return text


# What an argument holding bytes that are not UTF-8 reads as (Python keeps them as lone surrogates), which no
# request can carry.
NOT_TEXT = "is not valid UTF-8 text"


def is_text(value: str) -> bool:
    if value.isascii():  # most values: no encoding needed to know
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


non_negative_int = number(int, 0)


def join_dash_values(argv: Sequence[str], options: Collection[str]) -> list[str]:
    """`argv` with each of `options` joined to a value of its that begins with "-" (`--limit -5` is passed on as
    `--limit=-5`, `-r -5` as `-r-5`): argparse reads such a value as an option and stops at "expected one
    argument", where the option's own check would say what it takes, naming it. A value that begins with
    "--" stays apart (the value was left out and the next option follows), as does everything after "--"."""
    joined: list[str] = []
    place = 0
    while place < len(argv):
        word = argv[place]
        if word == "--":
            return joined + list(argv[place:])
        value = argv[place + 1] if place + 1 < len(argv) else ""
        if word in options and value.startswith("-") and not value.startswith("--") and value != "-":
            joined.append(f"{word}={value}" if word.startswith("--") else word + value)
            place += 2
        else:
            joined.append(word)
            place += 1
    return joined


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts to the terminal; keeps texts with line breaks (examples, tables) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)
