"""Provider receipts → normalised `ReceiptEvent`s, one status set for every provider.

SendGrid: processed → accepted; deferred → deferred (SMTP code); delivered;
bounce → bounced (`hard`, or `soft` when `type` is blocked, + SMTP code);
dropped → failed (`dropped:<reason>`); open → opened; click → clicked;
spamreport → complained; unsubscribe, group_unsubscribe → unsubscribed (a group's for
the topic `sendgrid-group-<asm_group_id>`); group_resubscribe → a resubscribe to that topic.
A drop because the address is on one of SendGrid's own suppression lists opts out as the
event it stands for, while counted as the failure it is: "Unsubscribed Address" is marked
`opted_out` (for the topic of the message's `asm_group_id` when it has one, else every topic),
"Spam Reporting Address" `complained_before` (every topic).

SES (event publishing `eventType` and notifications `notificationType`):
Send → accepted; Delivery → delivered; Bounce → bounced (Permanent `hard`,
Transient/Undetermined `soft`, + SMTP code or subtype); Complaint → complained
(feedback type; a `not-spam` report is ignored); Reject, Rendering Failure →
failed; DeliveryDelay → deferred (delay type); Open → opened; Click → clicked;
Subscription → unsubscribed when the recipient opted out (of everything or of a
topic they were not out of before). The plain-text
message SES sends to validate a new topic is acknowledged and ignored.

Twilio: queued, accepted, scheduled, sending, sent → accepted (reason: that
status); delivered; undelivered, failed, canceled → failed (ErrorCode); read. A
failure with ErrorCode 21610 (the recipient had replied STOP to the sender, which a
messaging service reports here rather than refusing the send) is marked `opted_out`.

WhatsApp: sent → accepted; delivered; read; failed → failed (errors[].code). A
failure with code 131050 (the recipient stopped the business's marketing messages in
WhatsApp, which Meta reports in the failed status) is marked `opted_out`. Inbound
`messages[]` and `user_preferences[]` (a customer stopping or resuming the business's
marketing messages) are not delivery events: `opt_outs` reads them, the first for
STOP/START, the second as one; a preference of another category or value than
`marketing_messages` stop or resume is counted unusable.

A receipt whose envelope is not the documented shape raises `MalformedReceipt`
(400); an individual entry that is unusable is skipped and counted as ignored,
so one odd event does not make a provider redeliver a whole batch, and named by
its place in the receipt ("[3].event: is required"), for the reply and the log. Nothing
here keeps a free-text value: only our IDs, the provider's IDs (for lookup and
dedupe, never stored as is), statuses, codes and times.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from libs.ids import is_id
from libs.json_documents import parse
from libs.suppressions import TWILIO_OPTED_OUT
from services.receipts.errors import MalformedReceipt
from services.receipts.model import ParsedReceipt, ReceiptEvent, Status
from services.receipts.scrubbing import join_code, numeric_code, slug, smtp_code

_PROVIDER_ID = re.compile(r"^[A-Za-z0-9._:=+/-]{1,256}\Z")
_EARLIEST = 946684800.0  # 2000-01-01: older "times" are garbage


def load_json(body: bytes, field: str = "body") -> Any:
    try:
        return parse(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise MalformedReceipt(field, "is not valid JSON") from None


def _text(value: object) -> str:
    """A string field; numbers are accepted where providers are loose about types."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def our_id(value: object) -> str:
    """Our own ID as we write them (uuid hex, campaign IDs); anything else is not ours and is not looked up."""
    text = _text(value).strip()
    return text if is_id(text) else ""


def provider_id(value: object) -> str:
    text = _text(value).strip()
    return text if _PROVIDER_ID.match(text) else ""


