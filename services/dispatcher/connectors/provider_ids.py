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

_TOKEN = re.compile(r"^[A-Za-z0-9._:=+/-]{1,256}\Z")
_NON_DIGITS = re.compile(r"\D")
_BASE64_SEGMENT = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")


# How many of a number's last digits, found in an ID, mean it holds the number.
NUMBER_TAIL = 7
_URLSAFE = str.maketrans("-_", "+/")
_HEX_ONLY = re.compile(r"[0-9a-fA-F]+")


def holds_recipient(text: str, recipient: str) -> bool:
    """True when `text` contains the recipient, its digits, or either inside a base64 segment."""
    if not recipient:
        return False
    e164 = recipient[:1] == "+" and recipient.isascii() and recipient[1:].isdigit()  # the usual phone number
    digits = recipient[1:] if e164 else _NON_DIGITS.sub("", recipient)
    whole = recipient.lower().encode()
    # The number's last digits: a provider may write it otherwise than it was sent (WhatsApp's wa_id
    # drops Brazil's added 9 and adds Mexico's 1; a national form drops the country code).
    tail = digits[-NUMBER_TAIL:] if len(digits) >= NUMBER_TAIL else digits
    number = tail.encode() if len(digits) >= 6 else whole  # the whole needle twice: no digits to look for
    haystack = text.lower().encode()
    if whole in haystack or number in haystack:
        return True
    # Base64 of hex digits alone never decodes to three ASCII digits in a row: the first byte of
    # every three is at most 23, 104-127 or at least 208, never "0"-"9". So an ID of hex digits
    # (what gateways' IDs often are) cannot hold an E.164 number of six digits or more, decoded.
    if e164 and len(digits) >= 6 and _HEX_ONLY.fullmatch(text):
        return False
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
