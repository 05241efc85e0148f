"""Masks contacts and names for display (`j***@e***.com`, `+44 ***** **123`, `J***`), also inside rendered text."""

from __future__ import annotations

import difflib
import itertools
import re
import string
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

import phonenumbers
from markupsafe import escape


def mask_name(value: str) -> str:
    return " ".join(part[:1] + "***" for part in value.split()) if value else ""


def mask_email(value: str) -> str:
    local, _, domain = value.rpartition("@")
    if not local:
        return "***"
    host, _, tld = domain.rpartition(".")
    return f"{local[:1]}***@{host[:1]}***.{tld}" if host else f"{local[:1]}***@***"


def mask_phone(value: str) -> str:
    """Country code and the last three digits stay; the rest becomes stars."""
    if value.isdigit():  # WhatsApp writes numbers without the '+'
        value = "+" + value
    try:
        number = phonenumbers.parse(value, None)
        country = f"+{number.country_code}"
        national = str(number.national_number)
    except phonenumbers.NumberParseException:
        return "***"
    hidden = len(national) - 3
    if hidden <= 0:
        return f"{country} ***"
    stars = "*" * hidden
    head, tail = stars[:5], stars[5:]
    return f"{country} {head} {tail}{national[-3:]}" if tail else f"{country} {head}{national[-3:]}"


def mask_contact(value: str) -> str:
    return mask_email(value) if "@" in value else mask_phone(value)


_PHONE_LIKE = re.compile(r"^\+?[0-9][0-9 ().-]{5,}[0-9]\Z")
_WORD_EDGE = re.compile(r"\w")


def mask_value(value: str) -> str:
    """A fetched value of unknown kind: an email or a phone number by its shape, else like a name."""
    if "@" in value:
        return mask_email(value)
    if _PHONE_LIKE.match(value.strip()) and sum(c.isdigit() for c in value) >= 7:
        return mask_phone(value if value.strip().startswith("+") else "+" + value.strip())
    return mask_name(value)


def _forms(value: str) -> dict[str, str]:
    """Every spelling of a fetched value a template could produce, each with its mask.

    Parts are masked too (an email's local part and domain, a name's words, a
    number without '+' or its country code), so `{{ email.split('@')[0] }}` or
    `{{ first_name.split()[0] }}` does not show them either.
    """
    mask = mask_value(value)
    forms = {value: mask}
    if "@" in value:
        local, _, domain = value.rpartition("@")
        forms[local] = local[:1] + "***"
        forms[domain] = mask_email("x@" + domain).split("@", 1)[1]
    elif mask.startswith("+"):
        digits = "".join(c for c in value if c.isdigit())
        forms[digits] = mask.lstrip("+")
        country = mask.split(" ", 1)[0].lstrip("+")
        forms[digits[len(country) :]] = mask.split(" ", 1)[1] if " " in mask else "***"
    else:
        for word in value.split():
            forms[word] = mask_name(word)
    for form, masked in list(forms.items()):
        forms[quote(form, safe="")] = masked
        forms[quote_plus(form)] = masked
    return {f: m for f, m in forms.items() if len(f) >= 2}


# Forms this long are masked wherever they stand; shorter ones only as whole words.
_ANYWHERE_FROM = 4


def _masking(values: Iterable[str], html: bool) -> tuple[re.Pattern[str], dict[str, str]] | None:
    """The pattern that finds every spelling of the fetched values, and each spelling's mask by its
    casefolded form; None when no value is long enough to mask."""
    table: dict[str, str] = {}  # casefolded form → its mask: what a match is looked up by
    spellings: set[str] = set()  # what the pattern searches for
    for value in values:
        if value and len(value) >= 2:
            for form, masked in _forms(value).items():
                shown = [(form, masked)]
                if html:
                    shown.append((str(escape(form)), str(escape(masked))))
                for spelling, mask in shown:
                    table.setdefault(spelling.casefold(), mask)
                    # The regex's ignoring of case is character by character: "ß" is not "SS", nor "İ"
                    # "i̇". Each way a template can change the case is searched for as well.
                    spellings.update((spelling, spelling.lower(), spelling.upper(), spelling.casefold()))
    if not table:
        return None

    def pattern(form: str) -> str:
        # Short forms as whole words only ("Al" not in "totally"); longer ones wherever they stand,
        # joined to other text too ("JohnSmith", "john_smith").
        if len(form) >= _ANYWHERE_FROM:
            return re.escape(form)
        before = r"(?<!\w)" if _WORD_EDGE.match(form[0]) else ""
        after = r"(?!\w)" if _WORD_EDGE.match(form[-1]) else ""
        return before + re.escape(form) + after

    alternatives = sorted((f for f in spellings if len(f) >= 2), key=len, reverse=True)
    return re.compile("|".join(pattern(f) for f in alternatives), re.IGNORECASE), table


