"""Lists that meet a config sealed under a key the service is not given (a key rotation rolled out of order,
a dev-mode restart): every other config is listed as usual, the unreadable one is listed by what its index
holds and marked `unreadable`, and the log names it by its Redis key, never by anything sealed in it.
Reading or using that one config still fails FAILED_PRECONDITION, and an OAuth config it may use is kept, the
refusal saying why and what mends it."""

from __future__ import annotations

import json
import os

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from cli.exits import OK
from libs import config_index
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from sandbox.pii_api import OAuthClient
from services.resolver.configs import OAuthConfigStore, PiiApiConfigStore
from services.resolver.content_apis import ContentApiConfigStore
from tests.integration.test_cli_config import WS as CLI_WS
from tests.integration.test_cli_config import run_cli, workspace_yaml
from tests.integration.test_config_lists import WS, content_config, oauth_config, resolve
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

EMAIL, SMS = common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS
STRANGER = SecretBox([os.urandom(32)])  # a key no service of the test is given


@pytest.fixture
async def api(start_pii_api_server):
    return await start_pii_api_server(oauth=OAuthClient("app", "oauth-s3cret-1"), api_key="api-s3cret-key-1")


async def sealed_elsewhere(redis, key: str, value: bytes) -> None:
    """Writes `value` at `key` sealed under a key the services do not hold, as a process with another key would."""
    await redis.set(key, STRANGER.seal(value, key.encode()))


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def logged(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


async def test_a_connector_list_goes_on_past_one_that_does_not_open(start_suite, redis, captured_logs):
    suite = await start_suite()
    ws = suite.workspace_id
    connector = suite.workspace.connectors()["sendgrid"]
    key = ConnectorStore.key(ws, "sendgrid")
    await sealed_elsewhere(redis, key, connector.SerializeToString())
    captured_logs.clear()

    listed = await suite.dispatcher.stub.ListConnectors(dpb.ListConnectorsRequest(workspace_id=ws))
    assert [(c.connector_id, c.kind, c.channel, c.unreadable) for c in listed.connectors] == [
        ("gateway", dpb.CONNECTOR_KIND_CUSTOM_HTTP, SMS, False),
        ("sendgrid", dpb.CONNECTOR_KIND_UNSPECIFIED, common_pb2.CHANNEL_UNSPECIFIED, True),
        ("twilio", dpb.CONNECTOR_KIND_TWILIO, SMS, False),
        ("whatsapp", dpb.CONNECTOR_KIND_WHATSAPP_CLOUD, common_pb2.CHANNEL_WHATSAPP, False),
    ]
    unreadable = listed.connectors[1]
    assert unreadable.version == 1 and unreadable.updated_at_ms > 0  # what the index and counter hold
    assert key in logged(captured_logs)
    for secret in (*connector.credentials.values(), connector.webhook_secret, connector.base_url, connector.sender):
        assert secret not in logged(captured_logs)
    # Listed again (a console polling it), it is not logged again for a minute.
    await suite.dispatcher.stub.ListConnectors(dpb.ListConnectorsRequest(workspace_id=ws))
    assert logged(captured_logs).count(key) == 1

    got = await refused(
        suite.dispatcher.stub.GetConnector(dpb.GetConnectorRequest(workspace_id=ws, connector_id="sendgrid"))
    )
    assert got.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert got.details().startswith(f"connector 'sendgrid' in workspace {ws!r} does not open")


async def test_pii_and_content_api_lists_go_on_past_one_that_does_not_open(resolver, api, redis, captured_logs):
    email = bulk_config(api.base_url, headers={"X-Api-Key": "api-s3cret-key-1"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=email))
    sms = single_config(api.base_url, channel=SMS, headers={"X-Api-Key": "api-s3cret-key-2"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=sms))
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=sms))
    for name in ("loyalty", "offers"):
        await resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content_config(api, name)))
    pii_key = f"{PiiApiConfigStore._base(WS, SMS)}:v:2"
    await sealed_elsewhere(redis, pii_key, sms.SerializeToString())
    content_key = f"{ContentApiConfigStore._base(WS, 'loyalty')}:v:1"
    await sealed_elsewhere(redis, content_key, content_config(api, "loyalty").SerializeToString())
    captured_logs.clear()

    pii = await resolver.stub.ListPiiApiConfigs(pb.ListPiiApiConfigsRequest(workspace_id=WS))
    assert [(c.channel, c.version, c.mode, c.unreadable) for c in pii.configs] == [
        (EMAIL, 1, pb.MODE_BULK, False),
        (SMS, 2, pb.MODE_UNSPECIFIED, True),
    ]
    assert pii.configs[1].updated_at_ms > 0
    content = await resolver.stub.ListContentApiConfigs(pb.ListContentApiConfigsRequest(workspace_id=WS))
    assert [(c.name, c.version, c.mode, c.unreadable) for c in content.configs] == [
        ("loyalty", 1, pb.MODE_UNSPECIFIED, True),
        ("offers", 1, pb.MODE_SINGLE, False),
    ]
    assert content.configs[0].updated_at_ms > 0
    text = logged(captured_logs)
    assert pii_key in text and content_key in text
    await resolver.stub.ListPiiApiConfigs(pb.ListPiiApiConfigsRequest(workspace_id=WS))
    assert logged(captured_logs).count(pii_key) == 1  # not again for a minute
    assert "s3cret" not in text and api.base_url not in text

    got = await refused(resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id=WS, channel=SMS)))
    assert got.code() == grpc.StatusCode.FAILED_PRECONDITION
    got = await refused(
        resolver.stub.GetContentApiConfig(pb.GetContentApiConfigRequest(workspace_id=WS, name="loyalty"))
    )
    assert got.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_cli_list_marks_the_config_that_does_not_open(
    start_resolver, start_dispatcher, api, redis, tmp_path, capsys
):
    resolver = await start_resolver()
    dispatcher = await start_dispatcher(resolver)
    addrs = ["--resolver-addr", f"127.0.0.1:{resolver.port}", "--dispatcher-addr", f"127.0.0.1:{dispatcher.port}"]
    config = tmp_path / "workspace.yaml"
    config.write_text(workspace_yaml(api.base_url).replace("oauth-secret-1", "oauth-s3cret-1"))
    assert await run_cli("config", "put", str(config), *addrs) == OK
    await sealed_elsewhere(redis, f"{PiiApiConfigStore._base(CLI_WS, EMAIL)}:v:1", b"")
    await sealed_elsewhere(redis, ConnectorStore.key(CLI_WS, "sg"), b"")
    await sealed_elsewhere(redis, OAuthConfigStore.key(CLI_WS, "crm"), b"")
    capsys.readouterr()

    assert await run_cli("config", "list", "--workspace", CLI_WS, *addrs) == OK
    assert [line.split(", saved ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "pii-api email: version 1, UNREADABLE (sealed under a key not configured)",
        "oauth crm: version 1, active, UNREADABLE (sealed under a key not configured)",
        "connector sg: version 1, UNREADABLE (sealed under a key not configured)",
    ]
    assert await run_cli("config", "list", "connector", "--workspace", CLI_WS, "-o", "json", *addrs[2:]) == OK
    assert [(e["name"], e.get("unreadable")) for e in json.loads(capsys.readouterr().out)] == [("sg", True)]


async def test_an_oauth_config_list_goes_on_past_one_that_does_not_open(resolver, api, redis, captured_logs):
    for name in ("crm", "erp"):
        await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api, name)))
    key = OAuthConfigStore.key(WS, "crm")
    await sealed_elsewhere(redis, key, oauth_config(api).SerializeToString())
    captured_logs.clear()

    listed = await resolver.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    # The token status is not sealed: the last token request's, made by a process that opened the config.
    assert [(c.oauth_config_id, c.version, c.status, c.unreadable) for c in listed.configs] == [
        ("crm", 1, pb.TOKEN_STATUS_ACTIVE, True),
        ("erp", 1, pb.TOKEN_STATUS_ACTIVE, False),
    ]
    assert listed.configs[0].updated_at_ms > 0
    text = logged(captured_logs)
    assert key in text and "s3cret" not in text and api.base_url not in text
    await resolver.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    assert logged(captured_logs).count(key) == 1  # not again for a minute

    got = await refused(resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm")))
    assert got.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert got.details().startswith(f"OAuth config 'crm' in workspace {WS!r} does not open")


async def test_an_oauth_config_deleted_while_its_list_is_read_is_not_listed(resolver, api, monkeypatch):
    for name in ("crm", "erp"):
        await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api, name)))
    page = config_index.page

    async def deleted_after_the_page(*args, **kwargs):
        """The page names erp; then erp is deleted, before its status and version are read."""
        found = await page(*args, **kwargs)
        await resolver.stub.DeleteOAuthConfig(pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id="erp"))
        return found

    monkeypatch.setattr(config_index, "page", deleted_after_the_page)
    listed = await resolver.stub.ListOAuthConfigs(pb.ListOAuthConfigsRequest(workspace_id=WS))
    assert [(c.oauth_config_id, c.status, c.unreadable) for c in listed.configs] == [
        ("crm", pb.TOKEN_STATUS_ACTIVE, False)
    ]


