"""WhatsApp's marketing opt-outs: a failure for a recipient who stopped the business's marketing
messages (131050), and the `user_preferences` webhook's stop and resume."""

from __future__ import annotations

import pytest

from libs.opt_out import START, STOP
from services.receipts.model import FUNNEL_COUNTER, Status
from services.receipts.opt_outs import whatsapp_inbound
from services.receipts.parsing import parse_whatsapp

NOW = 1_714_564_800.0
MID = "0123456789abcdef0123456789abcdef"
NUMBER = "447400123456"


def failed(code: object) -> dict:
    return {"id": "wamid.1", "status": "failed", "biz_opaque_callback_data": MID, "errors": [{"code": code}]}


def document(*values: dict) -> dict:
    return {"object": "whatsapp_business_account", "entry": [{"changes": [{"value": v} for v in values]}]}


def preference(value: object = "stop", category: object = "marketing_messages", **fields) -> dict:
    item = {
        "wa_id": NUMBER,
        "detail": "User requested to stop marketing messages",
        "category": category,
        "value": value,
        "timestamp": 1714564001,
    }
    item.update(fields)
    return item


def preferences(*items: object, field: str = "user_preferences", number_id: str = "1111") -> dict:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "changes": [
                    {
                        "field": field,
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {"display_phone_number": "15550783881", "phone_number_id": number_id},
                            "contacts": [{"profile": {"name": "Jane"}, "wa_id": NUMBER}],
                            "user_preferences": list(items),
                        },
                    }
                ]
            }
        ],
    }


@pytest.mark.parametrize(
    ("code", "opted_out"),
    [
        (131050, True),
        ("131050", True),
        (131049, False),  # Meta's own cap on marketing messages per user: no opt-out
        (131048, False),  # a spam-rate limit
        (131026, False),
        (21610, False),  # Twilio's code, not Meta's
        (1310500, False),
    ],
)
def test_a_whatsapp_failure_because_the_recipient_stopped_marketing_messages_opts_out(code, opted_out):
    [event] = parse_whatsapp(document({"statuses": [failed(code)]}), NOW).events
    assert (event.opted_out, event.opts_out, event.topic) == (opted_out, opted_out, "")
    # Counted as the failure it is, with Meta's code: never as an unsubscribe.
    assert (event.status, FUNNEL_COUNTER[event.status]) == (Status.FAILED, "failed")
    assert event.reason_code == str(code)


def test_only_a_failure_carries_the_marketing_opt_out():
    statuses = [{**failed(131050), "status": s, "id": f"wamid.{s}"} for s in ("sent", "delivered", "read")]
    assert [e.opted_out for e in parse_whatsapp(document({"statuses": statuses}), NOW).events] == [False] * 3


def test_user_preferences_become_stop_and_start_of_their_number_without_their_detail():
    stop = preference("stop")
    resume = preference("resume", timestamp="1714564009", detail="User requested to resume marketing messages")
    found = whatsapp_inbound(preferences(stop, resume), NOW)
    assert [(m.sender, m.text, m.provider_keyword, m.preference, m.sent_at_ms) for m in found] == [
        (NUMBER, "", STOP, True, 1_714_564_001_000),
        (NUMBER, "", START, True, 1_714_564_009_000),
    ]
    # Each is named by its number, choice and time (only ever hashed), so a redelivery acts once.
    assert len({m.message_id for m in found}) == 2
    assert found[0].message_id == whatsapp_inbound(preferences(stop), NOW)[0].message_id
    assert not any("marketing messages" in f"{m!r}" for m in found)
    # Usable preferences are no delivery events: counted as ignored, not unusable.
    parsed = parse_whatsapp(preferences(stop, resume), NOW)
    assert (parsed.events, parsed.ignored, parsed.unusable, parsed.total) == ([], 2, 0, 2)


@pytest.mark.parametrize(("timestamp", "expected_ms"), [(None, int(NOW * 1000)), ("soon", int(NOW * 1000))])
def test_a_preference_without_a_plausible_time_is_dated_at_its_arrival(timestamp, expected_ms):
    item = preference()
    if timestamp is None:
        del item["timestamp"]
    else:
        item["timestamp"] = timestamp
    [found] = whatsapp_inbound(preferences(item), NOW)
    assert found.sent_at_ms == expected_ms


def test_preferences_of_another_category_or_value_are_counted_unusable_and_not_acted_on():
    items = [
        preference("stop", category="utility_messages"),
        preference("pause"),
        preference("stop", wa_id=None),
        preference("stop", wa_id=447400123456),
        NUMBER,
        preference("Stop", category="Marketing_Messages"),  # case is no matter
    ]
    parsed = parse_whatsapp(preferences(*items), NOW)
    where = "entry[0].changes[0].value.user_preferences"
    assert parsed.named_unusable == [
        f"{where}[0].category: must be marketing_messages",
        f"{where}[1].value: must be stop or resume",
        f"{where}[2].wa_id: is required",
        f"{where}[3].wa_id: must be a string",
        f"{where}[4]: is not an object",
    ]
    assert (parsed.unusable, parsed.ignored, parsed.total) == (5, 6, 6)
    assert [m.provider_keyword for m in whatsapp_inbound(preferences(*items), NOW)] == [STOP]
    odd = parse_whatsapp(document({"user_preferences": {"wa_id": NUMBER}}), NOW)
    assert odd.named_unusable == ["entry[0].changes[0].value.user_preferences: is not a list"]


def test_another_numbers_preferences_are_ignored():
    parsed = parse_whatsapp(preferences(preference(), "x", number_id="2222"), NOW, "1111")
    assert (parsed.ignored, parsed.unusable) == (2, 0)
    assert whatsapp_inbound(preferences(preference(), number_id="2222"), NOW, "1111") == []
    assert len(whatsapp_inbound(preferences(preference()), NOW, "1111")) == 1
