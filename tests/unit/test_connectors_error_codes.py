"""Providers' error codes in outcomes: a code is repeated, a number that may be the recipient's is not."""

from __future__ import annotations

import orjson
import pytest

from services.dispatcher.connectors import twilio, whatsapp
from services.dispatcher.connectors.base import numeric_error_code
from services.dispatcher.connectors.http_retry import HttpReply

NUMBER = 447700900123  # the recipient's number, as a provider could echo it in the code's place


def reply(document: object) -> HttpReply:
    return HttpReply(400, {}, orjson.dumps(document))


@pytest.mark.parametrize(("value", "expected"), [(21610, 21610), (131047, 131047), (0, 0)])
def test_a_code_of_up_to_six_digits_is_kept(value, expected) -> None:
    assert numeric_error_code(value) == expected


@pytest.mark.parametrize("value", [NUMBER, 1_000_000, -1, True, "21610", 2.5, None])
def test_anything_else_is_not_a_code(value) -> None:
    assert numeric_error_code(value) is None


def test_twilio_describes_its_code_and_never_a_number() -> None:
    described = twilio.describe_error(reply({"code": 21211, "message": "+447700900123 is not valid"}))
    assert described == "twilio error 21211"
    assert twilio.describe_error(reply({"code": NUMBER})) == ""


def test_whatsapp_describes_its_code_and_never_a_number() -> None:
    assert whatsapp.describe_error(reply({"error": {"code": 131026}})) == "whatsapp error 131026"
    assert whatsapp.describe_error(reply({"error": {"code": NUMBER}})) == ""
    assert not whatsapp.is_rate_limited(reply({"error": {"code": NUMBER}}))
