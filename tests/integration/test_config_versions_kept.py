"""What a versioned config (PII API, content API) leaves in Redis: the versions in the window of
TOKENSEND_CONFIG_VERSIONS_KEPT, those a campaign instance's pin holds, and after a deletion the last
version deleted, which a new save goes on from.

On real Redis and on the embedded store, which must run the same scripts.
"""

from __future__ import annotations

import uuid

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.crypto import SecretBox
from libs.errors import NotFound
from libs.store import create_redis
from services.resolver.configs import PiiApiConfigStore
from services.resolver.content_apis import ContentApiConfigStore
from tests.pii_configs import bulk_config

pytestmark = pytest.mark.integration

WS = "ws-1"
EMAIL = common_pb2.CHANNEL_EMAIL
BASE = "ts:{ws-1}:pii:email"
BOX = SecretBox([b"k" * 32])
PIN_TTL = 60


@pytest.fixture(params=["redis", "memory"])
async def store(request, redis, redis_url):
    client = create_redis(redis_url if request.param == "redis" else f"memory://{uuid.uuid4().hex}")
    yield client
    await client.aclose()


def pii_configs(store, versions_kept: int) -> PiiApiConfigStore:
    """The store as a resolver started with that TOKENSEND_CONFIG_VERSIONS_KEPT builds it."""
    return PiiApiConfigStore(store, BOX, versions_kept=versions_kept, pin_ttl_seconds=PIN_TTL)


async def stored_versions(store, base: str = BASE) -> list[int]:
    return sorted([int(key.rsplit(b":", 1)[1]) async for key in store.scan_iter(match=f"{base}:v:*")])


async def command_calls(store, *commands: str) -> int:
    stats = await store.info("commandstats")
    return sum(stats.get(f"cmdstat_{command}", {"calls": 0})["calls"] for command in commands)


async def test_a_lowered_versions_kept_drops_every_version_out_of_the_new_window_but_the_pinned(store):
    config = bulk_config("https://pii.example.com", workspace_id=WS)
    before = pii_configs(store, versions_kept=8)
    for version in range(1, 11):
        await before.save(config)
        if version == 4:
            await before.load(WS, EMAIL, campaign_instance_id="run-4")  # holds version 4
    assert await stored_versions(store) == [3, 4, 5, 6, 7, 8, 9, 10]

    after = pii_configs(store, versions_kept=3)  # the resolvers restarted with the setting lowered
    assert await after.save(config) == 11
    assert await stored_versions(store) == [4, 9, 10, 11]
    assert (await after.load(WS, EMAIL, campaign_instance_id="run-4")).version == 4
    with pytest.raises(NotFound, match="version 5 is not kept any more"):
        await after.load(WS, EMAIL, 5)

    # Raised again, nothing comes back and nothing more goes until the window passes what is stored.
    raised = pii_configs(store, versions_kept=5)
    await raised.save(config)
    assert await stored_versions(store) == [4, 9, 10, 11, 12]


async def test_a_content_api_config_lets_its_versions_go_as_the_setting_is_lowered(store):
    base = "ts:{ws-1}:content:loyalty"
    config = rpb.ContentApiConfig(workspace_id=WS, name="loyalty", url="https://content.example.com/v1/@anonymous_id")
    before = ContentApiConfigStore(store, BOX, versions_kept=6, pin_ttl_seconds=PIN_TTL)
    for _ in range(6):
        await before.save(config)
    after = ContentApiConfigStore(store, BOX, versions_kept=2, pin_ttl_seconds=PIN_TTL)
    await after.save(config)
    assert await stored_versions(store, base) == [6, 7]


async def test_a_deletion_after_the_setting_was_lowered_leaves_no_version(store):
    config = bulk_config("https://pii.example.com", workspace_id=WS)
    before = pii_configs(store, versions_kept=8)
    for _ in range(10):
        await before.save(config)
    await before.load(WS, EMAIL, campaign_instance_id="run-10")

    assert await pii_configs(store, versions_kept=3).delete(WS, EMAIL) == 10
    assert await stored_versions(store) == []


async def test_saves_touch_only_the_versions_that_can_be_stored(redis):
    """However high the version numbers, a save walks only the versions it finds."""
    config = bulk_config("https://pii.example.com", workspace_id=WS)
    configs = pii_configs(redis, versions_kept=3)
    await configs.save(config)
    await configs.load(WS, EMAIL, campaign_instance_id="run-1")  # holds version 1 past the window
    await redis.set(f"{BASE}:latest", 500_000)  # as if saved half a million times
    calls = await command_calls(redis, "del", "zscore")
    for _ in range(3):
        await configs.save(config)
    assert await command_calls(redis, "del", "zscore") - calls < 20
    assert await stored_versions(redis) == [1, 500_001, 500_002, 500_003]


async def test_a_deleted_config_s_last_version_is_kept_while_it_stays_deleted_then_ends_with_its_pins(store):
    config = bulk_config("https://pii.example.com", workspace_id=WS)
    configs = pii_configs(store, versions_kept=3)
    await configs.save(config)
    await configs.save(config)
    await configs.load(WS, EMAIL, campaign_instance_id="run-1")  # pinned to version 2
    assert await configs.delete(WS, EMAIL) == 2

    # While deleted, it is the counter a new save goes on from: a version number read before the
    # deletion must never name a config saved since, however late the save comes.
    assert await store.get(f"{BASE}:deleted") == b"2"
    assert await store.ttl(f"{BASE}:deleted") == -1

    assert await configs.save(config) == 3
    # `:latest` carries the number on; the tombstone words the refusal of the old pins, and ends with them.
    pin_left = await store.ttl(f"{BASE}:pin:run-1")
    assert 0 < pin_left <= await store.ttl(f"{BASE}:deleted") <= PIN_TTL
    with pytest.raises(NotFound, match="version 2 was deleted with the config"):
        await configs.load(WS, EMAIL, campaign_instance_id="run-1")
    await configs.save(config)
    assert 0 < await store.ttl(f"{BASE}:deleted") <= PIN_TTL  # a later save does not extend it

    # Deleted again: the tombstone is the counter once more, kept for as long as the config stays deleted.
    assert await configs.delete(WS, EMAIL) == 4
    assert (await store.get(f"{BASE}:deleted"), await store.ttl(f"{BASE}:deleted")) == (b"4", -1)
    assert await configs.save(config) == 5


async def test_a_tombstone_left_without_an_end_by_a_config_saved_again_gets_one_at_the_next_save(store):
    config = bulk_config("https://pii.example.com", workspace_id=WS)
    configs = pii_configs(store, versions_kept=3)
    await configs.save(config)
    await configs.save(config)
    await store.set(f"{BASE}:deleted", 1)  # as a deletion at version 1 left it, saved over since, with no end
    await configs.save(config)
    assert 0 < await store.ttl(f"{BASE}:deleted") <= PIN_TTL
