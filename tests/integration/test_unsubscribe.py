"""One-click unsubscribe (RFC 8058) and providers' unsubscribe events suppress the anonymous ID behind a message."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2 as rpb

from libs.message_map import MessageMap, new_message_ids, split_message_id
from libs.suppressions import SuppressionStore
from libs.unsubscribe import UnsubscribeTokens, group_link_key, link_key
from libs.write_batch import BatchWriter, WriteBatch
from services.receipts import unsubscribe_page
from services.receipts.opt_outs import OptOuts
from tests.canary import redis_dump
from tests.integration.beyond import email_content, ids_fetched, people, post, receipts_for, unsubscribe_path
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    expire_map_entry,
    now_ts,
    put_messages,
    sendgrid_event,
    ses_message,
    stats,
)

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus


def dispatch(suite, recipients, instance="run-1"):
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


async def get(receipts, path: str) -> tuple[int, str]:
    async with receipts.http.get(receipts.local_url + path) as reply:
        return reply.status, await reply.text()


async def test_every_email_carries_a_one_click_link_that_unsubscribes_on_post_only(
    start_suite, redis, redis_url, secret_key
):
    suite = await start_suite()
    sent = await dispatch(suite, people(3))
    outbox = suite.providers.outbox_for("sendgrid")
    assert len(outbox) == 3
    for message in outbox:
        assert message.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert message.headers["List-Unsubscribe"].startswith("<http://127.0.0.1:8080/unsubscribe/")
        assert message.to.split("@")[0] not in message.headers["List-Unsubscribe"]
    by_message = {m.custom_args["tokensend_message_id"]: m for m in outbox}
    path = unsubscribe_path(by_message[sent.results[1].message_id].headers["List-Unsubscribe"])

    async with receipts_for(redis, redis_url, secret_key) as receipts:
        status, page = await get(receipts, path)
        assert status == 200 and '<form method="post"' in page and "Unsubscribe" in page
        status, page = await get(receipts, path)  # a link scanner following it twice changes nothing
        listed = await suite.dispatcher.stub.ListSuppressions(
            pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL)
        )
        assert list(listed.suppressions) == []

        # What a mailbox provider does for RFC 8058: POST the body to the header's URL.
        status, page = await post(
            receipts, path, b"List-Unsubscribe=One-Click", {"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert status == 200 and "unsubscribed" in page
        status, _ = await post(receipts, path, b"List-Unsubscribe=One-Click", {})  # again: still fine
        assert status == 200
        listed = await suite.dispatcher.stub.ListSuppressions(
            pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL)
        )
        assert [(e.anonymous_id, e.reason) for e in listed.suppressions] == [
            ("cust-000002", pb.SUPPRESSION_REASON_UNSUBSCRIBE_LINK)
        ]
        stats = await receipts.stub.GetCampaignStats(
            rpb.GetCampaignStatsRequest(workspace_id=suite.workspace_id, campaign_id="spring")
        )
        assert stats.unsubscribed == 1  # once, however many POSTs

        asked = ids_fetched(suite.pii_api.sandbox)
        nxt = await dispatch(suite, people(3), instance="run-2")
        assert [r.status for r in nxt.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_SUPPRESSED] + [
            S.DISPATCH_STATUS_SENT
        ]
        assert "cust-000002" not in asked

        # Forged, foreign and expired links unsubscribe no one.
        tokens = UnsubscribeTokens(suite.dispatcher.settings.secret_key)
        expired = tokens.sign(suite.workspace_id, sent.results[0].message_id, int(time.time()) - 10)
        forged = path[:-3] + ("AAA" if not path.endswith("AAA") else "BBB")
        for bad, code in ((f"/unsubscribe/{expired}", 410), (forged, 404), ("/unsubscribe/<script>", 404)):
            for status, page in (await post(receipts, bad, b"", {}), await get(receipts, bad)):
                assert status == code, bad  # the page says so too, with no button to press
                assert "<script>" not in page and "<form" not in page
        listed = await suite.dispatcher.stub.ListSuppressions(
            pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL)
        )
        assert len(listed.suppressions) == 1


async def test_the_link_outlives_the_message_map(start_suite, redis, redis_url, secret_key):
    suite = await start_suite()
    sent = await dispatch(suite, people(1))
    header = suite.providers.outbox_for("sendgrid")[0].headers["List-Unsubscribe"]
    await expire_map_entry(redis, suite.workspace_id, sent.results[0].message_id)  # the map expired
    # The link is kept in its group's hash (messages sent together), as long as the token lives; no key of its own.
    message_id = sent.results[0].message_id
    group_part, own_part = split_message_id(message_id)
    key = group_link_key(suite.workspace_id, group_part)
    assert await redis.hgetall(key) == {own_part.encode(): b"cust-000001"}
    ttl = suite.dispatcher.settings.unsubscribe_link_ttl_seconds
    assert ttl - 60 < await redis.ttl(key) <= ttl
    assert await redis.exists(link_key(suite.workspace_id, message_id)) == 0
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        status, _ = await post(receipts, unsubscribe_path(header), b"List-Unsubscribe=One-Click", {})
    assert status == 200
    again = await dispatch(suite, people(1), instance="run-2")
    assert again.results[0].status == S.DISPATCH_STATUS_SUPPRESSED


async def test_once_the_map_has_expired_the_link_still_names_the_recipient(redis, redis_url, secret_key):
    """A provider's unsubscribe or complaint arriving after the map entry expired, and a one-click
    POST, find the recipient through the link: kept per group of messages, or one key per message as before."""
    batch = new_message_ids(3)
    writes = WriteBatch()
    key = group_link_key(WS, split_message_id(batch[0])[0])
    writes.hset(key, mapping={split_message_id(m)[1]: f"linked-{n}" for n, m in enumerate(batch)})
    writes.expire(key, 600)
    await BatchWriter(redis).execute(writes)
    written_alone = [uuid.uuid4().hex, uuid.uuid4().hex]
    for n, message_id in enumerate(written_alone):
        await redis.set(link_key(WS, message_id), f"alone-{n}", ex=600)
    tokens = UnsubscribeTokens(SecretStr(secret_key))
    expires_at = int(time.time()) + 600
    pii = Pii.new()
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        events = [
            sendgrid_event("unsubscribe", pii, message_id=batch[1]),
            sendgrid_event("spamreport", pii, message_id=written_alone[0]),
            sendgrid_event("unsubscribe", pii, message_id=batch[0][:16] + "0" * 16),  # no such link
        ]
        assert (await receipts.post_sendgrid(events)).status == 200
        for message_id in (batch[2], written_alone[1]):
            status, _ = await post(receipts, f"/unsubscribe/{tokens.sign(WS, message_id, expires_at)}", b"", {})
            assert status == 200
    named = ["linked-0", "linked-1", "linked-2", "alone-0", "alone-1"]
    suppressed = await SuppressionStore(redis).find(WS, "email", "", named)
    assert suppressed == {"linked-1", "linked-2", "alone-0", "alone-1"}


async def test_provider_unsubscribes_and_complaints_suppress_the_recipient(redis, redis_url, secret_key):
    pii = Pii.new()
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        sg = await put_messages(redis, "sendgrid", 4)
        events = [
            sendgrid_event("unsubscribe", pii, message_id=sg[0].message_id),
            sendgrid_event("group_unsubscribe", pii, message_id=sg[1].message_id),
            sendgrid_event("spamreport", pii, message_id=sg[2].message_id),
            sendgrid_event("group_resubscribe", pii, message_id=sg[3].message_id),
            sendgrid_event("open", pii, message_id=sg[3].message_id),
        ]
        reply = await receipts.post_sendgrid(events)
        assert reply.status == 200
        ses = await put_messages(redis, "ses", 6)
        opted = await receipts.post_ses(ses_message("Subscription", pii, message_id=ses[5].message_id), pii)
        assert opted.status == 200
        store = SuppressionStore(redis)
        workspace = "ws-receipts"
        suppressed = await store.find(workspace, "email", "", [r.anonymous_id for r in sg + ses])
        assert suppressed == {"anon-0", "anon-2", "anon-5"}  # not anon-3 (resubscribe, open)
        # A group's unsubscribe holds for its group's topic (the harness's events are group 7's).
        group = await store.find(workspace, "email", "sendgrid-group-7", [r.anonymous_id for r in sg])
        assert group == {"anon-0", "anon-1", "anon-2"}
        entries, _, _ = await store.page(workspace, "email", "", 0, "", 100)
        reasons = {e.anonymous_id: e.reason for e in entries}
        assert reasons[sg[2].anonymous_id] == pb.SUPPRESSION_REASON_COMPLAINT
        assert reasons[sg[0].anonymous_id] == pb.SUPPRESSION_REASON_PROVIDER_UNSUBSCRIBE


async def test_a_complaint_delivered_again_after_the_brand_lifted_it_suppresses_again(redis, redis_url, secret_key):
    """Opt-outs act before the ledger drops a redelivery: the safe direction, within the provider's retries
    (docs/suppressions.md)."""
    pii = Pii.new()
    store = SuppressionStore(redis)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        (record,) = await put_messages(redis, "sendgrid", 1)
        complaint = sendgrid_event("spamreport", pii, message_id=record.message_id)
        assert (await receipts.post_sendgrid([complaint])).status == 200
        lifted = await store.lift(WS, "email", "", [record.anonymous_id], [pb.SUPPRESSION_REASON_COMPLAINT])
        assert lifted.changed == 1
        again = await receipts.post_sendgrid([complaint])
        assert again.status == 200 and again.json()["duplicates"] == 1
    assert await store.find(WS, "email", "", [record.anonymous_id]) == {record.anonymous_id}


GROUP = "sendgrid-group-7"  # the harness's events carry asm_group_id 7


def group_event(event: str, pii: Pii, message_id: str, at: int, group: int = 7) -> dict:
    return sendgrid_event(event, pii, message_id=message_id, timestamp=at, asm_group_id=group)


async def test_a_group_resubscribe_lifts_that_groups_unsubscribe_in_the_order_they_were_made(
    redis, redis_url, secret_key
):
    """SendGrid's preference page: leaving a group holds for its topic only, and joining it again lifts
    that hold. Their timestamps order them, whichever SendGrid delivers first, and redeliveries."""
    pii = Pii.new()
    t = now_ts() - 3600
    store = SuppressionStore(redis)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        left, back_first, left_again, both_late = await put_messages(redis, "sendgrid", 4)
        batches = [
            # Left at t, back at t+100: no longer held, and a redelivery of either changes nothing.
            [group_event("group_unsubscribe", pii, left.message_id, t)],
            [group_event("group_resubscribe", pii, left.message_id, t + 100)],
            [group_event("group_unsubscribe", pii, left.message_id, t)],
            [group_event("group_resubscribe", pii, left.message_id, t + 100)],
            # Back at t+100 arrives before leaving at t: the late unsubscribe changes nothing.
            [group_event("group_resubscribe", pii, back_first.message_id, t + 100)],
            [group_event("group_unsubscribe", pii, back_first.message_id, t)],
            # Left at t, back at t+100, left again at t+200: the resubscribe arriving last lifts nothing.
            [group_event("group_unsubscribe", pii, left_again.message_id, t)],
            [group_event("group_unsubscribe", pii, left_again.message_id, t + 200)],
            [group_event("group_resubscribe", pii, left_again.message_id, t + 100)],
            # In one delivery, out of order.
            [
                group_event("group_resubscribe", pii, both_late.message_id, t + 100),
                group_event("group_unsubscribe", pii, both_late.message_id, t),
            ],
        ]
        for events in batches:
            assert (await receipts.post_sendgrid(events)).status == 200
        ids = [r.anonymous_id for r in (left, back_first, left_again, both_late)]
        assert await store.find(WS, "email", GROUP, ids) == {left_again.anonymous_id}
        # A later unsubscribe holds again.
        await receipts.post_sendgrid([group_event("group_unsubscribe", pii, left.message_id, t + 300)])
        assert await store.find(WS, "email", GROUP, ids) == {left.anonymous_id, left_again.anonymous_id}
    assert await store.find(WS, "email", "", ids) == set()  # never every topic
    dump = b" ".join(await redis_dump(redis))
    assert pii.tag.encode() not in dump and pii.digits.encode() not in dump


async def test_a_group_resubscribe_lifts_only_that_groups_hold(redis, redis_url, secret_key):
    """Not an unsubscribe from everything, a complaint, another group's unsubscribe, the brand's own
    hold on the topic, nor a STOP sent by another channel."""
    pii = Pii.new()
    t = now_ts() - 3600
    store = SuppressionStore(redis)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        everything, complained, other_group, held, stopped = await put_messages(redis, "sendgrid", 5)
        await store.suppress(WS, "email", GROUP, [held.anonymous_id], pb.SUPPRESSION_REASON_MANUAL)
        await store.suppress(WS, "sms", "", [stopped.anonymous_id], pb.SUPPRESSION_REASON_INBOUND_STOP)
        events = [
            group_event("group_unsubscribe", pii, everything.message_id, t),
            sendgrid_event("unsubscribe", pii, message_id=everything.message_id, timestamp=t),
            sendgrid_event("spamreport", pii, message_id=complained.message_id, timestamp=t),
            group_event("group_unsubscribe", pii, other_group.message_id, t, group=8),
            group_event("group_unsubscribe", pii, held.message_id, t),
            group_event("group_unsubscribe", pii, stopped.message_id, t),
        ]
        assert (await receipts.post_sendgrid(events)).status == 200
        back = [group_event("group_resubscribe", pii, r.message_id, t + 100) for r in (everything, complained)]
        back += [group_event("group_resubscribe", pii, r.message_id, t + 100) for r in (other_group, held, stopped)]
        reply = await receipts.post_sendgrid(back)
        assert reply.status == 200
    ids = [everything.anonymous_id, complained.anonymous_id, other_group.anonymous_id, held.anonymous_id]
    assert await store.find(WS, "email", GROUP, ids) == {
        everything.anonymous_id,
        complained.anonymous_id,
        held.anonymous_id,
    }
    # Those two are held for every topic, so for the group's too; the group's own hash holds only the brand's.
    assert await store.find(WS, "email", "", ids) == {everything.anonymous_id, complained.anonymous_id}
    eight, _, _ = await store.page(WS, "email", "sendgrid-group-8", 0, "", 100)
    assert [e.anonymous_id for e in eight] == [other_group.anonymous_id]
    assert await store.find(WS, "email", GROUP, [stopped.anonymous_id]) == set()
    assert await store.find(WS, "sms", "", [stopped.anonymous_id]) == {stopped.anonymous_id}
    entries, _, _ = await store.page(WS, "email", GROUP, 0, "", 100)
    assert {e.anonymous_id: e.reasons[0][0] for e in entries} == {held.anonymous_id: pb.SUPPRESSION_REASON_MANUAL}


async def test_a_not_spam_report_neither_suppresses_nor_counts_as_a_complaint(redis, redis_url, secret_key):
    """A feedback report of type not-spam (RFC 5965) says the recipient took the email out of their spam
    folder: the opposite of a complaint. SES passes it on as a Complaint notification."""
    pii = Pii.new()
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        [rescued, reported] = await put_messages(redis, "ses", 2)
        for record, feedback in ((rescued, "not-spam"), (reported, "abuse")):
            message = ses_message("Complaint", pii, message_id=record.message_id)
            message["complaint"]["complaintFeedbackType"] = feedback
            assert (await receipts.post_ses(message, pii)).status == 200
    suppressed = await SuppressionStore(redis).find(WS, "email", "", [rescued.anonymous_id, reported.anonymous_id])
    assert suppressed == {reported.anonymous_id}
    assert (await stats(redis))["complained"] == 1


async def test_a_complaint_whose_suppression_failed_suppresses_when_redelivered(
    redis, redis_url, secret_key, monkeypatch
):
    """The store fails as the suppression is written: the webhook answers 503 and the provider sends
    the receipt again. That redelivery must still suppress the recipient, though its events would
    otherwise be duplicates."""
    failures = [RedisConnectionError("the store went away")]
    suppress = SuppressionStore.suppress_many

    async def failing_once(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return await suppress(self, *args, **kwargs)

    monkeypatch.setattr(SuppressionStore, "suppress_many", failing_once)
    pii = Pii.new()
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        [record] = await put_messages(redis, "sendgrid", 1)
        events = [sendgrid_event("spamreport", pii, message_id=record.message_id)]
        assert (await receipts.post_sendgrid(events)).status == 503
        assert await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id]) == set()
        again = await receipts.post_sendgrid(events)
        assert again.status == 200
        assert again.json()["duplicates"] == 0  # the first attempt recorded nothing
        assert await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id]) == {record.anonymous_id}
        third = await receipts.post_sendgrid(events)  # a true duplicate: suppressed still, counted once
        assert third.status == 200 and third.json()["duplicates"] == 1
    counts = await stats(redis)
    assert counts["complained"] == 1


async def test_a_slow_store_is_answered_503_not_blamed_on_the_client(redis, redis_url, secret_key, monkeypatch):
    """Only reading the request is the client's part: a store slower than that is 503, try again."""
    monkeypatch.setattr(unsubscribe_page, "READ_TIMEOUT_SECONDS", 0.2)

    async def slow(self, token):
        await asyncio.sleep(0.5)
        raise TimeoutError  # as redis-py's socket timeout ends a call

    monkeypatch.setattr(OptOuts, "unsubscribe", slow)
    tokens = UnsubscribeTokens(SecretStr(secret_key))
    token = tokens.sign(WS, new_message_ids(1)[0], int(time.time()) + 600)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        status, page = await post(receipts, f"/unsubscribe/{token}", b"List-Unsubscribe=One-Click", {})
    assert status == 503 and "try again" in page.lower()


