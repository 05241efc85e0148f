"""SendGrid drops a send to an address on its own suppression lists: the recipient opted out with SendGrid.

"Unsubscribed Address" suppresses as the provider's unsubscribe (the send's group topic when it had one,
else every topic), "Spam Reporting Address" as a complaint (every topic); both are counted as the failure
they are. "Bounced Address" and "Invalid" are no opt-out.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.message_map import MessageMap, MessageRecord
from libs.suppressions import SuppressionStore
from services.receipts.opt_outs import OptOuts
from tests.canary import redis_dump
from tests.integration.beyond import email_content, ids_fetched, people, receipts_for
from tests.integration.test_receipts_harness import (
    CONNECTORS,
    PROVIDER_CHANNEL,
    WS,
    Pii,
    now_ts,
    put_messages,
    sendgrid_event,
    stats,
)

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
GROUP = "sendgrid-group-7"  # the harness's events carry asm_group_id 7


def drop(pii: Pii, message_id: str, reason: str, group: int | None = 7, **extra) -> dict:
    """A drop as SendGrid posts it; `group` None for a send made with no unsubscribe group."""
    event = sendgrid_event("dropped", pii, message_id=message_id, reason=reason, **extra)
    if group is None:
        del event["asm_group_id"]
    else:
        event["asm_group_id"] = group
    return event


def dispatch(suite, recipients, instance: str):
    return suite.dispatcher.stub.Dispatch(
        pb.DispatchRequest(
            workspace_id=suite.workspace_id,
            campaign_id="spring",
            campaign_instance_id=instance,
            channel=C.CHANNEL_EMAIL,
            connector_id="sendgrid",
            content=email_content(),
            recipients=recipients,
        )
    )


async def test_a_drop_for_an_unsubscribed_address_suppresses_before_the_next_campaign_fetches_it(
    start_suite, redis, redis_url, secret_key
):
    """Through the signed webhook: the next Dispatch answers SUPPRESSED without asking the PII API."""
    suite = await start_suite()
    sent = await dispatch(suite, people(3), "run-1")
    assert {r.status for r in sent.results} == {S.DISPATCH_STATUS_SENT}
    pii = Pii.new()
    events = [
        drop(pii, sent.results[1].message_id, "Unsubscribed Address", group=None),
        drop(pii, sent.results[2].message_id, "Bounced Address", group=None),
    ]
    body = json.dumps(events).encode()
    headers = {**suite.providers.sendgrid_signer.headers(body), "Content-Type": "application/json"}
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        reply = await receipts.post("sendgrid", body, headers, connector_id="sendgrid", workspace_id=suite.workspace_id)
        assert reply.status == 200 and reply.json()["mapped"] == 2
        # Redelivered: a duplicate, suppressing no one anew.
        again = await receipts.post("sendgrid", body, headers, connector_id="sendgrid", workspace_id=suite.workspace_id)
        assert again.status == 200 and again.json()["duplicates"] == 2
    asked = ids_fetched(suite.pii_api.sandbox)
    nxt = await dispatch(suite, people(3), "run-2")
    assert [r.status for r in nxt.results] == [
        S.DISPATCH_STATUS_SENT,
        S.DISPATCH_STATUS_SUPPRESSED,
        S.DISPATCH_STATUS_SENT,  # a bounced address is no opt-out
    ]
    assert "cust-000002" not in asked and "cust-000001" in asked
    listed = await suite.dispatcher.stub.ListSuppressions(
        pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL)
    )
    assert [(e.anonymous_id, e.reason) for e in listed.suppressions] == [
        ("cust-000002", pb.SUPPRESSION_REASON_PROVIDER_UNSUBSCRIBE)
    ]
    counts = await stats(redis, "spring", "run-1", suite.workspace_id)
    assert counts["failed"] == 2 and counts.get("unsubscribed", 0) == 0  # counted as the failures they are
    dump = b" ".join(await redis_dump(redis))
    assert pii.tag.encode() not in dump


async def test_opted_out_drops_suppress_and_a_redelivery_counts_no_one_twice(redis, redis_url, secret_key):
    pii = Pii.new()
    store = SuppressionStore(redis)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        unsub_group, unsub_all, spam, bounced, invalid, spam_again = await put_messages(redis, "sendgrid", 6)
        events = [
            drop(pii, unsub_group.message_id, "Unsubscribed Address"),
            drop(pii, unsub_all.message_id, "Unsubscribed Address", group=None),
            drop(pii, spam.message_id, "Spam Reporting Address"),  # a complaint: every topic, group or not
            drop(pii, bounced.message_id, "Bounced Address"),
            drop(pii, invalid.message_id, "Invalid"),
            drop(pii, spam_again.message_id, "Spam Reporting Address", group=None),
        ]
        first = await receipts.post_sendgrid(events)
        assert first.status == 200 and first.json()["mapped"] == 6
        ids = [r.anonymous_id for r in (unsub_group, unsub_all, spam, bounced, invalid, spam_again)]
        assert await store.find(WS, "email", "", ids) == {"anon-1", "anon-2", "anon-5"}
        assert await store.find(WS, "email", GROUP, ids) == {"anon-0", "anon-1", "anon-2", "anon-5"}
        entries, _, _ = await store.page(WS, "email", "", 0, "", 100)
        assert {e.anonymous_id: e.reason for e in entries} == {
            "anon-1": pb.SUPPRESSION_REASON_PROVIDER_UNSUBSCRIBE,
            "anon-2": pb.SUPPRESSION_REASON_COMPLAINT,
            "anon-5": pb.SUPPRESSION_REASON_COMPLAINT,
        }
        # The same drops again with new event IDs (not duplicates to the ledger): suppressed already.
        again = await receipts.post_sendgrid([{**e, "sg_event_id": e["sg_event_id"] + "-2"} for e in events])
        assert again.status == 200
        # And the same deliveries again: duplicates.
        third = await receipts.post_sendgrid(events)
        assert third.status == 200 and third.json()["duplicates"] == 6
    counts = await stats(redis)
    assert counts["failed"] == 6 and counts.get("complained", 0) == 0 and counts.get("unsubscribed", 0) == 0


async def test_opted_out_drops_report_how_many_they_suppressed(redis, redis_url, secret_key, monkeypatch):
    """What the webhook's log line and the gRPC reply count as opted out: each recipient once, in one
    delivery or over its redeliveries."""
    pii = Pii.new()
    counted: list[int] = []
    original = OptOuts.from_events

    async def counting(self, workspace_id, events):
        counted.append(await original(self, workspace_id, events))
        return counted[-1]

    monkeypatch.setattr(OptOuts, "from_events", counting)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        records = await put_messages(redis, "sendgrid", 3)
        events = [drop(pii, r.message_id, "Unsubscribed Address", group=None) for r in records]
        # The first recipient also on the spam report list: held for both reasons, counted once.
        events.append(drop(pii, records[0].message_id, "Spam Reporting Address", group=None))
        assert (await receipts.post_sendgrid(events)).status == 200
        assert (await receipts.post_sendgrid(events)).status == 200
    assert counted == [3, 0]


async def put_sent(redis, count: int, sent_at: float) -> list[MessageRecord]:
    records = [
        MessageRecord(
            message_id=uuid.uuid4().hex,
            workspace_id=WS,
            campaign_id="camp-1",
            campaign_instance_id="inst-1",
            anonymous_id=f"sent-{sent_at:.0f}-{n}",
            channel=PROVIDER_CHANNEL["sendgrid"],
            connector_id=CONNECTORS["sendgrid"],
            provider="sendgrid",
            sent_at=sent_at,
        )
        for n in range(count)
    ]
    await MessageMap(redis, 3600).put_many(records)
    return records


async def test_a_group_resubscribe_lifts_a_group_drops_suppression_in_the_order_they_were_made(
    redis, redis_url, secret_key
):
    """A drop is as of its send: SendGrid held the address in the group then. The group's resubscribe
    made since lifts it, and the drop delivered again after it (or only then) changes nothing."""
    pii = Pii.new()
    t = now_ts() - 3600
    store = SuppressionStore(redis)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        dropped_then_back, back_then_dropped = await put_sent(redis, 2, float(t))
        resubscribe = [
            sendgrid_event("group_resubscribe", pii, message_id=r.message_id, timestamp=t + 100)
            for r in (dropped_then_back, back_then_dropped)
        ]
        first_drop = drop(pii, dropped_then_back.message_id, "Unsubscribed Address", timestamp=t + 1)
        assert (await receipts.post_sendgrid([first_drop])).status == 200
        ids = [dropped_then_back.anonymous_id, back_then_dropped.anonymous_id]
        assert await store.find(WS, "email", GROUP, ids) == {dropped_then_back.anonymous_id}
        assert await store.find(WS, "email", "", ids) == set()  # the group's topic only
        reply = await receipts.post_sendgrid(resubscribe)
        assert reply.status == 200
        assert await store.find(WS, "email", GROUP, ids) == set()
        # The drop delivered again, and a drop delivered only after the resubscribe: both made before it.
        late = drop(pii, back_then_dropped.message_id, "Unsubscribed Address", timestamp=t + 1)
        redelivered = {**first_drop, "sg_event_id": first_drop["sg_event_id"] + "-again"}
        assert (await receipts.post_sendgrid([redelivered, late])).status == 200
        assert await store.find(WS, "email", GROUP, ids) == set()
        # A drop of a send made after the resubscribe holds again.
        [later] = await put_sent(redis, 1, float(t + 200))
        later_drop = drop(pii, later.message_id, "Unsubscribed Address", timestamp=t + 200)
        assert (await receipts.post_sendgrid([later_drop])).status == 200
        assert await store.find(WS, "email", GROUP, [later.anonymous_id]) == {later.anonymous_id}


async def test_three_thousand_unsubscribes_are_written_in_one_script_call(redis, redis_url, secret_key):
    """One SendGrid batch of 3,000 unsubscribes: one suppression write however many there are, and the
    same on redelivery; the benchmark prints how long the webhook took."""
    pii = Pii.new()
    records = [
        MessageRecord(
            message_id=f"{n:032x}",
            workspace_id=WS,
            campaign_id="camp-1",
            campaign_instance_id="inst-1",
            anonymous_id=f"bulk-{n}",
            channel=PROVIDER_CHANNEL["sendgrid"],
            connector_id=CONNECTORS["sendgrid"],
            provider="sendgrid",
        )
        for n in range(3000)
    ]
    await MessageMap(redis, 3600).put_many(records)
    # SendGrid's fields that matter here (its full events would pass the receipt body limit).
    base = {"event": "unsubscribe", "email": pii.email, "timestamp": now_ts()}
    events = [{**base, "sg_event_id": f"ev-{n}", "tokensend_message_id": r.message_id} for n, r in enumerate(records)]
    store = SuppressionStore(redis)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        timings = []
        for _ in range(2):
            await redis.config_resetstat()
            started = time.perf_counter()
            reply = await receipts.post_sendgrid(events)
            timings.append(time.perf_counter() - started)
            assert reply.status == 200
            calls = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
            scripts = (await redis.info("commandstats")).get("cmdstat_eval", {}).get("calls", 0)
            # The ledger's own scripts run too; the suppressions' are one of them, not one per event.
            assert calls + scripts < 100
        print(f"\n3000 unsubscribes through the webhook: {timings[0]:.3f} s, redelivered {timings[1]:.3f} s")
    assert len(await store.find(WS, "email", "", [r.anonymous_id for r in records])) == 3000


async def test_a_drop_whose_suppression_failed_suppresses_when_redelivered(redis, redis_url, secret_key, monkeypatch):
    """The store fails as the batch's suppressions are written: 503, and the redelivery suppresses though
    its events would otherwise be duplicates."""
    failures = [RedisConnectionError("the store went away")]
    suppress_many = SuppressionStore.suppress_many

    async def failing_once(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return await suppress_many(self, *args, **kwargs)

    monkeypatch.setattr(SuppressionStore, "suppress_many", failing_once)
    pii = Pii.new()
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        [record] = await put_messages(redis, "sendgrid", 1)
        events = [drop(pii, record.message_id, "Spam Reporting Address")]
        assert (await receipts.post_sendgrid(events)).status == 503
        assert await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id]) == set()
        again = await receipts.post_sendgrid(events)
        assert again.status == 200 and again.json()["duplicates"] == 0
        assert await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id]) == {record.anonymous_id}
    assert (await stats(redis))["failed"] == 1