def event_time(value: object, fallback: float) -> float:
    """Unix seconds (number or digit string) or ISO 8601; the fallback when absent or absurd."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            return fallback
    elif isinstance(value, str) and value:
        text = value.strip()
        if re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", text):
            seconds = float(text)
        elif len(text) <= 40:
            try:
                parsed = datetime.datetime.fromisoformat(text)
            except ValueError:
                parsed = None
            if parsed is not None:
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=datetime.UTC)
                seconds = parsed.timestamp()
    if seconds is None or seconds != seconds or not _EARLIEST <= seconds <= time.time() + 86400:
        return fallback
    return seconds


def _first(value: object) -> object:
    """First item of a list (SES tag values), else the value itself."""
    if isinstance(value, list):
        return value[0] if value else ""
    return value


# --- SendGrid -------------------------------------------------------------------------------

_SENDGRID_STATUS = {
    "processed": Status.ACCEPTED,
    "deferred": Status.DEFERRED,
    "delivered": Status.DELIVERED,
    "bounce": Status.BOUNCED,
    "dropped": Status.FAILED,
    "open": Status.OPENED,
    "click": Status.CLICKED,
    "spamreport": Status.COMPLAINED,
    "unsubscribe": Status.UNSUBSCRIBED,
    "group_unsubscribe": Status.UNSUBSCRIBED,
}
# SendGrid's documented drop reasons, as slugs.
_SENDGRID_DROP_REASONS = (
    ("invalid smtpapi header", "invalid_smtpapi_header"),
    ("spam content", "spam_content"),
    ("unsubscribed address", "unsubscribed_address"),
    ("bounced address", "bounced_address"),
    ("spam reporting address", "spam_reporting_address"),
    ("recipient list over package quota", "over_quota"),
    ("invalid", "invalid"),
)

# Drops because the address is on SendGrid's unsubscribe lists (global, or the send's group), or on its
# spam report list: the recipient opted out with SendGrid.
_DROPPED_UNSUBSCRIBED = "dropped:unsubscribed_address"
_DROPPED_SPAM_REPORTED = "dropped:spam_reporting_address"


def _sendgrid_drop_reason(value: object) -> str:
    text = _text(value).strip().lower()
    for prefix, code in _SENDGRID_DROP_REASONS:
        if text.startswith(prefix):
            return "dropped:" + code
    return "dropped"


def _sendgrid_reason(name: str, item: Mapping[str, Any]) -> str:
    if name == "bounce":
        kind = "soft" if _text(item.get("type")).lower() == "blocked" else "hard"
        return join_code(kind, smtp_code(_text(item.get("status"))) or smtp_code(item.get("reason")))
    if name == "dropped":
        return _sendgrid_drop_reason(item.get("reason"))
    if name == "deferred":
        return smtp_code(item.get("response"))
    if name == "group_unsubscribe":
        return "group"
    return ""


SENDGRID_GROUP_TOPIC = "sendgrid-group-"
# SendGrid's integer group IDs, up to six digits: a run of seven or more may be a phone number (the
# scrubbing's own rule), and a value from a receipt that could be one never reaches a Redis key.
_SENDGRID_GROUP_ID = re.compile(r"[1-9][0-9]{0,5}")


def sendgrid_group_topic(value: object) -> str:
    """The topic of SendGrid's unsubscribe group `asm_group_id`, "" when it names none: only the
    digits of SendGrid's own integer IDs are kept, and only as many as no phone number has."""
    text = _text(value).strip()
    return SENDGRID_GROUP_TOPIC + text if _SENDGRID_GROUP_ID.fullmatch(text) else ""


def parse_sendgrid(document: Any, received_at: float) -> ParsedReceipt:
    """SendGrid's event webhook: a JSON array of events; our IDs come back as top-level custom_args."""
    if not isinstance(document, list):
        raise MalformedReceipt("body", "must be a JSON array of SendGrid events")
    parsed = ParsedReceipt()
    for index, item in enumerate(document):
        if not isinstance(item, dict):
            parsed.skip(f"[{index}]", "is not an object")
            continue
        name = _text(item.get("event")).lower()
        if not name:
            parsed.skip(f"[{index}].event", "is required" if item.get("event") in (None, "") else "must be a string")
            continue
        status = Status.UNSUBSCRIBED if name == "group_resubscribe" else _SENDGRID_STATUS.get(name)
        reason_code = _sendgrid_reason(name, item) if status is not None else ""
        # SendGrid drops a send to an address on its unsubscribe lists: a send with a group is checked
        # against that group's list (and the global one, which we cannot tell apart), so its topic.
        opted_out = reason_code == _DROPPED_UNSUBSCRIBED
        unsubscribing = name.startswith("group_") or opted_out
        topic = sendgrid_group_topic(item.get("asm_group_id")) if unsubscribing else ""
        if status is None:
            parsed.ignored += 1  # an event type not tracked (account_status_change ...)
            continue
        if name == "group_resubscribe" and not topic:
            parsed.skip(f"[{index}].asm_group_id", "must be a SendGrid unsubscribe group ID")
            continue
        custom = item.get("custom_args") if isinstance(item.get("custom_args"), dict) else {}
        sg_message_id = _text(item.get("sg_message_id"))
        event_id = _text(item.get("sg_event_id"))
        stamped = event_time(item.get("timestamp"), 0.0)
        message_id = our_id(item.get("tokensend_message_id")) or our_id(custom.get("tokensend_message_id"))
        identity = (
            ("sendgrid", event_id)
            if event_id
            else ("sendgrid", name, sg_message_id, message_id, _text(item.get("timestamp")), _text(item.get("url")))
        )
        # A resubscribe undoes its group's unsubscribe: the two share the ordering of their timestamps.
        (parsed.resubscribes if name == "group_resubscribe" else parsed.events).append(
            ReceiptEvent(
                provider="sendgrid",
                status=status,
                identities=(identity,),
                message_id=message_id,
                provider_message_id=provider_id(sg_message_id.split(".", 1)[0]),
                campaign_hint=our_id(item.get("tokensend_campaign")) or our_id(custom.get("tokensend_campaign")),
                instance_hint=our_id(item.get("tokensend_instance")) or our_id(custom.get("tokensend_instance")),
                reason_code=reason_code,
                occurred_at=stamped or received_at,
                dated=bool(stamped),
                topic=topic,
                opted_out=opted_out,
                complained_before=reason_code == _DROPPED_SPAM_REPORTED,
            )
        )
    return parsed


