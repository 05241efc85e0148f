"""Optimistic concurrency on saved configs: two operators who read, edit and save one config.

A Put or Delete that carries the version its caller read is refused (ABORTED, naming the version the
config is at) once another change came first, and changes nothing; one without it behaves as before.
"""

from __future__ import annotations

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.crypto import SecretBox
from sandbox.pii_api import OAuthClient
from services.resolver.configs import PiiApiConfigStore
from tests.integration.test_config_lists import WS, content_config, oauth_config, refused
from tests.pii_configs import bulk_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
ABORTED = grpc.StatusCode.ABORTED


@pytest.fixture
async def api(start_pii_api_server):
    return await start_pii_api_server(oauth=OAuthClient("app", "oauth-s3cret-1"), api_key="api-s3cret-key-1")


def pii_config(api, batch_size: int) -> pb.PiiApiConfig:
    return bulk_config(api.base_url, headers={"X-Api-Key": "api-s3cret-key-1"}, batch_size=batch_size)


def connector(sender: str) -> dpb.Connector:
    return dpb.Connector(
        workspace_id=WS,
        connector_id="sg",
        kind=dpb.CONNECTOR_KIND_SENDGRID,
        channel=EMAIL,
        credentials={"api_key": "SG.key-1"},
        sender=sender,
    )


async def test_pii_api_config_second_writer_of_a_version_is_refused(resolver, api):
    stub = resolver.stub
    await stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=pii_config(api, 10)))
    read = await stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id=WS, channel=EMAIL))
    assert read.version == 1

    first = await stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=pii_config(api, 20), expected_version=1))
    assert first.version == 2
    second = await refused(
        stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=pii_config(api, 30), expected_version=1))
    )
    assert second.code() == ABORTED
    assert second.details().startswith("expected_version: PII API config for workspace 'ws-1', channel family email")
    assert "is at version 2, not version 1" in second.details()
    now = await stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id=WS, channel=EMAIL))
    assert (now.version, now.config.batch_size) == (2, 20)  # the first writer's edit, nothing of the second's

    stale = await refused(
        stub.DeletePiiApiConfig(pb.DeletePiiApiConfigRequest(workspace_id=WS, channel=EMAIL, expected_version=1))
    )
    assert stale.code() == ABORTED and "is at version 2" in stale.details()
    assert (await stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id=WS, channel=EMAIL))).version == 2

    # Without the field, as before: saved whatever the version.
    assert (await stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=pii_config(api, 30)))).version == 3
    listed = await stub.ListPiiApiConfigs(pb.ListPiiApiConfigsRequest(workspace_id=WS))
    assert [c.version for c in listed.configs] == [3]
    deleted = await stub.DeletePiiApiConfig(
        pb.DeletePiiApiConfigRequest(workspace_id=WS, channel=EMAIL, expected_version=3)
    )
    assert deleted.version == 3
    # A version read before the deletion never matches the config saved after it.
    gone = await refused(
        stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=pii_config(api, 40), expected_version=3))
    )
    assert gone.code() == ABORTED and "does not exist" in gone.details()


async def test_content_api_config_second_writer_of_a_version_is_refused(resolver, api):
    stub = resolver.stub
    await stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content_config(api, timeout_ms=100)))
    first = await stub.PutContentApiConfig(
        pb.PutContentApiConfigRequest(config=content_config(api, timeout_ms=200), expected_version=1)
    )
    assert first.version == 2
    second = await refused(
        stub.PutContentApiConfig(
            pb.PutContentApiConfigRequest(config=content_config(api, timeout_ms=300), expected_version=1)
        )
    )
    assert second.code() == ABORTED
    assert second.details().startswith("expected_version: content API 'loyalty' in workspace 'ws-1' is at version 2")
    now = await stub.GetContentApiConfig(pb.GetContentApiConfigRequest(workspace_id=WS, name="loyalty"))
    assert (now.version, now.config.timeout_ms) == (2, 200)

    request = pb.DeleteContentApiConfigRequest(workspace_id=WS, name="loyalty", expected_version=1)
    assert (await refused(stub.DeleteContentApiConfig(request))).code() == ABORTED
    assert (await stub.ListContentApiConfigs(pb.ListContentApiConfigsRequest(workspace_id=WS))).configs[0].version == 2
    assert (await stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content_config(api)))).version == 3
    request.expected_version = 3
    assert (await stub.DeleteContentApiConfig(request)).version == 3


async def test_oauth_config_second_writer_of_a_version_is_refused(resolver, api):
    stub = resolver.stub
    saved = await stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    assert saved.config.version == 1
    read = await stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    assert read.config.version == 1

    edited = oauth_config(api)
    edited.scope = "first"
    assert (await stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=edited, expected_version=1))).config.version == 2
    edited.scope = "second"
    asked = api.sandbox.stats.token_requests
    second = await refused(stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=edited, expected_version=1)))
    assert second.code() == ABORTED
    assert api.sandbox.stats.token_requests == asked  # refused before the token endpoint was asked
    assert second.details().startswith("expected_version: OAuth config 'crm' in workspace 'ws-1' is at version 2")
    now = await stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm"))
    assert (now.config.version, now.config.scope) == (2, "first")
    listed = await stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    assert [c.version for c in listed.configs] == [2]

    request = pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm", expected_version=1)
    assert (await refused(stub.DeleteOAuthConfig(request))).code() == ABORTED
    assert (await stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))).config.version == 3
    request.expected_version = 3
    await stub.DeleteOAuthConfig(request)
    # Saved again under the same ID, it goes on from the deleted version.
    again = await stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    assert again.config.version == 4


