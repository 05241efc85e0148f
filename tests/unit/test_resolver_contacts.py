"""Unit tests for services/resolver/contacts.py: validation and normalisation of fetched contacts."""

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2

from services.resolver.contacts import (
    InvalidContact,
    channel_family,
    contact_label,
    normalize_contact,
    normalize_email,
    normalize_phone,
)

C = common_pb2.Channel
PHONE_CHANNELS = [C.CHANNEL_SMS, C.CHANNEL_MMS, C.CHANNEL_RCS, C.CHANNEL_WHATSAPP]


# --- email -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("  alice@example.com\n", "alice@example.com"),
        ("Alice@Example.COM", "Alice@example.com"),  # the domain is case-insensitive, the local part is kept
        ("a.b+tag@sub.example.co.uk", "a.b+tag@sub.example.co.uk"),
    ],
)
def test_normalize_email_valid(value: str, expected: str) -> None:
    assert normalize_email(value) == expected


@pytest.mark.parametrize(
    "value",
    ["not-an-email", "a@b", "", "   ", "a@@example.com", "alice@example..com", "a b@example.com", "alice@"],
)
def test_normalize_email_invalid_and_the_error_does_not_repeat_the_input(value: str) -> None:
    with pytest.raises(InvalidContact) as info:
        normalize_email(value)
    if value.strip():
        assert value.strip() not in str(info.value)
        assert value.strip() not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__, "no chained library error"


def test_email_error_never_holds_a_canary_address() -> None:
    canary = "canary.7f3a@not-a-real-domain"
    with pytest.raises(InvalidContact) as info:
        normalize_email(canary)
    assert "canary" not in str(info.value)
    assert "canary" not in repr(info.value.args)


# --- phone -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("+44 7400 123456", "+447400123456"),
        ("+447400123456", "+447400123456"),
        ("0044 7400 123456", "+447400123456"),
        ("447400123456", "+447400123456"),
        (" +44 7400-123456 ", "+447400123456"),
        ("+1 202 555 0123", "+12025550123"),
        ("+1 (202) 555-0123", "+12025550123"),
        ("1.202.555.0123", "+12025550123"),
        ("+33 6 12 34 56 78", "+33612345678"),
        ("+49 151 23456789", "+4915123456789"),
        ("+91 98765 43210", "+919876543210"),
        # Digits of other scripts are read as the digits they are; E.164 spells them in ASCII.
        ("+\u0664\u0664\u0667\u0664\u0660\u0660\u0661\u0662\u0663\u0664\u0665\u0666", "+447400123456"),
        ("+\uff14\uff14\uff17\uff14\uff10\uff10\uff11\uff12\uff13\uff14\uff15\uff16", "+447400123456"),
        ("+44 \u0667\u0664\u0660\u0660 123456", "+447400123456"),
        # Unicode dashes, a full-width plus and the invisible marks of text copied out of a right-to-left
        # or rich-text field, as phonenumbers reads them.
        ("+44 7400\u2013123456", "+447400123456"),
        ("+44\u20117400\u2011123456", "+447400123456"),
        ("\uff0b44 7400 123456", "+447400123456"),
        ("\u202a+44 7400 123456\u202c", "+447400123456"),
        ("\u200f+447400123456\u200e", "+447400123456"),
        ("\ufeff+447400123456", "+447400123456"),
    ],
)
def test_normalize_phone_valid(value: str, expected: str) -> None:
    assert normalize_phone(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "12ab",
        "+1",
        "",
        "+44 7400 12345",  # one digit short: parses but is not a valid number
        "07400123456",  # national format, no country code
        "+999 1234567",  # no such country code
        "+447400123456789012",  # too long
        "alice@example.com",
    ],
)
def test_normalize_phone_invalid_and_the_error_does_not_repeat_the_input(value: str) -> None:
    with pytest.raises(InvalidContact) as info:
        normalize_phone(value)
    digits = "".join(ch for ch in value if ch.isdigit())
    if len(digits) >= 4:
        assert digits not in str(info.value)
    if value:
        assert value not in str(info.value)
    assert info.value.__cause__ is None


# --- by channel ------------------------------------------------------------------------------------


