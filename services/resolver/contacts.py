"""Validation and normalisation of fetched contacts: email syntax, phone numbers to E.164."""

from __future__ import annotations

import re

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from tokensend.common.v1 import common_pb2

from services.resolver.phones import is_valid_national, is_valid_number, split_international

# Module constants: the enum wrapper's attribute lookup cost a call per fetched contact.
EMAIL = common_pb2.CHANNEL_EMAIL
SMS_FAMILY = (common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_MMS, common_pb2.CHANNEL_RCS)
WHATSAPP = common_pb2.CHANNEL_WHATSAPP

# Separators, as phonenumbers reads them: ASCII ones, Unicode dashes, and the invisible marks (bidi,
# zero-width) a number copied out of a right-to-left or rich-text field carries around it.
_PHONE_PUNCTUATION = re.compile(r"[\s().\-/\u00ad\u2010-\u2015\u2212\u200b-\u200f\u202a-\u202e\u2060\ufeff]")
_FULLWIDTH_PLUS = "\uff0b"
_INTERNATIONAL = re.compile(r"\+\d{6,15}")
# A number kept in a float column and written out as text ("4369912345678.0", a spreadsheet export): its
# ".0" is no separator, as it is in "604.604.7430". Only one trailing run of zeros after 7+ digits.
_FLOAT_RENDERING = re.compile(r"(\+?[0-9]{7,})\.0+")
# No message can dial an extension: the number is refused, and says why.
HAS_EXTENSION = "a phone number with an extension, which messages cannot reach: store the number without it"
# A vanity number ("1-800-FLOWERS") or a label kept with the number ("tel:", "Mobile:"): no number to send to.
HAS_LETTERS = "not a phone number: it holds letters (a vanity number, or a label such as tel:), store its digits alone"
# Longer than any address (254 octets) or number could be written, with room for spaces around it: refused
# before it is read. A megabyte-long value held the event loop, every other call waiting, for a second.
MAX_CONTACT_CHARS = 320
TOO_LONG = f"longer than {MAX_CONTACT_CHARS} characters"


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
# LDH labels of 1-63 characters, none starting or ending with "-" and none with "--" (no IDNA), an
# alphabetic TLD that is not special-use. Anything else (quoted, international, uppercase domain,
# long) goes through email-validator itself. The hyphen and length rules are checked on the domain
# as a whole rather than by the pattern: a label's bounded repeat made the match a third slower.
_PLAIN_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@((?:[a-z0-9-]+\.)+([a-z]+))"
)
_SPECIAL_USE = frozenset(("arpa", "invalid", "local", "localhost", "onion", "test"))


def normalize_email(value: str) -> str:
    value = value.strip()
    match = _PLAIN_EMAIL.fullmatch(value) if len(value) <= 128 else None
    if match is None:
        if len(value) > MAX_CONTACT_CHARS:  # not read, by the pattern nor by email-validator
            raise InvalidContact(f"not a valid email address: {TOO_LONG}")
    else:
        domain, tld = match.groups()
        hyphens_fit = "-" not in domain or (
            "--" not in domain and ".-" not in domain and "-." not in domain and domain[0] != "-"
        )
        if hyphens_fit and (len(domain) <= 63 or max(map(len, domain.split("."))) <= 63) and tld not in _SPECIAL_USE:
            return value  # what email-validator returns for these, at a twentieth of the cost
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError:
        raise InvalidContact(_email_problem(value)) from None


def _email_problem(value: str) -> str:
    """Why `value` is no address, for the shapes addresses are commonly kept in that the brand can mend;
    never quoting it (email-validator's own messages quote the characters they refuse)."""
    reason = "not a valid email address"
    local, at, domain = value.rpartition("@")
    if value[:7].lower() == "mailto:":
        return f"{reason}: a mailto: link, store the address alone"
    if value.endswith(">") and "<" in value:
        return f'{reason}: a display name with the address ("Name <address>"), store the address alone'
    if local.startswith('"'):
        return f"{reason}: a quoted local part, which mail providers do not take"
    if any(c.isspace() for c in value):
        return f"{reason}: it holds whitespace or a line break"
    if not value.isprintable():
        return f"{reason}: it holds invisible or control characters (a zero-width space, a byte order mark)"
    if not at:
        return f"{reason}: it has no @"
    if domain.endswith("."):
        return f"{reason}: its domain ends with a dot"
    return reason


def normalize_phone(value: str, region: str = "") -> str:
    """E.164 from common spellings: '+44 7700 900123', '0044...', '447700900123'; with a `region`
    ("US"), a number without "+" is read as that region dials it ('(415) 555-0100', '011 44...'), and one
    with "00" that the region reads no number in as international ('0044...' in the US)."""
    if value[:1] == "+" and value[1:].isdigit():
        compact = value  # already E.164's spelling, as most PII APIs keep numbers
    else:
        value = value.strip()
        if len(value) > MAX_CONTACT_CHARS:  # not read, by the patterns nor by phonenumbers
            raise InvalidContact(f"not a phone number: {TOO_LONG}")
        rendered = _FLOAT_RENDERING.fullmatch(value)
        if rendered is not None:
            value = rendered[1]  # the number the float holds, as `as_text` reads a JSON float
        compact = _PHONE_PUNCTUATION.sub("", value).replace(_FULLWIDTH_PLUS, "+")
        if region and compact.isdigit():
            try:
                return _national(compact, region)
            except InvalidContact:
                # "00" and a country code, as most of the world dials out: a region that dials out
                # otherwise (011 in the US, 0011 in Australia) reads no number in it, and it stands as is.
                if not compact.startswith("00"):
                    raise
        if compact.startswith("00"):
            compact = "+" + compact[2:]
        elif compact.isdigit():
            compact = "+" + compact
    if not _INTERNATIONAL.fullmatch(compact):
        if len(value) > MAX_CONTACT_CHARS:
            raise InvalidContact(f"not a phone number: {TOO_LONG}")
        if _has_extension(value, region):
            raise InvalidContact(HAS_EXTENSION)
        if any(c.isalpha() for c in value):
            raise InvalidContact(HAS_LETTERS)
        raise InvalidContact("not a phone number in international format")
    # Read off as it stands, its E.164 form is the compact spelling itself: ASCII digits only, since
    # parse reads other scripts' digits too and E.164 spells them in ASCII.
    split = split_international(compact) if compact.isascii() else None
    if split is not None:
        if not is_valid_national(*split):
            raise InvalidContact("not a valid phone number")
        return compact
    try:
        number = phonenumbers.parse(compact, None)
    except phonenumbers.NumberParseException:
        raise InvalidContact("not a phone number in international format") from None
    if not is_valid_number(number):
        raise InvalidContact("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _has_extension(value: str, region: str) -> bool:
    """Whether phonenumbers reads an extension (" x12", " ext. 12", ";ext=12", " #12") after the number."""
    try:
        return bool(phonenumbers.parse(value, region or None).extension)
    except phonenumbers.NumberParseException:
        return False


def _national(digits: str, region: str) -> str:
    """A number as `region` dials it (national, or international behind its own prefix), in E.164."""
    if not 3 <= len(digits) <= 17:
        raise InvalidContact("not a phone number")
    try:
        number = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        raise InvalidContact(f"not a phone number of region {region}") from None
    if not is_valid_number(number):
        raise InvalidContact("not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_contact(channel: int, value: str, region: str = "") -> str:
    if not value or not value.strip():
        raise InvalidContact("empty contact")
    if channel == EMAIL:
        return normalize_email(value)
    return normalize_phone(value, region)
