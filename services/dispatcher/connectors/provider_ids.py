"""Provider message IDs: the only value a connector copies out of a provider's reply.

The ID goes into the message-ID map in Redis, so it must be an opaque token,
never something that holds the recipient. That is not hypothetical: a WhatsApp
wamid is base64 of a record that contains the recipient's number
(`wamid.HBgLMTY1MDUwNzY1MjAV...` decodes to `...16505076520...`), and a
misconfigured custom gateway path could select the phone number itself. Such
IDs are dropped; receipts then map by our own ID, which every provider echoes.
"""

from __future__ import annotations

import binascii
import re

_TOKEN = re.compile(r"^[A-Za-z0-9._:=+/-]{1,256}$")
_NON_DIGITS = re.compile(r"\D")
_BASE64_SEGMENT = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")


_URLSAFE = str.maketrans("-_", "+/")


def _digits(recipient: str) -> str:
    if recipient[:1] == "+" and recipient[1:].isdigit():
        return recipient[1:]  # E.164, the usual phone number
    return _NON_DIGITS.sub("", recipient)


def holds_recipient(text: str, recipient: str) -> bool:
    """True when `text` contains the recipient, its digits, or either inside a base64 segment."""
    if not recipient:
        return False
    whole = recipient.lower().encode()
    digits = _digits(recipient)
    number = digits.encode() if len(digits) >= 6 else whole  # the whole needle twice: no digits to look for
    haystack = text.lower().encode()
    if whole in haystack or number in haystack:
        return True
    # Each base64-looking segment, decoded in either alphabet. One loop, no helper or generator, and
    # binascii directly (what base64.b64decode calls): this runs for every message sent.
    for segment in _BASE64_SEGMENT.findall(text):
        body = segment.rstrip("=")
        padded = body + "=" * (-len(body) % 4)
        # Without - or _ the URL-safe alphabet decodes to the same bytes: one decode is enough.
        for candidate in (padded, padded.translate(_URLSAFE)) if "-" in body or "_" in body else (padded,):
            try:
                haystack = binascii.a2b_base64(candidate).lower()
            except (binascii.Error, ValueError):
                continue
            if whole in haystack or number in haystack:
                return True
    return False


def safe_provider_id(value: object, recipient: str) -> str:
    """`value` when it is a short opaque token that does not hold the recipient; "" otherwise."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return ""
    text = str(value)
    if not _TOKEN.match(text) or holds_recipient(text, recipient):
        return ""
    return text