async def test_a_signed_link_for_a_message_no_longer_known_gets_the_same_answer_on_get_and_post(
    redis, redis_url, secret_key
):
    """Its signature is good, but nothing names its recipient (a send never settled): the page must not
    offer a button that the POST then refuses."""
    tokens = UnsubscribeTokens(SecretStr(secret_key))
    path = f"/unsubscribe/{tokens.sign(WS, uuid.uuid4().hex, int(time.time()) + 600)}"
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        shown, text = await get(receipts, path)
        posted, _ = await post(receipts, path, b"", {})
    assert shown == posted == 410
    assert "<form" not in text and "Link expired" in text


async def test_every_page_keeps_itself_out_of_caches_referrers_and_frames(redis, redis_url, secret_key):
    """The confirmation, the done page and the refusals alike: small, naming no one, never cached,
    never framed (a button under someone else's page would unsubscribe by a click meant for it)."""
    tokens = UnsubscribeTokens(SecretStr(secret_key))
    (record,) = await put_messages(redis, "sendgrid", 1)
    path = f"/unsubscribe/{tokens.sign(WS, record.message_id, int(time.time()) + 600)}"
    expired = f"/unsubscribe/{tokens.sign(WS, record.message_id, int(time.time()) - 10)}"
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        for method, where in (("GET", path), ("POST", path), ("GET", expired), ("POST", "/unsubscribe/forged")):
            async with receipts.http.request(method, receipts.local_url + where) as reply:
                page = await reply.text()
                assert reply.headers["Cache-Control"] == "no-store", (method, where)
                assert reply.headers["Referrer-Policy"] == "no-referrer"
                assert reply.headers["X-Frame-Options"] == "DENY"  # browsers that predate frame-ancestors
                assert "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]
                assert reply.headers["X-Content-Type-Options"] == "nosniff"
            assert len(page) < 2048 and record.anonymous_id not in page and WS not in page


