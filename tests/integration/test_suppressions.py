"""Suppressions keyed by anonymous ID: the RPCs, and campaigns that skip suppressed recipients unfetched."""

from __future__ import annotations

import time

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2 as rpb

from libs.campaign_stats import read_counts
from libs.message_map import MessageMap
from libs.suppressions import INBOUND_STOP, MANUAL, SuppressionStore
from tests.integration.beyond import email_content, ids_fetched, people, receipts_for
from tests.integration.test_dispatcher_campaigns import dispatch

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
SMS = pb.Content(sms_body="Hi {{ first_name }}")


def suppress(suite, ids, channel=C.CHANNEL_EMAIL, topic="", reason=0):
    return suite.dispatcher.stub.SuppressRecipients(
        pb.SuppressRecipientsRequest(
            workspace_id=suite.workspace_id, channel=channel, topic=topic, anonymous_ids=ids, reason=reason
        )
    )


async def test_suppressed_recipients_are_skipped_before_anything_is_fetched(start_suite, redis):
    suite = await start_suite()
    asked = ids_fetched(suite.pii_api.sandbox)
    reply = await suppress(suite, ["cust-000002", "cust-000004"])
    assert reply.suppressed == 2
    assert (await suppress(suite, ["cust-000002"])).suppressed == 0  # already suppressed

    sent = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(5))
    statuses = [S.Name(r.status) for r in sent.results]
    assert statuses == ["DISPATCH_STATUS_SENT", "DISPATCH_STATUS_SUPPRESSED"] * 2 + ["DISPATCH_STATUS_SENT"]
    assert sent.results[1].error_code == "SUPPRESSED" and sent.results[1].message_id == ""
    assert sent.summary.suppressed == 2 and sent.summary.sent == 3
    assert sorted(asked) == ["cust-000001", "cust-000003", "cust-000005"]  # nothing fetched for the others
    assert len(suite.providers.outbox_for("sendgrid")) == 3
    counts = await read_counts(redis, suite.workspace_id, "spring", "run-1")
    assert counts["suppressed"] == 2 and counts["attempted"] == 5
    mapped = [await MessageMap(redis, 60).get(suite.workspace_id, r.message_id) for r in sent.results if r.message_id]
    assert {m.anonymous_id for m in mapped} == {"cust-000001", "cust-000003", "cust-000005"}

    # Another channel family is not affected; lifting the suppression sends on a re-run of the instance.
    sms = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(2, start=2), instance="sms-1")
    assert {r.status for r in sms.results} == {S.DISPATCH_STATUS_SENT}
    lifted = await suite.dispatcher.stub.UnsuppressRecipients(
        pb.UnsuppressRecipientsRequest(
            workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, anonymous_ids=["cust-000002"]
        )
    )
    assert lifted.unsuppressed == 1
    again = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(5))
    assert [S.Name(r.status) for r in again.results][1:3] == ["DISPATCH_STATUS_SENT", "DISPATCH_STATUS_DUPLICATE"]
    assert again.results[3].status == S.DISPATCH_STATUS_SUPPRESSED


async def test_topics_narrow_a_suppression_and_every_topic_covers_all(start_suite):
    suite = await start_suite()
    await suppress(suite, ["cust-000001"], channel=C.CHANNEL_MMS, topic="offers")  # MMS counts for the SMS family
    await suppress(suite, ["cust-000002"], channel=C.CHANNEL_SMS)
    offers = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(3), instance="a", topic="offers")
    news = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(3), instance="b", topic="news")
    untopical = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people(3), instance="c")
    assert [r.status for r in offers.results] == [S.DISPATCH_STATUS_SUPPRESSED] * 2 + [S.DISPATCH_STATUS_SENT]
    assert [r.status for r in news.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_SUPPRESSED] + [
        S.DISPATCH_STATUS_SENT
    ]
    assert [r.status for r in untopical.results] == [r.status for r in news.results]

    async def stream():
        yield pb.DispatchStreamRequest(
            header=pb.DispatchStreamRequest.Header(
                workspace_id=suite.workspace_id,
                campaign_id="spring",
                campaign_instance_id="d",
                channel=C.CHANNEL_SMS,
                connector_id="gateway",
                content=SMS,
                topic="offers",
            )
        )
        yield pb.DispatchStreamRequest(recipients=pb.DispatchStreamRequest.Recipients(recipients=people(3)))

    streamed = [reply async for reply in suite.dispatcher.stub.DispatchStream(stream())]
    assert [r.status for reply in streamed for r in reply.results] == [r.status for r in offers.results]
    assert streamed[-1].summary.suppressed == 2

    test = await suite.dispatcher.stub.SendTest(
        pb.SendTestRequest(
            workspace_id=suite.workspace_id,
            campaign_id="spring",
            channel=C.CHANNEL_SMS,
            connector_id="gateway",
            content=SMS,
            recipient=pb.Recipient(anonymous_id="cust-000001"),
            topic="offers",
        )
    )
    assert test.result.status == S.DISPATCH_STATUS_SUPPRESSED


