"""A token request still out when its OAuth config is saved again with other credentials, or deleted,
does not have the last word on the config's status: the save stored its own (a token endpoint fixed
and saved ACTIVE is not shown Failed by the old credentials' late answer), and a deleted config leaves
no status behind. A save with the same credentials leaves the request's status standing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.crypto import SecretBox
from services.resolver.configs import OAuthConfigStore
from services.resolver.oauth import OAuthTokens, TokenUnavailable
from tests.conftest import serving

pytestmark = pytest.mark.integration


class Endpoint:
    """A token endpoint that holds each request until `answer` is set, then refuses it (HTTP 401)."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def token(self, request: web.Request) -> web.Response:
        self.asked.set()
        await self.answer.wait()
        return web.Response(status=401)


@pytest.fixture
async def setup(redis) -> AsyncIterator[tuple[Endpoint, OAuthConfigStore, OAuthTokens, str]]:
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_post("/token", endpoint.token)
    store = OAuthConfigStore(redis, SecretBox([b"k" * 32]))
    async with serving(app) as base_url, aiohttp.ClientSession() as session:
        yield endpoint, store, OAuthTokens(session, store, allow_private=True), f"{base_url}/token"


def config(token_url: str, secret: str) -> pb.OAuthConfig:
    return pb.OAuthConfig(
        workspace_id="ws", oauth_config_id="o1", token_url=token_url, client_id="c", client_secret=secret
    )


async def refused_after(endpoint: Endpoint, tokens: OAuthTokens, asked_with: pb.OAuthConfig, meanwhile) -> None:
    """A token request with `asked_with`, `meanwhile` done while it is out, then the endpoint's 401."""
    refresh = asyncio.create_task(tokens.token(asked_with))
    await asyncio.wait_for(endpoint.asked.wait(), 5)
    await meanwhile()
    endpoint.answer.set()
    with pytest.raises(TokenUnavailable, match="HTTP 401"):
        await asyncio.wait_for(refresh, 5)


async def test_a_save_with_other_credentials_keeps_its_own_status(setup):
    endpoint, store, tokens, token_url = setup
    old = config(token_url, "revoked")
    await store.save(pb.OAuthConfig(**{**_fields(old), "status": pb.TOKEN_STATUS_ACTIVE}))
    fixed = pb.OAuthConfig(**{**_fields(old), "client_secret": "rotated", "status": pb.TOKEN_STATUS_ACTIVE})
    await refused_after(endpoint, tokens, old, lambda: store.save(fixed))
    saved = await store.load("ws", "o1")
    assert (saved.status, saved.status_reason) == (pb.TOKEN_STATUS_ACTIVE, "")


async def test_a_deleted_config_leaves_no_status_behind(setup, redis):
    endpoint, store, tokens, token_url = setup
    old = config(token_url, "s")
    await store.save(pb.OAuthConfig(**{**_fields(old), "status": pb.TOKEN_STATUS_ACTIVE}))

    async def delete() -> None:
        assert await store.delete("ws", "o1", await store.uses("ws", "o1"))

    await refused_after(endpoint, tokens, old, delete)
    assert not await redis.exists(f"{OAuthConfigStore.key('ws', 'o1')}:status")


async def test_a_save_with_the_same_credentials_takes_the_requests_status(setup):
    endpoint, store, tokens, token_url = setup
    old = config(token_url, "s")
    await store.save(pb.OAuthConfig(**{**_fields(old), "status": pb.TOKEN_STATUS_ACTIVE}))
    again = pb.OAuthConfig(**{**_fields(old), "status": pb.TOKEN_STATUS_ACTIVE})
    await refused_after(endpoint, tokens, old, lambda: store.save(again))
    saved = await store.load("ws", "o1")
    assert (saved.status, saved.status_reason) == (pb.TOKEN_STATUS_FAILED, "token endpoint answered HTTP 401")


def _fields(config: pb.OAuthConfig) -> dict[str, object]:
    return {field.name: value for field, value in config.ListFields()}