async def test_a_store_outage_is_answered_503_with_retry_after_and_never_as_done(
    redis, redis_url, secret_key, monkeypatch
):
    """Mailbox providers and people try again when told when: the page must not say "unsubscribed"
    when nothing was written, and must say when to come back."""
    tokens = UnsubscribeTokens(SecretStr(secret_key))
    (record,) = await put_messages(redis, "sendgrid", 1)
    path = f"/unsubscribe/{tokens.sign(WS, record.message_id, int(time.time()) + 600)}"
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        failing = [RedisConnectionError("the store went away")] * 2

        async def store_down(self, *args, **kwargs):
            if failing:
                raise failing.pop()
            return await read(self, *args, **kwargs)

        read = MessageMap.get
        monkeypatch.setattr(MessageMap, "get", store_down)
        for method in ("GET", "POST"):
            async with receipts.http.request(
                method, receipts.local_url + path, data=b"List-Unsubscribe=One-Click"
            ) as reply:
                page = await reply.text()
                assert reply.status == 503, method
                assert int(reply.headers["Retry-After"]) > 0
                assert reply.headers["Cache-Control"] == "no-store"
            assert "unsubscribed" not in page.lower() and "<form" not in page
        assert await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id]) == set()
        status, page = await post(receipts, path, b"List-Unsubscribe=One-Click", {})  # the store is back
    assert status == 200 and "unsubscribed" in page
    assert await SuppressionStore(redis).find(WS, "email", "", [record.anonymous_id]) == {record.anonymous_id}
