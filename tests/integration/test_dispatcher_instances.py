"""A campaign instance ID belongs to the campaign that started it: another campaign naming it is refused,
through the real resolver and dispatcher on real Redis."""

from __future__ import annotations

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.store import workspace_key
from services.dispatcher.guards import CampaignInstances
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients, stream_requests

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
REFUSAL = (
    "campaign_instance_id: instance 'i1' was started by campaign 'spring'; campaign instance IDs must be "
    "unique within a workspace"
)


async def stored(redis, workspace_id: str) -> dict[bytes, bytes]:
    """Every key of the workspace and its value (DUMP): what a refused call must leave as it was."""
    keys = [key async for key in redis.scan_iter(match=workspace_key(workspace_id, "*"))]
    return {key: await redis.dump(key) for key in keys}


async def test_an_instance_of_another_campaign_is_refused_before_anything_is_claimed_or_fetched(start_suite, redis):
    suite = await start_suite()
    ws, stats = suite.workspace_id, suite.pii_api.sandbox.stats
    first = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="i1", campaign="spring")
    assert first.summary.sent == 5
    assert await redis.get(CampaignInstances.key(ws, "i1")) == b"spring"

    before, requests = await stored(redis, ws), stats.requests
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(8), instance="i1", campaign="summer")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith(REFUSAL), caught.value.details()
    # Nothing claimed, counted, mapped or sent, no contact fetched; the record still names the first campaign.
    assert await stored(redis, ws) == before
    assert stats.requests == requests
    assert len(suite.providers.outbox_for("custom")) == 5

    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(6), instance="i1", campaign="spring")
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_DUPLICATE] * 5 + [S.DISPATCH_STATUS_SENT]
    assert [r.message_id for r in again.results[:5]] == [r.message_id for r in first.results]

    other = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(8), instance="i2", campaign="summer")
    assert {r.status for r in other.results} == {S.DISPATCH_STATUS_SENT}
    assert await redis.get(CampaignInstances.key(ws, "i2")) == b"summer"
    assert len(suite.providers.outbox_for("custom")) == 6 + 8


async def test_a_stream_naming_another_campaign_s_instance_is_refused_at_its_header(start_suite, redis):
    suite = await start_suite()
    ws, stats = suite.workspace_id, suite.pii_api.sandbox.stats
    first = suite.dispatcher.stub.DispatchStream(stream_requests(suite, "i1", [recipients(3)], campaign="spring"))
    assert [r.status for reply in [reply async for reply in first] for r in reply.results] == [
        S.DISPATCH_STATUS_SENT
    ] * 3

    before, requests = await stored(redis, ws), stats.requests
    refused = suite.dispatcher.stub.DispatchStream(
        stream_requests(suite, "i1", [recipients(4), recipients(2, start=10)], campaign="summer")
    )
    results = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for reply in refused:
            results.extend(reply.results)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith(f"header.{REFUSAL}"), caught.value.details()
    assert results == []
    assert await stored(redis, ws) == before
    assert stats.requests == requests
    assert len(suite.providers.outbox_for("custom")) == 3

    # The campaign that started it streams it again: those sent are DUPLICATE, as before.
    again = suite.dispatcher.stub.DispatchStream(stream_requests(suite, "i1", [recipients(4)], campaign="spring"))
    statuses = [r.status for reply in [reply async for reply in again] for r in reply.results]
    assert statuses == [S.DISPATCH_STATUS_DUPLICATE] * 3 + [S.DISPATCH_STATUS_SENT]


async def test_the_instance_record_lives_as_long_as_its_claims_from_its_latest_call(start_suite, redis):
    suite = await start_suite(idempotency_ttl_seconds=5000)
    key = CampaignInstances.key(suite.workspace_id, "i1")
    await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(2), instance="i1")
    assert 4990 <= await redis.ttl(key) <= 5000

    await redis.expire(key, 100)  # time passes: the next call of the instance keeps it for another TTL
    await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1, start=3), instance="i1")
    assert 4990 <= await redis.ttl(key) <= 5000

    await redis.expire(key, 100)  # a refused call does not
    with pytest.raises(grpc.aio.AioRpcError):
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), instance="i1", campaign="summer")
    assert await redis.ttl(key) <= 100


async def test_an_instance_started_before_its_record_existed_is_recorded_by_its_next_call(start_suite, redis):
    suite = await start_suite()
    key = CampaignInstances.key(suite.workspace_id, "i1")
    await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(2), instance="i1")
    await redis.delete(key)  # as an earlier release left it: claims, no record
    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(2), instance="i1")
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_DUPLICATE] * 2
    assert await redis.get(key) == b"spring"

    # A test send is no instance's: it records none.
    test = pb.SendTestRequest(
        workspace_id=suite.workspace_id,
        campaign_id="summer",
        channel=C.CHANNEL_SMS,
        connector_id="gateway",
        content=SMS,
        recipient=recipients(1)[0],
    )
    assert (await suite.dispatcher.stub.SendTest(test)).result.status == S.DISPATCH_STATUS_SENT
    records = [key async for key in redis.scan_iter(match=CampaignInstances.key(suite.workspace_id, "*"))]
    assert records == [key.encode()]


async def test_redis_failing_at_the_instance_record_answers_unavailable_with_nothing_fetched(
    start_suite, redis, monkeypatch
):
    async def unreachable(self, workspace_id, campaign_id, instance):
        raise RedisConnectionError("connection refused")

    suite = await start_suite()
    requests = suite.pii_api.sandbox.stats.requests
    monkeypatch.setattr(CampaignInstances, "take", unreachable)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(3), instance="i1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert suite.pii_api.sandbox.stats.requests == requests
    assert suite.providers.outbox_for("custom") == []
    assert not [key async for key in redis.scan_iter(match=workspace_key(suite.workspace_id, "idem", "*"))]
