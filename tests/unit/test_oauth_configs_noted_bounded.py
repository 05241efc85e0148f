"""What the OAuth token cache notes per config (its last status, its short expires_in, each logged once)
stays bounded however many configs come and go, and a config deleted is forgotten at once."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver import oauth
from services.resolver.oauth import OAuthTokens, TokenUnavailable
from tests.conftest import serving


class Store:
    async def set_status(self, workspace_id: str, oauth_config_id: str, status: int, reason: str, **_: object) -> None:
        return None


@contextlib.asynccontextmanager
async def token_endpoint() -> AsyncIterator[tuple[str, OAuthTokens]]:
    """Its base URL: /refused answers 401, /short a token with expires_in 1; and the tokens asking it."""

    async def refused(request: web.Request) -> web.Response:
        return web.Response(status=401)

    async def short(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok", "token_type": "Bearer", "expires_in": 1})

    app = web.Application()
    app.router.add_post("/refused", refused)
    app.router.add_post("/short", short)
    async with serving(app) as base_url, aiohttp.ClientSession() as session:
        yield base_url, OAuthTokens(session, Store(), allow_private=True)  # type: ignore[arg-type]


def config(base_url: str, n: int, failing: bool) -> pb.OAuthConfig:
    path = "refused" if failing else "short"
    return pb.OAuthConfig(workspace_id="ws", oauth_config_id=f"o{n}", token_url=f"{base_url}/{path}", client_id=f"c{n}")


async def asked(tokens: OAuthTokens, c: pb.OAuthConfig) -> None:
    with contextlib.suppress(TokenUnavailable):
        await tokens.token(c)


async def test_configs_coming_and_going_leave_a_bounded_record(monkeypatch) -> None:
    monkeypatch.setattr(oauth, "CONFIGS_NOTED", 8)
    async with token_endpoint() as (base_url, tokens):
        for n in range(100):  # every other one refused; the others given a short expires_in
            await asked(tokens, config(base_url, n, failing=n % 2 == 0))
    assert len(tokens._known_status) == 8
    assert len(tokens._odd_lifetimes) == 8
    assert ("ws", "o99") in tokens._known_status and ("ws", "o0") not in tokens._known_status  # oldest went
    assert ("ws", "o99") in tokens._odd_lifetimes and ("ws", "o1") not in tokens._odd_lifetimes


async def test_a_failure_is_still_logged_once_while_its_config_is_recent(monkeypatch, caplog) -> None:
    monkeypatch.setattr(oauth, "CONFIGS_NOTED", 8)
    caplog.set_level(logging.WARNING, logger=oauth.__name__)
    async with token_endpoint() as (base_url, tokens):
        for _ in range(3):
            for n in range(4):  # fewer configs than the bound: each remembered
                await asked(tokens, config(base_url, n, failing=n == 0))
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failures == ["OAuth config ws/o0 failed: token endpoint answered HTTP 401"]
    assert len([r for r in caplog.records if "expires_in" in r.getMessage()]) == 3  # o1, o2, o3, once each


async def test_a_deleted_config_is_forgotten(caplog) -> None:
    caplog.set_level(logging.WARNING, logger=oauth.__name__)
    async with token_endpoint() as (base_url, tokens):
        await asked(tokens, config(base_url, 1, failing=True))
        await asked(tokens, config(base_url, 2, failing=False))
        assert set(tokens._known_status) == {("ws", "o1"), ("ws", "o2")} and set(tokens._odd_lifetimes) == {
            ("ws", "o2")
        }
        for n in ("o1", "o2", "never-seen"):
            tokens.forget("ws", n)
        assert not tokens._known_status and not tokens._odd_lifetimes
        await asked(tokens, config(base_url, 1, failing=True))  # saved again under the same ID, failing: news again
    assert len([r for r in caplog.records if "ws/o1 failed" in r.getMessage()]) == 2
