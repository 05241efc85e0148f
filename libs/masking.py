"""Masks contacts and names for display (`j***@e***.com`, `+44 ***** **123`, `J***`)."""

from __future__ import annotations

import phonenumbers


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
