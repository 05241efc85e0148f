"""ReceiptsService over gRPC: IngestReceipt parity with the webhooks, stats, the event stream."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from tokensend.common.v1 import common_pb2
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1.receipts_service_pb2_grpc import ReceiptsServiceStub

from libs.campaign_stats import add_counts, campaign_key, instance_key
from libs.message_map import MessageMap, MessageRecord, new_message_ids
from libs.unsubscribe import UnsubscribeTokens
from services.dispatcher.connectors import PROVIDER_NAMES, RECEIPTLESS
from services.receipts.ledger import StoredEvent
from services.receipts.server import ReceiptsDeps, build_server
from services.receipts.servicer import event_message
from services.receipts.webhooks import DEPENDENCY_RETRY_AFTER_SECONDS
from tests.conftest import DisposableRedis, free_port
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    put_messages,
    running_receipts,
    save_connectors,
    sendgrid_event,
    ses_message,
    sns_notification,
    stats,
    stream_entries,
    twilio_params,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration

OTHER_WS = "ws-relayed"


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def ingest(receipts, provider: int, connector_id: str, body: bytes, headers: dict, url: str = "", ws: str = WS):
    return await receipts.stub.IngestReceipt(
        pb.IngestReceiptRequest(
            workspace_id=ws, connector_id=connector_id, provider=provider, url=url, headers=headers, body=body
        )
    )


async def test_ingest_receipt_matches_the_webhooks(receipts, redis):
    """The same signed receipts, once through the webhooks and once relayed: the same counts and events."""
    await save_connectors(redis, receipts.settings, receipts.secrets, workspace_id=OTHER_WS)
    pii = Pii.new()
    results = {}
    for ws in (WS, OTHER_WS):
        sg = await put_messages(redis, "sendgrid", 2, workspace_id=ws)
        ses = await put_messages(redis, "ses", 1, workspace_id=ws)
        tw = await put_messages(redis, "twilio", 1, workspace_id=ws)
        wa = await put_messages(redis, "whatsapp", 1, workspace_id=ws)
        sg_body, sg_headers = receipts.sendgrid_request(
            [sendgrid_event(k, pii, message_id=r.message_id) for r in sg for k in ("delivered", "open", "open")]
            + [sendgrid_event("bounce", pii)]
        )
        ses_body, ses_headers = receipts.ses_request(
            sns_notification(ses_message("Complaint", pii, message_id=ses[0].message_id), pii), version=2
        )
        tw_body, tw_headers, query = receipts.twilio_request(
            twilio_params("undelivered", pii, error_code="30005"), tw[0].message_id, workspace_id=ws
        )
        wa_body, wa_headers = receipts.whatsapp_request(
            whatsapp_body([whatsapp_status("read", pii, message_id=wa[0].message_id)], pii)
        )
        if ws == WS:
            replies = [
                (await receipts.post("sendgrid", sg_body, sg_headers)).json(),
                (await receipts.post("ses", ses_body, ses_headers)).json(),
                (await receipts.post("twilio", tw_body, tw_headers, query=query)).json(),
                (await receipts.post("whatsapp", wa_body, wa_headers)).json(),
            ]
        else:
            # Twilio signed the URL it called: relayed with the body and headers untouched.
            twilio_url = receipts.public_url("twilio", workspace_id=ws, query=query)
            responses = [
                await ingest(receipts, pb.PROVIDER_SENDGRID, "sg-main", sg_body, sg_headers, ws=ws),
                await ingest(receipts, pb.PROVIDER_SES, "ses-main", ses_body, ses_headers, ws=ws),
                await ingest(receipts, pb.PROVIDER_TWILIO, "tw-main", tw_body, tw_headers, twilio_url, ws=ws),
                await ingest(receipts, pb.PROVIDER_WHATSAPP, "wa-main", wa_body, wa_headers, ws=ws),
            ]
            replies = [
                {"events": r.events, "mapped": r.mapped, "unmapped": r.unmapped, "duplicates": r.duplicates}
                for r in responses
            ]
        response = await receipts.stub.GetCampaignStats(
            pb.GetCampaignStatsRequest(workspace_id=ws, campaign_id="camp-1")
        )
        events = [
            (e["provider"], e["status"], e["reason_code"], e["anonymous_id"]) for e in await stream_entries(redis, ws)
        ]
        results[ws] = (replies, response, events)
    assert results[WS] == results[OTHER_WS]
    replies, response, events = results[WS]
    assert replies[0] == {"events": 7, "mapped": 6, "unmapped": 1, "duplicates": 0}
    # The WhatsApp message was read without a "delivered" status: its read counts the delivery.
    assert (response.delivered, response.opened, response.complained, response.failed) == (3, 3, 1, 1)
    assert ("twilio", "failed", "30005", "anon-0") in events


async def test_ingest_receipt_errors(receipts, redis):
    pii = Pii.new()
    body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii)])
    cases = [
        (dict(provider=pb.PROVIDER_SENDGRID, connector_id="sg-main", body=body), grpc.StatusCode.UNAUTHENTICATED),
        (
            dict(provider=pb.PROVIDER_SENDGRID, connector_id="sg-main", body=body + b" ", headers=headers),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            dict(provider=pb.PROVIDER_SENDGRID, connector_id="nope", body=body, headers=headers),
            grpc.StatusCode.NOT_FOUND,
        ),
        (dict(provider=pb.PROVIDER_WHATSAPP, connector_id="sg-main", body=body), grpc.StatusCode.NOT_FOUND),
    ]
    for fields, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await receipts.stub.IngestReceipt(pb.IngestReceiptRequest(workspace_id=WS, **fields))
        assert error.value.code() == code, fields

    async def invalid(request: pb.IngestReceiptRequest) -> tuple[str, list[str]]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await receipts.stub.IngestReceipt(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return error.value.details(), field_violations(error.value)

    details, fields = await invalid(pb.IngestReceiptRequest(workspace_id=WS, connector_id="sg-main", body=body))
    assert fields == ["provider"]
    # The names listed are those a client can send (proto JSON, as grpcurl writes it): every provider that
    # sends receipts (an SMTP relay sends none).
    named = re.findall(r"\b[A-Z][A-Z_]+\b", details)
    assert set(named) == set(pb.Provider.keys()) - {"PROVIDER_UNSPECIFIED", "PROVIDER_SMTP"}
    for name in named:
        json_format.ParseDict({"provider": name}, pb.IngestReceiptRequest())
    garbage, garbage_headers = receipts.sendgrid_request(b'{"event": "delivered"}')
    _, fields = await invalid(
        pb.IngestReceiptRequest(
            workspace_id=WS,
            connector_id="sg-main",
            provider=pb.PROVIDER_SENDGRID,
            body=garbage,
            headers=garbage_headers,
        )
    )
    assert fields == ["body"]
    tw_body, tw_headers, _ = receipts.twilio_request([("To", pii.phone)], "")
    _, fields = await invalid(
        pb.IngestReceiptRequest(
            workspace_id=WS, connector_id="tw-main", provider=pb.PROVIDER_TWILIO, body=tw_body, headers=tw_headers,
            url=receipts.public_url("twilio"),
        )
    )  # fmt: skip
    assert fields == ["MessageStatus"]
    oversize = b"[" + b" " * receipts.settings.max_receipt_bytes + b"]"
    details, fields = await invalid(
        pb.IngestReceiptRequest(workspace_id=WS, connector_id="sg-main", provider=pb.PROVIDER_SENDGRID, body=oversize)
    )
    assert (
        fields == ["body"]
        and f"{receipts.settings.max_receipt_bytes}-byte limit (TOKENSEND_MAX_RECEIPT_BYTES)" in details
    )
    _, fields = await invalid(
        pb.IngestReceiptRequest(workspace_id="bad id", connector_id="sg-main", provider=pb.PROVIDER_SENDGRID, body=body)
    )
    assert fields == ["workspace_id"]
    assert await stream_entries(redis) == []


async def test_counters_a_receipt_makes_are_kept_for_the_stats_ttl(redis, redis_url):
    """A receipt's count refreshes how long the counters are kept, or makes them with that lifetime
    (after the dispatcher's own counts expired, say): none is kept for good."""
    async with running_receipts(redis, redis_url, stats_ttl_seconds=5000) as receipts:
        pii = Pii.new()
        records = await put_messages(redis, "sendgrid", 1, instance="inst-1")
        await receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=records[0].message_id)])
        await receipts.post_sendgrid([sendgrid_event("delivered", pii, campaign="camp-1", message_id="0" * 32)])
        keys = [campaign_key(WS, "camp-1"), instance_key(WS, "camp-1", "inst-1")]
        assert [await redis.hget(key, "delivered") for key in keys] == [b"1", b"1"]
        assert await redis.hget(keys[0], "unmapped") == b"1"
        for key in keys:
            assert 4990 < await redis.ttl(key) <= 5000