# --- SES (through SNS) ----------------------------------------------------------------------

# What SES publishes, as plain text rather than an event, to a topic it is given as a configuration
# set's destination.
SES_TOPIC_VALIDATION = "Successfully validated SNS topic for Amazon SES event publishing."

_SES_STATUS = {
    "send": Status.ACCEPTED,
    "delivery": Status.DELIVERED,
    "bounce": Status.BOUNCED,
    "complaint": Status.COMPLAINED,
    "reject": Status.FAILED,
    "renderingfailure": Status.FAILED,
    "deliverydelay": Status.DEFERRED,
    "open": Status.OPENED,
    "click": Status.CLICKED,
    "subscription": Status.UNSUBSCRIBED,
}
# The event object's key in the SES payload, by normalised event type.
_SES_DETAIL_KEY = {
    "send": "send",
    "delivery": "delivery",
    "bounce": "bounce",
    "complaint": "complaint",
    "reject": "reject",
    "renderingfailure": "failure",
    "deliverydelay": "deliveryDelay",
    "open": "open",
    "click": "click",
    "subscription": "subscription",
}
_SES_BOUNCE_SUBTYPES = frozenset(
    {
        "undetermined",
        "general",
        "noemail",
        "suppressed",
        "onaccountsuppressionlist",
        "mailboxfull",
        "messagetoolarge",
        "contentrejected",
        "attachmentrejected",
    }
)
_SES_COMPLAINT_TYPES = frozenset({"abuse", "auth_failure", "fraud", "not_spam", "other", "virus"})
_SES_DELAY_TYPES = frozenset(
    {
        "internalfailure",
        "general",
        "mailboxfull",
        "spamdetected",
        "recipientservererror",
        "ipfailure",
        "tlsfailure",
        "transientcommunicationfailure",
        "byoiphostnamelookupunavailable",
        "sendingdeferral",
        "undetermined",
    }
)
_SES_REJECT_REASONS = frozenset({"bad_content"})
# What an identity's notifications (`notificationType`) report too, when a configuration set's event
# destination is also on: one event reaches us twice, in two SNS messages of different MessageIds.
_SES_NOTIFIED_KINDS = frozenset({"bounce", "complaint", "delivery"})


def _compact(value: object) -> str:
    return _text(value).replace(" ", "").replace("_", "").lower()


def _ses_reason(kind: str, detail: Mapping[str, Any]) -> str:
    if kind == "bounce":
        hard = _text(detail.get("bounceType")).lower() == "permanent"
        recipients = detail.get("bouncedRecipients")
        first = recipients[0] if isinstance(recipients, list) and recipients and isinstance(recipients[0], dict) else {}
        code = smtp_code(_text(first.get("status"))) or smtp_code(first.get("diagnosticCode"))
        subtype = _compact(detail.get("bounceSubType"))
        return join_code("hard" if hard else "soft", code or (subtype if subtype in _SES_BOUNCE_SUBTYPES else ""))
    if kind == "complaint":
        feedback = slug(detail.get("complaintFeedbackType"), _SES_COMPLAINT_TYPES)
        if feedback:
            return feedback
        sub = _compact(detail.get("complaintSubType"))
        return sub if sub == "onaccountsuppressionlist" else ""
    if kind == "reject":
        return join_code("rejected", slug(detail.get("reason"), _SES_REJECT_REASONS))
    if kind == "renderingfailure":
        return "rendering_failure"
    if kind == "deliverydelay":
        delay = _compact(detail.get("delayType"))
        return delay if delay in _SES_DELAY_TYPES else ""
    return ""


