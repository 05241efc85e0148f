"""Removes contacts from free text: email addresses, URLs, IP addresses, phone numbers.

Used wherever a provider's or a PII API's text must be shown or logged (a test
screen's error body, span attributes, log lines, bounce texts before a code is
pulled out of them). Detectors err on the side of removing too much; names
cannot be found by pattern, which is why `extra` takes the values fetched in the
current batch.

Percent-escapes are read first. A text is then scrubbed as it is written, and
again as a reader would see it: HTML character references read (`&#64;`,
`&#x40;`, `&commat;`), and a text that is not ASCII in its NFKC form (full-width
`＠` and digits as "@" and digits). Where reading finds nothing more, the text is
kept as it came. ASCII without "&#" or "&...;", nearly every log line and span
attribute, is scrubbed once, as written.

A fetched value is found in any case and any Unicode form (`fold`: NFKD and case
folding, "JANE DOE" and "Ｊａｎｅ Ｄｏｅ" for "Jane Doe", "Zoe\u0308" for "Zoë"),
and replaced where it stands in the text, however folding changed its length.
"""

from __future__ import annotations

import html
import ipaddress
import json
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Collection, Iterable
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


# An HTML character reference as a browser reads one: a number with or without its ";", a name with it
# (`&commat;`). Names without ";" are left: `&notify=1` in a query string is no "¬ify=1".
_CHARACTER_REFERENCE = re.compile(r"&(?:#[0-9]{1,8};?|#[xX][0-9A-Fa-f]{1,8};?|[A-Za-z][A-Za-z0-9]{1,31};)")


def _character(match: re.Match[str]) -> str:
    return html.unescape(match.group(0))


def _readable(text: str) -> str:
    """`text` as a reader would see it: character references read (and the percent-escapes they may
    spell), a text that is not ASCII in its NFKC form (full-width "＠" and digits as "@" and digits)."""
    for _ in range(_UNQUOTE_ROUNDS):  # a reference to a reference (`&amp;#64;`) is read through too
        read = _CHARACTER_REFERENCE.sub(_character, text) if "&" in text else text
        if not read.isascii():
            read = unicodedata.normalize("NFKC", read)
        if "%" in read:
            read = _percent_decoded(read)
        if read == text:
            break
        text = read
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


def fold(text: str) -> str:
    """The form a fetched value and a text are compared in: Unicode's compatibility caseless form
    (NFKD and case folded), so that "JANE DOE", "Ｊａｎｅ Ｄｏｅ" and "jane doe" are "Jane Doe", and a
    decomposed "Zoe\u0308" is "Zoë". Decomposed, not composed: a value's last character stays itself
    whatever follows it in a text ("Jane Doe" in "Jane Doe\u0301"), where composing made it another."""
    if text.isascii():
        return text.lower()
    normalize = unicodedata.normalize
    return normalize("NFKD", normalize("NFKD", normalize("NFD", text).casefold()).casefold())


# Says which of a scope's values, folded, a folded text holds.
Finder = Callable[[str], Collection[str]]


def _finder(extra: Iterable[str]) -> Finder | None:
    """What says which values of `extra`, folded, a folded text holds; None when there are none."""
    # Only the values the text holds: a batch taints a thousand values or more, and sorting them all
    # for every log line and span attribute cost more than the search. A scope's tainted values say
    # themselves which they are, from an index of their folded forms (libs.telemetry.TaintedValues).
    found_in = getattr(extra, "found_in", None)
    if found_in is not None:
        return found_in if extra else None
    values = {fold(v) for v in extra if v}
    if not values:
        return None
    return lambda folded: [v for v in values if v in folded]


_NOT_ASCII = re.compile(r"[^\x00-\x7f]+")


