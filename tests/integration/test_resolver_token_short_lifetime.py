"""A token endpoint that answers expires_in 0 (or negative, or a few seconds) is not asked on every
ResolveContacts: its token is kept the resolver's floor, and a 401 from the PII API still refreshes it."""

from __future__ import annotations

import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from tests.conftest import serving
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("expires_in", [0, -1, 2])
async def test_a_token_due_at_once_is_kept_for_the_next_calls(resolver, pii_api, customers, expires_in):
    asked = [0]

    async def token(request: web.Request) -> web.Response:
        asked[0] += 1
        return web.json_response({"access_token": f"tok-{asked[0]}", "token_type": "Bearer", "expires_in": expires_in})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    async with serving(app) as base_url:
        config = pb.OAuthConfig(
            workspace_id="ws-1",
            oauth_config_id="o1",
            token_url=f"{base_url}/oauth/token",
            client_id="c",
            client_secret="s",
        )
        saved = await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=config))
        assert saved.config.status == pb.TOKEN_STATUS_ACTIVE
        await resolver.stub.PutPiiApiConfig(
            pb.PutPiiApiConfigRequest(config=single_config(pii_api.base_url, oauth_config_id="o1"))
        )
        for n in range(5):
            request = pb.ResolveContactsRequest(
                workspace_id="ws-1", channel=common_pb2.CHANNEL_EMAIL, anonymous_ids=[f"cust-{n + 1:06d}"]
            )
            reply = await resolver.stub.ResolveContacts(request, timeout=10)
            assert reply.contacts[0].contact == customers[f"cust-{n + 1:06d}"].email
    assert asked[0] == 1  # the save's token served every call
