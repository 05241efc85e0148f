"""The webhooks end to end: real HTTP requests, real Redis, each provider's signed receipts."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
import logging
import ssl
import time
import uuid
from urllib.parse import urlencode

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import ValidationError
from tokensend.receipts.v1 import receipts_service_pb2 as rpb

from libs import message_map
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from libs.message_map import GROUP_PART, MessageMap, split_message_id
from libs.settings import ReceiptsSettings
from libs.telemetry import ScrubbingFilter, setup_telemetry
from sandbox.signing import SnsSigner, twilio_signature, whatsapp_signature
from services.receipts.ledger import statuses_key
from tests.integration.peers import TlsMaterial, make_tls_material
from tests.integration.test_operator_metrics import by_attributes, key
from tests.integration.test_receipts_harness import (
    SES_EVENT_TYPES,
    TOPIC_ARN,
    WS,
    Pii,
    expire_map_entry,
    leaks,
    log_text,
    put_messages,
    recorded_status,
    running_receipts,
    sendgrid_event,
    ses_message,
    sns_confirmation,
    sns_notification,
    sns_timestamp,
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


async def seen_keys(redis) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"ts:{{{WS}}}:rcpt:*")]


# --- every event of every provider ----------------------------------------------------------


async def test_sendgrid_every_event_type(receipts, redis):
    pii = Pii.new()
    records = await put_messages(redis, "sendgrid", 3)
    a, b, c = (r.message_id for r in records)
    events = [
        sendgrid_event("processed", pii, message_id=a),
        sendgrid_event("deferred", pii, message_id=a),
        sendgrid_event("delivered", pii, message_id=a),
        sendgrid_event("open", pii, message_id=a),
        sendgrid_event("open", pii, message_id=a),  # a second open is an event, not a second unique open
        sendgrid_event("click", pii, message_id=a),
        sendgrid_event("spamreport", pii, message_id=a),
        sendgrid_event("bounce", pii, message_id=b),
        sendgrid_event("dropped", pii, message_id=c),
        sendgrid_event("unsubscribe", pii, message_id=b),
        sendgrid_event("group_unsubscribe", pii, message_id=c),
        sendgrid_event("group_resubscribe", pii, message_id=c),
    ]
    reply = await receipts.post_sendgrid(events)
    assert reply.status == 200, reply.body
    assert reply.json() == {"events": 12, "mapped": 11, "unmapped": 0, "duplicates": 0}
    counts = await stats(redis)
    assert {k: v for k, v in counts.items() if k not in ("attempted", "sent")} == {
        "delivered": 1,
        "opened": 1,
        "clicked": 1,
        "complained": 1,
        "bounced": 1,
        "failed": 1,
        "unsubscribed": 2,
    }
    assert await stats(redis, instance="inst-1") == counts
    entries = await stream_entries(redis)
    assert [e["status"] for e in entries] == [
        "accepted", "deferred", "delivered", "opened", "opened", "clicked", "complained",
        "bounced", "failed", "unsubscribed", "unsubscribed",
    ]  # fmt: skip
    reasons = {e["status"]: e["reason_code"] for e in entries}
    assert reasons["bounced"] == "hard:5.1.1"
    assert reasons["failed"] == "dropped:bounced_address"
    assert reasons["deferred"] == "4.2.2"
    assert entries[0]["anonymous_id"] == "anon-0" and entries[0]["channel"] == "1"
    assert entries[0]["campaign_id"] == "camp-1" and entries[0]["campaign_instance_id"] == "inst-1"
    assert await recorded_status(redis, WS, a) == "complained"


async def test_sendgrid_blocked_bounce_is_soft(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "sendgrid", 1)
    event = sendgrid_event("bounce", pii, message_id=record.message_id, type="blocked", status="4.7.1")
    assert (await receipts.post_sendgrid([event])).status == 200
    [entry] = await stream_entries(redis)
    assert (entry["status"], entry["reason_code"]) == ("bounced", "soft:4.7.1")


@pytest.mark.parametrize("notification", [False, True])
async def test_ses_every_event_type(receipts, redis, notification):
    pii = Pii.new()
    kinds = ("Bounce", "Complaint", "Delivery") if notification else SES_EVENT_TYPES
    ses_ids = [f"0100{uuid.uuid4().hex}" for _ in kinds]
    # Notifications carry no tags: they map through the SES message ID the dispatcher indexed.
    records = await put_messages(redis, "ses", len(kinds), provider_ids=ses_ids if notification else ())
    for kind, record, ses_id in zip(kinds, records, ses_ids, strict=True):
        message = ses_message(kind, pii, message_id=record.message_id, ses_message_id=ses_id, notification=notification)
        reply = await receipts.post_ses(message, pii, version=2 if kind in ("Open", "Bounce") else 1)
        assert reply.status == 200, (kind, reply.body)
        assert reply.json()["mapped"] == 1, kind
    entries = await stream_entries(redis)
    got = {e["message_id"]: (e["status"], e["reason_code"]) for e in entries}
    expected = {
        "Send": ("accepted", ""),
        "Delivery": ("delivered", ""),
        "Bounce": ("bounced", "hard:5.1.1"),
        "Complaint": ("complained", "abuse"),
        "Reject": ("failed", "rejected:bad_content"),
        "Open": ("opened", ""),
        "Click": ("clicked", ""),
        "DeliveryDelay": ("deferred", "mailboxfull"),
        "Rendering Failure": ("failed", "rendering_failure"),
        "Subscription": ("unsubscribed", ""),
    }
    for kind, record in zip(kinds, records, strict=True):
        assert got[record.message_id] == expected[kind], kind
    counts = await stats(redis)
    assert counts["bounced"] == 1 and counts["complained"] == 1 and counts["delivered"] == 1


async def test_ses_transient_bounce_is_soft(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    message = ses_message("Bounce", pii, message_id=record.message_id, bounce_type="Transient")
    assert (await receipts.post_ses(message, pii)).status == 200
    [entry] = await stream_entries(redis)
    assert entry["reason_code"] == "soft:5.1.1"


async def test_twilio_every_status(receipts, redis):
    pii = Pii.new()
    statuses = ["queued", "accepted", "sending", "sent", "delivered", "read", "undelivered", "failed", "canceled"]
    records = await put_messages(redis, "twilio", len(statuses))
    for state, record in zip(statuses, records, strict=True):
        code = "30003" if state in ("undelivered", "failed") else ""
        reply = await receipts.post_twilio(twilio_params(state, pii, error_code=code), record.message_id)
        assert reply.status == 200, (state, reply.body)
    got = [(e["status"], e["reason_code"]) for e in await stream_entries(redis)]
    assert got == [
        ("accepted", "queued"),
        ("accepted", "accepted"),
        ("accepted", "sending"),
        ("accepted", "sent"),
        ("delivered", ""),
        ("read", ""),
        ("failed", "30003"),
        ("failed", "30003"),
        ("failed", "canceled"),
    ]
    counts = await stats(redis)
    # The "read" message had no "delivered" (each status has a message of its own): its read proves it.
    assert (counts["delivered"], counts["opened"], counts["failed"]) == (2, 1, 3)


async def test_twilio_message_lifecycle_moves_forward(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "twilio", 1)
    sid = "SM" + uuid.uuid4().hex
    for state in ("queued", "sent", "delivered"):
        assert (await receipts.post_twilio(twilio_params(state, pii, sid=sid), record.message_id)).status == 200
    assert await recorded_status(redis, WS, record.message_id) == "delivered"
    # What receipts record of a group's messages goes with the group's entries (3,600 s left), not later, and
    # no key of the message's own is made.
    group, own = split_message_id(record.message_id)
    entries_ttl = await redis.pttl(MessageMap.entries_key(WS, group))
    assert 0 < entries_ttl - 5000 <= await redis.pttl(statuses_key(WS, group)) <= entries_ttl
    assert await redis.hget(statuses_key(WS, group), own) == b"3:delivered:delivered"  # rank, status, counted
    assert not await redis.exists(MessageMap.key(WS, record.message_id))
    assert (await stats(redis))["delivered"] == 1


async def test_whatsapp_several_statuses_per_post(receipts, redis):
    pii = Pii.new()
    records = await put_messages(redis, "whatsapp", 3)
    a, b, c = (r.message_id for r in records)
    document = whatsapp_body(
        [
            whatsapp_status("sent", pii, message_id=a, wamid="wamid.A1"),
            whatsapp_status("read", pii, message_id=a, wamid="wamid.A1"),  # "delivered" skipped, as Meta may
            whatsapp_status("delivered", pii, message_id=b, wamid="wamid.B1"),
            whatsapp_status("failed", pii, message_id=c, wamid="wamid.C1", error_code=131026),
        ],
        pii,
    )
    reply = await receipts.post_whatsapp(document)
    assert reply.status == 200
    assert reply.json() == {"events": 5, "mapped": 4, "unmapped": 0, "duplicates": 0}  # + 1 inbound, ignored
    got = [(e["message_id"], e["status"], e["reason_code"]) for e in await stream_entries(redis)]
    assert got == [(a, "accepted", "sent"), (a, "read", ""), (b, "delivered", ""), (c, "failed", "131026")]
    counts = await stats(redis)
    # a's read proves its delivery though Meta skipped the "delivered" status: both counted.
    assert (counts["opened"], counts["delivered"], counts["failed"]) == (1, 2, 1)


async def test_a_read_without_delivered_counts_the_delivery_once(receipts, redis):
    """Meta (and Twilio's WhatsApp and RCS) may skip "delivered" and report "read": the message reached
    the handset all the same, so it is counted delivered, once, even when "delivered" comes late."""
    pii = Pii.new()
    [record] = await put_messages(redis, "whatsapp", 1, campaign="camp-read")
    [tw] = await put_messages(redis, "twilio", 1, campaign="camp-read")
    read = whatsapp_status("read", pii, message_id=record.message_id, timestamp=1_714_564_801)
    assert (await receipts.post_whatsapp(whatsapp_body([read], pii, inbound=False))).json()["mapped"] == 1
    assert (await receipts.post_twilio(twilio_params("read", pii), tw.message_id)).json()["mapped"] == 1
    counts = await stats(redis, "camp-read")
    assert (counts["delivered"], counts["opened"]) == (2, 2)
    late = whatsapp_status("delivered", pii, message_id=record.message_id, timestamp=1_714_564_800)
    assert (await receipts.post_whatsapp(whatsapp_body([late], pii, inbound=False))).json()["mapped"] == 1
    assert (await receipts.post_twilio(twilio_params("delivered", pii), tw.message_id)).json()["mapped"] == 1
    counts = await stats(redis, "camp-read")
    assert (counts["delivered"], counts["opened"]) == (2, 2)
    assert await recorded_status(redis, WS, record.message_id) == "read"


# --- exactly once -----------------------------------------------------------------------------


async def test_redelivery_five_times_counts_once(receipts, redis):
    pii = Pii.new()
    [sg] = await put_messages(redis, "sendgrid", 1)
    [ses] = await put_messages(redis, "ses", 1)
    [tw] = await put_messages(redis, "twilio", 1)
    [wa] = await put_messages(redis, "whatsapp", 1)
    sg_events = [sendgrid_event("delivered", pii, message_id=sg.message_id)]
    ses_envelope = sns_notification(ses_message("Delivery", pii, message_id=ses.message_id), pii)
    tw_params = twilio_params("delivered", pii)
    token = uuid.uuid4().hex
    wa_doc = whatsapp_body([whatsapp_status("delivered", pii, message_id=wa.message_id)], pii)
    for attempt in range(5):
        # SendGrid re-signs each retry with a fresh timestamp; the event ID stays.
        assert (await receipts.post_sendgrid(sg_events)).status == 200
        body, headers = receipts.ses_request(ses_envelope, version=1 + attempt % 2)
        assert (await receipts.post("ses", body, headers)).status == 200
        assert (await receipts.post_twilio(tw_params, tw.message_id, token=token)).status == 200
        reply = await receipts.post_whatsapp(wa_doc)
        assert reply.status == 200
        assert reply.json()["duplicates"] == (1 if attempt else 0)
    assert (await stats(redis))["delivered"] == 4
    assert len(await stream_entries(redis)) == 4


async def test_concurrent_duplicates_count_once(receipts, redis):
    pii = Pii.new()
    records = await put_messages(redis, "sendgrid", 20)
    events = [sendgrid_event("open", pii, message_id=r.message_id) for r in records]
    replies = await asyncio.gather(*(receipts.post_sendgrid(events) for _ in range(8)))
    assert all(r.status == 200 for r in replies)
    assert sum(r.json()["mapped"] for r in replies) == 20
    assert sum(r.json()["duplicates"] for r in replies) == 20 * 7
    assert (await stats(redis))["opened"] == 20
    assert len(await stream_entries(redis)) == 20


async def test_duplicates_inside_one_post(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "sendgrid", 1)
    event = sendgrid_event("delivered", pii, message_id=record.message_id)
    reply = await receipts.post_sendgrid([event, event, event])
    assert reply.json() == {"events": 3, "mapped": 1, "unmapped": 0, "duplicates": 2}


async def test_unique_opens_and_clicks_per_message(receipts, redis):
    pii = Pii.new()
    records = await put_messages(redis, "sendgrid", 2)
    events = [sendgrid_event(kind, pii, message_id=r.message_id) for r in records for kind in ("open",) * 3]
    events += [sendgrid_event("click", pii, message_id=records[0].message_id) for _ in range(4)]
    assert (await receipts.post_sendgrid(events)).json()["mapped"] == 10
    counts = await stats(redis)
    assert (counts["opened"], counts["clicked"]) == (2, 1)


async def test_out_of_order_counts_once_and_status_never_moves_back(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "sendgrid", 1)
    for kind in ("click", "open", "delivered", "processed", "deferred", "delivered"):
        event = sendgrid_event(kind, pii, message_id=record.message_id)
        assert (await receipts.post_sendgrid([event])).status == 200
        assert await recorded_status(redis, WS, record.message_id) == "clicked", kind
    counts = await stats(redis)
    assert (counts["delivered"], counts["opened"], counts["clicked"]) == (1, 1, 1)
    assert await redis.ttl(statuses_key(WS, record.message_id[:GROUP_PART])) > 0  # the map's TTL is kept
    event = sendgrid_event("unsubscribe", pii, message_id=record.message_id)
    await receipts.post_sendgrid([event])
    assert await recorded_status(redis, WS, record.message_id) == "unsubscribed"


async def test_whatsapp_out_of_order_statuses(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "whatsapp", 1)
    statuses = [
        whatsapp_status(s, pii, message_id=record.message_id, timestamp=1_714_564_800 + n)
        for n, s in enumerate(["read", "delivered", "sent"])
    ]
    assert (await receipts.post_whatsapp(whatsapp_body(statuses, pii))).json()["mapped"] == 3
    assert await recorded_status(redis, WS, record.message_id) == "read"
    counts = await stats(redis)
    assert (counts["opened"], counts["delivered"]) == (1, 1)


async def test_a_whatsapp_status_sent_again_with_another_time_is_a_duplicate(receipts, redis):
    """Meta may send a message's status again stamped anew: one event in the stream and the counts. One
    naming no ID of ours (another system's message on the account) is counted unmapped each time, unmarked."""
    pii = Pii.new()
    [record] = await put_messages(redis, "whatsapp", 1)
    unknown = "wamid." + uuid.uuid4().hex
    first = [
        whatsapp_status("delivered", pii, message_id=record.message_id, timestamp=1_714_564_800),
        whatsapp_status("delivered", pii, wamid=unknown, timestamp=1_714_564_800),
    ]
    again = [
        whatsapp_status("delivered", pii, message_id=record.message_id, timestamp=1_714_564_860),
        whatsapp_status("delivered", pii, wamid=unknown, timestamp=1_714_564_860),
    ]
    assert (await receipts.post_whatsapp(whatsapp_body(first, pii, inbound=False))).json() == {
        "events": 2, "mapped": 1, "unmapped": 1, "duplicates": 0,
    }  # fmt: skip
    assert (await receipts.post_whatsapp(whatsapp_body(again, pii, inbound=False))).json() == {
        "events": 2, "mapped": 0, "unmapped": 1, "duplicates": 1,
    }  # fmt: skip
    assert [e["status"] for e in await stream_entries(redis)] == ["delivered"]
    assert (await stats(redis))["delivered"] == 1
    assert (await stats(redis, "_workspace"))["unmapped"] == 2


# --- unknown messages -------------------------------------------------------------------------


async def test_unknown_ids_are_unmapped_and_dropped(receipts, redis):
    pii = Pii.new()
    await put_messages(redis, "sendgrid", 1, campaign="camp-1", instance="inst-1")
    events = [
        # Names a campaign that exists: counted there.
        sendgrid_event("delivered", pii, message_id=uuid.uuid4().hex, campaign="camp-1", instance="inst-1"),
        # Names nothing, or a campaign nobody sent: counted for the workspace, no key made for it.
        sendgrid_event("delivered", pii, message_id=uuid.uuid4().hex),
        sendgrid_event("open", pii, message_id=uuid.uuid4().hex, campaign="never-sent", instance="x"),
        sendgrid_event("open", pii),
    ]
    reply = await receipts.post_sendgrid(events)
    assert reply.json() == {"events": 4, "mapped": 0, "unmapped": 4, "duplicates": 0}
    assert (await stats(redis))["unmapped"] == 1
    assert (await stats(redis, instance="inst-1"))["unmapped"] == 1
    assert (await stats(redis, "_workspace"))["unmapped"] == 3
    assert not [k async for k in redis.scan_iter(match="*never-sent*")]
    assert await stream_entries(redis) == []
    assert "delivered" not in await stats(redis)


async def test_an_entry_written_before_groups_maps_and_keeps_its_status_in_its_own_hash(receipts, redis):
    """A dispatcher of an earlier release wrote a hash per message (its anonymous ID and its batch's ID);
    its receipts still map, and what they record stays in that hash, with its TTL."""
    [record] = await put_messages(redis, "twilio", 1)  # for the campaign's counters; then its older shape
    await expire_map_entry(redis, WS, record.message_id)
    older = uuid.uuid4().hex
    await redis.hset(MessageMap.key(WS, older), mapping={"batch": "b" * 32, "anonymous_id": "anon-old"})
    await redis.expire(MessageMap.key(WS, older), 600)
    fields = MessageMap.batch_fields(dataclasses.replace(record, message_id=older))
    await redis.hset(MessageMap.batch_key(WS, "b" * 32), mapping=fields)
    reply = await receipts.post_twilio(twilio_params("delivered", Pii.new()), older)
    assert reply.json()["mapped"] == 1
    assert await recorded_status(redis, WS, older) == "delivered"
    assert await redis.hget(MessageMap.key(WS, older), "status") == b"delivered"
    assert 0 < await redis.ttl(MessageMap.key(WS, older)) <= 600
    assert not await redis.exists(statuses_key(WS, older[:GROUP_PART]))
    assert (await stats(redis))["delivered"] == 1


async def test_expired_message_is_unmapped(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "twilio", 1)
    await expire_map_entry(redis, WS, record.message_id)  # the map entry's TTL ran out
    reply = await receipts.post_twilio(twilio_params("delivered", pii), record.message_id)
    assert reply.json()["unmapped"] == 1
    assert not await redis.exists(MessageMap.key(WS, record.message_id))  # not recreated without a TTL


async def test_provider_id_fallback_and_provider_must_match(receipts, redis):
    pii = Pii.new()
    xid = "XMSG" + uuid.uuid4().hex[:16]
    [record] = await put_messages(redis, "sendgrid", 1, provider_ids=[xid])
    # No custom_args: mapped through sg_message_id's X-Message-Id part.
    event = sendgrid_event("delivered", pii, sg_message_id=f"{xid}.filter0001-1")
    assert (await receipts.post_sendgrid([event])).json()["mapped"] == 1
    # A Twilio receipt naming a SendGrid message moves nothing.
    reply = await receipts.post_twilio(twilio_params("failed", pii, error_code="30003"), record.message_id)
    assert reply.json()["unmapped"] == 1
    assert (await stats(redis)).get("failed", 0) == 0


async def test_a_late_receipt_of_an_old_batch_is_mapped_when_the_kept_batch_records_are_full(
    receipts, redis, monkeypatch
):
    """The process keeps the batch records it read, the least recently used dropped first. A late
    receipt (an open days later) for a message of the oldest one kept, posted with an event of a batch
    not read before, is still attributed: reading the new record does not lose the old one midway."""
    monkeypatch.setattr(message_map, "BATCH_RECORDS_KEPT", 1)  # a full cache, small enough to fill here
    pii = Pii.new()
    [old] = await put_messages(redis, "sendgrid", 1)
    [new] = await put_messages(redis, "sendgrid", 1)
    assert (await receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=old.message_id)])).json()[
        "mapped"
    ] == 1
    events = [
        sendgrid_event("open", pii, message_id=old.message_id),
        sendgrid_event("delivered", pii, message_id=new.message_id),
    ]
    assert (await receipts.post_sendgrid(events)).json() == {"events": 2, "mapped": 2, "unmapped": 0, "duplicates": 0}
    counts = await stats(redis)
    assert (counts["delivered"], counts["opened"], counts.get("unmapped", 0)) == (2, 1, 0)