def _folded_pieces(text: str) -> tuple[str, list[int], list[int], list[int], list[bool]]:
    """`fold(text)` and how it is made of `text`, for a text that is not ASCII: for each piece, where
    its fold starts, where it starts and ends in `text`, and whether it folds one character for one.

    A run of ASCII folds character by character. A run of other characters, with the ASCII character
    before it (combining marks are put in order up to an ASCII character, never past it),
    folds on its own: character by character where that folds it the same, else as a whole."""
    folded: list[str] = []
    fold_starts: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    one_for_one: list[bool] = []
    length = 0

    def piece(start: int, end: int, folded_piece: str, ascii_run: bool) -> None:
        nonlocal length
        folded.append(folded_piece)
        fold_starts.append(length)
        starts.append(start)
        ends.append(end)
        one_for_one.append(ascii_run)
        length += len(folded_piece)

    at = 0
    for match in _NOT_ASCII.finditer(text):
        start, end = max(match.start() - 1, at), match.end()
        if start > at:
            piece(at, start, text[at:start].lower(), True)
        run = text[start:end]
        whole = fold(run)
        chars = [fold(c) for c in run]
        if "".join(chars) == whole:
            for i, folded_char in enumerate(chars):
                piece(start + i, start + i + 1, folded_char, False)
        else:
            piece(start, end, whole, False)
        at = end
    if at < len(text):
        piece(at, len(text), text[at:].lower(), True)
    return "".join(folded), fold_starts, starts, ends, one_for_one


def _value_spans(text: str, found_in: Finder) -> list[tuple[int, int]]:
    """Where in `text` the values of `found_in` stand, in any case and form, in order, overlaps joined."""
    folded = fold(text)
    held = found_in(folded)
    if not held:
        return []
    spans = []
    for value in held:
        # Each occurrence from the end of the last: one that begins inside it is cut by its "[redacted]"
        # and no longer whole, and a search from each position cost a step per position ("aaa" in "aaaa...").
        at = folded.find(value)
        while at != -1:
            spans.append((at, at + len(value)))
            at = folded.find(value, at + len(value))
    if not text.isascii():
        # Folding changed lengths: each span is taken back to the characters of `text` it came from
        # (the whole of a piece that folded as one). Found values only: no such walk for a text
        # that holds none.
        pieces, fold_starts, starts, ends, one_for_one = _folded_pieces(text)
        if pieces != folded:  # not made as it should be: all of it goes rather than a part kept
            return [(0, len(text))]
        mapped = []
        for start, end in spans:
            first, last = bisect_right(fold_starts, start) - 1, bisect_right(fold_starts, end - 1) - 1
            mapped.append(
                (
                    starts[first] + (start - fold_starts[first]) if one_for_one[first] else starts[first],
                    starts[last] + (end - fold_starts[last]) if one_for_one[last] else ends[last],
                )
            )
        spans = mapped
    spans.sort()
    joined = [spans[0]]
    for start, end in spans[1:]:
        if start < joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def _without_values(text: str, found_in: Finder) -> str:
    spans = _value_spans(text, found_in)
    if not spans:
        return text
    kept, at = [], 0
    for start, end in spans:
        kept += [text[at:start], "[redacted]"]
        at = end
    kept.append(text[at:])
    return "".join(kept)


# How far either side of a cut a value it would split is looked for: fetched values are shorter.
STRADDLE_WINDOW = 1024


def _cut_before_values(text: str, cut: int, found_in: Finder) -> int:
    """`cut`, moved back before any value of `found_in` it would split: the part of a value left
    before a cut is no longer the value, and would be kept as it stands."""
    start = max(0, cut - STRADDLE_WINDOW)
    for value_start, value_end in _value_spans(text[start : cut + STRADDLE_WINDOW], found_in):
        if start + value_start < cut < start + value_end:
            return start + value_start
    return cut


def redact_values(text: str, extra: Iterable[str]) -> str:
    """`text` with every value of `extra` it holds, in any case and form (`fold`), replaced where it
    stands; nothing else changed."""
    found_in = _finder(extra)
    return text if found_in is None else _without_values(text, found_in)


def scrub_text(
    text: str,
    limit: int = 200,
    extra: Iterable[str] = (),
    urls: bool = True,
    collapse_whitespace: bool = True,
) -> str:
    """`text` with emails, IPs, phone numbers (and URLs unless `urls=False`) replaced, and every value
    of `extra`, in any case and form, removed; whitespace collapsed unless told otherwise; cut to
    `limit` characters. Scrubbed as written, then as read (`_readable`)."""
    if not text:
        return ""
    found_in = _finder(extra)
    if len(text) > limit * 8:  # bound the regex work on hostile input
        text = text[: _cut_before_values(text, limit * 8, found_in) if found_in else limit * 8]
    if "%" in text:
        text = _percent_decoded(text)
    scrubbed = _scrubbed(text, found_in, urls)
    # What is left is read as a reader would see it (`_readable`) and scrubbed again, unless it is ASCII
    # without a character reference ("&#" or "&" and ";"), as nearly every log line and span attribute
    # is (a URL's "?a=?&b=?" too), and reads as it is written. Where reading finds nothing more, the
    # text is kept as it came (a "&amp;", a full-width letter).
    if not scrubbed.isascii() or ("&" in scrubbed and ("&#" in scrubbed or ";" in scrubbed)):
        readable = _readable(scrubbed)
        if readable != scrubbed:
            again = _scrubbed(readable, found_in, urls)
            if again != readable:
                scrubbed = again
    if collapse_whitespace:
        scrubbed = " ".join(scrubbed.split())
    return scrubbed[:limit]


