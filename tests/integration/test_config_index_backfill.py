"""Configs saved before the list index existed: listed, and guarded from deletion while in use, once the
services have indexed them from their keys."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs import config_index
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from libs.store import workspace_key
from services.resolver.configs import OAuthConfigStore
from services.resolver.content_apis import ContentApiConfigStore
from tests.conftest import resolver_settings

pytestmark = pytest.mark.integration

WS = "ws-1"


async def save_oauth_as_before(redis, box: SecretBox, oauth_config_id: str) -> None:
    """An OAuth config as saves wrote it before the index: the sealed config and its status, nothing more."""
    key = workspace_key(WS, "oauth", oauth_config_id)
    config = pb.OAuthConfig(workspace_id=WS, oauth_config_id=oauth_config_id, token_url="https://t.example.com/token")
    await redis.set(key, box.seal(config.SerializeToString(), key.encode()))
    await redis.hset(f"{key}:status", mapping={"status": pb.TOKEN_STATUS_ACTIVE, "reason": ""})


async def save_content_as_before(redis, box: SecretBox, name: str, oauth_config_id: str) -> None:
    """A content API config's first version as saves wrote it before the index: counter and sealed version."""
    base = workspace_key(WS, "content", name)
    config = pb.ContentApiConfig(
        workspace_id=WS, name=name, mode=pb.MODE_SINGLE, url="https://c.example.com/@anonymous_id"
    )
    config.oauth_config_id = oauth_config_id
    await redis.set(f"{base}:latest", 1)
    await redis.set(f"{base}:v:1", box.seal(config.SerializeToString(), base.encode()))


async def indexed(redis, kind: str) -> list[bytes]:
    return await redis.zrange(config_index.index_key(WS, kind), 0, -1)


async def test_configs_saved_before_the_index_are_listed_and_an_oauth_config_they_use_is_kept(
    start_resolver, redis, redis_url, secret_key, captured_logs
):
    box = SecretBox.from_settings(resolver_settings(redis_url, secret_key))
    for oauth_config_id in ("crm", "crm:eu", "unused"):  # ':' is escaped in keys
        await save_oauth_as_before(redis, box, oauth_config_id)
    await save_content_as_before(redis, box, "loyalty", "crm")
    resolver = await start_resolver()

    oauth = await resolver.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    assert [(c.oauth_config_id, c.status, c.updated_at_ms) for c in oauth.configs] == [
        ("crm", pb.TOKEN_STATUS_ACTIVE, 0),  # saved before save times were kept
        ("crm:eu", pb.TOKEN_STATUS_ACTIVE, 0),
        ("unused", pb.TOKEN_STATUS_ACTIVE, 0),
    ]
    content = await resolver.stub.ListContentApiConfigs(pb.ListContentApiConfigsRequest(workspace_id=WS))
    assert [(c.name, c.version, c.oauth_config_id) for c in content.configs] == [("loyalty", 1, "crm")]

    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is used by content API 'loyalty' (version 1)" in in_use.value.details()
    await resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="unused"))

    # Done once per Redis: a resolver started later reads the markers and scans nothing.
    assert await redis.exists(config_index.backfilled_key("oauth"), config_index.backfilled_key("content")) == 2
    await save_oauth_as_before(redis, box, "later")
    again = await start_resolver()
    listed = await again.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    assert [c.oauth_config_id for c in listed.configs] == ["crm", "crm:eu"]
    logged = [r.getMessage() for r in captured_logs.records if r.name == "libs.config_index"]
    assert [message.split(" (")[0] for message in logged] == [
        "config index: 3 oauth config(s) found by their keys, 3 of them not indexed before",
        "config index: 1 content config(s) found by their keys, 1 of them not indexed before",
    ]


async def test_connectors_saved_before_the_index_are_listed_and_deleted(start_dispatcher, redis, secret_key):
    box = SecretBox.from_settings(resolver_settings("redis://unused", secret_key))
    key = ConnectorStore.key(WS, "sendgrid")
    connector = dpb.Connector(
        workspace_id=WS,
        connector_id="sendgrid",
        kind=dpb.CONNECTOR_KIND_SENDGRID,
        channel=common_pb2.CHANNEL_EMAIL,
        credentials={"api_key": "SG.legacy-key"},
    )
    await redis.set(key, box.seal(connector.SerializeToString(), key.encode()))
    dispatcher = await start_dispatcher()

    listed = await dispatcher.stub.ListConnectors(dpb.ListConnectorsRequest(workspace_id=WS))
    assert [(c.connector_id, c.kind) for c in listed.connectors] == [("sendgrid", dpb.CONNECTOR_KIND_SENDGRID)]
    await dispatcher.stub.DeleteConnector(dpb.DeleteConnectorRequest(workspace_id=WS, connector_id="sendgrid"))
    assert not await redis.exists(key)
    assert await indexed(redis, "connector") == []


async def test_the_backfill_may_run_in_several_processes_at_once_and_indexes_no_deleted_config(redis):
    box = SecretBox([b"k" * 32])
    for oauth_config_id in ("a", "b", "c"):
        await save_oauth_as_before(redis, box, oauth_config_id)
    await save_content_as_before(redis, box, "loyalty", "")
    await redis.set(workspace_key(WS, "content", "other", "deleted"), 1)  # a deleted config's last version
    deleted = workspace_key(WS, "oauth", "b")
    scan_iter = redis.scan_iter

    async def scan_then_delete(**kwargs):
        """SCAN gives `b`, then its delete lands before the backfill indexes it."""
        async for key in scan_iter(**kwargs):
            if key == deleted.encode():
                await redis.delete(deleted)
            yield key

    redis.scan_iter = scan_then_delete
    layouts = [OAuthConfigStore.layout, ContentApiConfigStore.layout]
    await asyncio.gather(*(config_index.backfill(redis, layout) for layout in layouts * 2))
    assert await indexed(redis, "oauth") == [b"a", b"c"]
    assert await indexed(redis, "content") == [b"loyalty"]
    assert await config_index.backfill(redis, OAuthConfigStore.layout) == 0  # marked done