# --- refused receipts -------------------------------------------------------------------------


async def assert_nothing_recorded(redis) -> None:
    assert await stream_entries(redis) == []
    assert await seen_keys(redis) == []
    counts = await stats(redis)
    assert set(counts) <= {"attempted", "sent"}, counts


async def test_forged_and_missing_signatures(receipts, redis):
    pii = Pii.new()
    [sg] = await put_messages(redis, "sendgrid", 1)
    [tw] = await put_messages(redis, "twilio", 1)
    [wa] = await put_messages(redis, "whatsapp", 1)
    [ses] = await put_messages(redis, "ses", 1)

    body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii, message_id=sg.message_id)])
    forged = body.replace(b"delivered", b"bounce")
    assert (await receipts.post("sendgrid", forged, headers)).status == 403
    assert (await receipts.post("sendgrid", body, {"Content-Type": "application/json"})).status == 401
    other_key = type(receipts.secrets.sendgrid)()
    assert (await receipts.post("sendgrid", body, other_key.headers(body))).status == 403

    params = twilio_params("delivered", pii)
    body, headers, query = receipts.twilio_request(params, tw.message_id)
    assert (
        await receipts.post("twilio", body, headers, query=query.replace("message_id=", "message_id=x"))
    ).status == 403
    assert (await receipts.post("twilio", body + b"&Extra=1", headers, query=query)).status == 403
    unsigned = {k: v for k, v in headers.items() if k != "X-Twilio-Signature"}
    assert (await receipts.post("twilio", body, unsigned, query=query)).status == 401
    # Signed for the local URL instead of the public one Twilio sees: refused.
    local = receipts.local_url + receipts.path("twilio") + "?" + query
    wrong_url = {**headers, "X-Twilio-Signature": twilio_signature(receipts.secrets.twilio_auth_token, local, params)}
    assert (await receipts.post("twilio", body, wrong_url, query=query)).status == 403

    body, headers = receipts.whatsapp_request(
        whatsapp_body([whatsapp_status("read", pii, message_id=wa.message_id)], pii)
    )
    assert (
        await receipts.post("whatsapp", body, {"X-Hub-Signature-256": whatsapp_signature("nope", body)})
    ).status == 403
    assert (await receipts.post("whatsapp", body, {})).status == 401

    signed = receipts.sns.sign(sns_notification(ses_message("Delivery", pii, message_id=ses.message_id), pii))
    tampered = {**signed, "Message": signed["Message"].replace("Delivery", "Bounce")}
    assert (await receipts.post("ses", json.dumps(tampered).encode())).status == 403
    unsigned_sns = {k: v for k, v in signed.items() if k not in ("Signature",)}
    assert (await receipts.post("ses", json.dumps(unsigned_sns).encode())).status == 401
    await assert_nothing_recorded(redis)