def _scrubbed(text: str, found_in: Finder | None, urls: bool) -> str:
    if found_in is not None:
        text = _without_values(text, found_in)
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
    return _PHONE_CANDIDATE.sub(_phone_or_keep, text)


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
    next: a message may still quote an address or a number. One that opens as a JSON object or array
    but does not parse (cut short, as a Test reply cuts a body past 256 KiB) shows only its size: as
    text, the record it quotes would show whole."""
    try:
        document = parse(text)
    except ValueError:
        if text.lstrip()[:1] in ("{", "["):
            return f"<{len(text.encode())} bytes that open as JSON but do not parse (cut short?), not shown>"
        return text
    if not isinstance(document, dict | list):
        return text  # a bare string or number: the reply's own text, as a body that is not JSON
    try:
        return json.dumps(_shape(document, _ERROR_TEXT_KEYS), separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        return f"<{len(text.encode())} bytes of JSON, nested too deeply to show>"


# Record values shorter than this are not looked for in a message: "en" or "GB" would cut up its words.
MIN_RECORD_VALUE = 3
# A reply's values looked for at most: one customer's record holds far fewer.
MAX_RECORD_VALUES = 5000


def quoted_record_values(text: str | bytes) -> set[str]:
    """The strings of an error reply that `error_text` shows only by their type: the record it quotes.
    Nothing was read from a reply that failed, yet its message may name the customer whose record
    stands beside it ("customer Jane Doe is restricted"): these are what to scrub that message of.
    Empty for a reply that is not JSON."""
    try:
        document = parse(text)
    except ValueError:
        return set()
    found: set[str] = set()
    stack: list[tuple[object, bool]] = [(document, False)]
    while stack and len(found) < MAX_RECORD_VALUES:
        value, shown = stack.pop()
        if isinstance(value, dict):
            # As `_shape` keeps them: by a value's own key, not its parent's (a list passes its own on).
            stack.extend((item, key.lower() in _ERROR_TEXT_KEYS) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, shown) for item in value)
        elif isinstance(value, str) and not shown and len(value.strip()) >= MIN_RECORD_VALUE:
            found.add(value.strip())
    return found


def _shape(value: object, kept: frozenset[str] = frozenset(), keep: bool = False) -> object:
    """`value` with every value replaced by its type, but those under a key in `kept` (lowercase), at any
    depth of lists below it: an error's own text (`error_text`)."""
    if isinstance(value, dict):
        # A key like a field's name is kept; any other (a record keyed by a name or an address) is data.
        return {
            (key if _FIELD_NAME.match(key) and not names_itself(key, item) else "<key>"): _shape(
                item, kept, key.lower() in kept
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_shape(item, kept, keep) for item in value]
    if keep or value is None:
        return value
    return _TYPE_NAMES.get(type(value), "<value>")


_TYPE_NAMES = {str: "<string>", bool: "<boolean>", int: "<number>", float: "<number>"}
# How many values under a key are compared with it: a record is small, a bulk reply is not looked through.
_SELF_NAMING_VISITS = 1000


def names_itself(key: str, item: object) -> bool:
    """True when `key` is one of the string values of the record under it, in any case: a record keyed
    by its customer's name or ID (`{"Jane": {"first_name": "Jane"}}`), whose key is data, not a field."""
    if not isinstance(item, dict | list):
        return False
    folded, ascii_key = fold(key), key.isascii()
    stack, visits = [item], 0
    while stack and visits < _SELF_NAMING_VISITS:
        value = stack.pop()
        visits += 1
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            # Lengths compare only in ASCII: folded, "Zoë" may be composed or not, "Weiß" is "weiss".
            if (len(value) == len(key) or not (ascii_key and value.isascii())) and fold(value) == folded:
                return True
    return False


_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}\Z")
