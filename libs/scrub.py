"""Removes contacts from free text: email addresses, URLs, IP addresses, phone numbers.

Used wherever a provider's or a PII API's text must be shown or logged (a test
screen's error body, span attributes, log lines, bounce texts before a code is
pulled out of them). Detectors err on the side of removing too much; names
cannot be found by pattern, which is why `extra` takes the exact values fetched
in the current batch.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from urllib.parse import unquote

from libs.json_documents import parse

_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+")
# Any "user@host" shape, even without a dot in the host (local parts of internal relays).
_AT_TOKEN = re.compile(r"\S+@\S+")
_URL = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]{1,15}://|www\.)\S+", re.IGNORECASE)
_IPV6_CANDIDATE = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[0-9A-Za-z]+)?")
_IPV4 = re.compile(r"(?<![0-9])(?:\d{1,3}\.){3}\d{1,3}(?![0-9])")
# Digits with the separators people and providers use (+44 20 7946 0958, (415) 555-0100, 0044.20...),
# not inside identifiers (a hex message ID keeps its digits). The separators are those the resolver
# reads a fetched number with (services.resolver.contacts): Unicode dashes and the invisible marks a
# number copied out of rich text carries, so a reply quoting it as the API keeps it is caught too.
_PHONE_SEPARATORS = r"\s().\-/\u00ad\u2010-\u2015\u2212\u200b-\u200f\u202a-\u202e\u2060\ufeff"
_PHONE_CANDIDATE = re.compile(rf"(?<![0-9A-Za-z_])(?:\+|\b00|\()?\d[\d{_PHONE_SEPARATORS}]{{4,}}\d(?![0-9A-Za-z_])")
_PHONE_MIN_DIGITS = 7
# A percent-escape: what a URL, a query string or a form body (Twilio's `To=%2B44...`, an API's error
# quoting the request it refused) writes "@", "+" and ":" as, which no detector would otherwise see.
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# Escapes of escapes (`%2540`) are read through this many times; more is no URL anyone sends.
_UNQUOTE_ROUNDS = 3


def _percent_decoded(text: str) -> str:
    """`text` with its percent-escapes read, so that an encoded address or number is found as itself."""
    for _ in range(_UNQUOTE_ROUNDS):
        if _PERCENT_ESCAPE.search(text) is None:
            break
        text = unquote(text, errors="replace")
    return text


def _ipv6_or_keep(match: re.Match[str]) -> str:
    raw = match.group(0)
    # As found, then without sentence punctuation around it ("at 2001:db8::1.").
    for candidate in (raw, raw.rstrip("."), raw.strip(".:")):
        try:
            ipaddress.IPv6Address(candidate.split("%", 1)[0])
        except ValueError:
            continue
        return "[ip]"
    return raw


def _phone_or_keep(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    return "[phone]" if digits >= _PHONE_MIN_DIGITS else match.group(0)


# How far either side of a cut a value it would split is looked for: fetched values are shorter.
STRADDLE_WINDOW = 1024


def _cut_before_values(text: str, cut: int, found_in: Callable[[str], Iterable[str]]) -> int:
    """`cut`, moved back before any value of `found_in` it would split: the part of a value left
    before a cut is no longer the value, and would be kept as it stands."""
    start = max(0, cut - STRADDLE_WINDOW)
    window = text[start : cut + STRADDLE_WINDOW]
    values = list(found_in(window))
    moved = True
    while moved:
        moved = False
        for value in values:
            at = window.find(value)
            while at != -1 and start + at < cut:
                if cut < start + at + len(value):
                    cut, moved = start + at, True
                    break
                at = window.find(value, at + 1)
    return cut


def _finder(extra: Iterable[str]) -> Callable[[str], Iterable[str]]:
    """What says which values of `extra` a text holds."""
    # Only the values the text holds: a batch taints a thousand values or more, and sorting them all
    # for every log line and span attribute cost more than the search. A scope's tainted values say
    # themselves which they are, from an index (libs.telemetry.TaintedValues).
    found_in = getattr(extra, "found_in", None)
    if found_in is None:
        values = [v for v in extra if v]

        def found_in(part: str) -> list[str]:
            return [v for v in values if v in part]

    return found_in


def redact_values(text: str, extra: Iterable[str]) -> str:
    """`text` with every exact value of `extra` it holds replaced, longest first; nothing else changed."""
    for value in sorted(_finder(extra)(text), key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    return text


def scrub_text(
    text: str,
    limit: int = 200,
    extra: Iterable[str] = (),
    urls: bool = True,
    collapse_whitespace: bool = True,
) -> str:
    """`text` with emails, IPs, phone numbers (and URLs unless `urls=False`) replaced, and every exact
    value of `extra` removed; whitespace collapsed unless told otherwise; cut to `limit` characters."""
    if not text:
        return ""
    found_in = _finder(extra)
    if len(text) > limit * 8:  # bound the regex work on hostile input
        text = text[: _cut_before_values(text, limit * 8, found_in)]
    if "%" in text:
        text = _percent_decoded(text)
    held = found_in(text)
    for value in sorted(held, key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    # Each pattern runs only on a text holding what it cannot match without: a log line or span
    # attribute rarely holds an "@", a "://" or three dots, and each pattern costs 3-9 µs a line.
    if urls and ("://" in text or "www." in text.lower()):
        text = _URL.sub("[url]", text)
    if "@" in text:
        text = _EMAIL.sub("[email]", text)
        text = _AT_TOKEN.sub("[email]", text)
    if text.count(":") >= 2:
        text = _IPV6_CANDIDATE.sub(_ipv6_or_keep, text)
    if text.count(".") >= 3:
        text = _IPV4.sub("[ip]", text)
    text = _PHONE_CANDIDATE.sub(_phone_or_keep, text)
    if collapse_whitespace:
        text = " ".join(text.split())
    return text[:limit]


def value_types(text: str) -> str:
    """A JSON document with every value replaced by its type (`{"email": "<string>"}`), keys and
    nesting kept: what a reply of customer data may show of itself, its shape. A reply that is not
    JSON shows only its size."""
    try:
        return json.dumps(_shape(parse(text)), separators=(",", ":"))
    except ValueError:  # parse's, for what is not JSON or nests too deeply to read
        return f"<{len(text.encode())} bytes, not JSON>"
    except RecursionError:  # read, but too deep to walk
        return f"<{len(text.encode())} bytes of JSON, nested too deeply to show>"


# What an error reply names its own text with: RFC 9457's type, title and detail, OAuth's error and
# error_description, the code, message and status most APIs give, and the field an error is about.
_ERROR_TEXT_KEYS = frozenset(
    {
        "code",
        "description",
        "detail",
        "details",
        "error",
        "error_code",
        "error_description",
        "error_message",
        "errors",
        "field",
        "message",
        "messages",
        "msg",
        "parameter",
        "pointer",
        "reason",
        "status",
        "title",
        "type",
    }
)


def error_text(text: str) -> str:
    """An error reply without the record it may quote: of a JSON document, the values of the keys an
    error gives its own text with (`message`, `code`, `detail` ...) as they are, every other value
    replaced by its type as `value_types` does (a 422 listing the customer it refused, a 403 with the
    customer restricted). A reply that is not JSON is returned as it is. Either is for `scrub_text`
    next: a message may still quote an address or a number."""
    try:
        document = parse(text)
    except ValueError:
        return text
    if not isinstance(document, dict | list):
        return text  # a bare string or number: the reply's own text, as a body that is not JSON
    try:
        return json.dumps(_shape(document, _ERROR_TEXT_KEYS), separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return f"<{len(text.encode())} bytes of JSON, nested too deeply to show>"


def _shape(value: object, kept: frozenset[str] = frozenset(), keep: bool = False) -> object:
    """`value` with every value replaced by its type, but those under a key in `kept` (lowercase), at any
    depth of lists below it: an error's own text (`error_text`)."""
    if isinstance(value, dict):
        # A key like a field's name is kept; any other (a record keyed by a name or an address) is data.
        return {
            (key if _FIELD_NAME.match(key) else "<key>"): _shape(item, kept, key.lower() in kept)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_shape(item, kept, keep) for item in value]
    if keep or value is None:
        return value
    return _TYPE_NAMES.get(type(value), "<value>")


_TYPE_NAMES = {str: "<string>", bool: "<boolean>", int: "<number>", float: "<number>"}
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
