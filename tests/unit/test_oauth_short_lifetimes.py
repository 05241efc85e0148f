"""A token endpoint answering expires_in 0, negative or a few seconds: the token serves this call and is
kept MIN_TOKEN_LIFETIME_SECONDS (a 401 refreshes it sooner), and the odd lifetime is logged once a config."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver import oauth
from services.resolver.oauth import MIN_TOKEN_LIFETIME_SECONDS, OAuthTokens
from tests.conftest import serving


class Store:
    async def set_status(self, workspace_id: str, oauth_config_id: str, status: int, reason: str, **_: object) -> None:
        return None


def config(oauth_config_id: str = "o1", token_url: str = "http://127.0.0.1:1/token") -> pb.OAuthConfig:
    return pb.OAuthConfig(workspace_id="ws", oauth_config_id=oauth_config_id, token_url=token_url, client_id="c")


@pytest.mark.parametrize("expires_in", [0, -5, 1, 29.5, "0", True])
async def test_a_short_lifetime_is_kept_the_floor_then_refreshed(expires_in, caplog) -> None:
    issued = [0]

    async def token(request: web.Request) -> web.Response:
        issued[0] += 1
        return web.json_response({"access_token": f"tok-{issued[0]}", "token_type": "Bearer", "expires_in": expires_in})

    app = web.Application()
    app.router.add_post("/token", token)
    now = [1000.0]
    caplog.set_level(logging.WARNING, logger=oauth.__name__)
    async with serving(app) as base_url, aiohttp.ClientSession() as session:
        tokens = OAuthTokens(session, Store(), allow_private=True, clock=lambda: now[0])  # type: ignore[arg-type]
        c = config(token_url=f"{base_url}/token")
        for _ in range(5):
            assert await tokens.token(c) == "tok-1"  # this call's, and the next ones'
        now[0] += MIN_TOKEN_LIFETIME_SECONDS * 0.85
        assert await tokens.token(c) == "tok-1"
        now[0] += MIN_TOKEN_LIFETIME_SECONDS * 0.1  # past the floor less its 10 % margin
        assert await tokens.token(c) == "tok-2"
        assert await tokens.token(c, rejected="tok-2") == "tok-3"  # a 401 still refreshes at once
    assert issued[0] == 3
    odd = [r for r in caplog.records if "expires_in" in r.getMessage()]
    assert len(odd) == 1  # once for the config, however many tokens
    assert odd[0].getMessage().startswith("OAuth config ws/o1: token endpoint gave expires_in ")
    assert "tok-" not in odd[0].getMessage()


async def test_a_usual_lifetime_is_kept_as_it_is_and_not_logged(caplog) -> None:
    tokens = OAuthTokens(None, Store(), allow_private=False)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger=oauth.__name__)

    async def request_token(c: pb.OAuthConfig) -> tuple[str, float]:
        return "tok", 3600.0

    tokens.request_token = request_token  # type: ignore[method-assign]
    assert await tokens.token(config()) == "tok"
    assert not caplog.records
