"""Validation and normalisation of fetched contacts: email syntax, phone numbers to E.164."""

from __future__ import annotations

import re

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from tokensend.common.v1 import common_pb2

# Module constants: the enum wrapper's attribute lookup cost a call per fetched contact.
EMAIL = common_pb2.CHANNEL_EMAIL
SMS_FAMILY = (common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_MMS, common_pb2.CHANNEL_RCS)
WHATSAPP = common_pb2.CHANNEL_WHATSAPP

_PHONE_PUNCTUATION = re.compile(r"[\s().\-/]")
_INTERNATIONAL = re.compile(r"\+\d{6,15}")
_ASK_PARSE = re.compile("")  # a calling code whose metadata the fast path does not read
_national_prefixes: dict[int, re.Pattern[str] | None] = {}  # calling code -> national_prefix_for_parsing


class InvalidContact(ValueError):
    """The value is not a usable email address or phone number (its text is never kept)."""


def channel_family(channel: int) -> str:
    """Email, SMS (with MMS and RCS) and WhatsApp each have their own PII API config."""
    if channel == EMAIL:
        return "email"
    if channel in SMS_FAMILY:
        return "sms"
    if channel == WHATSAPP:
        return "whatsapp"
    raise ValueError("unspecified channel")


def contact_label(channel: int) -> str:
    """The name the reference product's analytics use for the fetched value."""
    return "Email ID" if channel == EMAIL else "Mobile No."


# Plain ASCII addresses that email-validator accepts unchanged: dot-atom local part, lowercase
# LDH labels without "--" (no IDNA), an alphabetic TLD that is not special-use. Anything else
# (quoted, international, uppercase domain, long) goes through email-validator itself.
_PLAIN_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+([a-z]{1,63})"
)
_SPECIAL_USE = frozenset(("arpa", "invalid", "local", "localhost", "onion", "test"))


def normalize_email(value: str) -> str:
    value = value.strip()
    match = _PLAIN_EMAIL.fullmatch(value)
    if match and len(value) <= 128 and "--" not in value.partition("@")[2] and match.group(1) not in _SPECIAL_USE:
        return value  # what email-validator returns for these, at a twentieth of the cost
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError:
        raise InvalidContact("not a valid email address") from None


def normalize_phone(value: str) -> str:
    """E.164 from common spellings: '+44 7700 900123', '0044...', '447700900123'."""
    compact = _PHONE_PUNCTUATION.sub("", value.strip())
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    elif compact.isdigit():
        compact = "+" + compact
    if not _INTERNATIONAL.fullmatch(compact):
        raise InvalidContact("not a phone number in international format")
    try:
        number = parse_international(compact)
    except phonenumbers.NumberParseException:
        raise InvalidContact("not a phone number in international format") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidContact("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def parse_international(compact: str) -> phonenumbers.PhoneNumber:
    """`phonenumbers.parse(compact, None)` for "+" and 6-15 digits, at a tenth of the cost.

    Most numbers need none of parse's text handling: the calling code is the first known prefix of
    1-3 digits, and the rest is the national number as it stands when it neither starts with 0
    (Italian leading zeros) nor with the country's national prefix (which parse may strip). Those,
    and unknown codes, go through parse itself; tests compare the two over every calling code.
    """
    digits = compact[1:]
    if digits[0] != "0":
        for size in (1, 2, 3):
            country_code = int(digits[:size])
            if country_code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
                continue
            prefix = _national_prefix(country_code)
            national = digits[size:]
            if prefix is not _ASK_PARSE and national[0] != "0" and (prefix is None or not prefix.match(national)):
                return phonenumbers.PhoneNumber(country_code=country_code, national_number=int(national))
            break
    return phonenumbers.parse(compact, None)


def _national_prefix(country_code: int) -> re.Pattern[str] | None:
    try:
        return _national_prefixes[country_code]
    except KeyError:
        pass
    region = phonenumbers.region_code_for_country_code(country_code)
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    prefix: re.Pattern[str] | None = _ASK_PARSE
    if metadata is not None:
        pattern = metadata.national_prefix_for_parsing
        prefix = re.compile(pattern) if pattern else None
    _national_prefixes[country_code] = prefix
    return prefix


def normalize_contact(channel: int, value: str) -> str:
    if not value or not value.strip():
        raise InvalidContact("empty contact")
    if channel == EMAIL:
        return normalize_email(value)
    return normalize_phone(value)