def _ses_opted_out_topics(preferences: Mapping[str, Any]) -> set[str]:
    """The topics a contact's preferences opt out of, by name."""
    topics = preferences.get("topicSubscriptionStatus")
    return {
        _text(t.get("topicName"))
        for t in (topics if isinstance(topics, list) else [])
        if isinstance(t, dict) and _text(t.get("subscriptionStatus")).lower() == "optout"
    }


def _ses_opted_out(detail: Mapping[str, Any]) -> bool:
    """A Subscription event unsubscribes when the recipient left everything or a topic they were not out of
    before: SES reports every change of preferences, and an opt-in to one topic still lists the topics
    left earlier, which are no new opt-out. Either suppresses every topic: the dispatcher sends without
    SES's list management (no `TopicName`), so no SES topic is one of ours."""
    preferences = detail.get("newTopicPreferences")
    if not isinstance(preferences, dict):
        return False
    before = detail.get("oldTopicPreferences")
    before = before if isinstance(before, dict) else {}
    if preferences.get("unsubscribeAll") is True and before.get("unsubscribeAll") is not True:
        return True
    return bool(_ses_opted_out_topics(preferences) - _ses_opted_out_topics(before))


def _ses_not_spam(detail: Mapping[str, Any]) -> bool:
    """A `not-spam` feedback report (RFC 5965) corrects a message wrongly taken for spam: no complaint."""
    return slug(detail.get("complaintFeedbackType"), _SES_COMPLAINT_TYPES) == "not_spam"


def parse_ses(message: Any, sns_message_id: str, sns_timestamp: object, received_at: float) -> ParsedReceipt:
    """One SES event (event publishing: `eventType`) or notification (`notificationType`) from an SNS Message."""
    if not isinstance(message, dict):
        raise MalformedReceipt("Message", "must be a JSON object")
    kind_text = _text(message.get("eventType")) or _text(message.get("notificationType"))
    if not kind_text:
        raise MalformedReceipt("Message.eventType", "is required (or Message.notificationType)")
    kind = _compact(kind_text)
    status = _SES_STATUS.get(kind)
    parsed = ParsedReceipt()
    detail = message.get(_SES_DETAIL_KEY.get(kind, ""))
    detail = detail if isinstance(detail, dict) else {}
    if (
        status is None
        or (status is Status.UNSUBSCRIBED and not _ses_opted_out(detail))
        or (status is Status.COMPLAINED and _ses_not_spam(detail))
    ):
        parsed.ignored = 1  # AmazonSnsSubscriptionSucceeded, Received, opt-ins, not-spam reports ...
        return parsed
    if status is Status.COMPLAINED and _compact(detail.get("complaintSubType")) == "onaccountsuppressionlist":
        # Not a complaint about this message: SES did not send it, the address being on the account's
        # suppression list. Counted as a complaint, it inflated the campaign's complaint rate.
        status = Status.FAILED
    mail = message.get("mail") if isinstance(message.get("mail"), dict) else {}
    tags = mail.get("tags") if isinstance(mail.get("tags"), dict) else {}
    # The event's own time, else the send's, else SNS's: each the provider's (0 when none is usable).
    stamped = event_time(detail.get("timestamp"), event_time(mail.get("timestamp"), event_time(sns_timestamp, 0.0)))
    ses_message_id = provider_id(mail.get("messageId"))
    identity: tuple[str, ...] = ("ses", sns_message_id, kind)
    if kind in _SES_NOTIFIED_KINDS and ses_message_id:
        # Named by the event itself, the same in both shapes (and in SNS's redeliveries of either), so the
        # second of a notification and its published event is a duplicate.
        identity = ("ses-event", ses_message_id, kind, _text(detail.get("timestamp")))
    parsed.events.append(
        ReceiptEvent(
            provider="ses",
            status=status,
            identities=(identity,),
            message_id=our_id(_first(tags.get("tokensend_message_id"))),
            provider_message_id=ses_message_id,
            campaign_hint=our_id(_first(tags.get("tokensend_campaign"))),
            instance_hint=our_id(_first(tags.get("tokensend_instance"))),
            reason_code=_ses_reason(kind, detail),
            occurred_at=stamped or received_at,
            dated=bool(stamped),
        )
    )
    return parsed