async def test_campaign_stats_per_campaign_and_instance(receipts, redis):
    pii = Pii.new()
    first = await put_messages(redis, "sendgrid", 3, instance="inst-1")
    second = await put_messages(redis, "sendgrid", 2, instance="inst-2")
    async with redis.pipeline(transaction=False) as pipe:  # what the dispatcher writes for resolve failures
        add_counts(pipe, WS, "camp-1", "inst-1", {"attempted": 2, "resolve_failed": 2, "resolve_failed:HTTP_404": 2})
        add_counts(pipe, WS, "camp-1", "inst-2", {"attempted": 1, "resolve_failed": 1, "resolve_failed:TIMEOUT": 1})
        await pipe.execute()
    events = [sendgrid_event("delivered", pii, message_id=r.message_id) for r in first + second]
    events += [sendgrid_event("click", pii, message_id=first[0].message_id)]
    assert (await receipts.post_sendgrid(events)).status == 200

    async def get(instance: str = "") -> pb.GetCampaignStatsResponse:
        return await receipts.stub.GetCampaignStats(
            pb.GetCampaignStatsRequest(workspace_id=WS, campaign_id="camp-1", campaign_instance_id=instance)
        )

    whole, one, two = await get(), await get("inst-1"), await get("inst-2")
    assert (whole.attempted, whole.sent, whole.resolve_failed, whole.delivered, whole.clicked) == (8, 5, 3, 5, 1)
    assert dict(whole.resolve_failed_by_reason) == {"HTTP_404": 2, "TIMEOUT": 1}
    assert (one.attempted, one.delivered, one.clicked, dict(one.resolve_failed_by_reason)) == (5, 3, 1, {"HTTP_404": 2})
    assert (two.attempted, two.delivered, two.clicked) == (3, 2, 0)
    empty = await receipts.stub.GetCampaignStats(pb.GetCampaignStatsRequest(workspace_id=WS, campaign_id="none-yet"))
    assert empty == pb.GetCampaignStatsResponse()
    await receipts.post_sendgrid([sendgrid_event("open", pii)])
    workspace = await receipts.stub.GetCampaignStats(pb.GetCampaignStatsRequest(workspace_id=WS))
    assert workspace.unmapped == 1
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await receipts.stub.GetCampaignStats(pb.GetCampaignStatsRequest(workspace_id=WS, campaign_id="a b"))
    assert field_violations(error.value) == ["campaign_id"]


