"""Listing and deleting PII API, OAuth and content API configs through the real resolver on real Redis."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import OAuthClient
from services.resolver.configs import OAuthConfigStore
from services.resolver.content_apis import ContentApiConfigStore, ContentApis
from services.resolver.servicer import ResolverServicer
from tests.integration.test_resolver_configs import raw_redis_dump
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

WS = "ws-1"
EMAIL, SMS = common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS


@pytest.fixture
async def api(start_pii_api_server):
    return await start_pii_api_server(oauth=OAuthClient("app", "oauth-s3cret-1"), api_key="api-s3cret-key-1")


def oauth_config(api, oauth_config_id: str = "crm", secret: str = "oauth-s3cret-1") -> pb.OAuthConfig:
    return pb.OAuthConfig(
        workspace_id=WS,
        oauth_config_id=oauth_config_id,
        token_url=f"{api.base_url}/oauth/token",
        client_id="app",
        client_secret=secret,
    )


def content_config(api, name: str = "loyalty", **fields) -> pb.ContentApiConfig:
    return pb.ContentApiConfig(
        workspace_id=WS,
        name=name,
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url=f"{api.base_url}/v1/customers/@anonymous_id",
        headers={"X-Api-Key": "api-s3cret-key-1"},
        field_paths={"tier": "customer.tier"},
        **fields,
    )


async def resolve(resolver, instance: str = "", **fields) -> pb.ResolveContactsResponse:
    request = pb.ResolveContactsRequest(
        workspace_id=WS, channel=EMAIL, anonymous_ids=["cust-000001"], campaign_instance_id=instance, **fields
    )
    return await resolver.stub.ResolveContacts(request)


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_lists_summarise_each_config_and_show_no_secret(resolver, api):
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    failed = oauth_config(api, "old-crm", secret="wrong-secret")
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=failed))
    bulk = bulk_config(api.base_url, oauth_config_id="crm", headers={"X-Api-Key": "api-s3cret-key-1"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk))
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk))
    sms = single_config(api.base_url, channel=common_pb2.CHANNEL_RCS, headers={"X-Api-Key": "api-s3cret-key-1"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=sms))
    await resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content_config(api)))
    before = int(time.time() * 1000)

    pii = await resolver.stub.ListPiiApiConfigs(pb.ListPiiApiConfigsRequest(workspace_id=WS))
    assert [(c.channel, c.version, c.mode, c.oauth_config_id) for c in pii.configs] == [
        (EMAIL, 2, pb.MODE_BULK, "crm"),
        (SMS, 1, pb.MODE_SINGLE, ""),  # the family's first channel, whichever saved it
    ]
    assert all(0 < c.updated_at_ms <= before for c in pii.configs)

    oauth = await resolver.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    assert [(c.oauth_config_id, c.status) for c in oauth.configs] == [
        ("crm", pb.TOKEN_STATUS_ACTIVE),
        ("old-crm", pb.TOKEN_STATUS_FAILED),
    ]
    assert "401" in oauth.configs[1].status_reason and oauth.next_page_token == ""

    content = await resolver.stub.ListContentApiConfigs(pb.ListContentApiConfigsRequest(workspace_id=WS))
    assert [(c.name, c.version, c.mode) for c in content.configs] == [("loyalty", 1, pb.MODE_SINGLE)]

    shown = b"".join(r.SerializeToString() for r in (pii, oauth, content))
    assert b"s3cret" not in shown and api.base_url.encode() not in shown
    other = await resolver.stub.ListPiiApiConfigs(pb.ListPiiApiConfigsRequest(workspace_id="ws-2"))
    assert list(other.configs) == []


async def test_lists_page_by_name(resolver, api):
    for name in ("e", "a", "d", "b", "c"):
        await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api, name)))
    seen, token, pages = [], "", 0
    while True:
        page = await resolver.stub.ListOAuthConfigs(
            pb.ListOAuthConfigsRequest(workspace_id=WS, page_size=2, page_token=token)
        )
        pages += 1
        assert len(page.configs) <= 2
        seen += [c.oauth_config_id for c in page.configs]
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (["a", "b", "c", "d", "e"], 3)

    bad_token = await refused(
        resolver.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS, page_token="%%"))
    )
    assert bad_token.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Named, with what to send instead: an operator pasting a token by hand learns which one.
    assert bad_token.details() == (
        "page_token: is not ours: send the previous reply's next_page_token, or none for the first page"
    )
    too_big = await refused(
        resolver.stub.ListContentApiConfigs(pb.ListContentApiConfigsRequest(workspace_id=WS, page_size=1001))
    )
    assert too_big.details().startswith("page_size: at most 1000")


async def test_deleting_a_pii_api_config_removes_every_version_and_its_secrets(resolver, api, redis):
    config = bulk_config(api.base_url, headers={"X-Api-Key": "api-s3cret-key-1"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    assert (await resolve(resolver, "run-1")).config_version == 2  # run-1 is pinned to version 2

    deleted = await resolver.stub.DeletePiiApiConfig(pb.DeletePiiApiConfigRequest(workspace_id=WS, channel=EMAIL))
    assert deleted.version == 2
    keys = [key async for key in redis.scan_iter(match=b"ts:{ws-1}:pii:email:v:*")]
    assert keys == []
    get = await refused(resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id=WS, channel=EMAIL)))
    assert get.code() == grpc.StatusCode.NOT_FOUND
    pinned = await refused(resolve(resolver, "run-1"))
    assert pinned.code() == grpc.StatusCode.NOT_FOUND
    assert "no PII API config for workspace 'ws-1', channel family email" in pinned.details()
    listed = await resolver.stub.ListPiiApiConfigs(pb.ListPiiApiConfigsRequest(workspace_id=WS))
    assert list(listed.configs) == []

    # Saved again, it goes on from the deleted versions: run-1 never moves to a config it did not start with.
    again = await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    assert again.version == 3
    still_pinned = await refused(resolve(resolver, "run-1"))
    assert still_pinned.code() == grpc.StatusCode.NOT_FOUND
    assert "version 2 was deleted with the config" in still_pinned.details()
    old = await refused(
        resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id=WS, channel=EMAIL, version=1))
    )
    assert "version 1 was deleted with the config" in old.details()
    assert (await resolve(resolver, "run-2")).config_version == 3

    missing = await refused(
        resolver.stub.DeletePiiApiConfig(pb.DeletePiiApiConfigRequest(workspace_id=WS, channel=SMS))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert missing.details() == "no PII API config for workspace 'ws-1', channel family sms"
    unnamed = await refused(resolver.stub.DeletePiiApiConfig(pb.DeletePiiApiConfigRequest(workspace_id=WS)))
    assert unnamed.details().startswith("channel: is required")


async def test_an_oauth_config_in_use_is_kept_until_no_config_or_pin_names_it(start_resolver, api, redis):
    resolver = await start_resolver(pin_ttl_seconds=3)  # outlives the calls below on a busy machine
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    with_oauth = bulk_config(api.base_url, oauth_config_id="crm", headers={"X-Api-Key": "api-s3cret-key-1"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=with_oauth))

    in_use = await refused(
        resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    )
    assert in_use.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert in_use.details() == (
        "oauth_config_id: OAuth config 'crm' is used by the PII API config for channel family email (version 1): "
        "save that config without it, or delete it, first"
    )

    assert (await resolve(resolver, "run-1")).config_version == 1  # run-1 pins version 1, which uses crm
    without = bulk_config(api.base_url, headers={"X-Api-Key": "api-s3cret-key-1"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=without))
    pinned = await refused(
        resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    )
    assert "channel family email (version 1)" in pinned.details()

    # A content API names it too.
    await resolver.stub.PutContentApiConfig(
        pb.PutContentApiConfigRequest(config=content_config(api, oauth_config_id="crm"))
    )
    await asyncio.sleep(3.1)  # run-1's pin ends
    content = await refused(
        resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    )
    assert "is used by content API 'loyalty' (version 1)" in content.details()
    await resolver.stub.DeleteContentApiConfig(pb.DeleteContentApiConfigRequest(workspace_id=WS, name="loyalty"))

    await resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    gone = await refused(resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    # Only its version counter stays (a number), so a version read before the delete matches no later save.
    assert [key async for key in redis.scan_iter(match=b"ts:{ws-1}:oauth:*")] == [b"ts:{ws-1}:oauth:crm:version"]
    listed = await resolver.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    assert list(listed.configs) == []
    again = await refused(
        resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND
    assert again.details() == "no OAuth config 'crm' in workspace 'ws-1'"
    assert b"oauth-s3cret-1" not in await raw_redis_dump(redis)


async def test_deleting_a_content_api_config_fails_the_calls_that_name_it(resolver, api):
    await resolver.stub.PutPiiApiConfig(
        pb.PutPiiApiConfigRequest(config=bulk_config(api.base_url, headers={"X-Api-Key": "api-s3cret-key-1"}))
    )
    await resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content_config(api)))
    assert (await resolve(resolver, "run-1", content_api_names=["loyalty"])).content_apis[0].version == 1

    deleted = await resolver.stub.DeleteContentApiConfig(
        pb.DeleteContentApiConfigRequest(workspace_id=WS, name="loyalty")
    )
    assert deleted.version == 1
    for instance in ("run-1", "run-2"):
        error = await refused(resolve(resolver, instance, content_api_names=["loyalty"]))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "content API 'loyalty' in workspace 'ws-1'" in error.details()
    listed = await resolver.stub.ListContentApiConfigs(pb.ListContentApiConfigsRequest(workspace_id=WS))
    assert list(listed.configs) == []
    missing = await refused(
        resolver.stub.DeleteContentApiConfig(pb.DeleteContentApiConfigRequest(workspace_id=WS, name="loyalty"))
    )
    assert missing.details() == "no content API 'loyalty' in workspace 'ws-1'"
    bad = await refused(
        resolver.stub.DeleteContentApiConfig(pb.DeleteContentApiConfigRequest(workspace_id=WS, name="9lives"))
    )
    assert bad.details().startswith("name: must be an identifier")


async def test_a_deletion_reaches_every_resolver_at_once(start_resolver, api):
    first, second = await start_resolver(), await start_resolver()
    assert second.deps.config_cache.live
    config = bulk_config(api.base_url, headers={"X-Api-Key": "api-s3cret-key-1"})
    await first.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    for _ in range(3):  # kept by the second resolver
        assert (await resolve(second)).config_version == 1

    await first.stub.DeletePiiApiConfig(pb.DeletePiiApiConfigRequest(workspace_id=WS, channel=EMAIL))
    started = time.monotonic()
    while True:
        try:
            await resolve(second)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() - started < 1.0, "the deleted config was still used"


async def test_a_config_naming_the_oauth_config_saved_while_its_delete_checks_keeps_it(resolver, api, monkeypatch):
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    check = ContentApiConfigStore.oauth_user

    async def save_during_the_check(store, workspace_id, oauth_config_id):
        """The check finds no user; then a content API naming the OAuth config is saved, before the delete."""
        found = await check(store, workspace_id, oauth_config_id)
        if not found[0]:
            named = content_config(api, oauth_config_id="crm")
            await resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=named))
        return found

    monkeypatch.setattr(ContentApiConfigStore, "oauth_user", save_during_the_check)
    in_use = await refused(
        resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    )
    assert in_use.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is used by content API 'loyalty' (version 1)" in in_use.details()
    assert (await resolve_content_oauth(resolver)) == "crm"


async def resolve_content_oauth(resolver) -> str:
    """The OAuth config the saved content API names (and which must still exist)."""
    content = await resolver.stub.GetContentApiConfig(pb.GetContentApiConfigRequest(workspace_id=WS, name="loyalty"))
    oauth_id = content.config.oauth_config_id
    await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id=WS, oauth_config_id=oauth_id))
    return oauth_id


async def test_an_oauth_delete_that_configs_naming_it_keep_racing_gives_up(resolver, api, redis, monkeypatch):
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    check = ContentApiConfigStore.oauth_user

    async def saved_each_time(store, workspace_id, oauth_config_id):
        """Each check misses a save naming it (as one landing just after the check would be)."""
        await redis.incr(OAuthConfigStore.uses_key(workspace_id, oauth_config_id))
        return await check(store, workspace_id, oauth_config_id)

    monkeypatch.setattr(ContentApiConfigStore, "oauth_user", saved_each_time)
    raced = await refused(
        resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    )
    assert raced.code() == grpc.StatusCode.ABORTED
    assert raced.details() == "oauth_config_id: configs naming OAuth config 'crm' kept being saved: try again"
    await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))  # kept


async def test_a_config_saved_while_the_oauth_config_it_names_is_deleted_is_refused(resolver, api, monkeypatch):
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))

    def deleted_after(prepare):
        async def prepare_then_delete(*args, **kwargs):
            """The save's check finds the OAuth config; then its delete lands, before the save."""
            prepared = await prepare(*args, **kwargs)
            await resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
            return prepared

        return prepare_then_delete

    monkeypatch.setattr(ResolverServicer, "_prepare", deleted_after(ResolverServicer._prepare))
    monkeypatch.setattr(ContentApis, "prepare", deleted_after(ContentApis.prepare))
    pii = bulk_config(api.base_url, oauth_config_id="crm", headers={"X-Api-Key": "api-s3cret-key-1"})
    pii_refused = await refused(resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=pii)))
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    content = content_config(api, oauth_config_id="crm")
    content_refused = await refused(resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content)))
    for refusal in (pii_refused, content_refused):
        assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refusal.details() == "config.oauth_config_id: OAuth config 'crm' does not exist"
    assert list((await resolver.stub.ListPiiApiConfigs(pb.ListPiiApiConfigsRequest(workspace_id=WS))).configs) == []
    listed = await resolver.stub.ListContentApiConfigs(pb.ListContentApiConfigsRequest(workspace_id=WS))
    assert list(listed.configs) == []
