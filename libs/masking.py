"""Masks contacts and names for display (`j***@e***.com`, `+44 ***** **123`, `J***`), also inside rendered text."""

from __future__ import annotations

import re
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


_PHONE_LIKE = re.compile(r"^\+?[0-9][0-9 ().-]{5,}[0-9]$")
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


def mask_fetched(text: str, values: Iterable[str], html: bool = False) -> str:
    """`text` with every fetched value (in any letter case, URL-encoded, and HTML-escaped when `html`)
    replaced by its mask, in one pass so a mask is never masked again."""
    if not text:
        return text
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
        return text

    def pattern(form: str) -> str:
        # Short forms as whole words only ("Al" not in "totally"); longer ones wherever they stand,
        # joined to other text too ("JohnSmith", "john_smith").
        if len(form) >= _ANYWHERE_FROM:
            return re.escape(form)
        before = r"(?<!\w)" if _WORD_EDGE.match(form[0]) else ""
        after = r"(?!\w)" if _WORD_EDGE.match(form[-1]) else ""
        return before + re.escape(form) + after

    alternatives = sorted((f for f in spellings if len(f) >= 2), key=len, reverse=True)
    regex = re.compile("|".join(pattern(f) for f in alternatives), re.IGNORECASE)
    return regex.sub(lambda m: table.get(m.group(0).casefold(), "***"), text)