async def test_stale_sendgrid_timestamp(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "sendgrid", 1)
    events = [sendgrid_event("delivered", pii, message_id=record.message_id)]
    for skew in (-3600, 3600):
        reply = await receipts.post_sendgrid(events, timestamp=int(time.time()) + skew)
        assert reply.status == 403
        assert "window" in reply.json()["error"]
    await assert_nothing_recorded(redis)


async def test_oversize_bodies_get_413(redis, redis_url):
    async with running_receipts(redis, redis_url, max_receipt_bytes=4096) as receipts:
        pii = Pii.new()
        big = [sendgrid_event("open", pii) for _ in range(40)]
        reply = await receipts.post_sendgrid(big)
        assert reply.status == 413
        assert "4096-byte limit (TOKENSEND_MAX_RECEIPT_BYTES)" in reply.json()["error"]  # the variable to raise

        async def chunks():  # no Content-Length: the bounded reader stops it
            for _ in range(10):
                yield b"x" * 1024

        url = receipts.local_url + receipts.path("sendgrid")
        async with receipts.http.post(url, data=chunks()) as response:
            assert response.status == 413
        await assert_nothing_recorded(redis)
        async with receipts.http.get(receipts.local_url + "/healthz") as response:
            assert response.status == 200


async def test_the_log_of_an_oversize_body_names_the_limit(redis, redis_url, caplog):
    """The default limit is seven digits of bytes, which the log scrubbing took for a phone number."""
    async with running_receipts(redis, redis_url) as receipts:
        limit = receipts.settings.max_receipt_bytes

        async def chunks():
            for _ in range(limit // 65536 + 1):
                yield b"x" * 65536

        with caplog.at_level(logging.INFO, logger="services.receipts.webhooks"):
            async with receipts.http.post(receipts.local_url + receipts.path("sendgrid"), data=chunks()) as response:
                assert response.status == 413
    (record,) = [r for r in caplog.records if "over the" in r.getMessage()]
    ScrubbingFilter().filter(record)  # as every handler shows it
    assert f"{limit:,} bytes" in record.getMessage() and "[phone]" not in record.getMessage()


async def test_a_body_that_never_finishes_gets_408(redis, redis_url):
    async with running_receipts(redis, redis_url, receipt_read_timeout_seconds=0.3) as receipts:

        async def trickle():
            yield b"["
            await asyncio.sleep(2)
            yield b"]"

        url = receipts.local_url + receipts.path("sendgrid")
        async with receipts.http.post(url, data=trickle()) as response:
            assert response.status == 408
        await assert_nothing_recorded(redis)


async def test_ses_raw_message_delivery_is_refused_as_unsigned(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    raw = json.dumps(ses_message("Delivery", pii, message_id=record.message_id)).encode()
    assert (await receipts.post("ses", raw)).status == 401
    await assert_nothing_recorded(redis)


@pytest.mark.parametrize(
    ("provider", "body"),
    [
        ("sendgrid", b"{not json"),
        ("sendgrid", b'{"event":"delivered"}'),
        ("sendgrid", b"[" * 100_000),
        ("whatsapp", b"\xff\xfe"),
        ("whatsapp", b'{"object":"whatsapp_business_account"}'),
        ("twilio", b"\xff\xfe=\xff"),
        ("twilio", b"AccountSid=AC1&To=%2B4474"),
    ],
)
async def test_malformed_signed_bodies_get_400(receipts, redis, provider, body):
    if provider == "sendgrid":
        reply = await receipts.post("sendgrid", body, receipts.sendgrid_request(body)[1])
    elif provider == "whatsapp":
        reply = await receipts.post("whatsapp", body, receipts.whatsapp_request(body)[1])
    else:
        params = [("AccountSid", "AC1"), ("To", "+4474")] if body.startswith(b"Acc") else []
        signed = receipts.public_url("twilio")
        headers = {"X-Twilio-Signature": twilio_signature(receipts.secrets.twilio_auth_token, signed, params)}
        reply = await receipts.post("twilio", body, headers)
    assert reply.status == 400, reply.body
    assert set(reply.json()) == {"error"}
    await assert_nothing_recorded(redis)


async def test_malformed_ses_bodies(receipts, redis):
    assert (await receipts.post("ses", b"[1,2]")).status == 400
    assert (await receipts.post("ses", b'{"Type":"Other"}')).status == 400
    signed = receipts.sns.sign(sns_notification("not json"))
    reply = await receipts.post("ses", json.dumps(signed).encode())
    assert reply.status == 400 and "Message" in reply.json()["error"]
    signed = receipts.sns.sign(sns_notification({"mail": {}}))
    reply = await receipts.post("ses", json.dumps(signed).encode())
    assert reply.status == 400 and "eventType" in reply.json()["error"]
    await assert_nothing_recorded(redis)


@pytest.mark.parametrize("kind", [[], {"Notification": 1}, ["Notification"]])
async def test_an_sns_type_that_is_not_a_string_is_malformed(receipts, redis, caplog, kind):
    """Anyone may post to the URL: a Type that is a JSON list or object is a malformed body (400), not an
    internal error logged as one."""
    with caplog.at_level(logging.INFO):
        reply = await receipts.post("ses", json.dumps({"Type": kind, "Message": "{}"}).encode())
    assert reply.status == 400, reply.body
    assert "Type" in reply.json()["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await assert_nothing_recorded(redis)


async def test_unknown_connector_and_wrong_kind_get_404(receipts, redis):
    pii = Pii.new()
    body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii)])
    for connector_id, workspace_id in (("nope", WS), ("sg-main", "other-ws"), ("wa-main", WS)):
        reply = await receipts.post("sendgrid", body, headers, connector_id=connector_id, workspace_id=workspace_id)
        assert reply.status == 404
        assert reply.json() == {"error": "unknown connector"}
    reply = await receipts.post("sendgrid", body, headers, connector_id="bad%20id")
    assert reply.status == 400