# --- Twilio ---------------------------------------------------------------------------------

_TWILIO_STATUS = {
    "queued": Status.ACCEPTED,
    "accepted": Status.ACCEPTED,
    "scheduled": Status.ACCEPTED,
    "sending": Status.ACCEPTED,
    "sent": Status.ACCEPTED,
    "delivered": Status.DELIVERED,
    "undelivered": Status.FAILED,
    "failed": Status.FAILED,
    "canceled": Status.FAILED,
    "read": Status.READ,
}


def _single(params: Sequence[tuple[str, str]], name: str) -> str:
    for key, value in params:
        if key == name:
            return value
    return ""


def parse_twilio(
    params: Sequence[tuple[str, str]], url_message_id: str, idempotency_token: str, received_at: float
) -> ParsedReceipt:
    """A status callback: one event. Our ID rides in the callback URL's `message_id`."""
    state = (_single(params, "MessageStatus") or _single(params, "SmsStatus")).strip().lower()
    if not state:
        raise MalformedReceipt("MessageStatus", "is required")
    sid = _single(params, "MessageSid") or _single(params, "SmsSid")
    status = _TWILIO_STATUS.get(state)
    parsed = ParsedReceipt()
    if status is None:
        parsed.ignored = 1  # receiving, received, partially_delivered ...
        return parsed
    if status is Status.ACCEPTED:
        reason = state
    else:
        reason = numeric_code(_single(params, "ErrorCode")) or ("canceled" if state == "canceled" else "")
    # Twilio's SID and the status name the event; without a SID, our ID from the callback URL does, or every
    # message's callbacks of that status would be one event, all but the first taken for redeliveries.
    identities: tuple[tuple[str, ...], ...] = (
        (("twilio", sid, state),) if sid else (("twilio", "", state, our_id(url_message_id)),)
    )
    if idempotency_token:
        identities += (("twilio-idempotency", idempotency_token),)
    parsed.events.append(
        ReceiptEvent(
            provider="twilio",
            status=status,
            identities=identities,
            message_id=our_id(url_message_id),
            provider_message_id=provider_id(sid),
            reason_code=reason,
            occurred_at=received_at,  # status callbacks carry no event time
            opted_out=status is Status.FAILED and reason == str(TWILIO_OPTED_OUT),
        )
    )
    return parsed


# --- WhatsApp -------------------------------------------------------------------------------

_WHATSAPP_STATUS = {
    "sent": Status.ACCEPTED,
    "delivered": Status.DELIVERED,
    "read": Status.READ,
    "failed": Status.FAILED,
}


