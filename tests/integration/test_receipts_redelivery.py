"""One event reaching us more than once, by another route than a provider's plain retry, is counted once.

SES reports Bounce, Complaint and Delivery twice when both an identity's SNS notifications
(`notificationType`, no tags: mapped by the SES message ID) and a configuration set's event
destination (`eventType`, with our tags) are on: two SNS messages, two SNS MessageIds, one event.
"""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.campaign_stats import add_counts
from libs.message_map import MessageMap
from libs.telemetry import setup_telemetry
from services.receipts.ledger import BATCH, DeliveryLedger
from tests.integration.test_operator_metrics import by_attributes, key
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    expire_map_entry,
    put_messages,
    recorded_status,
    running_receipts,
    sendgrid_event,
    ses_message,
    stats,
    stream_entries,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


def both_shapes(kind: str, pii: Pii, ses_id: str, message_id: str, **extra) -> tuple[dict, dict]:
    """The notification and the published event SES makes of one event: (notification, event)."""
    notification = ses_message(kind, pii, ses_message_id=ses_id, notification=True, **extra)
    event = ses_message(kind, pii, message_id=message_id, ses_message_id=ses_id, campaign="camp-1", **extra)
    return notification, event


async def unmapped_anywhere(redis) -> int:
    return (await stats(redis)).get("unmapped", 0) + (await stats(redis, "_workspace")).get("unmapped", 0)


@pytest.mark.parametrize(
    ("kind", "counter", "notification_first"),
    [("Delivery", "delivered", True), ("Bounce", "bounced", False), ("Complaint", "complained", True)],
)
async def test_an_ses_notification_and_its_published_event_count_once(
    receipts, redis, kind, counter, notification_first
):
    pii = Pii.new()
    ses_id = f"0100{uuid.uuid4().hex}"
    [record] = await put_messages(redis, "ses", 1, provider_ids=[ses_id])
    notification, event = both_shapes(kind, pii, ses_id, record.message_id)
    first, second = (notification, event) if notification_first else (event, notification)
    reply = await receipts.post_ses(first, pii)
    assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body
    reply = await receipts.post_ses(second, pii)
    assert reply.status == 200, reply.body
    assert reply.json() == {"events": 1, "mapped": 0, "unmapped": 0, "duplicates": 1}
    [entry] = await stream_entries(redis)  # one event for the stream's readers, not two
    assert entry["message_id"] == record.message_id
    assert (await stats(redis))[counter] == 1
    # SNS redelivering either message changes nothing either.
    for shape in (notification, event):
        assert (await receipts.post_ses(shape, pii)).json()["duplicates"] == 1
    assert len(await stream_entries(redis)) == 1


async def test_an_ses_event_for_an_expired_message_counts_unmapped_once(receipts, redis):
    """Both shapes of an event for a message no longer in the map: one unmapped receipt, not one per shape
    (the notification was counted for the workspace, the tagged event for its campaign)."""
    pii = Pii.new()
    await put_messages(redis, "ses", 1)  # the campaign exists, so the tagged event is counted in it
    notification, event = both_shapes("Delivery", pii, f"0100{uuid.uuid4().hex}", uuid.uuid4().hex)
    assert (await receipts.post_ses(notification, pii)).json()["unmapped"] == 1
    assert (await receipts.post_ses(event, pii)).json()["duplicates"] == 1
    assert await unmapped_anywhere(redis) == 1
    assert await stream_entries(redis) == []


async def test_a_published_event_maps_after_its_notification_came_too_early(receipts, redis):
    """The notification names only the SES message ID, indexed once the dispatcher has the send's reply: one
    that comes first, and too late to wait for the index (its time is long past), is unmapped. The published
    event carries our ID and is still counted, once: in the funnel, the workspace's unmapped count it had
    taken back. (A young one is refused instead: `test_receipts_early_events.py`.)"""
    pii = Pii.new()
    ses_id = f"0100{uuid.uuid4().hex}"
    [record] = await put_messages(redis, "ses", 1)  # the SES message ID not indexed yet
    notification, event = both_shapes("Delivery", pii, ses_id, record.message_id)
    assert (await receipts.post_ses(notification, pii)).json()["unmapped"] == 1
    assert (await stats(redis, "_workspace"))["unmapped"] == 1
    reply = await receipts.post_ses(event, pii)
    assert reply.json() == {"events": 1, "mapped": 1, "unmapped": 0, "duplicates": 0}, reply.body
    assert (await stats(redis))["delivered"] == 1
    assert await unmapped_anywhere(redis) == 0
    assert await recorded_status(redis, WS, record.message_id) == "delivered"
    # From then on both are duplicates, and an unmapped redelivery counts nothing more.
    for shape in (notification, event):
        assert (await receipts.post_ses(shape, pii)).json()["duplicates"] == 1
    assert len(await stream_entries(redis)) == 1
    assert await unmapped_anywhere(redis) == 0