async def test_list_pages_through_every_suppression_with_its_reason(start_suite):
    suite = await start_suite()
    ids = [f"anon-{i:04d}" for i in range(1500)]
    await suppress(suite, ids[:1000])
    await suppress(suite, ids[1000:], reason=pb.SUPPRESSION_REASON_COMPLAINT)
    await suppress(suite, ["anon-x"], topic="offers")
    seen, token, pages = {}, "", 0
    while True:
        page = await suite.dispatcher.stub.ListSuppressions(
            pb.ListSuppressionsRequest(
                workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, page_size=100, page_token=token
            )
        )
        pages += 1
        for entry in page.suppressions:
            seen[entry.anonymous_id] = entry
        token = page.next_page_token
        if not token:
            break
    assert set(seen) == set(ids) and pages >= 2
    assert seen["anon-0000"].reason == pb.SUPPRESSION_REASON_MANUAL
    assert seen["anon-1240"].reason == pb.SUPPRESSION_REASON_COMPLAINT
    assert seen["anon-0000"].channel == C.CHANNEL_EMAIL and seen["anon-0000"].created_at_ms > 0
    topical = await suite.dispatcher.stub.ListSuppressions(
        pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, topic="offers")
    )
    assert [(e.anonymous_id, e.topic) for e in topical.suppressions] == [("anon-x", "offers")]


def unsuppress(suite, ids, reasons=(), channel=C.CHANNEL_EMAIL, topic=""):
    return suite.dispatcher.stub.UnsuppressRecipients(
        pb.UnsuppressRecipientsRequest(
            workspace_id=suite.workspace_id, channel=channel, topic=topic, anonymous_ids=ids, reasons=list(reasons)
        )
    )


async def test_a_brands_hold_and_a_customers_opt_out_are_kept_and_lifted_apart(start_suite):
    """The brand held cust-000001 (MANUAL), then the customer unsubscribed: lifting the brand's hold
    must not send to them again."""
    suite = await start_suite()
    assert (await suppress(suite, ["cust-000001"])).suppressed == 1
    again = await suppress(suite, ["cust-000001"], reason=pb.SUPPRESSION_REASON_UNSUBSCRIBE_LINK)
    assert (again.suppressed, again.already_suppressed) == (0, 1)
    listed = await suite.dispatcher.stub.ListSuppressions(
        pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL)
    )
    (entry,) = listed.suppressions
    assert entry.reason == pb.SUPPRESSION_REASON_MANUAL
    assert list(entry.reasons) == [pb.SUPPRESSION_REASON_MANUAL, pb.SUPPRESSION_REASON_UNSUBSCRIBE_LINK]

    lifted = await unsuppress(suite, ["cust-000001"])  # no reasons: the brand's own hold only
    assert (lifted.unsuppressed, lifted.still_suppressed) == (0, 1)
    held = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(1))
    assert held.results[0].status == S.DISPATCH_STATUS_SUPPRESSED

    # The customer resubscribed through the brand's own preference centre: the brand names the reason.
    lifted = await unsuppress(suite, ["cust-000001"], reasons=[pb.SUPPRESSION_REASON_UNSUBSCRIBE_LINK])
    assert (lifted.unsuppressed, lifted.still_suppressed) == (1, 0)
    sent = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(1), instance="run-2")
    assert sent.results[0].status == S.DISPATCH_STATUS_SENT


