"""TOKENSEND_EGRESS_PROXY: PII API, token endpoint and content API calls all leave through the proxy."""

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import OAuthClient
from tests.integration.beyond import ContentApiPeer, ForwardProxy
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration


@pytest.fixture
async def proxy():
    proxy = ForwardProxy()
    await proxy.start()
    yield proxy
    await proxy.stop()


async def test_every_call_to_the_brand_goes_through_the_proxy(start_resolver, start_pii_api_server, proxy):
    api = await start_pii_api_server(oauth=OAuthClient("cid", "csecret"))
    content = ContentApiPeer(loyalty={"cust-000001": {"points": 7}})
    await content.start()
    try:
        resolver = await start_resolver(egress_proxy=proxy.url)
        stub = resolver.stub
        oauth = await stub.PutOAuthConfig(
            pb.PutOAuthConfigRequest(
                config=pb.OAuthConfig(
                    workspace_id="ws",
                    oauth_config_id="o1",
                    token_url=f"{api.base_url}/oauth/token",
                    client_id="cid",
                    client_secret="csecret",
                )
            )
        )
        assert oauth.config.status == pb.TOKEN_STATUS_ACTIVE
        await stub.PutPiiApiConfig(
            pb.PutPiiApiConfigRequest(config=bulk_config(api.base_url, workspace_id="ws", oauth_config_id="o1"))
        )
        await stub.PutPiiApiConfig(
            pb.PutPiiApiConfigRequest(
                config=single_config(
                    api.base_url, workspace_id="ws", channel=common_pb2.CHANNEL_SMS, oauth_config_id="o1"
                )
            )
        )
        await stub.PutContentApiConfig(
            pb.PutContentApiConfigRequest(
                config=pb.ContentApiConfig(
                    workspace_id="ws",
                    name="loyalty",
                    mode=pb.MODE_SINGLE,
                    method=pb.HTTP_METHOD_GET,
                    url=f"{content.base_url}/loyalty/@anonymous_id",
                    field_paths={"points": "member.points"},
                )
            )
        )
        email = await stub.ResolveContacts(
            pb.ResolveContactsRequest(
                workspace_id="ws",
                channel=common_pb2.CHANNEL_EMAIL,
                anonymous_ids=["cust-000001", "cust-000002"],
                content_api_names=["loyalty"],
            )
        )
        assert email.contacts[0].contact and email.contacts[0].content["loyalty"].fields["points"] == "7"
        sms = await stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws", channel=common_pb2.CHANNEL_SMS, anonymous_ids=["cust-000003"])
        )
        assert sms.contacts[0].contact.startswith("+")
    finally:
        await content.stop()
    through = " ".join(proxy.seen)
    assert f"POST {api.base_url}/oauth/token" in through  # the token endpoint
    assert f"POST {api.base_url}/v1/customers:batchGet" in through  # the PII API, bulk
    assert f"GET {api.base_url}/v1/customers/cust-000003" in through  # the PII API, single
    assert f"GET {content.base_url}/loyalty/cust-000001" in through  # the content API
    assert api.sandbox.stats.requests == sum(1 for s in proxy.seen if api.base_url in s)  # nothing went around it