async def test_an_event_counted_unmapped_in_its_campaign_is_taken_back_there_when_its_twin_maps(receipts, redis):
    """The tagged event came before the message was in the map: unmapped, in the campaign and the instance it
    names. The notification, once the message is there, maps; the campaign's and the instance's unmapped
    counts go back, and the workspace's is left alone."""
    pii = Pii.new()
    ses_id = f"0100{uuid.uuid4().hex}"
    [record] = await put_messages(redis, "ses", 1, provider_ids=[ses_id])
    await expire_map_entry(redis, WS, record.message_id)  # not written yet
    async with redis.pipeline(transaction=False) as pipe:  # an unmapped count of another event's
        add_counts(pipe, WS, "_workspace", "", {"unmapped": 1})
        await pipe.execute()
    notification, event = both_shapes("Delivery", pii, ses_id, record.message_id)
    event["mail"]["tags"]["tokensend_instance"] = ["inst-1"]
    assert (await receipts.post_ses(event, pii)).json()["unmapped"] == 1
    assert (await stats(redis))["unmapped"] == 1 and (await stats(redis, instance="inst-1"))["unmapped"] == 1
    await MessageMap(redis, 3600).put_many([record])
    reply = await receipts.post_ses(notification, pii)
    assert reply.json() == {"events": 1, "mapped": 1, "unmapped": 0, "duplicates": 0}, reply.body
    for counters in (await stats(redis), await stats(redis, instance="inst-1")):
        assert counters["delivered"] == 1 and counters.get("unmapped", 0) == 0, counters
    assert (await stats(redis, "_workspace"))["unmapped"] == 1
    assert len(await stream_entries(redis)) == 1


async def test_distinct_ses_events_of_one_message_are_all_kept(receipts, redis):
    """Keyed on the event's own time: a soft bounce and the hard one after it are two events, and so are
    two opens (only ever published, so keyed on their SNS messages)."""
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    ses_id = f"0100{uuid.uuid4().hex}"
    soft = ses_message("Bounce", pii, message_id=record.message_id, ses_message_id=ses_id, bounce_type="Transient")
    hard = ses_message("Bounce", pii, message_id=record.message_id, ses_message_id=ses_id)
    hard["bounce"]["timestamp"] = "2024-05-01T12:30:00.000Z"
    opens = [ses_message("Open", pii, message_id=record.message_id, ses_message_id=ses_id) for _ in range(2)]
    for message in (soft, hard, *opens):
        assert (await receipts.post_ses(message, pii)).json()["mapped"] == 1
    entries = await stream_entries(redis)
    assert [(e["status"], e["reason_code"]) for e in entries] == [
        ("bounced", "soft:5.1.1"),
        ("bounced", "hard:5.1.1"),
        ("opened", ""),
        ("opened", ""),
    ]


async def test_an_event_recorded_unmapped_then_mapped_is_one_event_in_the_metric(redis, redis_url):
    """SES's notification came first, unmapped, and its published event mapped: one delivery in
    `tokensend.receipts`, not two."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    ses_id = f"0100{uuid.uuid4().hex}"
    async with running_receipts(redis, redis_url, telemetry) as receipts:
        [record] = await put_messages(redis, "ses", 1)
        notification, event = both_shapes("Delivery", pii, ses_id, record.message_id)
        assert (await receipts.post_ses(notification, pii)).json()["unmapped"] == 1
        assert (await receipts.post_ses(event, pii)).json()["mapped"] == 1
    telemetry.shutdown()
    assert by_attributes(reader, "tokensend.receipts") == {key(provider="ses", status="delivered"): 1}


async def test_the_receipts_metric_counts_each_event_once(redis, redis_url):
    """`tokensend.receipts` by status is what a dashboard divides: a provider's redelivery is not a second
    delivery there either, and another system's traffic on the account (no ID of ours) is not there at all."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    async with running_receipts(redis, redis_url, telemetry) as receipts:
        [record] = await put_messages(redis, "whatsapp", 1)
        document = whatsapp_body([whatsapp_status("delivered", pii, message_id=record.message_id)], pii, inbound=False)
        replies = [await receipts.post_whatsapp(document) for _ in range(3)]
        assert [r.json()["duplicates"] for r in replies] == [0, 1, 1]
        unknown = whatsapp_body([whatsapp_status("read", pii)], pii, inbound=False)
        for _ in range(2):
            assert (await receipts.post_whatsapp(unknown)).status == 200
    telemetry.shutdown()
    assert by_attributes(reader, "tokensend.receipts") == {key(provider="whatsapp", status="delivered"): 1}
    assert by_attributes(reader, "tokensend.receipts.unmapped") == {key(provider="whatsapp"): 2}


async def test_a_body_cut_off_by_the_store_part_way_is_counted_once_in_the_metric(redis, redis_url, monkeypatch):
    """A SendGrid body of more events than one ledger batch, Redis failing after the first batch: 503, and
    the redelivery finds that batch's events duplicates. Each event is still one in `tokensend.receipts`,
    as in the stats: those recorded before the failure are counted then."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    record_batch = DeliveryLedger._run
    batches = 0

    async def second_batch_fails(self, *args, **kwargs):
        nonlocal batches
        batches += 1
        if batches == 2:
            raise RedisConnectionError("connection lost")
        return await record_batch(self, *args, **kwargs)

    monkeypatch.setattr(DeliveryLedger, "_run", second_batch_fails)
    pii = Pii.new()
    async with running_receipts(redis, redis_url, telemetry) as receipts:
        records = await put_messages(redis, "sendgrid", BATCH + 10)
        events = [sendgrid_event("delivered", pii, message_id=r.message_id) for r in records]
        assert (await receipts.post_sendgrid(events)).status == 503
        again = await receipts.post_sendgrid(events)
        assert again.status == 200 and again.json()["duplicates"] == BATCH, again.body
        assert (await stats(redis))["delivered"] == BATCH + 10
    telemetry.shutdown()
    assert by_attributes(reader, "tokensend.receipts") == {key(provider="sendgrid", status="delivered"): BATCH + 10}
