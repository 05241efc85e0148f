"""A config's max_requests_per_second against the sample PII API: kept across resolvers, per request
(bulk requests, retries and Test calls included), within the caller's deadline, Redis' errors UNAVAILABLE.

Bounds are generous: each test only tells a capped run (N requests at R a second take about N/R s)
from an uncapped one (a few hundredths of a second)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.rate_limit import RateLimiter
from services.resolver.pii_client import NO_SLOT, NO_SLOT_FOR_RETRY
from tests.integration.test_resolver_configs import field_violations
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode
IDS = [f"cust-{n:06d}" for n in range(1, 11)]


async def put(resolver, config):
    return await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))


async def resolve(resolver, ids, timeout=None, **fields):
    request = pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=ids, **fields)
    return await resolver.stub.ResolveContacts(request, timeout=timeout)


async def timed(call):
    started = time.monotonic()
    reply = await call
    return reply, time.monotonic() - started


async def test_single_mode_requests_keep_to_the_configs_rate(resolver, pii_api, customers, redis):
    await put(resolver, single_config(pii_api.base_url))
    reply, uncapped = await timed(resolve(resolver, IDS))
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in IDS]
    assert await redis.keys("*rate*") == []  # no cap, no slot kept in Redis

    await put(resolver, single_config(pii_api.base_url, max_requests_per_second=20))
    reply, capped = await timed(resolve(resolver, IDS))
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in IDS]
    # Ten requests, 50 ms apart: the last goes out 450 ms after the first.
    assert uncapped < 0.4 <= capped < 5
    assert await redis.keys("*rate*") == [b"ts:{ws-1}:pii-rate:email"]


async def test_a_bulk_request_takes_one_slot_whatever_its_batch(resolver, pii_api, customers):
    await put(resolver, bulk_config(pii_api.base_url, batch_size=100, max_requests_per_second=10))
    ids = [f"cust-{n:06d}" for n in range(1, 251)]
    reply, took = await timed(resolve(resolver, ids))
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in ids]
    assert pii_api.sandbox.stats.by_path["/v1/customers:batchGet"] == 3
    assert 0.2 - 0.02 <= took < 5  # three requests 100 ms apart, not 250 of them (25 s)


async def test_two_resolvers_share_the_rate(start_resolver, pii_api, customers):
    first, second = await start_resolver(), await start_resolver()
    await put(first, single_config(pii_api.base_url, max_requests_per_second=20))
    (one, two), took = await timed(asyncio.gather(resolve(first, IDS[:5]), resolve(second, IDS[5:])))
    assert [c.contact for c in [*one.contacts, *two.contacts]] == [customers[i].email for i in IDS]
    # Five requests each: alone, each resolver's last would go out after 200 ms; together, after 450.
    assert 0.4 <= took < 5


async def test_retries_and_test_calls_take_a_slot_too(resolver, pii_api, customers):
    await put(resolver, single_config(pii_api.base_url, max_retries=1, max_requests_per_second=5))
    pii_api.sandbox.faults.fail_status, pii_api.sandbox.faults.fail_count = 503, 1
    reply, took = await timed(resolve(resolver, ["cust-000001"]))
    assert reply.contacts[0].contact == customers["cust-000001"].email
    assert pii_api.sandbox.stats.statuses == {"503": 1, "200": 1}
    assert took >= 0.15  # the retry waits for the slot 200 ms after the first attempt's, not 10-40 ms

    saved = pb.TestPiiApiConfigRequest.SavedConfig(workspace_id="ws-1", channel=EMAIL)
    request = pb.TestPiiApiConfigRequest(saved=saved, test_anonymous_id="cust-000002")
    replies, took = await timed(asyncio.gather(*(resolver.stub.TestPiiApiConfig(request) for _ in range(3))))
    assert [r.contact for r in replies] == [customers["cust-000002"].email] * 3
    assert took >= 0.35  # behind the slots above, three more 200 ms apart


async def test_ids_with_no_slot_before_the_deadline_fail_rate_limited_without_a_call(resolver, pii_api, customers):
    await put(resolver, single_config(pii_api.base_url, max_requests_per_second=2))
    ids = IDS[:6]
    # Slots at 0 and 500 ms come before the deadline (1 s, less a tenth for the reply); 1 s and later do not.
    reply, took = await timed(resolve(resolver, ids, timeout=1.0))
    assert [c.anonymous_id for c in reply.contacts] == ids
    resolved = [c for c in reply.contacts if not c.HasField("error")]
    refused = [c for c in reply.contacts if c.HasField("error")]
    assert [c.contact for c in resolved] == [customers[c.anonymous_id].email for c in resolved]
    assert len(resolved) == 2 and pii_api.sandbox.stats.requests == 2
    for contact in refused:
        assert contact.error.code == E.RESOLVE_ERROR_CODE_RATE_LIMITED
        assert contact.error.detail == NO_SLOT
        assert (contact.error.attempts, contact.error.http_status) == (0, 0)
        assert contact.error.message == "Invalid API response (fetching Email ID)"
    assert took < 0.9

    # The refused requests reserved nothing: the next slot is the one after the last request made.
    reply = await resolve(resolver, ["cust-000009"], timeout=1.0)
    assert reply.contacts[0].contact == customers["cust-000009"].email


async def test_a_retry_with_no_slot_before_the_deadline_keeps_the_apis_failure(resolver, pii_api):
    await put(resolver, single_config(pii_api.base_url, max_retries=3, max_requests_per_second=1))
    pii_api.sandbox.faults.fail_status, pii_api.sandbox.faults.fail_count = 503, -1
    reply = await resolve(resolver, ["cust-000001"], timeout=0.8)
    error = reply.contacts[0].error
    assert (error.code, error.attempts, error.http_status) == (E.RESOLVE_ERROR_CODE_SERVER_ERROR, 1, 503)
    assert error.detail == f"HTTP 503; {NO_SLOT_FOR_RETRY}"
    assert pii_api.sandbox.stats.requests == 1


async def test_content_apis_keep_to_their_own_rate(resolver, pii_api, customers):
    await put(resolver, bulk_config(pii_api.base_url, max_requests_per_second=1))
    content = pb.ContentApiConfig(
        workspace_id="ws-1",
        name="profile",
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url=f"{pii_api.base_url}/v1/customers/@anonymous_id",
        field_paths={"first_name": "customer.profile.first_name"},
        max_requests_per_second=20,
    )
    saved = await resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content))
    assert saved.config.max_requests_per_second == 20
    ids = IDS[:5]
    reply, took = await timed(resolve(resolver, ids, content_api_names=["profile"]))
    for contact in reply.contacts:
        assert contact.content["profile"].fields["first_name"] == customers[contact.anonymous_id].first_name
    # Five content requests 50 ms apart, behind none of the PII API's: its slots are a second apart, and
    # its own (sharing them, the first content request would wait for the PII API's next slot, 1 s on).
    assert 0.2 - 0.02 <= took < 1


async def test_redis_failing_under_a_cap_is_unavailable_and_no_request_goes_out(resolver, pii_api, monkeypatch):
    await put(resolver, single_config(pii_api.base_url, max_requests_per_second=5))
    reserve_within = RateLimiter.reserve_within
    failures = []

    async def first_fails(self, *args):
        if not failures:
            failures.append(1)
            raise RedisConnectionError("connection refused")
        await asyncio.sleep(0.2)  # Redis answering the others late: they must not go out after the reply
        return await reserve_within(self, *args)

    monkeypatch.setattr(RateLimiter, "reserve_within", first_fails)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(resolver, IDS[:5], timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(0.5)
    assert pii_api.sandbox.stats.requests == 0


@pytest.mark.parametrize("kind", ["pii", "content"])
async def test_max_requests_per_second_is_validated_naming_the_field(resolver, kind):
    if kind == "pii":
        config = single_config("https://pii.example.com", max_requests_per_second=100_000)
        put_config = lambda c: resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=c))  # noqa: E731
    else:
        config = pb.ContentApiConfig(
            workspace_id="ws-1",
            name="offers",
            mode=pb.MODE_SINGLE,
            method=pb.HTTP_METHOD_GET,
            url="https://content.example.com/@anonymous_id",
            field_paths={"headline": "headline"},
            max_requests_per_second=100_000,
        )
        put_config = lambda c: resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=c))  # noqa: E731
    assert (await put_config(config)).config.max_requests_per_second == 100_000
    config.max_requests_per_second = 100_001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await put_config(config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["config.max_requests_per_second"]
    assert "0..100000" in caught.value.details()
