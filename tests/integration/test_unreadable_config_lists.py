"""Lists that meet a config sealed under a key the service is not given (a key rotation rolled out of order,
a dev-mode restart): every other config is listed as usual, the unreadable one is listed by what its index
holds and marked `unreadable`, and the log names it by its Redis key, never by anything sealed in it.
Reading or using that one config still fails FAILED_PRECONDITION."""

from __future__ import annotations

import json
import os

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from cli.exits import OK
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from sandbox.pii_api import OAuthClient
from services.resolver.configs import PiiApiConfigStore
from services.resolver.content_apis import ContentApiConfigStore
from tests.integration.test_cli_config import WS as CLI_WS
from tests.integration.test_cli_config import run_cli, workspace_yaml
from tests.integration.test_config_lists import WS, content_config
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
    capsys.readouterr()

    assert await run_cli("config", "list", "--workspace", CLI_WS, *addrs) == OK
    assert [line.split(", saved ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "pii-api email: version 1, UNREADABLE (sealed under a key not configured)",
        "oauth crm: version 1, active",
        "connector sg: version 1, UNREADABLE (sealed under a key not configured)",
    ]
    assert await run_cli("config", "list", "connector", "--workspace", CLI_WS, "-o", "json", *addrs[2:]) == OK
    assert [(e["name"], e.get("unreadable")) for e in json.loads(capsys.readouterr().out)] == [("sg", True)]
