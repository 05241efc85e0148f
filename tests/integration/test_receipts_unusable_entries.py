"""Batches mixing good and unusable entries: the good ones are all recorded, the others named by place.

A provider's batch may hold an entry that is not its documented shape (not an object, no event type, a
resubscribe to no group). It is left out so that the batch is not sent again for it, and it was counted
only in a metric, so nobody could tell which entry of which receipt was dropped. Now the reply and a log
line (a line a minute per connector) name each by its place in the receipt, with a fixed phrase: nothing of
the entry itself.
"""

from __future__ import annotations

import json

import pytest
from tokensend.receipts.v1 import receipts_service_pb2 as pb

from tests.integration.test_receipts_harness import (
    Pii,
    leaks,
    log_text,
    put_messages,
    running_receipts,
    sendgrid_event,
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


async def test_a_sendgrid_batch_records_its_good_events_and_names_the_unusable_ones(receipts, redis, captured_logs):
    pii = Pii.new()
    records = await put_messages(redis, "sendgrid", 3)
    a, b, c = (r.message_id for r in records)
    delivered = sendgrid_event("delivered", pii, message_id=a)
    batch = [
        delivered,
        pii.email,  # not an object
        {"email": pii.email, "sg_event_id": "e-1", "tokensend_message_id": b},  # no event type
        sendgrid_event("bounce", pii, message_id=b),
        sendgrid_event("group_resubscribe", pii, message_id=c, asm_group_id=pii.digits),  # no group of SendGrid's
        sendgrid_event("account_status_change", pii, message_id=c),  # a type not tracked: ignored, not unusable
        sendgrid_event("open", pii, message_id=c),
        delivered,  # the first one again in the same post
    ]
    reply = await receipts.post_sendgrid(batch)
    assert reply.status == 200, reply.body
    assert reply.json() == {
        "events": 8,
        "mapped": 3,
        "unmapped": 0,
        "duplicates": 1,
        "unusable": 3,
        "unusable_entries": [
            "[1]: is not an object",
            "[2].event: is required",
            "[4].asm_group_id: must be a SendGrid unsubscribe group ID",
        ],
    }
    # Nothing accepted is lost: the delivery, the bounce and the open are all counted and streamed.
    counts = await stats(redis)
    assert (counts["delivered"], counts["bounced"], counts["opened"]) == (1, 1, 1)
    assert [e["status"] for e in await stream_entries(redis)] == ["delivered", "bounced", "opened"]

    lines = [r.getMessage() for r in captured_logs.records if "documented shape" in r.getMessage()]
    assert len(lines) == 1 and r"3 of its 8 entries left out" in lines[0], lines
    assert "[1]: is not an object; [2].event: is required" in lines[0] and "sg-main" in lines[0]
    assert leaks(pii.needles(), log_text(captured_logs)) == []
    assert leaks(pii.needles(), [json.dumps(reply.body).encode()]) == []

    # The same batch again: every good event a duplicate, the unusable ones named again; the log line is
    # not repeated within the minute.
    again = await receipts.post_sendgrid(batch)
    assert again.json()["duplicates"] == 4 and again.json()["unusable"] == 3
    assert len([r for r in captured_logs.records if "documented shape" in r.getMessage()]) == 1


async def test_a_whatsapp_post_names_its_unusable_statuses_and_changes(receipts, redis, captured_logs):
    pii = Pii.new()
    [chat] = await put_messages(redis, "whatsapp", 1)
    document = whatsapp_body(
        [
            whatsapp_status("delivered", pii, message_id=chat.message_id),
            pii.phone,
            {"id": pii.wamid + "x", "recipient_id": pii.digits, "biz_opaque_callback_data": chat.message_id},
            whatsapp_status("deleted", pii, message_id=chat.message_id),  # not tracked: ignored, not unusable
        ],
        pii,
    )
    document["entry"] += [pii.email, {"id": "1", "changes": [{"field": "messages", "value": pii.name}]}]
    document["entry"].append({"id": "2", "changes": [{"value": {"statuses": {"status": "read"}}}]})
    reply = await receipts.post_whatsapp(document)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["unusable_entries"] == [
        "entry[0].changes[0].value.statuses[1]: is not an object",
        "entry[0].changes[0].value.statuses[2].status: is required",
        "entry[1]: is not an object",
        "entry[2].changes[0].value: is not an object",
        "entry[3].changes[0].value.statuses: is not a list",
    ]
    assert (body["mapped"], body["unusable"]) == (1, 5)
    assert (await stats(redis))["delivered"] == 1
    assert leaks(pii.needles(), log_text(captured_logs)) == []
    assert leaks(pii.needles(), [json.dumps(body).encode()]) == []


async def test_a_batch_with_more_unusable_entries_than_named_counts_them_all(receipts, redis):
    [record] = await put_messages(redis, "sendgrid", 1)
    batch = [7] * 50 + [sendgrid_event("delivered", Pii.new(), message_id=record.message_id)]
    body = (await receipts.post_sendgrid(batch)).json()
    assert (body["unusable"], len(body["unusable_entries"]), body["mapped"]) == (50, 20, 1)
    assert body["unusable_entries"][-1] == "[19]: is not an object"


async def test_a_receipt_without_unusable_entries_replies_as_before(receipts, redis):
    [record] = await put_messages(redis, "twilio", 1)
    reply = await receipts.post_twilio(twilio_params("delivered", Pii.new()), record.message_id)
    assert reply.json() == {"events": 1, "mapped": 1, "unmapped": 0, "duplicates": 0}


async def test_ingest_receipt_records_the_good_events_of_a_mixed_batch(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "sendgrid", 1)
    body, headers = receipts.sendgrid_request([3, sendgrid_event("delivered", pii, message_id=record.message_id)])
    response = await receipts.stub.IngestReceipt(
        pb.IngestReceiptRequest(
            workspace_id="ws-receipts",
            connector_id="sg-main",
            provider=pb.PROVIDER_SENDGRID,
            headers=headers,
            body=body,
        )
    )
    assert (response.events, response.mapped) == (2, 1)
    # A relay sees what the webhook's reply says: what was left out, and where.
    assert (response.ignored, response.unusable, list(response.unusable_entries)) == (1, 1, ["[0]: is not an object"])
