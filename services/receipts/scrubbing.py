"""Turns provider values into what may be stored: short codes, never free text with PII.

Stored events keep a reason *code* only (an SMTP enhanced status such as
"5.1.1", a provider error number such as "30003" or "131026", or a slug from a
fixed vocabulary such as "hard:5.1.1" or "dropped:bounced_address"). Codes are
checked against strict patterns, so an address, a number or a name in the
field it came from cannot pass. `libs.scrub.scrub_text` removes emails, URLs,
IP addresses and phone numbers from free text; it runs before a code is pulled
out of a bounce message, so the digits of an address cannot pose as a code.
Names cannot be found by pattern, which is why free text itself is never kept.
"""

from __future__ import annotations

import re

from libs.scrub import scrub_text

_SMTP_ENHANCED = re.compile(r"(?<![0-9.])([245]\.\d{1,3}\.\d{1,3})(?![0-9]|\.\d)")
_SMTP_BASIC = re.compile(r"^\s*([245]\d\d)(?![0-9])")
_SLUG_STRIP = re.compile(r"[^a-z0-9]+")


def smtp_code(text: object) -> str:
    """The SMTP enhanced status ("5.1.1") or, failing that, the basic reply code ("550") in free text."""
    if not isinstance(text, str) or not text:
        return ""
    clean = scrub_text(text, limit=400)
    enhanced = _SMTP_ENHANCED.search(clean)
    if enhanced:
        return enhanced.group(1)
    basic = _SMTP_BASIC.search(clean)
    return basic.group(1) if basic else ""


def numeric_code(value: object, max_digits: int = 6) -> str:
    """A provider's numeric error code ("30003", 131026); longer runs of digits could be a phone number."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        return ""
    value = value.strip()
    return value if value.isascii() and value.isdigit() and 1 <= len(value) <= max_digits else ""


def slug(value: object, vocabulary: frozenset[str]) -> str:
    """`value` as a lowercase slug when it names an entry of `vocabulary`; "" for anything else."""
    if not isinstance(value, str):
        return ""
    candidate = _SLUG_STRIP.sub("_", value.strip().lower()).strip("_")
    return candidate if candidate in vocabulary else ""


def join_code(*parts: str) -> str:
    return ":".join(part for part in parts if part)