async def collect(stream, count: int, timeout: float = 5.0) -> list[pb.StreamDeliveryEventsResponse]:
    got = []

    async def read():
        async for event in stream:
            got.append(event)
            if len(got) == count:
                return

    await asyncio.wait_for(read(), timeout)
    return got


async def test_stream_delivery_events_resumes_and_tails(receipts, redis):
    pii = Pii.new()
    records = await put_messages(redis, "twilio", 4)
    for record in records[:2]:
        await receipts.post_twilio(twilio_params("delivered", pii), record.message_id)

    stream = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS))
    first = await collect(stream, 2)
    assert [e.message_id for e in first] == [r.message_id for r in records[:2]]
    event = first[0]
    assert (event.provider, event.status, event.channel) == (
        pb.PROVIDER_TWILIO,
        pb.DELIVERY_STATUS_DELIVERED,
        common_pb2.CHANNEL_SMS,
    )
    assert (event.campaign_id, event.campaign_instance_id, event.anonymous_id) == ("camp-1", "inst-1", "anon-0")
    assert event.occurred_at.seconds > 0

    # Still open: a new receipt shows up live.
    await receipts.post_twilio(twilio_params("failed", pii, error_code="30003"), records[2].message_id)
    [live] = await collect(stream, 1)
    assert (live.message_id, live.status, live.reason_code) == (
        records[2].message_id,
        pb.DELIVERY_STATUS_FAILED,
        "30003",
    )
    stream.cancel()

    # Resume after the first event: the rest, nothing before.
    resumed = receipts.stub.StreamDeliveryEvents(
        pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id=first[0].event_id)
    )
    again = await collect(resumed, 2)
    assert [e.event_id for e in again] == [first[1].event_id, live.event_id]
    resumed.cancel()

    # "$": only what comes next.
    only_new = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="$"))
    reader = asyncio.ensure_future(collect(only_new, 1))
    await asyncio.sleep(0.3)
    await receipts.post_twilio(twilio_params("delivered", pii), records[3].message_id)
    [newest] = await reader
    assert newest.message_id == records[3].message_id
    only_new.cancel()


