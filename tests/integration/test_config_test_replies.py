"""The Test screens show an API's reply as it came, but never the config's own secrets: an API that quotes
back the key, query value or access token it was sent has them masked, as a read masks them."""

from __future__ import annotations

import pytest
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import OAuthClient
from tests.canary import hits, secret_needles
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration

API_KEY = "pii-api-k3y-4c1d9e"
TENANT = "tenant-s3cret+5"  # percent-encoded when sent, and when quoted back
CLIENT_SECRET = "oauth-s3cret-31"
MASK = "********"


def reply_texts(reply: pb.TestPiiApiConfigResponse | pb.TestContentApiConfigResponse) -> list[str]:
    return [reply.response_body, *reply.response_keys, reply.error.detail, reply.error.message]


async def test_an_api_quoting_back_the_config_s_secrets_shows_them_masked(resolver, start_pii_api_server):
    api = await start_pii_api_server(api_key=API_KEY, oauth=OAuthClient("brand-client", CLIENT_SECRET))
    oauth = pb.OAuthConfig(
        workspace_id="ws-1",
        oauth_config_id="brand",
        token_url=f"{api.base_url}/oauth/token",
        client_id="brand-client",
        client_secret=CLIENT_SECRET,
    )
    assert (await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth))).config.status == (
        pb.TOKEN_STATUS_ACTIVE
    )
    secrets = {"headers": {"X-Api-Key": API_KEY}, "query_params": {"tenant": TENANT}, "oauth_config_id": "brand"}
    pii_config = single_config(api.base_url, max_retries=0, **secrets)
    content_config = pb.ContentApiConfig(
        workspace_id="ws-1",
        name="profile",
        mode=pb.MODE_SINGLE,
        method=pb.HTTP_METHOD_GET,
        url=f"{api.base_url}/v1/customers/@anonymous_id",
        field_paths={"first_name": "customer.profile.first_name"},
        max_retries=0,
        **secrets,
    )
    api.sandbox.faults.fail_status, api.sandbox.faults.fail_count = 500, -1
    api.sandbox.faults.echo_credentials_in_errors = True

    tested = await resolver.stub.TestPiiApiConfig(
        pb.TestPiiApiConfigRequest(config=pii_config, test_anonymous_id="cust-000001")
    )
    content = await resolver.stub.TestContentApiConfig(
        pb.TestContentApiConfigRequest(config=content_config, test_anonymous_id="cust-000001")
    )

    tokens = list(api.sandbox._tokens)  # the access tokens the sandbox issued
    assert tokens
    for reply in (tested, content):
        assert reply.http_status == 500 and reply.error.code == pb.RESOLVE_ERROR_CODE_SERVER_ERROR
        assert "injected_failure" in reply.response_body  # the reply itself is shown
        assert f"Bearer {MASK}" in reply.response_body and f'"x_api_key": "{MASK}"' in reply.response_body
        assert f'"query": "tenant={MASK}"' in reply.response_body
        assert "request.query" in reply.response_keys
        assert hits(secret_needles(API_KEY, TENANT, *tokens), reply_texts(reply)) == []


async def test_a_short_secret_quoted_back_is_masked_where_it_stands_whole(resolver, start_pii_api_server):
    """A key of a few characters is masked too, in each form the reply quotes it; the words and numbers
    that merely hold its letters are shown as they came."""
    api = await start_pii_api_server(api_key="k3y")
    secrets = {"headers": {"X-Api-Key": "k3y"}, "query_params": {"tenant": "t+5"}}
    api.sandbox.faults.fail_status, api.sandbox.faults.fail_count = 500, -1
    api.sandbox.faults.echo_credentials_in_errors = True

    reply = await resolver.stub.TestPiiApiConfig(
        pb.TestPiiApiConfigRequest(
            config=single_config(api.base_url, max_retries=0, **secrets), test_anonymous_id="cust-000001"
        )
    )

    assert reply.http_status == 500 and "injected_failure" in reply.response_body
    assert f'"x_api_key": "{MASK}"' in reply.response_body
    assert f'"query": "tenant={MASK}"' in reply.response_body  # sent, and quoted back, as t%2B5
    assert "request.x_api_key" in reply.response_keys  # a path holding the key's letters is not cut
    assert hits(secret_needles("k3y", "t+5"), reply_texts(reply)) == []