# --- SNS ------------------------------------------------------------------------------------


async def test_ses_topic_validation_message_is_acknowledged(receipts, redis, caplog):
    """Adding an SNS destination to a configuration set, SES publishes a plain-text test message to the
    topic: a receipt of AWS's, acknowledged, not refused as malformed."""
    envelope = sns_notification("Successfully validated SNS topic for Amazon SES event publishing.")
    del envelope["Subject"]
    body, headers = receipts.ses_request(envelope)
    with caplog.at_level(logging.INFO, logger="services.receipts"):
        reply = await receipts.post("ses", body, headers)
    assert reply.status == 200, reply.body
    assert reply.json()["note"] == "topic validation acknowledged"
    assert (reply.json()["events"], reply.json()["mapped"], reply.json()["unmapped"]) == (1, 0, 0)
    assert not [r for r in caplog.records if "refused" in r.getMessage()]
    await assert_nothing_recorded(redis)
    # Any other text is still not an SES event.
    signed = receipts.sns.sign(sns_notification("Successfully validated SNS topic, or so it says"))
    assert (await receipts.post("ses", json.dumps(signed).encode())).status == 400


async def test_sns_message_older_than_the_dedupe_window_is_refused(receipts, redis):
    """SNS signs its Timestamp and gives up retrying within an hour: a message older than the dedupe
    window is a replay no marker remembers (a complaint replayed would suppress again), so it is refused."""
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    window = receipts.settings.receipt_dedupe_ttl_seconds
    envelope = sns_notification(ses_message("Complaint", pii, message_id=record.message_id), pii)
    envelope["Timestamp"] = sns_timestamp(window + 60)
    body, headers = receipts.ses_request(envelope)
    reply = await receipts.post("ses", body, headers)
    assert reply.status == 403, reply.body
    assert "TOKENSEND_RECEIPT_DEDUPE_TTL_SECONDS" in reply.json()["error"]
    await assert_nothing_recorded(redis)
    assert [k async for k in redis.scan_iter(match=f"ts:{{{WS}}}:supp*")] == []
    odd_time = {**envelope, "Timestamp": "yesterday"}
    reply = await receipts.post("ses", *receipts.ses_request(odd_time))
    assert reply.status == 400 and "Timestamp" in reply.json()["error"]
    # An hour late (SNS's longest retry) is within the window: counted.
    envelope["Timestamp"] = sns_timestamp(3600)
    reply = await receipts.post("ses", *receipts.ses_request(envelope))
    assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body