async def test_connector_second_writer_of_a_version_is_refused(resolver, start_dispatcher):
    stub = (await start_dispatcher(resolver)).stub
    saved = await stub.PutConnector(dpb.PutConnectorRequest(connector=connector("a@brand.example")))
    assert saved.connector.version == 1
    read = await stub.GetConnector(dpb.GetConnectorRequest(workspace_id=WS, connector_id="sg"))
    assert read.connector.version == 1

    first = await stub.PutConnector(dpb.PutConnectorRequest(connector=connector("b@brand.example"), expected_version=1))
    assert first.connector.version == 2
    second = await refused(
        stub.PutConnector(dpb.PutConnectorRequest(connector=connector("c@brand.example"), expected_version=1))
    )
    assert second.code() == ABORTED
    assert second.details().startswith("expected_version: connector 'sg' in workspace 'ws-1' is at version 2")
    now = await stub.GetConnector(dpb.GetConnectorRequest(workspace_id=WS, connector_id="sg"))
    assert (now.connector.version, now.connector.sender) == (2, "b@brand.example")
    listed = await stub.ListConnectors(dpb.ListConnectorsRequest(workspace_id=WS))
    assert [c.version for c in listed.connectors] == [2]

    request = dpb.DeleteConnectorRequest(workspace_id=WS, connector_id="sg", expected_version=1)
    assert (await refused(stub.DeleteConnector(request))).code() == ABORTED
    assert (await stub.GetConnector(dpb.GetConnectorRequest(workspace_id=WS, connector_id="sg"))).connector.version == 2
    # Without the field, as before; a version sent inside the connector is the server's to set.
    unconditional = connector("d@brand.example")
    unconditional.version = 1
    assert (await stub.PutConnector(dpb.PutConnectorRequest(connector=unconditional))).connector.version == 3
    request.expected_version = 3
    await stub.DeleteConnector(request)
    gone = await refused(
        stub.PutConnector(dpb.PutConnectorRequest(connector=connector("e@brand.example"), expected_version=3))
    )
    assert gone.code() == ABORTED and "does not exist" in gone.details()


async def test_deleting_a_config_saved_many_times_touches_only_the_versions_that_can_exist(resolver, redis, api):
    store = PiiApiConfigStore(redis, SecretBox.from_settings(resolver.settings), versions_kept=3, pin_ttl_seconds=60)
    config = pii_config(api, 10)
    await store.save(config)
    await store.load(WS, EMAIL, campaign_instance_id="run-1")  # pins version 1 past the window
    base = "ts:{ws-1}:pii:email"
    await redis.set(f"{base}:latest", 500_000)  # as if saved half a million times
    for _ in range(3):
        await store.save(config)
    stored = sorted([key async for key in redis.scan_iter(match=f"{base}:v:*")])
    assert stored == [f"{base}:v:{v}".encode() for v in (1, 500_001, 500_002, 500_003)]

    before = await redis.info("commandstats")
    assert await store.delete(WS, EMAIL) == 500_003
    after = await redis.info("commandstats")
    dels = after["cmdstat_del"]["calls"] - before.get("cmdstat_del", {"calls": 0})["calls"]
    assert dels < 20  # the kept versions and the pinned one, not every number since the last delete
    assert [key async for key in redis.scan_iter(match=f"{base}:v:*")] == []


@pytest.mark.parametrize("asked", [2**64 - 1, 2**63, 2**53 + 1])
async def test_a_version_past_any_save_is_named_as_asked(resolver, api, asked):
    """A uint64 version no save has made is NOT_FOUND naming it as the caller wrote it, whatever its size:
    never as another number (a negative one, or one rounded to a float's precision)."""
    stub = resolver.stub
    await stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=pii_config(api, 10)))
    await stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content_config(api)))
    calls = {
        "PII API config for workspace 'ws-1', channel family email": [
            stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id=WS, channel=EMAIL, version=asked)),
            stub.ResolveContacts(
                pb.ResolveContactsRequest(
                    workspace_id=WS, channel=EMAIL, anonymous_ids=["cust-000001"], config_version=asked
                )
            ),
        ],
        "content API 'loyalty' in workspace 'ws-1'": [
            stub.GetContentApiConfig(pb.GetContentApiConfigRequest(workspace_id=WS, name="loyalty", version=asked)),
            stub.ResolveContacts(
                pb.ResolveContactsRequest(
                    workspace_id=WS,
                    channel=EMAIL,
                    anonymous_ids=["cust-000001"],
                    content_api_names=["loyalty"],
                    content_api_versions={"loyalty": asked},
                )
            ),
        ],
    }
    for what, pending in calls.items():
        for call in pending:
            error = await refused(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error.details() == f"{what}: there is no version {asked} (the latest is 1)"
