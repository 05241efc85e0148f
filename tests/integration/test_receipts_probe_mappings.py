"""Provider receipts probed as the providers send them: documented shapes whose meaning is easy to misread."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from libs.suppressions import SuppressionStore
from libs.telemetry import setup_telemetry
from tests.integration.test_operator_metrics import by_attributes, key
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    put_messages,
    running_receipts,
    sendgrid_event,
    ses_message,
    stats,
    stream_entries,
    twilio_params,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


def subscription(pii: Pii, message_id: str, old: dict, new: dict) -> dict:
    message = ses_message("Subscription", pii, message_id=message_id)
    message["subscription"].update(oldTopicPreferences=old, newTopicPreferences=new)
    return message


def topics(**statuses: str) -> list[dict[str, str]]:
    return [{"topicName": name, "subscriptionStatus": status} for name, status in statuses.items()]


async def test_an_ses_opt_in_to_one_topic_is_no_unsubscribe_though_another_stays_opted_out(receipts, redis):
    """SES reports every change of a contact's preferences with all of them: opting back in to "news" still
    lists "offers", left long ago. That is no new opt-out: nothing counted, nobody suppressed."""
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    opt_in = subscription(
        pii,
        record.message_id,
        old={"unsubscribeAll": False, "topicSubscriptionStatus": topics(offers="OptOut", news="OptOut")},
        new={"unsubscribeAll": False, "topicSubscriptionStatus": topics(offers="OptOut", news="OptIn")},
    )
    reply = await receipts.post_ses(opt_in, pii)
    assert reply.status == 200, reply.body
    assert reply.json() == {"events": 1, "mapped": 0, "unmapped": 0, "duplicates": 0}
    assert "unsubscribed" not in await stats(redis)
    assert await stream_entries(redis) == []
    assert not await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # Leaving a topic while another was left before.
        (
            {"unsubscribeAll": False, "topicSubscriptionStatus": topics(offers="OptOut", news="OptIn")},
            {"unsubscribeAll": False, "topicSubscriptionStatus": topics(offers="OptOut", news="OptOut")},
        ),
        # Leaving everything.
        ({"unsubscribeAll": False}, {"unsubscribeAll": True}),
        # A first choice, with no earlier preferences reported.
        (None, {"unsubscribeAll": False, "topicSubscriptionStatus": topics(offers="OptOut")}),
    ],
)
async def test_an_ses_opt_out_is_an_unsubscribe(receipts, redis, old, new):
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    message = subscription(pii, record.message_id, old=old, new=new)
    if old is None:
        del message["subscription"]["oldTopicPreferences"]
    reply = await receipts.post_ses(message, pii)
    assert reply.status == 200, reply.body
    assert reply.json()["mapped"] == 1
    assert (await stats(redis))["unsubscribed"] == 1
    assert [e["status"] for e in await stream_entries(redis)] == ["unsubscribed"]
    assert await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id]) == {record.anonymous_id}


async def test_entries_ignored_on_purpose_are_counted_for_operators(redis, redis_url):
    """Statuses not tracked are acknowledged (the provider must not send them again) and counted by provider
    in `tokensend.receipts.ignored`, so an operator sees them arrive; nothing of them reaches the stats."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    async with running_receipts(redis, redis_url, telemetry) as receipts:
        [email] = await put_messages(redis, "sendgrid", 1)
        [sms] = await put_messages(redis, "twilio", 1)
        [chat] = await put_messages(redis, "whatsapp", 1)
        batch = [
            sendgrid_event("delivered", pii, message_id=email.message_id),
            sendgrid_event("account_status_change", pii, message_id=email.message_id),
            "not an event",
        ]
        reply = await receipts.post_sendgrid(batch)
        assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body
        reply = await receipts.post_twilio(twilio_params("partially_delivered", pii), sms.message_id)
        assert reply.status == 200 and reply.json()["events"] == 1, reply.body
        statuses = [whatsapp_status("deleted", pii, message_id=chat.message_id)]
        reply = await receipts.post_whatsapp(whatsapp_body(statuses, pii, inbound=False))
        assert reply.status == 200 and reply.json()["events"] == 1, reply.body
    assert by_attributes(reader, "tokensend.receipts.ignored") == {
        key(provider="sendgrid"): 2,
        key(provider="twilio"): 1,
        key(provider="whatsapp"): 1,
    }
    assert by_attributes(reader, "tokensend.receipts") == {key(provider="sendgrid", status="delivered"): 1}
    assert (await stats(redis))["delivered"] == 1