async def test_streamed_events_name_the_provider_of_every_connector_with_events(receipts, redis):
    """An email sent through an SMTP relay gets no receipt, but its one-click unsubscribe is an event: it
    names the relay as its provider, as every connector whose messages can have events is named."""
    for provider in {PROVIDER_NAMES[kind] for kind in PROVIDER_NAMES if kind not in RECEIPTLESS}:
        stored = StoredEvent("1-0", "m", "c", "i", "a", common_pb2.CHANNEL_EMAIL, provider, "unsubscribed", "", 0)
        assert event_message(stored).provider != pb.PROVIDER_UNSPECIFIED, provider
    [message_id] = new_message_ids(1)
    record = MessageRecord(message_id, WS, "camp-smtp", "inst-1", "anon-0", common_pb2.CHANNEL_EMAIL, "relay", "smtp")
    await MessageMap(redis, 3600).put_many([record])
    token = UnsubscribeTokens(receipts.settings.secret_key).sign(WS, message_id, int(time.time()) + 3600)
    async with receipts.http.post(f"{receipts.local_url}/unsubscribe/{token}", data=b"List-Unsubscribe=One-Click"):
        pass
    stream = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS))
    [event] = await collect(stream, 1)
    stream.cancel()
    assert (event.message_id, event.status, event.reason_code) == (
        message_id,
        pb.DELIVERY_STATUS_UNSUBSCRIBED,
        "one_click",
    )
    assert event.provider == pb.PROVIDER_SMTP


async def test_stream_delivery_events_bad_requests(receipts):
    for request, field in (
        (pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="yesterday"), "after_id"),
        (pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="12-x"), "after_id"),
        (pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="99999999999999999999"), "after_id"),  # > 2^64
        (pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="1-18446744073709551616"), "after_id"),
        (pb.StreamDeliveryEventsRequest(workspace_id=""), "workspace_id"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in receipts.stub.StreamDeliveryEvents(request):
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(error.value) == [field]


async def test_stream_is_trimmed(redis, redis_url):
    async with running_receipts(redis, redis_url, events_stream_maxlen=10) as receipts:
        pii = Pii.new()
        records = await put_messages(redis, "sendgrid", 300)
        await receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=r.message_id) for r in records])
        length = await redis.xlen(f"ts:{{{WS}}}:events")
        assert 10 <= length < 300
        stream = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS))
        events = await collect(stream, length)
        assert events[-1].message_id == records[-1].message_id  # the newest are kept
        stream.cancel()