def _objects(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _items(value: object) -> list[Any]:
    """A list's items whatever they are, so that those that are not objects are counted as ignored."""
    return value if isinstance(value, list) else []


# Meta's code for a message it did not deliver because the recipient had stopped the business's marketing
# messages ("This recipient has chosen to stop receiving marketing messages on WhatsApp from your business"),
# reported in a `failed` status: an opt-out with WhatsApp, as Twilio's 21610 is one with Twilio. Its
# neighbours are not: 131049 is Meta's own cap on marketing messages per user, 131048 a spam-rate limit.
WHATSAPP_MARKETING_OPTED_OUT = 131050

# The `user_preferences` webhook field: a customer stopped or resumed the business's marketing messages in
# WhatsApp's settings. Meta documents one category and two values.
WHATSAPP_PREFERENCE_CATEGORY = "marketing_messages"
WHATSAPP_PREFERENCES = frozenset({"stop", "resume"})


def whatsapp_preference(item: object) -> str:
    """A `user_preferences[]` item's preference, "stop" or "resume"; "" when it is not one acted on."""
    if not isinstance(item, dict) or whatsapp_preference_problem(item) is not None:
        return ""
    return _text(item.get("value")).strip().lower()


def whatsapp_preference_problem(item: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why a `user_preferences[]` object is not one acted on, as (field, problem): fixed phrases only, for
    `wa_id` is a phone number and `detail` a free text, neither ever read out."""
    if _text(item.get("category")).strip().lower() != WHATSAPP_PREFERENCE_CATEGORY:
        return "category", "must be " + WHATSAPP_PREFERENCE_CATEGORY
    if _text(item.get("value")).strip().lower() not in WHATSAPP_PREFERENCES:
        return "value", "must be stop or resume"
    wa_id = item.get("wa_id")
    if not isinstance(wa_id, str) or not wa_id.strip():
        return "wa_id", "is required" if wa_id is None or isinstance(wa_id, str) else "must be a string"
    return None


def for_another_number(value: Mapping[str, Any], phone_number_id: str) -> bool:
    """Whether a webhook change is about another business number than the connector's: one Meta app
    (one callback URL, one app secret) may serve the numbers of several connectors and workspaces."""
    metadata = value.get("metadata")
    number = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
    return bool(phone_number_id) and isinstance(number, str) and number != phone_number_id


def parse_whatsapp(document: Any, received_at: float, phone_number_id: str = "") -> ParsedReceipt:
    """`entry[].changes[].value.statuses[]`, several per POST; inbound `messages[]` and usable
    `user_preferences[]` are ignored (`opt_outs` acts on them), and so is what concerns another number
    than the connector's `phone_number_id`."""
    if not isinstance(document, dict) or not isinstance(document.get("entry"), list):
        raise MalformedReceipt("entry", "must be a list of WhatsApp webhook entries")
    parsed = ParsedReceipt()
    for e, entry in enumerate(document["entry"]):
        if not isinstance(entry, dict):
            parsed.skip(f"entry[{e}]", "is not an object")
            continue
        if entry.get("changes") is not None and not isinstance(entry.get("changes"), list):
            parsed.skip(f"entry[{e}].changes", "is not a list")
        for c, change in enumerate(_items(entry.get("changes"))):
            where = f"entry[{e}].changes[{c}]"
            if not isinstance(change, dict):
                parsed.skip(where, "is not an object")
                continue
            value = change.get("value")
            if not isinstance(value, dict):
                parsed.skip(where + ".value", "is not an object")
                continue
            messages, statuses = _items(value.get("messages")), _items(value.get("statuses"))
            preferences = _items(value.get("user_preferences"))
            if for_another_number(value, phone_number_id):
                parsed.ignored += len(messages) + len(statuses) + len(preferences)
                continue
            parsed.ignored += len(messages)
            if value.get("user_preferences") is not None and not isinstance(value.get("user_preferences"), list):
                parsed.skip(where + ".value.user_preferences", "is not a list")
            for p, item in enumerate(preferences):
                if not isinstance(item, dict):
                    parsed.skip(f"{where}.value.user_preferences[{p}]", "is not an object")
                    continue
                problem = whatsapp_preference_problem(item)
                if problem is not None:
                    parsed.skip(f"{where}.value.user_preferences[{p}].{problem[0]}", problem[1])
                else:
                    parsed.ignored += 1  # a customer's opt-out or opt-in, not a delivery event
            if value.get("statuses") is not None and not isinstance(value.get("statuses"), list):
                parsed.skip(where + ".value.statuses", "is not a list")
            for s, item in enumerate(statuses):
                if not isinstance(item, dict):
                    parsed.skip(f"{where}.value.statuses[{s}]", "is not an object")
                    continue
                state = _text(item.get("status")).lower()
                if not state:
                    problem = "is required" if item.get("status") in (None, "") else "must be a string"
                    parsed.skip(f"{where}.value.statuses[{s}].status", problem)
                    continue
                status = _WHATSAPP_STATUS.get(state)
                if status is None:
                    parsed.ignored += 1  # deleted, warning ...: statuses not tracked
                    continue
                wamid = _text(item.get("id"))
                errors = _objects(item.get("errors"))
                reason = numeric_code(errors[0].get("code"), max_digits=7) if errors else ""
                failed = status is Status.FAILED
                stamped = event_time(item.get("timestamp"), 0.0)
                message_id = our_id(item.get("biz_opaque_callback_data"))
                # A message takes each status once, so Meta's ID and the status name the event: the same
                # status sent again, stamped anew, is a redelivery. Without that ID, our ID and the time do.
                identity = (
                    ("whatsapp", wamid, state)
                    if wamid
                    else ("whatsapp", "", state, message_id, _text(item.get("timestamp")))
                )
                parsed.events.append(
                    ReceiptEvent(
                        provider="whatsapp",
                        status=status,
                        identities=(identity,),
                        message_id=message_id,
                        provider_message_id=provider_id(wamid),
                        reason_code=reason if failed else (state if state == "sent" else ""),
                        occurred_at=stamped or received_at,
                        dated=bool(stamped),
                        # For every topic of the WhatsApp family, as 21610 is for SMS: the customer left the
                        # business's marketing as a whole, and Meta names no topic of ours.
                        opted_out=failed and reason == str(WHATSAPP_MARKETING_OPTED_OUT),
                    )
                )
    return parsed