async def test_sns_subscription_confirmation_is_fetched(receipts, redis):
    token = uuid.uuid4().hex
    envelope = sns_confirmation(receipts.sns.subscribe_url(token), token)
    reply = await receipts.post("ses", json.dumps(receipts.sns.sign(envelope, 2)).encode())
    assert reply.status == 200, reply.body
    assert reply.json()["note"] == "subscription confirmed"
    assert receipts.sns.count("/?Action=ConfirmSubscription") == 1
    assert any(token in r for r in receipts.sns.requests)


async def test_a_replayed_sns_subscription_confirmation_is_confirmed_once(receipts, redis, caplog):
    """A validly signed confirmation posted again (a replay within the age window, or SNS's own retry)
    fetches its SubscribeURL once: the others are answered 200, and a line a minute says they came."""
    token = uuid.uuid4().hex
    envelope = sns_confirmation(receipts.sns.subscribe_url(token), token)
    body = json.dumps(receipts.sns.sign(envelope)).encode()
    with caplog.at_level(logging.INFO, logger="services.receipts"):
        replies = [await receipts.post("ses", body) for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4, [r.body for r in replies]
    assert [r.json()["note"] for r in replies] == ["subscription confirmed"] + ["subscription already confirmed"] * 3
    assert receipts.sns.count("/?Action=ConfirmSubscription") == 1
    lines = [r.getMessage() for r in caplog.records if "subscription" in r.getMessage()]
    assert len([line for line in lines if "SNS subscription confirmed" in line]) == 1, lines
    assert len([line for line in lines if "already confirmed" in line]) == 1, lines
    # The marker is a keyed digest, as the ledger's: neither the token nor the topic in a key.
    keys = b" ".join(await seen_keys(redis))
    assert token.encode() not in keys and b"ses-events" not in keys

    # Another subscription of the same topic (a new token) is confirmed.
    other = uuid.uuid4().hex
    envelope |= {"MessageId": str(uuid.uuid4()), "Token": other, "SubscribeURL": receipts.sns.subscribe_url(other)}
    reply = await receipts.post("ses", json.dumps(receipts.sns.sign(envelope)).encode())
    assert reply.status == 200 and reply.json()["note"] == "subscription confirmed"
    assert receipts.sns.count("/?Action=ConfirmSubscription") == 2


async def test_a_subscription_whose_confirmation_failed_is_confirmed_when_sent_again(receipts, redis):
    token = uuid.uuid4().hex
    envelope = sns_confirmation(receipts.sns.subscribe_url(token), token)
    body = json.dumps(receipts.sns.sign(envelope)).encode()
    receipts.sns.statuses["/"] = 500  # SNS's SubscribeURL answering an error
    first = await receipts.post("ses", body)
    assert first.status == 503, first.body
    del receipts.sns.statuses["/"]
    again = await receipts.post("ses", body)
    assert again.status == 200 and again.json()["note"] == "subscription confirmed"


async def test_sns_unsubscribe_confirmation_is_not_followed(receipts, redis, caplog):
    """Re-subscribing is an operator's decision; but SES receipts stop from here on, so the operator is
    warned, with the connector and topic to subscribe again."""
    token = uuid.uuid4().hex
    envelope = {
        "Type": "UnsubscribeConfirmation",
        "MessageId": str(uuid.uuid4()),
        "Token": token,
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:ses-events",
        "Message": "You have chosen to deactivate subscription.",
        "SubscribeURL": receipts.sns.subscribe_url(token),
        "Timestamp": sns_timestamp(),
    }
    with caplog.at_level(logging.INFO, logger="services.receipts"):
        reply = await receipts.post("ses", json.dumps(receipts.sns.sign(envelope)).encode())
    assert reply.status == 200
    assert receipts.sns.count("/?Action") == 0
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "ses-main" in warning.getMessage() and envelope["TopicArn"] in warning.getMessage()


async def test_sns_subscribe_url_on_another_host_is_refused(receipts, redis):
    envelope = sns_confirmation("https://evil.example/?Action=ConfirmSubscription", "t")
    reply = await receipts.post("ses", json.dumps(receipts.sns.sign(envelope)).encode())
    assert reply.status == 403


@pytest.mark.parametrize(
    "cert_url",
    [
        "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-x.pem",
        "https://127.0.0.2:{port}/SimpleNotificationService-x.pem",
        "http://127.0.0.1:{port}/SimpleNotificationService-test.pem",
        "https://127.0.0.1:{port}/SimpleNotificationService-test.txt",
    ],
)
async def test_sns_certificate_on_a_wrong_host_is_refused_without_fetching(receipts, redis, cert_url):
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    envelope = sns_notification(ses_message("Delivery", pii, message_id=record.message_id), pii)
    signed = receipts.sns.sign(envelope, cert_url=cert_url.format(port=receipts.sns.port))
    reply = await receipts.post("ses", json.dumps(signed).encode())
    assert reply.status == 403
    assert receipts.sns.requests == []
    await assert_nothing_recorded(redis)


async def test_sns_certificate_is_fetched_once(receipts, redis):
    pii = Pii.new()
    records = await put_messages(redis, "ses", 5)
    for record in records:
        reply = await receipts.post_ses(ses_message("Delivery", pii, message_id=record.message_id), pii)
        assert reply.status == 200
    assert receipts.sns.count("/SimpleNotificationService") == 1
    assert (await stats(redis))["delivered"] == 5


async def test_sns_certificate_from_an_untrusted_issuer_is_refused(redis, redis_url):
    async with running_receipts(redis, redis_url) as receipts:
        stranger = SnsSigner()  # its own CA, not the one the settings trust
        receipts.sns.signer = stranger
        pii = Pii.new()
        [record] = await put_messages(redis, "ses", 1)
        reply = await receipts.post_ses(ses_message("Delivery", pii, message_id=record.message_id), pii)
        assert reply.status == 403


async def test_sns_topic_allow_list(receipts, redis):
    store = ConnectorStore(redis, SecretBox.from_settings(receipts.settings))
    connector = await store.find(WS, "ses-main")
    connector.credentials["sns_topic_arns"] = "arn:aws:sns:us-east-1:123456789012:other-topic"
    await store.save(connector)
    pii = Pii.new()
    [record] = await put_messages(redis, "ses", 1)
    reply = await receipts.post_ses(ses_message("Delivery", pii, message_id=record.message_id), pii)
    assert reply.status == 403


# --- WhatsApp handshake -----------------------------------------------------------------------


async def test_whatsapp_verification_handshake(receipts):
    url = receipts.local_url + receipts.path("whatsapp")
    good = {
        "hub.mode": "subscribe",
        "hub.verify_token": receipts.secrets.whatsapp_verify_token,
        "hub.challenge": "1158201444",
    }
    async with receipts.http.get(url + "?" + urlencode(good)) as reply:
        assert reply.status == 200
        assert await reply.text() == "1158201444"
    for bad in ({**good, "hub.verify_token": "wrong"}, {**good, "hub.mode": "unsubscribe"}, {}):
        async with receipts.http.get(url + "?" + urlencode(bad)) as reply:
            assert reply.status == 403
    async with receipts.http.get(
        receipts.local_url + receipts.path("whatsapp", "nope") + "?" + urlencode(good)
    ) as reply:
        assert reply.status == 404


# --- Twilio specifics -------------------------------------------------------------------------


async def test_twilio_idempotency_token_dedupes(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "twilio", 1)
    token = uuid.uuid4().hex
    first = await receipts.post_twilio(twilio_params("delivered", pii), record.message_id, token=token)
    # A retry with the same token is a duplicate even if it differs otherwise.
    again = await receipts.post_twilio(twilio_params("delivered", pii), record.message_id, token=token)
    assert (first.json()["mapped"], again.json()["duplicates"]) == (1, 1)


async def test_twilio_json_body_with_body_sha256(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "twilio", 1)
    body = json.dumps({"MessageSid": "SM" + uuid.uuid4().hex, "MessageStatus": "delivered", "To": pii.phone}).encode()
    query = urlencode({"message_id": record.message_id, "bodySHA256": hashlib.sha256(body).hexdigest()})
    signature = twilio_signature(receipts.secrets.twilio_auth_token, receipts.public_url("twilio", query=query), [])
    headers = {"X-Twilio-Signature": signature, "Content-Type": "application/json"}
    reply = await receipts.post("twilio", body, headers, query=query)
    assert reply.status == 200 and reply.json()["mapped"] == 1
    reply = await receipts.post("twilio", body.replace(b"delivered", b"failed"), headers, query=query)
    assert reply.status == 403


async def test_twilio_public_url_with_default_port(redis, redis_url):
    async with running_receipts(redis, redis_url, public_webhook_url="https://receipts.example.test:443/hooks") as r:
        pii = Pii.new()
        [record] = await put_messages(redis, "twilio", 1)
        # Twilio signed the URL as configured in the callback, without the port.
        params = twilio_params("delivered", pii)
        query = urlencode({"message_id": record.message_id})
        signed = "https://receipts.example.test/hooks" + r.path("twilio") + "?" + query
        headers = {"X-Twilio-Signature": twilio_signature(r.secrets.twilio_auth_token, signed, params)}
        reply = await r.post("twilio", urlencode(params).encode(), headers, query=query)
        assert reply.status == 200 and reply.json()["mapped"] == 1


@pytest.fixture
def webhook_tls(tmp_path) -> TlsMaterial:
    return make_tls_material(tmp_path)


async def test_webhooks_are_served_over_https_when_given_a_certificate(redis, redis_url, webhook_tls: TlsMaterial):
    https = {"http_tls_cert_file": str(webhook_tls.cert_path), "http_tls_key_file": str(webhook_tls.key_path)}
    async with running_receipts(redis, redis_url, **https) as receipts:
        pii = Pii.new()
        [record] = await put_messages(redis, "sendgrid", 1)
        body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii, message_id=record.message_id)])
        base = f"https://127.0.0.1:{receipts.webhook_port}"
        trust = ssl.create_default_context(cadata=webhook_tls.ca_pem)
        async with aiohttp.ClientSession() as client:
            async with client.post(base + receipts.path("sendgrid"), data=body, headers=headers, ssl=trust) as reply:
                assert reply.status == 200
            async with client.get(base + "/healthz", ssl=trust) as reply:
                assert reply.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # a certificate nobody vouched for
                await client.get(base + "/healthz")
            with pytest.raises(aiohttp.ClientError):  # plain HTTP gets no answer on the HTTPS port
                await client.get(f"http://127.0.0.1:{receipts.webhook_port}/healthz")
        assert (await stats(redis))["delivered"] == 1


