"""Configs kept in process between calls, on real Redis: a save elsewhere reaches every process at
once, and nothing is kept while the process cannot hear about saves."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs import config_cache
from libs.config_cache import CHANNEL, MISSING, ConfigCache
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from services.resolver.configs import PiiApiConfigStore
from tests.integration.test_receipts_harness import CONNECTORS, WS, running_receipts
from tests.pii_configs import bulk_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL


async def eventually(check, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "did not happen in time"
        await asyncio.sleep(0.01)


async def resolve(resolver, ids, **fields):
    return await resolver.stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=ids, **fields)
    )


async def test_a_config_saved_by_one_resolver_is_used_by_another_on_its_next_call(start_resolver, pii_api):
    first, second = await start_resolver(), await start_resolver()
    assert second.deps.config_cache.live
    await first.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    before = await resolve(second, ["cust-000001"])
    assert before.config_version == 1 and "last_name" in before.contacts[0].attributes

    changed = bulk_config(pii_api.base_url, attribute_paths={"first_name": "profile.first_name"})
    await first.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=changed))
    # The change is announced when it is saved; the next call already sees it (or a few ms later).
    started = time.monotonic()
    while (after := await resolve(second, ["cust-000001"])).config_version != 2:
        assert time.monotonic() - started < 1.0
    assert "last_name" not in after.contacts[0].attributes


async def test_calls_use_the_kept_config_until_a_change_is_announced(start_resolver, pii_api, redis):
    resolver = await start_resolver()
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    base = PiiApiConfigStore._base("ws-1", EMAIL)
    # The save's own announcement can reach the subscriber after a read has begun, and such a read is
    # not kept: read until one is, as the next call after a quiet moment would.
    deadline = time.monotonic() + 5
    while resolver.deps.config_cache.get(base, ("config", 1)) is MISSING:
        assert time.monotonic() < deadline, "the config was never kept"
        await resolve(resolver, ["cust-000001"])

    # Gone from Redis without a word: the process still has it.
    await redis.delete(f"{base}:v:1")
    assert (await resolve(resolver, ["cust-000002"])).config_version == 1

    # Announced: read again, and Redis no longer has that version.
    await redis.publish(CHANNEL, base)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await eventually_failing(resolver)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 1 is not kept any more" in error.value.details()


async def eventually_failing(resolver) -> None:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        await resolve(resolver, ["cust-000003"])
        await asyncio.sleep(0.01)


async def test_nothing_is_kept_while_the_subscription_is_down(start_resolver, pii_api, redis):
    resolver = await start_resolver()
    cache = resolver.deps.config_cache
    assert cache.live
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    await resolve(resolver, ["cust-000001"])
    base = PiiApiConfigStore._base("ws-1", EMAIL)

    # The subscriber's connection is cut: a change made now would not be heard.
    await redis.client_kill_filter(_type="pubsub")
    await eventually(lambda: not cache.live)
    await redis.delete(f"{base}:v:1")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await resolve(resolver, ["cust-000002"])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    # Subscribed again: kept configs come back, from a fresh read.
    await eventually(lambda: cache.live)
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    assert (await resolve(resolver, ["cust-000003"])).config_version == 2
    await redis.delete(f"{base}:v:2")
    assert (await resolve(resolver, ["cust-000004"])).config_version == 2


async def test_a_pinned_instance_keeps_its_version_and_a_kept_pin_ends_with_the_pin(start_resolver, pii_api, redis):
    resolver = await start_resolver(pin_ttl_seconds=3)  # outlives the calls below on a busy machine
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    assert (await resolve(resolver, ["cust-000001"], campaign_instance_id="run-1")).config_version == 1
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    assert (await resolve(resolver, ["cust-000001"], campaign_instance_id="run-1")).config_version == 1
    assert (await resolve(resolver, ["cust-000001"])).config_version == 2
    # Redis forgets the pin once it ends; so does the process, and the instance takes the latest.
    await asyncio.sleep(3.1)
    assert (await resolve(resolver, ["cust-000001"], campaign_instance_id="run-1")).config_version == 2


async def test_a_read_in_flight_when_a_change_is_announced_is_not_kept(redis):
    cache = ConfigCache(redis, 60)
    await cache.start()
    try:
        assert cache.live
        mark = cache.mark()
        await redis.publish(CHANNEL, "ts:{ws-x}:connector:other")
        await eventually(lambda: cache.mark() != mark)
        cache.put("ts:{ws-x}:connector:c1", "connector", "old", mark)
        assert cache.get("ts:{ws-x}:connector:c1", "connector") is MISSING
        cache.put("ts:{ws-x}:connector:c1", "connector", "new", cache.mark())
        assert cache.get("ts:{ws-x}:connector:c1", "connector") == "new"
    finally:
        await cache.close()
    assert not cache.live and cache.get("ts:{ws-x}:connector:c1", "connector") is MISSING


async def test_a_kept_config_is_read_again_after_its_longest_life(redis):
    now = [100.0]
    cache = ConfigCache(redis, 30, clock=lambda: now[0])
    await cache.start()
    try:
        cache.put("topic", "name", "value", cache.mark())
        cache.put("topic", "pin", 7, cache.mark(), expires_at=110.0)
        now[0] = 109.0
        assert (cache.get("topic", "name"), cache.get("topic", "pin")) == ("value", 7)
        now[0] = 110.0
        assert cache.get("topic", "pin") is MISSING and cache.get("topic", "name") == "value"
        now[0] = 130.0
        assert cache.get("topic", "name") is MISSING
    finally:
        await cache.close()


async def test_zero_turns_the_cache_off(start_resolver, pii_api, redis):
    resolver = await start_resolver(config_cache_seconds=0)
    assert not resolver.deps.config_cache.live
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url)))
    await resolve(resolver, ["cust-000001"])
    await redis.delete(f"{PiiApiConfigStore._base('ws-1', EMAIL)}:v:1")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await resolve(resolver, ["cust-000002"])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_connector_saved_on_one_dispatcher_is_sent_through_by_another(start_suite, start_dispatcher):
    suite = await start_suite()
    other = await start_dispatcher(suite.resolver)
    assert other.deps.config_cache.live
    request = dpb.DispatchRequest(
        workspace_id=suite.workspace_id,
        campaign_id="spring",
        campaign_instance_id="run-1",
        channel=common_pb2.CHANNEL_SMS,
        connector_id="gateway",
        content=dpb.Content(sms_body="Hi {{ first_name }}"),
    )
    request.recipients.add(anonymous_id="cust-000001")
    first = await other.stub.Dispatch(request)
    assert first.results[0].status == dpb.DispatchStatus.DISPATCH_STATUS_SENT

    saved = await suite.dispatcher.stub.GetConnector(
        dpb.GetConnectorRequest(workspace_id=suite.workspace_id, connector_id="gateway")
    )
    changed = dpb.Connector()
    changed.CopyFrom(saved.connector)
    changed.custom_http.url = changed.custom_http.url.replace("127.0.0.1", "localhost")
    await suite.dispatcher.stub.PutConnector(dpb.PutConnectorRequest(connector=changed))
    key = ConnectorStore.key(suite.workspace_id, "gateway")
    await eventually(lambda: other.deps.config_cache.get(key, "connector") is MISSING)

    request.campaign_instance_id = "run-2"
    second = await other.stub.Dispatch(request)
    assert second.results[0].status == dpb.DispatchStatus.DISPATCH_STATUS_SENT
    kept = other.deps.config_cache.get(key, "connector")
    assert kept is not MISSING and kept[0].custom_http.url == changed.custom_http.url


async def test_receipts_check_webhooks_against_a_changed_secret_at_once(redis, redis_url):
    """The receipts service keeps connectors for webhooks; a new webhook secret applies from the next post."""
    async with running_receipts(redis, redis_url) as receipts:
        assert receipts.deps.config_cache is not None and receipts.deps.config_cache.live
        empty = {"object": "whatsapp_business_account", "entry": []}
        assert (await receipts.post_whatsapp(empty)).status == 200
        key = ConnectorStore.key(WS, CONNECTORS["whatsapp"])
        assert receipts.deps.config_cache.get(key, "connector") is not MISSING

        store = ConnectorStore(redis, SecretBox.from_settings(receipts.settings))
        connector = await store.load(WS, CONNECTORS["whatsapp"])
        connector.webhook_secret = "a-new-app-secret"
        await store.save(connector)
        await eventually(lambda: receipts.deps.config_cache.get(key, "connector") is MISSING)

        assert (await receipts.post_whatsapp(empty)).status == 403  # still signed with the old secret
        receipts.secrets.whatsapp_app_secret = "a-new-app-secret"
        assert (await receipts.post_whatsapp(empty)).status == 200


async def test_a_topic_keeps_a_bounded_number_of_entries_the_expired_first(redis, monkeypatch):
    """Every campaign instance pins a config version of its own: a busy topic gathers one entry per
    instance. Past the bound the expired go first, then the oldest."""
    monkeypatch.setattr(config_cache, "ENTRIES_PER_TOPIC", 4)
    now = [100.0]
    cache = ConfigCache(redis, 30, clock=lambda: now[0])
    await cache.start()
    try:
        cache.put("topic", "latest", "v2", cache.mark())
        cache.put("topic", ("version", "run-1"), 1, cache.mark(), expires_at=105.0)
        for n in range(2, 4):
            cache.put("topic", ("version", f"run-{n}"), 1, cache.mark())
        now[0] = 106.0  # run-1's pin has expired
        cache.put("topic", ("version", "run-4"), 1, cache.mark())
        assert cache.get("topic", "latest") == "v2"  # the expired one made room
        cache.put("topic", ("version", "run-5"), 1, cache.mark())
        assert cache.get("topic", "latest") is MISSING  # then the oldest
        assert [cache.get("topic", ("version", f"run-{n}")) for n in range(2, 6)] == [1, 1, 1, 1]
    finally:
        await cache.close()
