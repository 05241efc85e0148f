"""A contact far longer than any address or number is refused as such before it is read: a megabyte-long
value in a reply held the event loop, and every other call, for a second while it was validated."""

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver.contacts import MAX_CONTACT_CHARS, normalize_contact
from services.resolver.pii_client import PiiApiClient

EMAIL, SMS = common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS
E = pb.ResolveErrorCode


@pytest.mark.parametrize(
    ("channel", "value", "detail"),
    [
        (EMAIL, "a" * 1_000_000 + "@example.com", "not a valid email address: longer than 320 characters"),
        (SMS, "+" + "4" * 1_000_000, "not a phone number: longer than 320 characters"),
        (SMS, "1-" * 500_000, "not a phone number: longer than 320 characters"),
    ],
    ids=["email", "e164-digits", "punctuated"],
)
@pytest.mark.parametrize("path", ["contact", "record.contact"], ids=["field", "nested"])
def test_a_contact_too_long_to_be_one_is_refused_saying_so(channel, value, detail, path) -> None:
    config = pb.PiiApiConfig(channel=channel, contact_path=path)
    record = {"contact": value} if path == "contact" else {"record": {"contact": value}}
    reply = pb.ResolveContactsResponse()
    PiiApiClient._add_records(config, channel, ["cust-1"], {"cust-1": record}, 200, 1, reply.contacts, {})
    error = reply.contacts[0].error
    assert (error.code, error.detail) == (E.RESOLVE_ERROR_CODE_INVALID_CONTACT, detail)


def test_an_address_at_the_bound_with_spaces_around_it_is_still_read() -> None:
    address = "a" * 60 + "@" + "b" * 60 + ".example.com"
    padded = address.center(MAX_CONTACT_CHARS)
    assert normalize_contact(EMAIL, padded) == address
    assert normalize_contact(SMS, "+447400123456".center(MAX_CONTACT_CHARS)) == "+447400123456"