async def test_a_small_list_is_paged_by_page_size_too(start_suite):
    """Redis answers a small hash whole in one SCAN step; pages still hold at most page_size."""
    suite = await start_suite()
    ids = [f"anon-{i:02d}" for i in range(25)]
    await suppress(suite, ids)
    seen, token, sizes = [], "", []
    while True:
        page = await suite.dispatcher.stub.ListSuppressions(
            pb.ListSuppressionsRequest(
                workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, page_size=10, page_token=token
            )
        )
        sizes.append(len(page.suppressions))
        seen += [e.anonymous_id for e in page.suppressions]
        token = page.next_page_token
        if not token:
            break
    assert sizes == [10, 10, 5] and sorted(seen) == ids


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(anonymous_ids=[]), "anonymous_ids"),
        (dict(anonymous_ids=["a b"]), "anonymous_ids[0]"),
        (dict(anonymous_ids=["x"] * 1001), "anonymous_ids"),
        (dict(topic="not a topic"), "topic"),
        (dict(channel=C.CHANNEL_UNSPECIFIED), "channel"),
        (dict(reason=99), "reason"),
    ],
)
async def test_bad_requests_name_the_field(start_suite, fields, field):
    suite = await start_suite()
    request = pb.SuppressRecipientsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL)
    request.anonymous_ids.append("cust-1")
    for name, value in fields.items():
        if name == "anonymous_ids":
            del request.anonymous_ids[:]
            request.anonymous_ids.extend(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.SuppressRecipients(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:"), caught.value.details()
    if field == "reason":  # told by the names a client can send
        assert "SUPPRESSION_REASON_MANUAL" in caught.value.details()
        assert "UNSPECIFIED" not in caught.value.details()


@pytest.mark.parametrize("token", ["99999999999999999999", "18446744073709551616", "12a", "-1", "\u0661\u0662"])
async def test_a_page_token_that_is_no_cursor_is_refused(start_suite, token):
    """Redis's scan cursors are unsigned 64-bit: anything else is refused here, not by Redis."""
    suite = await start_suite()
    request = pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, page_token=token)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.ListSuppressions(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("page_token:"), caught.value.details()


async def test_campaign_stats_count_the_suppressed(start_suite, redis, redis_url, secret_key):
    suite = await start_suite()
    await suppress(suite, ["cust-000001"])
    await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(3))
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        stats = await receipts.stub.GetCampaignStats(
            rpb.GetCampaignStatsRequest(workspace_id=suite.workspace_id, campaign_id="spring")
        )
    assert (stats.attempted, stats.sent, stats.suppressed) == (3, 2, 1)


async def test_campaign_stats_count_the_capped_and_the_repeats(start_suite, redis, redis_url, secret_key):
    """Both are counted as the campaign is sent; a campaign's stats say how many of each there were."""
    suite = await start_suite()
    cap = pb.FrequencyCap(max_messages=1, window_seconds=3600)
    await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(2), instance="run-1", cap=cap)
    await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(3), instance="run-2", cap=cap)
    await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(3), instance="run-2", cap=cap)
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        stats = await receipts.stub.GetCampaignStats(
            rpb.GetCampaignStatsRequest(workspace_id=suite.workspace_id, campaign_id="spring")
        )
    # run-2 caps two and sends one; its repeat finds the one sent held (a duplicate) and caps the two
    # again, since a capped recipient holds no claim (a later run may send it)
    assert (stats.attempted, stats.sent, stats.capped, stats.duplicate) == (7, 3, 4, 1)


async def test_an_entry_present_throughout_is_listed_though_others_are_lifted_between_pages(redis):
    store = SuppressionStore(redis)
    ids = [f"id-{i:03d}" for i in range(30)]
    await store.suppress("ws-paging", "email", "", ids, MANUAL)
    entries, cursor, after = await store.page("ws-paging", "email", "", 0, "", 10)
    seen = [e.anonymous_id for e in entries]
    await store.lift("ws-paging", "email", "", ["id-003"], [MANUAL])  # one already listed goes
    while cursor or after:
        entries, cursor, after = await store.page("ws-paging", "email", "", cursor, after, 10)
        seen += [e.anonymous_id for e in entries]
    assert set(ids) - {"id-003"} <= set(seen)