def test_normalize_contact_email_channel() -> None:
    assert normalize_contact(C.CHANNEL_EMAIL, " bob@example.com ") == "bob@example.com"
    with pytest.raises(InvalidContact):
        normalize_contact(C.CHANNEL_EMAIL, "+447400123456")


@pytest.mark.parametrize("channel", PHONE_CHANNELS)
def test_normalize_contact_phone_channels(channel: int) -> None:
    assert normalize_contact(channel, "0044 7400 123456") == "+447400123456"
    with pytest.raises(InvalidContact):
        normalize_contact(channel, "bob@example.com")


@pytest.mark.parametrize("channel", [C.CHANNEL_EMAIL, *PHONE_CHANNELS])
@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_normalize_contact_empty(channel: int, value: str) -> None:
    with pytest.raises(InvalidContact):
        normalize_contact(channel, value)


def test_invalid_contact_is_a_value_error() -> None:
    assert issubclass(InvalidContact, ValueError)


# --- families and labels ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "family"),
    [
        (C.CHANNEL_EMAIL, "email"),
        (C.CHANNEL_SMS, "sms"),
        (C.CHANNEL_MMS, "sms"),
        (C.CHANNEL_RCS, "sms"),
        (C.CHANNEL_WHATSAPP, "whatsapp"),
    ],
)
def test_channel_family(channel: int, family: str) -> None:
    assert channel_family(channel) == family


@pytest.mark.parametrize("channel", [C.CHANNEL_UNSPECIFIED, 99])
def test_channel_family_unspecified(channel: int) -> None:
    with pytest.raises(ValueError):
        channel_family(channel)


def test_contact_label() -> None:
    assert contact_label(C.CHANNEL_EMAIL) == "Email ID"
    for channel in PHONE_CHANNELS:
        assert contact_label(channel) == "Mobile No."


@pytest.mark.parametrize(
    ("value", "region", "e164"),
    [
        ("6046047430", "CA", "+16046047430"),
        ("(415) 555-0100", "US", "+14155550100"),
        ("1 415 555 0100", "US", "+14155550100"),
        ("011 44 7400 123456", "US", "+447400123456"),
        ("07400 123456", "GB", "+447400123456"),
        ("0044 7400 123456", "DE", "+447400123456"),
        ("+44 7400 123456", "US", "+447400123456"),  # a "+" is read as it stands, whatever the region
    ],
)
def test_a_region_reads_numbers_as_it_dials_them(value, region, e164) -> None:
    assert normalize_contact(common_pb2.CHANNEL_SMS, value, region) == e164


@pytest.mark.parametrize("value", ["447400123456", "555", "4155550100x", "1" * 20])
def test_a_region_refuses_what_it_does_not_dial(value) -> None:
    with pytest.raises(InvalidContact):
        normalize_contact(common_pb2.CHANNEL_SMS, value, "US")


@pytest.mark.parametrize(
    ("value", "region", "e164"),
    [
        ("0044 7400 123456", "US", "+447400123456"),  # the US dials out with 011
        ("0044 7400 123456", "AU", "+447400123456"),  # Australia with 0011
        ("00 1 415 555 0100", "JP", "+14155550100"),  # Japan with 010
        ("00447400123456", "RU", "+447400123456"),  # Russia with 810
        ("0016 49 231 1234", "AU", "+492311234"),  # what the region dials itself is read so first (0016 + 49)
    ],
)
def test_a_number_with_00_is_international_in_a_region_that_dials_out_otherwise(value, region, e164) -> None:
    """A number with "00" and a country code is read as it stands, region or not: with `default_region: US` set for an
    API's national numbers, its "0044..." numbers, which read fine without it, all failed INVALID_CONTACT."""
    assert normalize_contact(common_pb2.CHANNEL_SMS, value, region) == e164
    if region != "AU":
        assert normalize_contact(common_pb2.CHANNEL_SMS, value) == e164


@pytest.mark.parametrize("value", ["0044 12", "00", "0099 123 456 789", "0044 7400 12345 6789"])
def test_a_number_with_00_that_is_no_number_anywhere_is_still_refused(value) -> None:
    with pytest.raises(InvalidContact):
        normalize_contact(common_pb2.CHANNEL_SMS, value, "US")


