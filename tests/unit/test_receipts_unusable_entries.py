"""Parsing names the entries it leaves out as unusable by their place, and a sid-less Twilio event by our ID."""

from __future__ import annotations

from services.receipts.model import MAX_NAMED_UNUSABLE
from services.receipts.parsing import parse_sendgrid, parse_twilio, parse_whatsapp

NOW = 1_714_564_800.0
MID = "0123456789abcdef0123456789abcdef"


def test_sendgrid_names_unusable_entries_and_only_counts_types_not_tracked():
    parsed = parse_sendgrid(
        [
            {"event": "delivered", "sg_event_id": "e1", "tokensend_message_id": MID},
            "jane@example.com",
            {"email": "jane@example.com"},
            {"event": ["open"]},
            {"event": "group_resubscribe", "asm_group_id": "+447400123456"},
            {"event": "account_status_change"},
        ],
        NOW,
    )
    assert len(parsed.events) == 1 and parsed.ignored == 5 and parsed.total == 6
    assert parsed.unusable == 4
    assert parsed.named_unusable == [
        "[1]: is not an object",
        "[2].event: is required",
        "[3].event: must be a string",
        "[4].asm_group_id: must be a SendGrid unsubscribe group ID",
    ]


def test_only_the_first_unusable_entries_are_named():
    parsed = parse_sendgrid([None] * (MAX_NAMED_UNUSABLE + 5), NOW)
    assert parsed.unusable == parsed.ignored == MAX_NAMED_UNUSABLE + 5
    assert len(parsed.named_unusable) == MAX_NAMED_UNUSABLE


def test_whatsapp_names_unusable_entries_changes_and_statuses():
    document = {
        "entry": [
            {
                "changes": [
                    {
                        "value": {
                            "statuses": [3, {"id": "wamid.1"}, {"id": "wamid.2", "status": "deleted"}, {"status": {}}]
                        }
                    }
                ]
            },
            "x",
            {"changes": {"value": {}}},
            {"changes": [5, {"value": []}, {"value": {"statuses": {"status": "read"}}}]},
        ]
    }
    parsed = parse_whatsapp(document, NOW)
    assert parsed.events == [] and parsed.ignored == 9 and parsed.unusable == 8
    assert parsed.named_unusable == [
        "entry[0].changes[0].value.statuses[0]: is not an object",
        "entry[0].changes[0].value.statuses[1].status: is required",
        "entry[0].changes[0].value.statuses[3].status: must be a string",
        "entry[1]: is not an object",
        "entry[2].changes: is not a list",
        "entry[3].changes[0]: is not an object",
        "entry[3].changes[1].value: is not an object",
        "entry[3].changes[2].value.statuses: is not a list",
    ]


def test_a_twilio_callback_without_a_sid_is_named_by_our_id():
    [first] = parse_twilio([("MessageStatus", "delivered")], MID, "", NOW).events
    [other] = parse_twilio([("MessageStatus", "delivered")], MID[::-1], "", NOW).events
    assert first.identities == (("twilio", "", "delivered", MID),)
    assert first.identities != other.identities
    [with_sid] = parse_twilio([("MessageSid", "SM1"), ("MessageStatus", "delivered")], MID, "", NOW).events
    assert with_sid.identities == (("twilio", "SM1", "delivered"),)  # unchanged: markers already written match
