"""A campaign instance ID belongs to the campaign that started it: another campaign naming it is refused,
through the real resolver and dispatcher on real Redis."""

from __future__ import annotations

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.store import workspace_key
from services.dispatcher import servicer
from services.dispatcher.guards import CampaignInstances, Idempotency
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
    # The header alone: grpc's asyncio client reports a part written after the server's answer as INTERNAL
    # ("Internal error from Core", grpc/grpc#36066) instead of that answer.
    refused = suite.dispatcher.stub.DispatchStream(stream_requests(suite, "i1", [], campaign="summer"))
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


def counted_takes(monkeypatch) -> list[str]:
    """The campaign of each take of an instance's record, as the dispatcher makes them."""
    takes, take = [], CampaignInstances.take

    async def counted(self, workspace_id, campaign_id, instance):
        takes.append(campaign_id)
        return await take(self, workspace_id, campaign_id, instance)

    monkeypatch.setattr(CampaignInstances, "take", counted)
    return takes


async def test_a_long_stream_keeps_its_instance_record_with_a_take_now_and_then_not_one_a_batch(
    start_suite, redis, monkeypatch
):
    suite = await start_suite(batch_size=5, idempotency_ttl_seconds=5000)
    key = CampaignInstances.key(suite.workspace_id, "i1")
    takes = counted_takes(monkeypatch)
    quick = suite.dispatcher.stub.DispatchStream(stream_requests(suite, "i1", [recipients(20)]))
    assert [r.status for reply in [reply async for reply in quick] for r in reply.results] == [
        S.DISPATCH_STATUS_SENT
    ] * 20
    assert takes == ["spring"]  # four batches within the interval: the header's take only

    monkeypatch.setattr(servicer, "INSTANCE_REFRESH_SECONDS", 0)  # the interval passes before each batch
    parts = stream_requests(suite, "i1", [recipients(5, start=21), recipients(5, start=26)])
    call = suite.dispatcher.stub.DispatchStream()
    await call.write(await anext(parts))  # the header
    await call.write(await anext(parts))
    assert [r.status for r in (await call.read()).results] == [S.DISPATCH_STATUS_SENT] * 5
    await redis.expire(key, 100)  # hours of streaming: the record nears its end
    await call.write(await anext(parts))
    assert [r.status for r in (await call.read()).results] == [S.DISPATCH_STATUS_SENT] * 5
    assert 4990 <= await redis.ttl(key) <= 5000  # taken again before the batch's claims were written
    await call.done_writing()
    assert (await call.read()).summary.sent == 10
    assert await call.code() == grpc.StatusCode.OK
    assert await redis.get(key) == b"spring"


async def test_a_stream_whose_instance_another_campaign_took_meanwhile_ends_before_claiming_more(
    start_suite, redis, monkeypatch
):
    """The record expired while the stream ran and another campaign took the instance: the stream ends
    FAILED_PRECONDITION at its next batch, as a call of that campaign would, with nothing of that batch
    claimed, fetched or sent, rather than writing its claims under the other campaign's instance."""
    monkeypatch.setattr(servicer, "INSTANCE_REFRESH_SECONDS", 0)
    suite = await start_suite(batch_size=5)
    ws, stats = suite.workspace_id, suite.pii_api.sandbox.stats
    second = recipients(5, start=6)
    parts = stream_requests(suite, "i1", [recipients(5), second], campaign="summer")
    call = suite.dispatcher.stub.DispatchStream()
    await call.write(await anext(parts))
    await call.write(await anext(parts))
    assert [r.status for r in (await call.read()).results] == [S.DISPATCH_STATUS_SENT] * 5
    await redis.set(CampaignInstances.key(ws, "i1"), "spring")  # expired, then taken by campaign spring
    requests = stats.ids_requested
    await call.write(await anext(parts))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()  # no result for the batch: the call's end
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith(f"header.{REFUSAL}"), caught.value.details()
    assert "recipients without a result were not sent" in caught.value.details()
    assert not await redis.exists(*(Idempotency.key(ws, "i1", r.anonymous_id) for r in second))
    assert stats.ids_requested == requests
    assert len(suite.providers.outbox_for("custom")) == 5
    assert await redis.get(CampaignInstances.key(ws, "i1")) == b"spring"


