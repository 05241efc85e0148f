"""Removes contacts from free text: email addresses, phone numbers, IP addresses.

Used where a provider's or PII API's text must be kept (a bounce reason, a
test screen's error body). Detectors err on the side of removing too much.
"""

from __future__ import annotations

import re

_EMAIL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6 = re.compile(
    r"\b(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{1,4}){0,6}\b|::(?:[0-9A-Fa-f]{1,4}:?){1,7}"
)
# Seven or more digits, optionally led by + and split by spaces, dots, dashes or brackets.
_PHONE = re.compile(r"(?:\+|\b00)?\(?\d[\d\s().-]{5,}\d\b")


def scrub_text(text: str, extra: set[str] | frozenset[str] = frozenset(), limit: int = 512) -> str:
    """`text` with contacts (and any exact `extra` values) replaced by placeholders, truncated to `limit`."""
    for value in sorted(extra, key=len, reverse=True):
        if value:
            text = text.replace(value, "[redacted]")
    text = _EMAIL.sub("[email]", text)
    text = _IPV6.sub("[ip]", text)
    text = _IPV4.sub("[ip]", text)
    text = _PHONE.sub(lambda m: "[phone]" if sum(c.isdigit() for c in m.group()) >= 7 else m.group(), text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
