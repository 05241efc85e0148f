"""Provider receipts → normalised events: statuses, reason codes, identities, robustness."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.receipts.errors import MalformedReceipt
from services.receipts.model import FUNNEL_COUNTER, STATUS_RANK, Status
from services.receipts.parsing import (
    event_time,
    load_json,
    our_id,
    parse_sendgrid,
    parse_ses,
    parse_twilio,
    parse_whatsapp,
)

NOW = 1_714_564_800.0
MID = "0123456789abcdef0123456789abcdef"


def sendgrid(**fields):
    return parse_sendgrid([{"sg_event_id": "ev1", "timestamp": 1_714_564_000, **fields}], NOW)


@pytest.mark.parametrize(
    ("fields", "status", "reason"),
    [
        ({"event": "processed"}, Status.ACCEPTED, ""),
        ({"event": "deferred", "response": "451 4.7.1 greylisted, try 10.5.1.1 later"}, Status.DEFERRED, "4.7.1"),
        ({"event": "delivered", "response": "250 OK"}, Status.DELIVERED, ""),
        ({"event": "bounce", "type": "bounce", "status": "5.1.1"}, Status.BOUNCED, "hard:5.1.1"),
        ({"event": "bounce", "type": "blocked", "status": "4.7.1"}, Status.BOUNCED, "soft:4.7.1"),
        ({"event": "bounce", "reason": "550 5.1.2 bad domain for a@b.c"}, Status.BOUNCED, "hard:5.1.2"),
        ({"event": "bounce", "status": "+447400123456"}, Status.BOUNCED, "hard"),
        ({"event": "dropped", "reason": "Bounced Address"}, Status.FAILED, "dropped:bounced_address"),
        ({"event": "dropped", "reason": "Unsubscribed Address"}, Status.FAILED, "dropped:unsubscribed_address"),
        ({"event": "dropped", "reason": "Spam Reporting Address"}, Status.FAILED, "dropped:spam_reporting_address"),
        ({"event": "dropped", "reason": "Invalid SMTPAPI header"}, Status.FAILED, "dropped:invalid_smtpapi_header"),
        ({"event": "dropped", "reason": "jane@example.com is on a list"}, Status.FAILED, "dropped"),
        ({"event": "open"}, Status.OPENED, ""),
        ({"event": "click", "url": "https://x.example"}, Status.CLICKED, ""),
        ({"event": "spamreport"}, Status.COMPLAINED, ""),
        ({"event": "unsubscribe"}, Status.UNSUBSCRIBED, ""),
        ({"event": "group_unsubscribe", "asm_group_id": 3}, Status.UNSUBSCRIBED, "group"),
    ],
)
def test_sendgrid_events(fields, status, reason):
    parsed = sendgrid(**fields, tokensend_message_id=MID, tokensend_campaign="c1", tokensend_instance="i1")
    [event] = parsed.events
    assert (event.status, event.reason_code) == (status, reason)
    assert (event.message_id, event.campaign_hint, event.instance_hint) == (MID, "c1", "i1")
    assert event.identities == (("sendgrid", "ev1"),)
    assert event.occurred_at == 1_714_564_000


def test_sendgrid_ignores_unknown_and_odd_entries_and_a_resubscribe_to_no_group():
    parsed = parse_sendgrid([{"event": "group_resubscribe"}, {"event": "new_thing"}, 3, None, [], {}], NOW)
    assert parsed.events == [] and parsed.resubscribes == [] and parsed.ignored == 6 and parsed.total == 6


def test_sendgrid_group_events_name_the_groups_topic():
    """An unsubscribe group's events hold for the topic `sendgrid-group-<asm_group_id>`; a resubscribe is
    no delivery event, but counts in the receipt's total. Anything but SendGrid's integer ID names none."""
    parsed = parse_sendgrid(
        [
            {"event": "group_unsubscribe", "asm_group_id": 42, "timestamp": 1_714_564_000, "sg_event_id": "e1"},
            {"event": "group_resubscribe", "asm_group_id": "42", "timestamp": 1_714_564_100, "sg_event_id": "e2"},
            {"event": "group_unsubscribe", "asm_group_id": "+447400123456"},
            {"event": "group_resubscribe", "asm_group_id": "jane@example.com"},
            {"event": "unsubscribe", "asm_group_id": 42},
            {"event": "group_unsubscribe", "asm_group_id": 4155550100},  # a phone number's shape: kept nowhere
        ],
        NOW,
    )
    assert [(e.status, e.topic) for e in parsed.events] == [
        (Status.UNSUBSCRIBED, "sendgrid-group-42"),
        (Status.UNSUBSCRIBED, ""),  # no group: every topic, as any unsubscribe
        (Status.UNSUBSCRIBED, ""),
        (Status.UNSUBSCRIBED, ""),
    ]
    [resubscribe] = parsed.resubscribes
    assert (resubscribe.topic, resubscribe.occurred_at) == ("sendgrid-group-42", 1_714_564_100)
    assert parsed.ignored == 1 and parsed.total == 6


def test_sendgrid_ids():
    [event] = sendgrid(event="delivered", sg_message_id="14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0").events
    assert event.provider_message_id == "14c5d75ce93"
    assert event.message_id == ""
    [event] = sendgrid(event="open", custom_args={"tokensend_message_id": MID}).events
    assert event.message_id == MID
    [event] = sendgrid(event="open", tokensend_message_id="jane@example.com").events
    assert event.message_id == ""  # not one of our IDs: never looked up


def test_sendgrid_without_event_id_has_a_stable_identity():
    item = {"event": "open", "sg_message_id": "abc.def", "timestamp": 5, "tokensend_message_id": MID}
    first = parse_sendgrid([item], NOW).events[0].identities
    assert first == parse_sendgrid([dict(item)], NOW).events[0].identities
    assert first != parse_sendgrid([{**item, "timestamp": 6}], NOW).events[0].identities


def test_sendgrid_envelope_must_be_a_list():
    for document in ({"event": "open"}, "x", None, 3):
        with pytest.raises(MalformedReceipt):
            parse_sendgrid(document, NOW)


def ses(kind, detail_key=None, detail=None, notification=False, **mail):
    message = {"notificationType" if notification else "eventType": kind, "mail": {"messageId": "ses-1", **mail}}
    if detail_key:
        message[detail_key] = detail or {}
    return parse_ses(message, "sns-1", "2024-05-01T12:00:00Z", NOW)


@pytest.mark.parametrize(
    ("kind", "key", "detail", "status", "reason"),
    [
        ("Send", "send", {}, Status.ACCEPTED, ""),
        ("Delivery", "delivery", {"timestamp": "2024-05-01T12:00:01Z"}, Status.DELIVERED, ""),
        (
            "Bounce",
            "bounce",
            {"bounceType": "Permanent", "bounceSubType": "General", "bouncedRecipients": [{"status": "5.1.1"}]},
            Status.BOUNCED,
            "hard:5.1.1",
        ),
        (
            "Bounce",
            "bounce",
            {"bounceType": "Transient", "bounceSubType": "MailboxFull", "bouncedRecipients": [{}]},
            Status.BOUNCED,
            "soft:mailboxfull",
        ),
        (
            "Bounce",
            "bounce",
            {"bounceType": "Permanent", "bounceSubType": "Suppressed"},
            Status.BOUNCED,
            "hard:suppressed",
        ),
        (
            "Bounce",
            "bounce",
            {"bounceType": "Permanent", "bouncedRecipients": [{"diagnosticCode": "smtp; 550 5.1.1 <a@b.example>"}]},
            Status.BOUNCED,
            "hard:5.1.1",
        ),
        ("Complaint", "complaint", {"complaintFeedbackType": "abuse"}, Status.COMPLAINED, "abuse"),
        ("Complaint", "complaint", {"complaintFeedbackType": "auth-failure"}, Status.COMPLAINED, "auth_failure"),
        (
            "Complaint",
            "complaint",
            {"complaintSubType": "OnAccountSuppressionList"},
            Status.FAILED,  # not sent: the address is on the account's suppression list; no new complaint
            "onaccountsuppressionlist",
        ),
        ("Complaint", "complaint", {"complaintFeedbackType": "jane@x.example"}, Status.COMPLAINED, ""),
        ("Reject", "reject", {"reason": "Bad content"}, Status.FAILED, "rejected:bad_content"),
        ("Rendering Failure", "failure", {"errorMessage": "no name"}, Status.FAILED, "rendering_failure"),
        (
            "DeliveryDelay",
            "deliveryDelay",
            {"delayType": "TransientCommunicationFailure"},
            Status.DEFERRED,
            "transientcommunicationfailure",
        ),
        (
            "DeliveryDelay",
            "deliveryDelay",
            {"delayType": "BYOIPHostNameLookupUnavailable"},
            Status.DEFERRED,
            "byoiphostnamelookupunavailable",
        ),
        ("DeliveryDelay", "deliveryDelay", {"delayType": "jane@x.example"}, Status.DEFERRED, ""),
        ("DeliveryDelay", "deliveryDelay", {"delayType": "MailboxFull"}, Status.DEFERRED, "mailboxfull"),
        ("Open", "open", {"ipAddress": "192.0.2.1"}, Status.OPENED, ""),
        ("Click", "click", {"link": "https://x.example"}, Status.CLICKED, ""),
        (
            "Subscription",
            "subscription",
            {"newTopicPreferences": {"topicSubscriptionStatus": [{"subscriptionStatus": "OptOut"}]}},
            Status.UNSUBSCRIBED,
            "",
        ),
    ],
)
def test_ses_events(kind, key, detail, status, reason):
    [event] = ses(kind, key, detail, tags={"tokensend_message_id": [MID], "tokensend_campaign": ["c1"]}).events
    assert (event.status, event.reason_code) == (status, reason)
    assert (event.message_id, event.campaign_hint, event.provider_message_id) == (MID, "c1", "ses-1")
    # What an identity's notifications report too is keyed on the event, the rest on its SNS message.
    by_event = kind in ("Bounce", "Complaint", "Delivery")
    assert event.identities[0][:2] == (("ses-event", "ses-1") if by_event else ("ses", "sns-1"))


def test_ses_notifications_and_times():
    [event] = ses("Bounce", "bounce", {"bounceType": "Permanent", "timestamp": "2024-05-01T12:00:05.000Z"}, True).events
    assert event.status is Status.BOUNCED and event.message_id == "" and event.provider_message_id == "ses-1"
    assert event.occurred_at == 1_714_564_805.0
    [event] = ses("Delivery", notification=True, timestamp="2024-05-01T11:00:00Z").events
    assert event.occurred_at == 1_714_561_200.0


def test_ses_ignored_and_malformed():
    assert ses("Subscription", "subscription", {"newTopicPreferences": {"unsubscribeAll": False}}).ignored == 1
    assert ses("AmazonSnsSubscriptionSucceeded", notification=True).ignored == 1
    with pytest.raises(MalformedReceipt, match="eventType"):
        parse_ses({"mail": {}}, "sns-1", "", NOW)
    with pytest.raises(MalformedReceipt):
        parse_ses(["Delivery"], "sns-1", "", NOW)


@pytest.mark.parametrize(
    ("state", "error", "status", "reason"),
    [
        ("queued", "", Status.ACCEPTED, "queued"),
        ("accepted", "", Status.ACCEPTED, "accepted"),
        ("scheduled", "", Status.ACCEPTED, "scheduled"),
        ("sending", "", Status.ACCEPTED, "sending"),
        ("sent", "", Status.ACCEPTED, "sent"),
        ("delivered", "", Status.DELIVERED, ""),
        ("undelivered", "30003", Status.FAILED, "30003"),
        ("failed", "30008", Status.FAILED, "30008"),
        ("failed", "+447400123456", Status.FAILED, ""),
        ("canceled", "", Status.FAILED, "canceled"),
        ("read", "", Status.READ, ""),
    ],
)
def test_twilio_statuses(state, error, status, reason):
    params = [("MessageSid", "SM1"), ("MessageStatus", state), ("To", "+447400123456")]
    if error:
        params.append(("ErrorCode", error))
    [event] = parse_twilio(params, MID, "tok", NOW).events
    assert (event.status, event.reason_code, event.message_id, event.provider_message_id) == (
        status,
        reason,
        MID,
        "SM1",
    )
    assert event.identities == (("twilio", "SM1", state), ("twilio-idempotency", "tok"))


@pytest.mark.parametrize(
    ("state", "error", "sender", "opted_out"),
    [
        # A messaging service accepts the send and reports Twilio's refusal in the callback.
        ("failed", "21610", "+15017122661", True),
        ("undelivered", "21610", "+15017122661", True),
        ("failed", " 21610 ", "rcs:brand_agent", True),  # RCS: same SMS family
        ("failed", "30008", "+15017122661", False),
        ("failed", "21611", "+15017122661", False),  # only 21610 is an opt-out
        ("failed", "216100", "+15017122661", False),
        ("canceled", "", "+15017122661", False),
        ("delivered", "21610", "+15017122661", False),
        ("sent", "21610", "+15017122661", False),
    ],
)
def test_a_twilio_failure_for_an_opted_out_number_opts_out(state, error, sender, opted_out):
    prefix = "rcs:" if sender.startswith("rcs:") else ""
    params = [
        ("MessageSid", "SM1"),
        ("MessageStatus", state),
        ("ErrorCode", error),
        ("From", sender),
        ("To", prefix + "+447400123456"),
        ("MessagingServiceSid", "MG" + "0a" * 16),
    ]
    [event] = parse_twilio(params, MID, "", NOW).events
    assert (event.opted_out, event.opts_out) == (opted_out, opted_out)
    if opted_out:
        # Counted as the failure it is, with Twilio's code: never as an unsubscribe.
        assert (event.status, event.reason_code, FUNNEL_COUNTER[event.status]) == (Status.FAILED, "21610", "failed")


def test_only_unsubscribes_complaints_and_opted_out_refusals_opt_out():
    assert [e.opts_out for e in sendgrid(event="unsubscribe").events] == [True]
    assert [e.opts_out for e in sendgrid(event="spamreport").events] == [True]
    assert [e.opts_out for e in sendgrid(event="dropped", reason="Unsubscribed Address").events] == [True]
    failed = whatsapp({"id": "wamid.1", "status": "failed", "errors": [{"code": 21610}]})
    assert [e.opts_out for e in failed.events] == [False]  # Twilio's code, not Meta's


@pytest.mark.parametrize(
    ("reason", "group", "opted_out", "complained_before", "topic"),
    [
        # On SendGrid's unsubscribe lists: the send's group when it had one (its list was checked), else all.
        ("Unsubscribed Address", 42, True, False, "sendgrid-group-42"),
        ("Unsubscribed Address", "42", True, False, "sendgrid-group-42"),
        ("Unsubscribed Address", None, True, False, ""),
        ("unsubscribed address", 12345678, True, False, ""),  # no group ID SendGrid makes: every topic
        # On its spam report list: a complaint, for every topic.
        ("Spam Reporting Address", 42, False, True, ""),
        ("Spam Reporting Address", None, False, True, ""),
        # Not opt-outs.
        ("Bounced Address", 42, False, False, ""),
        ("Invalid", 42, False, False, ""),
        ("Spam Content (if spam checker app enabled)", 42, False, False, ""),
        ("Recipient List over Package Quota", None, False, False, ""),
        ("someone@example.com unsubscribed", 42, False, False, ""),
    ],
)
def test_a_sendgrid_drop_for_an_address_on_its_suppression_lists_opts_out(
    reason, group, opted_out, complained_before, topic
):
    fields = {"event": "dropped", "reason": reason, "tokensend_message_id": MID}
    if group is not None:
        fields["asm_group_id"] = group
    [event] = sendgrid(**fields).events
    assert (event.opted_out, event.complained_before, event.topic) == (opted_out, complained_before, topic)
    assert event.opts_out == (opted_out or complained_before)
    assert event.complains == complained_before
    # Counted as the failure it is, never as an unsubscribe or a complaint.
    assert (event.status, FUNNEL_COUNTER[event.status]) == (Status.FAILED, "failed")


def test_only_unsubscribes_and_drops_carry_a_group_topic():
    assert [e.topic for e in sendgrid(event="delivered", asm_group_id=7).events] == [""]
    assert [e.topic for e in sendgrid(event="unsubscribe", asm_group_id=7).events] == [""]
    assert [e.topic for e in sendgrid(event="group_unsubscribe", asm_group_id=7).events] == ["sendgrid-group-7"]
    assert [e.complains for e in sendgrid(event="spamreport").events] == [True]
    assert [e.complains for e in sendgrid(event="unsubscribe").events] == [False]


def test_twilio_old_parameter_names_inbound_and_missing_status():
    [event] = parse_twilio([("SmsSid", "SM2"), ("SmsStatus", "delivered")], "", "", NOW).events
    assert event.provider_message_id == "SM2" and event.identities == (("twilio", "SM2", "delivered"),)
    assert parse_twilio([("MessageStatus", "received")], "", "", NOW).ignored == 1
    with pytest.raises(MalformedReceipt, match="MessageStatus"):
        parse_twilio([("To", "+447400123456")], MID, "", NOW)


def whatsapp(*statuses, messages=()):
    value = {"statuses": list(statuses), "messages": list(messages)}
    return parse_whatsapp({"object": "whatsapp_business_account", "entry": [{"changes": [{"value": value}]}]}, NOW)


def test_whatsapp_statuses():
    parsed = whatsapp(
        {"id": "wamid.1", "status": "sent", "timestamp": "1714564000", "biz_opaque_callback_data": MID},
        {"id": "wamid.1", "status": "delivered", "timestamp": "1714564001", "biz_opaque_callback_data": MID},
        {"id": "wamid.1", "status": "read", "timestamp": "1714564002"},
        {"id": "wamid.2", "status": "failed", "timestamp": "1714564003", "errors": [{"code": 131026}]},
        {"id": "wamid.3", "status": "failed", "errors": [{"code": 447400123456}]},
        {"id": "wamid.4", "status": "deleted"},
        "junk",
        messages=[{"from": "447400123456", "text": {"body": "hi"}}],
    )
    got = [(e.status, e.reason_code, e.message_id) for e in parsed.events]
    assert got == [
        (Status.ACCEPTED, "sent", MID),
        (Status.DELIVERED, "", MID),
        (Status.READ, "", ""),
        (Status.FAILED, "131026", ""),
        (Status.FAILED, "", ""),
    ]
    assert parsed.ignored == 3  # "deleted", "junk" and the inbound message
    assert parsed.events[0].identities == (("whatsapp", "wamid.1", "sent"),)
    assert parsed.events[1].occurred_at == 1_714_564_001


def test_whatsapp_items_that_are_not_objects_are_counted_as_ignored():
    """The reply's counts cover everything posted: an entry, change, status or message that is not an object
    is malformed and counted as ignored, as a SendGrid event that is not one is."""
    status = {"id": "wamid.1", "status": "delivered", "timestamp": "1714564001"}
    document = {
        "entry": [
            "junk",
            None,
            {"changes": [7, {"value": "junk"}, {"value": {"statuses": [status, [], "x"], "messages": [1, {}]}}]},
        ]
    }
    parsed = parse_whatsapp(document, NOW)
    assert [e.provider_message_id for e in parsed.events] == ["wamid.1"]
    # 2 entries, 2 changes, 2 statuses, 2 messages
    assert parsed.ignored == 8 and parsed.total == 9
    # Another number's items are all ignored, objects or not.
    other = {"metadata": {"phone_number_id": "2222"}, "statuses": [status, "x"], "messages": [None]}
    assert parse_whatsapp({"entry": [{"changes": [{"value": other}]}]}, NOW, "1111").ignored == 3


def test_a_whatsapp_status_sent_again_with_another_time_is_the_same_event():
    """A message takes each status once: Meta sending one again, stamped anew, is a redelivery."""
    first, again, other = whatsapp(
        {"id": "wamid.1", "status": "delivered", "timestamp": "1714564001"},
        {"id": "wamid.1", "status": "delivered", "timestamp": "1714564009"},
        {"id": "wamid.1", "status": "read", "timestamp": "1714564009"},
    ).events
    assert first.identities == again.identities != other.identities
    # Without Meta's ID, nothing says two statuses are one message's: our ID and the time tell them apart.
    no_id = whatsapp(
        {"status": "delivered", "timestamp": "1714564001", "biz_opaque_callback_data": MID},
        {"status": "delivered", "timestamp": "1714564001", "biz_opaque_callback_data": "m-2"},
        {"status": "delivered", "timestamp": "1714564002", "biz_opaque_callback_data": MID},
    ).events
    assert len({e.identities for e in no_id}) == 3


def test_whatsapp_malformed():
    for document in ({}, {"entry": {}}, [], "x"):
        with pytest.raises(MalformedReceipt, match="entry"):
            parse_whatsapp(document, NOW)
    odd = parse_whatsapp({"entry": [{"changes": [{"value": "x"}]}, 1]}, NOW)
    assert odd.events == [] and odd.ignored == odd.total == 2  # the change and the entry


def test_helpers():
    assert our_id(MID) == MID and our_id("a b") == "" and our_id(7) == "7" and our_id(True) == ""
    assert event_time(1_714_564_000, NOW) == 1_714_564_000
    assert event_time("1714564000.5", NOW) == 1_714_564_000.5
    assert event_time("2024-05-01T12:00:00+02:00", NOW) == 1_714_557_600
    for bad in (10**400, float("nan"), float("inf"), -5, "yesterday", None, "9" * 12, [1]):
        assert event_time(bad, NOW) == NOW
    with pytest.raises(MalformedReceipt):
        load_json(b"[" * 50_000)
    with pytest.raises(MalformedReceipt):
        load_json(b"\xff")


def test_status_rank_and_funnel():
    order = [Status.ACCEPTED, Status.DEFERRED, Status.DELIVERED, Status.OPENED, Status.CLICKED, Status.BOUNCED]
    assert [STATUS_RANK[s] for s in order] == sorted(STATUS_RANK[s] for s in order)
    assert STATUS_RANK[Status.READ] == STATUS_RANK[Status.OPENED]
    assert STATUS_RANK[Status.COMPLAINED] > STATUS_RANK[Status.CLICKED]
    assert set(STATUS_RANK) == set(Status)
    assert FUNNEL_COUNTER[Status.READ] == "opened" and Status.ACCEPTED not in FUNNEL_COUNTER


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
sendgrid_like = st.lists(
    st.fixed_dictionaries(
        {"event": st.sampled_from(["open", "bounce", "dropped", "deferred", "click"]) | json_values},
        optional={k: json_values for k in ("sg_event_id", "sg_message_id", "timestamp", "reason", "status", "type")},
    )
)


@settings(max_examples=300, deadline=None)
@given(document=json_values | sendgrid_like, params=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12))))
def test_parsers_raise_only_malformed(document, params):
    """Whatever a verified body holds, a parser returns events or refuses it as malformed."""
    for parse in (
        lambda: parse_sendgrid(document, NOW),
        lambda: parse_whatsapp(document, NOW),
        lambda: parse_ses(document, "sns", document, NOW),
        lambda: parse_twilio(params, str(document), "", NOW),
        lambda: load_json(json.dumps(document).encode()),
    ):
        try:
            parse()
        except MalformedReceipt:
            pass


def test_whatsapp_changes_for_another_number_are_not_the_connectors():
    """One Meta app (one callback URL, one app secret) may serve the numbers of several connectors: a
    status or a STOP for another business number than the connector's is ignored, never acted on."""
    from services.receipts.opt_outs import whatsapp_inbound

    def change(number: str) -> dict:
        return {
            "field": "messages",
            "value": {
                "metadata": {"phone_number_id": number},
                "statuses": [{"id": f"wamid.{number}", "status": "delivered", "timestamp": "1714564001"}],
                "messages": [{"from": "447400123456", "id": f"in.{number}", "type": "text", "text": {"body": "STOP"}}],
            },
        }

    document = {"entry": [{"changes": [change("1111"), change("2222")]}]}
    parsed = parse_whatsapp(document, 0.0, "1111")
    assert [e.provider_message_id for e in parsed.events] == ["wamid.1111"]
    assert parsed.ignored == 3  # the connector's own inbound message, and the other number's two items
    assert [m.message_id for m in whatsapp_inbound(document, 0.0, "1111")] == ["in.1111"]
    # A connector that names no number (or a change that names none) keeps everything.
    assert len(parse_whatsapp(document, 0.0).events) == 2 and len(whatsapp_inbound(document, 0.0)) == 2


@pytest.mark.parametrize(
    ("timestamp", "expected_ms"),
    [
        ("1714564001", 1_714_564_001_000),
        ("\u00b2", int(NOW * 1000)),  # a digit to str.isdigit, not to int()
        ("9" * 5000, int(NOW * 1000)),  # past the digits int() converts
        ("1" * 15, int(NOW * 1000)),  # 35,000 years ahead: a STOP no START could ever follow
        ("0", int(NOW * 1000)),
        (None, int(NOW * 1000)),
    ],
)
def test_an_inbound_whatsapp_message_time_is_the_providers_only_when_plausible(timestamp, expected_ms):
    """An inbound message's send time orders STOP and START: one that is not a plausible Unix time is
    taken as the arrival's, never an internal error nor a time no later START could come after."""
    from services.receipts.opt_outs import whatsapp_inbound

    message = {"from": "447400123456", "id": "in.1", "type": "text", "text": {"body": "STOP"}}
    if timestamp is not None:
        message["timestamp"] = timestamp
    document = {"entry": [{"changes": [{"value": {"messages": [message]}}]}]}
    [found] = whatsapp_inbound(document, NOW)
    assert found.sent_at_ms == expected_ms