async def test_stream_resumed_past_its_trimming_is_out_of_range(redis, redis_url):
    """A consumer whose position the trimming has passed is told, not handed what follows the gap."""
    async with running_receipts(redis, redis_url, events_stream_maxlen=10) as receipts:
        pii = Pii.new()
        first = await put_messages(redis, "sendgrid", 5)
        await receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=r.message_id) for r in first])
        stream = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS))
        seen = await collect(stream, 5)
        stream.cancel()
        later = await put_messages(redis, "sendgrid", 300)
        await receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=r.message_id) for r in later])
        oldest_kept = (await redis.xrange(f"ts:{{{WS}}}:events", count=1))[0][0].decode()
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in receipts.stub.StreamDeliveryEvents(
                pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id=seen[1].event_id)
            ):
                pass
        assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert seen[1].event_id in error.value.details() and f"oldest kept is {oldest_kept}" in error.value.details()
        # From the oldest kept, or from a position still kept: no gap, nothing refused.
        for after_id in ("", "0-0"):
            stream = receipts.stub.StreamDeliveryEvents(
                pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id=after_id)
            )
            assert (await collect(stream, 1))[0].event_id == oldest_kept
            stream.cancel()
        newest_two = await redis.xrevrange(f"ts:{{{WS}}}:events", count=2)
        stream = receipts.stub.StreamDeliveryEvents(
            pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id=newest_two[1][0].decode())
        )
        assert (await collect(stream, 1))[0].message_id == later[-1].message_id
        stream.cancel()


async def test_health_serving(redis, redis_url):
    async with running_receipts(redis, redis_url) as receipts:
        health = health_pb2_grpc.HealthStub(receipts.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="tokensend.receipts.v1.ReceiptsService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_redis_down_means_retry_later(disposable_redis):
    """Providers retry on 5xx, internal clients on UNAVAILABLE: nothing is lost while Redis is away."""
    client = aioredis.Redis.from_url(disposable_redis.url)
    try:
        async with running_receipts(client, disposable_redis.url) as receipts:
            pii = Pii.new()
            body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii)])
            assert (await receipts.post("sendgrid", body, headers)).status == 200
            disposable_redis.stop()
            reply = await receipts.post("sendgrid", body, headers)
            assert reply.status == 503 and reply.json() == {"error": "storage unavailable, retry later"}
            # As for a dependency that timed out: a provider that reads Retry-After waits before sending again.
            async with receipts.http.post(
                receipts.local_url + receipts.path("sendgrid"), data=body, headers=headers
            ) as raw:
                assert raw.status == 503 and raw.headers.get("Retry-After") == str(DEPENDENCY_RETRY_AFTER_SECONDS)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await ingest(receipts, pb.PROVIDER_SENDGRID, "sg-main", body, headers)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS)):
                    pass
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.aclose()


async def test_a_tailing_stream_ends_at_shutdown_saying_where_to_resume(redis, redis_url):
    """SIGTERM: a tail never ends by itself, so it held the rollout for the whole grace period and was
    then cut with gRPC's own "Cancelling all calls". It ends at once, UNAVAILABLE, naming its position."""
    [record] = await put_messages(redis, "twilio", 1)
    async with running_receipts(redis, redis_url) as receipts:
        await receipts.post_twilio(twilio_params("delivered", Pii.new()), record.message_id)
        # A second process, to be stopped here as SIGTERM stops one.
        settings = receipts.settings.model_copy(update={"grace_seconds": 10.0})
        service, port = await build_server(settings, ReceiptsDeps.from_settings(settings))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = ReceiptsServiceStub(channel).StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS))
            [event] = await collect(stream, 1)
            await asyncio.sleep(0.3)  # tailing, blocked in its read
            started = asyncio.get_running_loop().time()
            stopping = asyncio.ensure_future(service.stop(settings.grace_seconds))

            async def rest() -> None:
                async for _ in stream:
                    pass

            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(rest(), 15)
            await stopping
            took = asyncio.get_running_loop().time() - started
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ended.value.details()
    assert f"after_id {event.event_id}" in ended.value.details()
    assert took < 2, f"shutdown took {took:.1f}s of its {settings.grace_seconds:.0f}s grace"


async def test_event_streams_open_at_once_are_bounded(redis, redis_url):
    """Each tailing stream holds a Redis connection: past the process's bound a new one is refused with
    RESOURCE_EXHAUSTED, whatever its workspace, and one closing makes room."""
    async with running_receipts(redis, redis_url, events_max_streams=2) as receipts:

        def tail(workspace: str):
            return receipts.stub.StreamDeliveryEvents(
                pb.StreamDeliveryEventsRequest(workspace_id=workspace, after_id="$")
            )

        # A workspace's share is a quarter of the whole, here one: each tail is another workspace's.
        open_streams = [tail(WS), tail("ws-second")]
        readers = [asyncio.ensure_future(stream.read()) for stream in open_streams]
        await asyncio.sleep(0.3)  # both are tailing
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in tail("ws-third"):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 event streams are open on this process (TOKENSEND_EVENTS_MAX_STREAMS)" in refused.value.details()
        open_streams[0].cancel()
        await asyncio.sleep(0.3)
        third = tail("ws-third")
        reading = asyncio.ensure_future(third.read())
        await asyncio.sleep(0.3)
        assert not reading.done()  # tailing, not refused
        for stream in (open_streams[1], third):
            stream.cancel()
        await asyncio.gather(*readers, reading, return_exceptions=True)