def test_https_needs_the_certificate_and_its_key_together(webhook_tls: TlsMaterial) -> None:
    with pytest.raises(ValidationError, match="TOKENSEND_HTTP_TLS_CERT_FILE and TOKENSEND_HTTP_TLS_KEY_FILE"):
        ReceiptsSettings(http_tls_cert_file=str(webhook_tls.cert_path))
    with pytest.raises(ValidationError, match="TOKENSEND_HTTP_TLS_CERT_FILE and TOKENSEND_HTTP_TLS_KEY_FILE"):
        ReceiptsSettings(http_tls_key_file=str(webhook_tls.key_path))


# --- what a hostile or broken client sends ----------------------------------------------------


async def raw_request(port: int, head: bytes, body: bytes = b"", *, close: bool = True) -> bytes:
    """One request written byte for byte (headers aiohttp's client would refuse); the reply's status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 5)).strip()
    finally:
        if close:
            writer.close()


async def test_signature_headers_that_are_not_utf8_do_not_verify(receipts, redis, caplog):
    """A byte aiohttp cannot decode in a signature header is a signature that does not verify: 403, not 500."""
    caplog.set_level(logging.INFO)
    cases = {
        "twilio": (
            b"X-Twilio-Signature: abc\xff\r\nContent-Type: application/x-www-form-urlencoded",
            b"MessageSid=SM1",
        ),
        "whatsapp": (b"X-Hub-Signature-256: sha256=\xff", b'{"entry":[]}'),
    }
    for provider, (header, body) in cases.items():
        path = receipts.path(provider).encode()
        head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\nConnection: close\r\n" % (
            path,
            len(body),
            header,
        )
        assert await raw_request(receipts.webhook_port, head, body) == b"HTTP/1.1 403 Forbidden", provider
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await assert_nothing_recorded(redis)


async def test_an_sns_envelope_with_a_lone_surrogate_does_not_verify(receipts, redis):
    """JSON may escape a lone surrogate, which no UTF-8 that SNS signed holds: refused as not verifying,
    over the webhook and over IngestReceipt alike."""
    envelope = {
        **sns_notification("{}"),
        "Subject": "SUBJECT",
        "SignatureVersion": "1",
        "Signature": "AAAA",
        "SigningCertURL": receipts.sns.cert_url,
    }
    body = json.dumps(envelope).replace('"SUBJECT"', '"x\\ud800y"').encode()
    reply = await receipts.post("ses", body)
    assert reply.status == 403 and reply.json() == {"error": "SNS signature does not verify"}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await receipts.stub.IngestReceipt(
            rpb.IngestReceiptRequest(workspace_id=WS, connector_id="ses-main", provider=rpb.PROVIDER_SES, body=body)
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await assert_nothing_recorded(redis)


async def test_an_event_id_holding_a_lone_surrogate_does_not_fail_its_batch(receipts, redis):
    pii = Pii.new()
    records = await put_messages(redis, "sendgrid", 3)
    events = [sendgrid_event("delivered", pii, message_id=r.message_id) for r in records]
    events[2]["sg_event_id"] = "ODD-ID"
    reply = await receipts.post_sendgrid(json.dumps(events).replace('"ODD-ID"', '"\\ud800"').encode())
    assert reply.status == 200, reply.body
    assert (await stats(redis))["delivered"] == 3
    records = await put_messages(redis, "whatsapp", 2, campaign="camp-wa")
    statuses = [
        whatsapp_status("delivered", pii, message_id=r.message_id, wamid=f"wamid.ok{n}") for n, r in enumerate(records)
    ]
    statuses[1]["id"] = "ODD-ID"
    document = json.dumps(whatsapp_body(statuses, pii, inbound=False)).replace('"ODD-ID"', '"\\udc00"').encode()
    reply = await receipts.post_whatsapp(document)
    assert reply.status == 200, reply.body
    assert (await stats(redis, "camp-wa"))["delivered"] == 2


async def test_sns_messages_are_refused_until_the_connector_lists_its_topics(redis, redis_url, caplog):
    """SNS signs for every AWS account: without sns_topic_arns no topic is known to be ours, so nothing
    is confirmed or counted, and the operator is told what to set: once a minute per connector, since a
    message any account signed can be posted again and again. Each is still refused and counted."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    caplog.set_level(logging.WARNING)
    try:
        async with running_receipts(redis, redis_url, telemetry) as receipts:
            store = ConnectorStore(redis, SecretBox.from_settings(receipts.settings))
            connector = await store.find(WS, "ses-main")
            del connector.credentials["sns_topic_arns"]
            await store.save(connector)
            token = uuid.uuid4().hex
            confirmation = sns_confirmation(receipts.sns.subscribe_url(token), token)
            pii = Pii.new()
            [record] = await put_messages(redis, "ses", 1)
            notification = sns_notification(ses_message("Complaint", pii, message_id=record.message_id))
            signed = [json.dumps(receipts.sns.sign(envelope)).encode() for envelope in (confirmation, notification)]
            for body in [*signed, signed[1], signed[1]]:  # the notification posted again, as replayed
                reply = await receipts.post("ses", body)
                assert reply.status == 403, reply.body
                assert "sns_topic_arns" in reply.json()["error"]
            assert receipts.sns.count("/?Action") == 0
            await assert_nothing_recorded(redis)
    finally:
        telemetry.shutdown()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "topic" in r.getMessage()]
    assert len(warnings) == 1 and "sns_topic_arns" in warnings[0] and TOPIC_ARN in warnings[0], warnings
    assert by_attributes(reader, "tokensend.receipts.refused") == {key(provider="ses", code="topic_not_listed"): 4}