def delete_oauth(resolver, oauth_config_id: str = "crm"):
    return resolver.stub.DeleteOAuthConfig(
        pb.DeleteOAuthConfigRequest(workspace_id=WS, oauth_config_id=oauth_config_id)
    )


async def test_an_oauth_delete_refused_for_a_config_that_does_not_open_says_why_and_what_to_do(resolver, api, redis):
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    sms = single_config(api.base_url, channel=SMS, headers={"X-Api-Key": "api-s3cret-key-2"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=sms))
    await sealed_elsewhere(redis, f"{PiiApiConfigStore._base(WS, SMS)}:v:1", sms.SerializeToString())

    kept = await refused(delete_oauth(resolver))
    assert kept.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert kept.details() == (
        "oauth_config_id: OAuth config 'crm' cannot be deleted while the PII API config for channel family sms "
        "(version 1) does not open with TOKENSEND_SECRET_KEY: it was sealed under a key not configured, so whether "
        "it uses this OAuth config cannot be checked; add that key to TOKENSEND_SECRET_KEY, or save that config "
        "again with its secrets, or delete it, first"
    )

    # A config that opens and uses it is named instead: that one surely holds the delete back.
    await resolver.stub.PutContentApiConfig(
        pb.PutContentApiConfigRequest(config=content_config(api, oauth_config_id="crm"))
    )
    used = await refused(delete_oauth(resolver))
    assert "is used by content API 'loyalty' (version 1)" in used.details()
    await resolver.stub.DeleteContentApiConfig(pb.DeleteContentApiConfigRequest(workspace_id=WS, name="loyalty"))

    await resolver.stub.DeletePiiApiConfig(pb.DeletePiiApiConfigRequest(workspace_id=WS, channel=SMS))
    await delete_oauth(resolver)
    gone = await refused(resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id=WS, oauth_config_id="crm")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_an_oauth_delete_names_a_content_api_or_a_pinned_version_that_does_not_open(resolver, api, redis):
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth_config(api)))
    await resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=content_config(api)))
    content_key = f"{ContentApiConfigStore._base(WS, 'loyalty')}:v:1"
    await sealed_elsewhere(redis, content_key, content_config(api).SerializeToString())
    kept = await refused(delete_oauth(resolver))
    assert kept.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert kept.details().startswith(
        "oauth_config_id: OAuth config 'crm' cannot be deleted while content API 'loyalty' (version 1) does not open"
    )
    await resolver.stub.DeleteContentApiConfig(pb.DeleteContentApiConfigRequest(workspace_id=WS, name="loyalty"))

    # A version a campaign instance is pinned to: saving the config again does not mend it.
    email = bulk_config(api.base_url, headers={"X-Api-Key": "api-s3cret-key-1"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=email))
    assert (await resolve(resolver, "run-1")).config_version == 1
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=email))
    await sealed_elsewhere(redis, f"{PiiApiConfigStore._base(WS, EMAIL)}:v:1", email.SerializeToString())
    pinned = await refused(delete_oauth(resolver))
    assert pinned.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert pinned.details() == (
        "oauth_config_id: OAuth config 'crm' cannot be deleted while the PII API config for channel family email "
        "(version 1, which a campaign instance is pinned to) does not open with TOKENSEND_SECRET_KEY: it was sealed "
        "under a key not configured, so whether it uses this OAuth config cannot be checked; add that key to "
        "TOKENSEND_SECRET_KEY, or delete that config, or wait until the pins on that version end "
        "(TOKENSEND_PIN_TTL_SECONDS), first"
    )
