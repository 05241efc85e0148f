"""An OAuth config deleted is forgotten by the resolver that deleted it: one saved again under its ID is
news, its odd token lifetime logged again, and nothing of it is left behind in the process."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver import oauth
from tests.conftest import serving

pytestmark = pytest.mark.integration


async def test_a_config_saved_again_after_its_deletion_is_news(resolver, caplog):
    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok", "token_type": "Bearer", "expires_in": 0})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    caplog.set_level(logging.WARNING, logger=oauth.__name__)
    async with serving(app) as base_url:
        config = pb.OAuthConfig(
            workspace_id="ws-1",
            oauth_config_id="o1",
            token_url=f"{base_url}/oauth/token",
            client_id="c",
            client_secret="s",
        )
        for _ in range(2):
            for _ in range(2):  # saved twice: its expires_in 0 is logged once
                saved = await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=config))
                assert saved.config.status == pb.TOKEN_STATUS_ACTIVE
            await resolver.stub.DeleteOAuthConfig(
                pb.DeleteOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="o1")
            )
    odd = [r.getMessage() for r in caplog.records if "expires_in" in r.getMessage()]
    assert len(odd) == 2  # once for each life of the config
    assert odd[0] == odd[1] and odd[0].startswith("OAuth config ws-1/o1: token endpoint gave expires_in 0;")