async def test_redis_failing_at_a_stream_s_refresh_of_its_instance_ends_it_unavailable(start_suite, redis, monkeypatch):
    """As Redis failing under a batch: the stream ends UNAVAILABLE with the next batch unclaimed and
    unfetched, and a re-run of the instance sends exactly what it did not."""
    monkeypatch.setattr(servicer, "INSTANCE_REFRESH_SECONDS", 0)
    suite = await start_suite(batch_size=5)
    ws, stats = suite.workspace_id, suite.pii_api.sandbox.stats
    take, away = CampaignInstances.take, False

    async def unless_away(self, workspace_id, campaign_id, instance):
        if away:
            raise RedisConnectionError("connection refused")
        return await take(self, workspace_id, campaign_id, instance)

    monkeypatch.setattr(CampaignInstances, "take", unless_away)
    second = recipients(5, start=6)
    parts = stream_requests(suite, "i1", [recipients(5), second])
    call = suite.dispatcher.stub.DispatchStream()
    await call.write(await anext(parts))
    await call.write(await anext(parts))
    assert [r.status for r in (await call.read()).results] == [S.DISPATCH_STATUS_SENT] * 5
    requests, away = stats.ids_requested, True
    await call.write(await anext(parts))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not await redis.exists(*(Idempotency.key(ws, "i1", r.anonymous_id) for r in second))
    assert stats.ids_requested == requests

    monkeypatch.setattr(CampaignInstances, "take", take)
    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(10), instance="i1")
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_DUPLICATE] * 5 + [S.DISPATCH_STATUS_SENT] * 5
    assert len(suite.providers.outbox_for("custom")) == 10


async def test_a_long_dispatch_call_keeps_its_instance_record_between_its_batches(start_suite, redis, monkeypatch):
    suite = await start_suite(batch_size=5, idempotency_ttl_seconds=5000)
    key = CampaignInstances.key(suite.workspace_id, "i1")
    takes = counted_takes(monkeypatch)
    quick = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(15), instance="i1")
    assert quick.summary.sent == 15
    assert takes == ["spring"]  # three batches within the interval: the call's take only

    monkeypatch.setattr(servicer, "INSTANCE_REFRESH_SECONDS", 0)  # the interval passes before each batch
    take, takes[:] = CampaignInstances.take, []

    async def nearing_its_end(self, workspace_id, campaign_id, instance):
        await redis.expire(key, 100)  # hours of sending: the record nears its end before each take
        return await take(self, workspace_id, campaign_id, instance)

    monkeypatch.setattr(CampaignInstances, "take", nearing_its_end)
    long = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(15, start=16), instance="i1")
    assert long.summary.sent == 15
    assert takes == ["spring"] * 3  # the call's take, then one before each later batch
    assert 4990 <= await redis.ttl(key) <= 5000


async def test_a_dispatch_call_whose_instance_another_campaign_took_meanwhile_stops_before_claiming_more(
    start_suite, redis, monkeypatch
):
    """The record expired between two batches of a call and another campaign took the instance: the call
    ends FAILED_PRECONDITION before the next batch claims, fetches or sends anything, saying how many
    recipients it did not send."""
    monkeypatch.setattr(servicer, "INSTANCE_REFRESH_SECONDS", 0)
    suite = await start_suite(batch_size=5)
    ws, stats = suite.workspace_id, suite.pii_api.sandbox.stats
    take, seen = CampaignInstances.take, []

    async def taken_meanwhile(self, workspace_id, campaign_id, instance):
        seen.append(campaign_id)
        if len(seen) == 2:  # before the second batch, once the first was sent
            await redis.set(CampaignInstances.key(ws, "i1"), "spring")
        return await take(self, workspace_id, campaign_id, instance)

    monkeypatch.setattr(CampaignInstances, "take", taken_meanwhile)
    people = recipients(12)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, instance="i1", campaign="summer")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith(REFUSAL), caught.value.details()
    assert "took it: 7 of the call's 12 recipients were not sent" in caught.value.details()
    assert not await redis.exists(*(Idempotency.key(ws, "i1", r.anonymous_id) for r in people[5:]))
    assert stats.ids_requested == 5
    assert len(suite.providers.outbox_for("custom")) == 5
    assert await redis.get(CampaignInstances.key(ws, "i1")) == b"spring"