async def test_a_made_up_connector_is_answered_before_its_body(receipts, redis):
    """A path naming no connector is answered 404 at once, not after waiting for the body: slow bodies
    sent to made-up paths hold no webhook slot."""
    head = b"POST /webhooks/sendgrid/no-such-ws/no-such-connector HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
    started = time.monotonic()
    assert await raw_request(receipts.webhook_port, head) == b"HTTP/1.1 404 Not Found"
    assert time.monotonic() - started < receipts.settings.receipt_read_timeout_seconds


async def test_a_client_hanging_up_mid_body_is_not_a_store_outage(receipts, redis, caplog):
    caplog.set_level(logging.DEBUG, logger="services.receipts.webhooks")
    reader, writer = await asyncio.open_connection("127.0.0.1", receipts.webhook_port)
    path = receipts.path("sendgrid").encode()
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n[{" % path)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "services.receipts.webhooks"]
    assert not [m for level, m in messages if level >= logging.WARNING], messages
    assert any(level == logging.DEBUG and "client went away" in m for level, m in messages), messages


async def test_a_client_hanging_up_mid_unsubscribe_is_not_an_error(receipts, caplog):
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", receipts.webhook_port)
    writer.write(b"POST /unsubscribe/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n")  # no body yet
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)
    loud = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, loud


async def test_a_body_whose_content_encoding_does_not_decode_is_refused_400(receipts, redis, caplog):
    """A gzip body that is not gzip is the sender's fault: 400 naming the header, logged by kind only, and
    the connection closed (its stream is unusable); a body that decodes is verified and counted as any."""
    caplog.set_level(logging.INFO)
    pii = Pii.new()
    [record] = await put_messages(redis, "sendgrid", 1)
    body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii, message_id=record.message_id)])
    compressed = {**headers, "Content-Encoding": "gzip"}
    for path in (receipts.path("sendgrid"), "/unsubscribe/abc"):
        async with aiohttp.ClientSession() as http:  # a connection of its own: the reply closes it
            async with http.post(
                receipts.local_url + path, data=b"not gzip " + pii.email.encode(), headers=compressed
            ) as reply:
                assert reply.status == 400, (path, await reply.text())
                assert reply.headers["Connection"] == "close"
                text = await reply.text()
                assert pii.tag not in text and ("Content-Encoding" in text or "could not be read" in text)
    loud = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, loud
    assert not leaks(pii.needles(), log_text(caplog))
    reply = await receipts.post("sendgrid", gzip.compress(body), compressed)
    assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body
    assert (await stats(redis))["delivered"] == 1


async def test_another_systems_traffic_is_counted_without_a_dedupe_marker(receipts, redis):
    """Events of messages another system sent through the brand's SendGrid account name no ID of ours:
    counted unmapped, each time delivered, and never marked seen (a busy sender would fill Redis with a
    marker per event for the dedupe TTL). An event of ours whose message has expired keeps its marker."""
    pii = Pii.new()
    foreign = [sendgrid_event("delivered", pii), sendgrid_event("open", pii)]
    for _ in range(2):
        assert (await receipts.post_sendgrid(foreign)).json() == {
            "events": 2, "mapped": 0, "unmapped": 2, "duplicates": 0,
        }  # fmt: skip
    assert (await stats(redis, "_workspace"))["unmapped"] == 4
    assert not [k async for k in redis.scan_iter(match=f"*{WS}*rcpt:seen*")]

    ours = [sendgrid_event("delivered", pii, message_id=uuid.uuid4().hex)]
    assert (await receipts.post_sendgrid(ours)).json()["unmapped"] == 1
    assert (await receipts.post_sendgrid(ours)).json()["duplicates"] == 1
    assert len([k async for k in redis.scan_iter(match=f"*{WS}*rcpt:seen*")]) == 1