def mask_fetched(text: str, values: Iterable[str], html: bool = False, shadow: str | None = None) -> str:
    """`text` with every fetched value (in any letter case, URL-encoded, and HTML-escaped when `html`)
    replaced by its mask, in one pass so a mask is never masked again.

    `shadow` is the same content rendered with each value's `stand_in`: every other character of
    `text` that differs from it came from a value by a way no spelling covers (sliced, reversed,
    spelled out letter by letter, a branch taken on it) and is starred too.
    """
    if not text:
        return text
    masking = _masking(values, html)
    changed = _changed(text, shadow) if shadow is not None else None
    if masking is None:
        return _starred(text, 0, len(text), changed)
    regex, table = masking
    out, at = [], 0
    for match in regex.finditer(text):
        out.append(_starred(text, at, match.start(), changed))
        out.append(table.get(match.group(0).casefold(), "***"))
        at = match.end()
    out.append(_starred(text, at, len(text), changed))
    return "".join(out)


# Letters turned by 13 and digits by 5: a stand-in keeps a value's length, case and punctuation, so a
# render with stand-ins lines up with the real one wherever the template does not branch on a value.
_TURNED = str.maketrans(
    string.ascii_lowercase + string.ascii_uppercase + string.digits,
    string.ascii_lowercase[13:]
    + string.ascii_lowercase[:13]
    + string.ascii_uppercase[13:]
    + string.ascii_uppercase[:13]
    + string.digits[5:]
    + string.digits[:5],
)


def stand_in(value: str) -> str:
    """`value` with every letter and digit changed (other scripts' letters become `x`): what a preview
    renders a second time with, to find the characters of the first render that came from values."""
    turned = value.translate(_TURNED)
    if turned.isascii():
        return turned
    return "".join("x" if not c.isascii() and c.isalnum() else c for c in turned)


# Beyond this a line's characters are matched with difflib's heuristics (fast, coarser, never finer).
_EXACT_LINE = 4096
# Lines of different lengths are aligned character by character, and a value's letter can meet the
# same letter by chance: only runs this long are taken as shared text.
_TRUSTED_RUN = 4


def _changed(text: str, shadow: str) -> bytearray:
    """1 for each character of `text` that its shadow render does not share at the same place."""
    if len(text) == len(shadow):
        return bytearray(a != b for a, b in zip(text, shadow, strict=True))
    changed = bytearray(len(text))
    lines, shadow_lines = text.splitlines(keepends=True), shadow.splitlines(keepends=True)
    starts = list(itertools.accumulate((len(line) for line in lines), initial=0))
    matcher = difflib.SequenceMatcher(None, lines, shadow_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if tag == "replace" and i2 - i1 == j2 - j1:
            for offset in range(i2 - i1):
                line, other = lines[i1 + offset], shadow_lines[j1 + offset]
                changed[starts[i1 + offset] : starts[i1 + offset + 1]] = _changed_in_line(line, other)
        else:
            changed[starts[i1] : starts[i2]] = b"\x01" * (starts[i2] - starts[i1])
    return changed


def _changed_in_line(line: str, other: str) -> bytearray:
    if len(line) == len(other):
        return bytearray(a != b for a, b in zip(line, other, strict=True))
    changed = bytearray(b"\x01" * len(line))
    long = max(len(line), len(other)) > _EXACT_LINE
    for block in difflib.SequenceMatcher(None, line, other, autojunk=long).get_matching_blocks():
        if block.size >= _TRUSTED_RUN:
            changed[block.a : block.a + block.size] = bytes(block.size)
    return changed


def _starred(text: str, start: int, end: int, changed: bytearray | None) -> str:
    piece = text[start:end]
    if changed is None or not any(changed[start:end]):
        return piece
    return "".join("*" if flag and not c.isspace() else c for c, flag in zip(piece, changed[start:end], strict=True))
