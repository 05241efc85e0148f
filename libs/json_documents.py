"""JSON on hot paths: parsing replies (PII API lookups, provider answers, webhooks) and
encoding provider requests.

orjson parses the usual UTF-8 document several times faster than the standard
library. It reads integers beyond 64 bits as floats, losing digits, and refuses
NaN and UTF-16 bodies: a body with a run of 19 or more digits, and anything orjson
refuses, goes to the standard library instead, so a reply means the same whichever
parser read it. Anything neither accepts raises ValueError. Encoding works the same way
round: what orjson refuses (integers beyond 64 bits, lone surrogates) is left to the
standard library, which raises what it always raised.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_NUMBER = re.compile(rb"[0-9]{19,}")
_LONG_NUMBER_TEXT = re.compile(r"[0-9]{19,}")


def parse(body: bytes | str) -> Any:
    if (_LONG_NUMBER if isinstance(body, bytes) else _LONG_NUMBER_TEXT).search(body):
        return json.loads(body)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def dump(value: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII characters as they are). Infinities and NaN, which JSON cannot
    spell, are written as null."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
