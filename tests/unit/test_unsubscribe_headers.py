"""Every email connector sends the one-click unsubscribe headers the campaign sets."""

from __future__ import annotations

from libs.unsubscribe import list_unsubscribe_headers
from services.dispatcher.connectors.base import OutboundMessage
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
