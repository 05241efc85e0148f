"""Every email connector sends the one-click unsubscribe headers the campaign sets."""

from __future__ import annotations

import time
from dataclasses import replace

from libs.unsubscribe import UnsubscribeTokens, list_unsubscribe_headers, list_unsubscribe_headers_signed
from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.connectors.email_headers import checked_per_batch, extra_headers
from services.dispatcher.connectors.sendgrid import SendGridConnector
from services.dispatcher.connectors.ses import send_email_params
from services.dispatcher.connectors.smtp import build_email

HEADERS = list_unsubscribe_headers("https://hooks.example", "TOKEN")
MESSAGE = OutboundMessage(
    message_id="m1",
    anonymous_id="a1",
    campaign_id="c",
    campaign_instance_id="i",
    to="jane@example.com",
    subject="Hi",
    text_body="Hello",
    headers=HEADERS,
)


def test_sendgrid_puts_them_on_the_personalization():
    assert SendGridConnector._personalization(MESSAGE)["headers"] == HEADERS


def test_ses_sends_them_as_simple_content_headers():
    sent = send_email_params(MESSAGE, "news@brand.example")["Content"]["Simple"]["Headers"]
    assert {h["Name"]: h["Value"] for h in sent} == HEADERS


def test_smtp_writes_them_into_the_message():
    email = build_email(MESSAGE, "news@brand.example")
    assert email["List-Unsubscribe"] == "<https://hooks.example/unsubscribe/TOKEN>"
    assert email["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_batch_s_links_are_checked_once_and_sent_as_made():
    """The unsubscribe headers differ per message only by a base64url token: checked once for the
    batch, each message's pass the connectors' header check untouched and are what it would keep."""
    sign = UnsubscribeTokens(None).signer("brand", int(time.time()) + 3600)
    signed = list_unsubscribe_headers_signed("https://hooks.example/base/", sign)
    checked = checked_per_batch(signed)
    for message_id in (f"{n:032x}" for n in range(50)):
        headers = checked(message_id)
        assert headers == signed(message_id) == extra_headers(dict(headers))
        assert extra_headers(headers) is headers  # not checked again, message by message
        assert SendGridConnector._personalization(replace(MESSAGE, headers=headers))["headers"] == headers


def test_a_batch_s_links_that_would_break_a_header_are_still_dropped_message_by_message():
    sign = UnsubscribeTokens(None).signer("brand", int(time.time()) + 3600)
    signed = list_unsubscribe_headers_signed("https://hooks.example/base\r\nBcc: attacker@evil.example", sign)
    headers = checked_per_batch(signed)("0" * 32)
    assert extra_headers(headers) == {"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    assert SendGridConnector._personalization(replace(MESSAGE, headers=headers))["headers"] == {
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"
    }