async def test_a_large_list_loses_no_entry_present_throughout_though_others_are_lifted_between_pages(redis):
    """A hash past Redis's small encoding is scanned bucket by bucket, and a step runs past COUNT by its
    last bucket's entries; asked again after lifts, the same step reached further buckets, whose entries
    a page by ID skipped for good (hundreds of 2,000)."""
    store = SuppressionStore(redis)
    ids = [f"id-{i:05d}" for i in range(2000)]
    await store.suppress("ws-paging-large", "email", "", ids, MANUAL)
    assert await redis.object("encoding", store.key("ws-paging-large", "email")) == b"hashtable"
    seen: set[str] = set()
    lifted: set[str] = set()
    cursor, after = 0, ""
    while True:
        entries, cursor, after = await store.page("ws-paging-large", "email", "", cursor, after, 10)
        assert len(entries) <= 10
        seen.update(e.anonymous_id for e in entries)
        gone = [e.anonymous_id for e in entries[:5]]  # five already listed go before the next page
        await store.lift("ws-paging-large", "email", "", gone, [MANUAL])
        lifted.update(gone)
        if not cursor and not after:
            break
    assert set(ids) - lifted <= seen


async def test_reasons_are_listed_oldest_first_when_a_stop_is_sent_again(redis):
    """A STOP sent again moves its time past the brand's hold, and a STOP sent before a hold may be
    delivered after it: the entry still names the oldest reason first, as the contract says."""
    store = SuppressionStore(redis)
    await store.suppress("ws-order", "sms", "", ["a", "b"], INBOUND_STOP, at_ms=1_000)
    await store.suppress("ws-order", "sms", "", ["a", "b"], MANUAL, at_ms=None)
    await store.suppress("ws-order", "sms", "", ["a"], INBOUND_STOP, at_ms=int(time.time() * 1000) + 60_000)
    await store.suppress("ws-order", "sms", "", ["c"], MANUAL)
    await store.suppress("ws-order", "sms", "", ["c"], INBOUND_STOP, at_ms=1_000)  # sent long before, delivered now
    entries, _, _ = await store.page("ws-order", "sms", "", 0, "", 10)
    held = {e.anonymous_id: e for e in entries}
    assert [r for r, _ in held["a"].reasons] == [MANUAL, INBOUND_STOP]
    assert [r for r, _ in held["b"].reasons] == [INBOUND_STOP, MANUAL]
    assert [r for r, _ in held["c"].reasons] == [INBOUND_STOP, MANUAL]
    assert held["c"].reason == INBOUND_STOP and held["c"].created_at_ms == 1_000
    assert all(list(e.reasons) == sorted(e.reasons, key=lambda pair: pair[1]) for e in entries)


async def test_lifting_a_topics_hold_reports_who_an_every_topic_suppression_still_holds(start_suite):
    """cust-000001's topic hold is lifted, but they unsubscribed from everything; cust-000003 is held
    for every topic only: neither is sent the topic's campaigns, and the reply must not say otherwise."""
    suite = await start_suite()
    await suppress(suite, ["cust-000001", "cust-000002"], topic="offers")
    await suppress(suite, ["cust-000001"], reason=pb.SUPPRESSION_REASON_UNSUBSCRIBE_LINK)
    await suppress(suite, ["cust-000003"])
    held = await suppress(suite, ["cust-000001", "cust-000003", "cust-000004"], topic="offers")
    assert (held.suppressed, held.already_suppressed) == (1, 2)  # cust-000003 was held for every topic
    await unsuppress(suite, ["cust-000004"], topic="offers")
    lifted = await unsuppress(suite, ["cust-000001", "cust-000002", "cust-000003", "cust-000004"], topic="offers")
    assert (lifted.unsuppressed, lifted.still_suppressed) == (1, 2)
    offers = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", email_content(), people(4), topic="offers")
    assert [r.status for r in offers.results] == [
        S.DISPATCH_STATUS_SUPPRESSED,
        S.DISPATCH_STATUS_SENT,
        S.DISPATCH_STATUS_SUPPRESSED,
        S.DISPATCH_STATUS_SENT,
    ]
    topical = await suite.dispatcher.stub.ListSuppressions(
        pb.ListSuppressionsRequest(workspace_id=suite.workspace_id, channel=C.CHANNEL_EMAIL, topic="offers")
    )
    assert list(topical.suppressions) == []  # the topic's own holds are gone all the same
    again = await unsuppress(suite, ["cust-000001"], topic="offers")  # nothing left to lift there
    assert (again.unsuppressed, again.still_suppressed) == (0, 1)