@pytest.mark.parametrize(
    ("value", "region", "e164"),
    [
        ("4369912345678.0", "", "+4369912345678"),
        ("+4369912345678.0", "", "+4369912345678"),
        (" 4369912345678.000 ", "", "+4369912345678"),
        ("447400123456.0", "", "+447400123456"),
        ("6046047430.0", "CA", "+16046047430"),
        # Dotted spellings are separators, as they were: several groups, or no float's ".0".
        ("604.604.7430", "CA", "+16046047430"),
        ("1.202.555.0123", "", "+12025550123"),
    ],
)
def test_a_number_written_out_of_a_float_column_is_the_number_not_another_one(value, region, e164) -> None:
    """ "4369912345678.0" is the float 4369912345678 written as text: its dot dropped as a separator,
    +43699123456780, another valid Austrian number, was the contact."""
    assert normalize_contact(common_pb2.CHANNEL_SMS, value, region) == e164


@pytest.mark.parametrize("region", ["", "AT"])
@pytest.mark.parametrize("value", ["4.369912345678e12", "4.369912345678E+12", "4369912345678e0", "4369912345678.0e0"])
def test_a_number_in_scientific_notation_is_refused_not_read_as_another(value, region) -> None:
    with pytest.raises(InvalidContact) as info:
        normalize_contact(common_pb2.CHANNEL_SMS, value, region)
    assert "4369912345678" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "region"),
    [
        *[
            (value, region)
            for value in (
                "+1 415 555 0100 x12",
                "+1 415 555 0100 ext. 12",
                "+1 (415) 555-0100 extension 12",
                "+14155550100;ext=12",
                "+44 20 7946 0958 #12",
            )
            for region in ("", "US")
        ],
        ("(415) 555-0100 x12", "US"),  # as the region dials it
    ],
)
def test_a_number_with_an_extension_is_refused_as_such(value, region) -> None:
    """A text message cannot dial an extension: the number is refused, and the reason given is its extension,
    not a format it is in."""
    with pytest.raises(InvalidContact) as info:
        normalize_contact(common_pb2.CHANNEL_SMS, value, region)
    message = str(info.value)
    assert "extension" in message
    assert "international format" not in message
    for digits in ("4155550100", "2079460958", "0100", "12"):
        assert digits not in message
    assert info.value.__cause__ is None


@pytest.mark.parametrize("value", ["+1 415 555 0100 xyz", "+1 415 555 0100 x", "+1 415 555 01OO"])
def test_letters_that_are_no_extension_are_not_called_one(value) -> None:
    with pytest.raises(InvalidContact) as info:
        normalize_contact(common_pb2.CHANNEL_SMS, value)
    assert "extension" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("Jane Evans <jane.evans@example.com>", "display name"),
        ("mailto:jane.evans@example.com", "mailto:"),
        ("MAILTO:jane.evans@example.com", "mailto:"),
        ('"jane evans"@example.com', "quoted local part"),
        ("jane.evans@example.com.", "ends with a dot"),
        ("jane.evans @example.com", "whitespace"),
        ("jane.evans@exa\nmple.com", "whitespace"),
        ("\u200bjane.evans@example.com", "invisible"),
        ("jane.evans\ufeff@example.com", "invisible"),
        ("jane.evans.example.com", "no @"),
    ],
)
def test_an_address_kept_in_a_fixable_shape_is_refused_saying_which_without_quoting_it(value, reason) -> None:
    """What is wrong with the stored address is told, so the brand can mend its data; the address is not."""
    with pytest.raises(InvalidContact) as info:
        normalize_email(value)
    message = str(info.value)
    assert message.startswith("not a valid email address")
    assert reason in message
    for part in ("jane", "evans", "example"):
        assert part not in message
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("value", "region"), [("1-800-FLOWERS", ""), ("1-800-FLOWERS", "US"), ("tel:+447400123456", "")]
)
def test_a_number_holding_letters_is_refused_saying_so(value, region) -> None:
    with pytest.raises(InvalidContact) as info:
        normalize_contact(common_pb2.CHANNEL_SMS, value, region)
    message = str(info.value)
    assert "letters" in message and "extension" not in message
    for part in ("800", "FLOWERS", "7400", "+44"):
        assert part not in message
