"""Which events may wait for the dispatcher to index their provider's message ID, and how they are refused."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from libs.settings import ReceiptsSettings
from services.receipts.errors import NotIndexedYet, http_status_of
from services.receipts.intake import REFUSAL_REASONS, may_wait_for_index, refusal_reason
from services.receipts.model import ReceiptEvent, Status
from services.receipts.parsing import parse_sendgrid, parse_ses, parse_twilio, parse_whatsapp

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
WINDOW = 45
MID = "0123456789abcdef0123456789abcdef"

# An SES identity's notification: the SES message ID only, dated by SES.
NOTIFICATION = ReceiptEvent(
    provider="ses",
    status=Status.BOUNCED,
    identities=(("ses-event", "0100abc", "bounce", ""),),
    provider_message_id="0100abc",
    occurred_at=NOW - 5,
    dated=True,
)


def notified(**fields) -> ReceiptEvent:
    return dataclasses.replace(NOTIFICATION, **fields)


def test_a_young_event_naming_only_the_provider_id_may_wait():
    assert may_wait_for_index(NOTIFICATION, NOW, WINDOW)
    assert may_wait_for_index(notified(occurred_at=NOW - WINDOW), NOW, WINDOW)
    assert may_wait_for_index(notified(occurred_at=NOW + 2), NOW, WINDOW)  # SES's clock a little ahead


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (notified(occurred_at=NOW - WINDOW - 1), "older than the window: counted unmapped"),
        (notified(occurred_at=NOW + WINDOW + 1), "dated too far ahead: a forgery cannot stretch the window"),
        (notified(dated=False, occurred_at=NOW), "no time of its own: its age is unknown"),
        (notified(message_id=MID), "names our ID: its map entry is written before the send"),
        (notified(provider_message_id=""), "names no provider ID to wait for"),
        (notified(provider="whatsapp"), "WhatsApp echoes our ID for our sends"),
        (notified(provider="sendgrid"), "SendGrid echoes our ID for our sends"),
        (notified(provider="twilio"), "Twilio echoes our ID for our sends"),
    ],
)
def test_other_events_cannot_wait(event, why):
    assert not may_wait_for_index(event, NOW, WINDOW), why


def test_a_window_of_zero_makes_none_wait():
    assert not may_wait_for_index(notified(occurred_at=NOW), NOW, 0)


def test_ses_events_are_dated_by_ses():
    def parse(message, sns_timestamp="2024-05-01T11:59:58Z"):
        [event] = parse_ses(message, "sns-1", sns_timestamp, NOW + 100).events
        return event

    bounce = {"notificationType": "Bounce", "mail": {"messageId": "0100abc"}, "bounce": {"bounceType": "Permanent"}}
    dated = parse({**bounce, "bounce": {"timestamp": "2024-05-01T11:59:55Z"}})
    assert (dated.occurred_at, dated.dated) == (NOW - 5, True)
    sent = parse({**bounce, "mail": {"messageId": "0100abc", "timestamp": "2024-05-01T11:59:50Z"}})
    assert (sent.occurred_at, sent.dated) == (NOW - 10, True)
    assert parse(bounce).occurred_at == NOW - 2  # SNS's own Timestamp, the last of the provider's times
    undated = parse(bounce, sns_timestamp="not a time")
    assert (undated.occurred_at, undated.dated) == (NOW + 100, False)


def test_other_providers_say_whether_they_dated_an_event():
    [sendgrid] = parse_sendgrid([{"event": "delivered", "sg_event_id": "e1", "timestamp": NOW - 3}], NOW).events
    [undated] = parse_sendgrid([{"event": "delivered", "sg_event_id": "e2"}], NOW).events
    assert (sendgrid.dated, undated.dated, undated.occurred_at) == (True, False, NOW)
    status = {"id": "wamid.1", "status": "delivered", "timestamp": str(int(NOW - 3))}
    [whatsapp] = parse_whatsapp({"entry": [{"changes": [{"value": {"statuses": [status]}}]}]}, NOW).events
    assert (whatsapp.dated, whatsapp.occurred_at) == (True, NOW - 3)
    [twilio] = parse_twilio([("MessageStatus", "delivered"), ("MessageSid", "SM1")], MID, "", NOW).events
    assert not twilio.dated  # Twilio's callbacks carry no time


def test_the_refusal_is_a_503_with_retry_after_and_a_reason_of_its_own():
    refusal = NotIndexedYet()
    assert http_status_of(refusal) == 503 and refusal.code == grpc.StatusCode.UNAVAILABLE
    assert refusal.retry_after_seconds > 0
    assert refusal_reason(refusal) == "not_indexed_yet" and "not_indexed_yet" in REFUSAL_REASONS


def test_the_window_is_bounded_by_what_sns_retries():
    assert ReceiptsSettings(receipt_index_wait_seconds=0).receipt_index_wait_seconds == 0
    with pytest.raises(ValueError, match="3600"):
        ReceiptsSettings(receipt_index_wait_seconds=3601)