async def test_one_workspace_cannot_take_every_event_stream(redis, redis_url):
    """A tenant holding its workspace's share of streams open is refused more, naming the limit per
    workspace; another workspace still opens its own."""
    async with running_receipts(redis, redis_url, events_max_streams_per_workspace=2) as receipts:
        held = [
            receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id="ws-busy", after_id="$"))
            for _ in range(2)
        ]
        readers = [asyncio.ensure_future(stream.read()) for stream in held]
        await asyncio.sleep(0.3)  # both are tailing
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in receipts.stub.StreamDeliveryEvents(
                pb.StreamDeliveryEventsRequest(workspace_id="ws-busy", after_id="$"), timeout=5
            ):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 event streams are open for this workspace" in refused.value.details()
        other = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="$"))
        reading = asyncio.ensure_future(other.read())
        await asyncio.sleep(0.3)
        assert not reading.done()  # tailing, not refused
        for stream in (*held, other):
            stream.cancel()
        await asyncio.gather(*readers, reading, return_exceptions=True)


async def test_a_redis_refusing_writes_for_want_of_replicas_means_retry_later(disposable_redis):
    """A master set to refuse writes while too few replicas keep up (min-replicas-to-write: NOREPLICAS) is a
    Redis that cannot take the receipt now, as a full one is: the provider gets a 503 and redelivers, an
    internal client UNAVAILABLE, never the 500 / INTERNAL of a fault of ours; the redelivery counts once."""
    client = aioredis.Redis.from_url(disposable_redis.url)
    try:
        async with running_receipts(client, disposable_redis.url) as receipts:
            pii = Pii.new()
            [message] = await put_messages(client, "sendgrid", 1)
            body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii, message_id=message.message_id)])
            await client.config_set("min-replicas-to-write", 1)
            try:
                reply = await receipts.post("sendgrid", body, headers)
                assert reply.status == 503 and reply.json() == {"error": "storage unavailable, retry later"}
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await ingest(receipts, pb.PROVIDER_SENDGRID, "sg-main", body, headers)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "retry later" in error.value.details()
            finally:
                await client.config_set("min-replicas-to-write", 0)
            assert (await receipts.post("sendgrid", body, headers)).status == 200
            assert (await receipts.post("sendgrid", body, headers)).json()["duplicates"] == 1
            assert (await stats(client))["delivered"] == 1
    finally:
        await client.aclose()


async def blocked_reads(admin: aioredis.Redis) -> int:
    """Connections blocked in a read (a tail's XREAD BLOCK)."""
    return sum(1 for c in await admin.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))


async def test_a_tail_cut_by_a_failover_ends_unavailable(disposable_redis):
    """A failover demotes the master a tail blocks on: Redis cuts the read (UNBLOCKED). The tail ends UNAVAILABLE,
    for the client to resume from its last event, as when Redis is away, not INTERNAL as a fault of ours."""
    admin = aioredis.Redis.from_url(disposable_redis.url)
    other = DisposableRedis(free_port())
    other.start()
    try:
        async with running_receipts(admin, disposable_redis.url) as receipts:
            tail = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="$"))
            await tail.initial_metadata()
            for _ in range(100):  # until its read blocks in Redis
                if await blocked_reads(admin):
                    break
                await asyncio.sleep(0.05)
            assert await blocked_reads(admin) == 1
            await admin.replicaof("127.0.0.1", other.port)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await asyncio.wait_for(tail.read(), 10)
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "retry later" in ended.value.details()
            finally:
                await admin.replicaof("NO", "ONE")
    finally:
        await admin.aclose()
        other.stop()
