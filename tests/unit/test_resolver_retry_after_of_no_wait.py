"""A Retry-After of no wait (0, or a date already past: the API's clock behind ours), from a PII API or
a token endpoint, backs off as if none were sent: honoured as given, every retry would go out within
milliseconds to an API that is throttling or failing."""

from __future__ import annotations

import random

import aiohttp
import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.backoff import full_jitter_delay
from services.resolver.circuit import CircuitBreaker
from services.resolver.oauth import OAuthTokens, TokenBackoff, TokenUnavailable
from services.resolver.pii_client import PiiApiClient
from tests.conftest import resolver_settings, serving
from tests.pii_configs import single_config

E = pb.ResolveErrorCode
NO_WAIT = ["0", "Wed, 21 Oct 2015 07:28:00 GMT"]


def jitter(retries: int, base_s: float, cap_s: float) -> list[float]:
    rng = random.Random(7)
    return [full_jitter_delay(retry, base_s, cap_s, rng) for retry in range(1, retries + 1)]


@pytest.mark.parametrize("retry_after", NO_WAIT, ids=["zero", "a-date-past"])
async def test_a_pii_api_asking_for_no_wait_gets_backoff(retry_after: str) -> None:
    asked: list[int] = []

    async def customer(request: web.Request) -> web.Response:
        asked.append(1)
        if len(asked) <= 3:
            status = 429 if len(asked) < 3 else 503
            return web.json_response({"error": "busy"}, status=status, headers={"Retry-After": retry_after})
        return web.json_response({"customer": {"email": "ann@example.org"}})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", customer)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    settings = resolver_settings("redis://127.0.0.1:1/0", pii_retry_base_ms=1000, pii_retry_max_ms=8000)
    async with serving(app) as base_url, aiohttp.ClientSession() as session:
        client = PiiApiClient(
            session,
            None,  # type: ignore[arg-type]  # no OAuth
            None,  # type: ignore[arg-type]
            CircuitBreaker(100, 1),
            settings,
            None,  # type: ignore[arg-type]  # no rate limit
            sleep=sleep,
            rng=random.Random(7),
        )
        contacts = pb.ResolveContactsResponse().contacts
        config = single_config(base_url, max_retries=3, attribute_paths={})
        await client.resolve(config, common_pb2.CHANNEL_EMAIL, ["cust-1"], None, contacts)
    assert contacts[0].contact == "ann@example.org" and len(asked) == 4
    assert slept == jitter(3, 1.0, 8.0) and sum(slept) > 1.0


async def test_a_token_endpoint_asking_for_no_wait_gets_backoff(monkeypatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    class Store:
        async def set_status(self, *_: object, **__: object) -> None:
            return None

    backoff = TokenBackoff(base_s=0.5, cap_s=5.0, max_retry_after_s=30.0)
    tokens = OAuthTokens(None, Store(), allow_private=False, backoff=backoff, sleep=sleep, rng=random.Random(7))  # type: ignore[arg-type]
    answers = [0.0, 0.0, None]

    async def request_token(config: pb.OAuthConfig) -> tuple[str, float]:
        retry_after = answers.pop(0)
        if retry_after is not None:
            raise TokenUnavailable(
                "token endpoint answered HTTP 429",
                code=E.RESOLVE_ERROR_CODE_RATE_LIMITED,
                retryable=True,
                retry_after=retry_after,
            )
        return "token", 3600.0

    monkeypatch.setattr(tokens, "request_token", request_token)
    config = pb.OAuthConfig(workspace_id="ws", oauth_config_id="o", token_url="https://idp.example/token")
    assert await tokens.token(config, wait=60, retries=3) == "token"
    assert slept == jitter(2, 0.5, 5.0)
