"""A token endpoint that is briefly unavailable (5xx, 429, 408, a timeout, a refused connection) is
retried as the PII API is: the config's max_retries, full jitter or Retry-After up to the limit, no
retry the callers' deadlines leave no time for; one refresh for every caller meanwhile. A refusal
of the credentials (400, 401, 403) is not retried, and is the only failure that says AUTH_FAILED."""

from __future__ import annotations

import asyncio
import random
import socket

import aiohttp
import pytest
from aiohttp import web
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver.oauth import OAuthTokens, TokenBackoff, TokenUnavailable
from tests.conftest import serving

E = pb.ResolveErrorCode
UNAVAILABLE = "token endpoint answered HTTP 503"


class Store:
    def __init__(self) -> None:
        self.statuses: list[tuple[int, str]] = []  # (status, reason), as stored

    async def set_status(self, workspace_id: str, oauth_config_id: str, status: int, reason: str, **_: object) -> None:
        self.statuses.append((status, reason))


def config(token_url: str = "https://idp.example/token") -> pb.OAuthConfig:
    return pb.OAuthConfig(workspace_id="ws", oauth_config_id="o", token_url=token_url, client_id="c")


def unavailable(retry_after: float | None = None) -> TokenUnavailable:
    return TokenUnavailable(
        UNAVAILABLE, code=E.RESOLVE_ERROR_CODE_SERVER_ERROR, retryable=True, retry_after=retry_after
    )


def scripted_endpoint(tokens: OAuthTokens, monkeypatch, answers: list) -> list[int]:
    """`tokens`' token endpoint gives `answers` in turn: a TokenUnavailable raised, an Event waited for,
    or a token. Returns the list the attempts are counted in."""
    asked: list[int] = []

    async def request_token(c: pb.OAuthConfig) -> tuple[str, float]:
        asked.append(len(asked) + 1)
        answer = answers[len(asked) - 1]
        if isinstance(answer, asyncio.Event):
            await answer.wait()
            answer = answers[len(asked)]  # what the held attempt then gives
        if isinstance(answer, TokenUnavailable):
            raise answer
        return answer, 3600.0

    monkeypatch.setattr(tokens, "request_token", request_token)
    return asked


def retrying_tokens(store: Store, slept: list[float], max_retry_after_s: float = 30.0) -> OAuthTokens:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    backoff = TokenBackoff(base_s=0.5, cap_s=5.0, max_retry_after_s=max_retry_after_s)
    return OAuthTokens(None, store, allow_private=False, backoff=backoff, sleep=sleep, rng=random.Random(7))  # type: ignore[arg-type]


async def test_statuses_say_whether_the_credentials_or_the_endpoint_failed() -> None:
    async def answer(request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        return web.json_response({"error": "x"}, status=status, headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_post("/status/{status}", answer)
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}/token"
    async with aiohttp.ClientSession() as session, serving(app) as base_url:
        tokens = OAuthTokens(session, Store(), allow_private=True)
        outcomes = {}
        for status in (400, 401, 403, 404, 408, 429, 500, 503):
            try:
                await tokens.request_token(config(f"{base_url}/status/{status}"))
            except TokenUnavailable as exc:
                outcomes[status] = (E.Name(exc.code), exc.retryable, exc.retry_after)
        try:
            await tokens.request_token(config(refused_url))
        except TokenUnavailable as exc:
            outcomes["refused"] = (E.Name(exc.code), exc.retryable, exc.retry_after)
        guarded = OAuthTokens(session, Store(), allow_private=False)
        try:
            await guarded.request_token(config(refused_url))
        except TokenUnavailable as exc:
            outcomes["private"] = (E.Name(exc.code), exc.retryable, exc.retry_after)
    assert outcomes == {
        400: ("RESOLVE_ERROR_CODE_AUTH_FAILED", False, None),
        401: ("RESOLVE_ERROR_CODE_AUTH_FAILED", False, None),
        403: ("RESOLVE_ERROR_CODE_AUTH_FAILED", False, None),
        404: ("RESOLVE_ERROR_CODE_HTTP_ERROR", False, None),
        408: ("RESOLVE_ERROR_CODE_TIMEOUT", True, 7.0),
        429: ("RESOLVE_ERROR_CODE_RATE_LIMITED", True, 7.0),
        500: ("RESOLVE_ERROR_CODE_SERVER_ERROR", True, 7.0),
        503: ("RESOLVE_ERROR_CODE_SERVER_ERROR", True, 7.0),
        "refused": ("RESOLVE_ERROR_CODE_CONNECTION_FAILED", True, None),
        "private": ("RESOLVE_ERROR_CODE_BLOCKED_URL", False, None),  # asked again, it is as private
    }


@pytest.mark.parametrize(
    "host", ["idp..example", "idp\u200b.example", "a" * 70 + ".example"], ids=["empty", "zero-width", "long"]
)
async def test_a_token_url_whose_host_the_client_cannot_use_is_not_retried(host: str) -> None:
    """Saved before such hosts were refused: asked again, the client refuses it the same."""
    async with aiohttp.ClientSession() as session:
        tokens = OAuthTokens(session, Store(), allow_private=False)
        with pytest.raises(TokenUnavailable) as caught:
            await tokens.request_token(config(f"https://{host}/token"))
    assert (caught.value.code, caught.value.retryable) == (E.RESOLVE_ERROR_CODE_CONNECTION_FAILED, False)
    assert "cannot use" in str(caught.value) and host not in str(caught.value)


async def test_a_refresh_is_retried_with_full_jitter_for_every_caller_and_stores_one_status(monkeypatch) -> None:
    store, slept = Store(), []
    tokens = retrying_tokens(store, slept)
    asked = scripted_endpoint(tokens, monkeypatch, [unavailable(), unavailable(), "token-3"])
    callers = [tokens.token(config(), wait=60, retries=3) for _ in range(5)]
    assert await asyncio.gather(*callers) == ["token-3"] * 5
    assert len(asked) == 3  # one refresh with its retries, not one each
    assert len(slept) == 2 and 0 <= slept[0] <= 0.5 and 0 <= slept[1] <= 1.0  # full jitter, doubling
    assert store.statuses == [(pb.TOKEN_STATUS_ACTIVE, "")]  # not Failed for a failure got over


async def test_a_refresh_that_still_fails_says_how_often_it_was_asked(monkeypatch) -> None:
    store, slept = Store(), []
    tokens = retrying_tokens(store, slept)
    asked = scripted_endpoint(tokens, monkeypatch, [unavailable()] * 3)
    outcomes = await asyncio.gather(*(tokens.token(config(), retries=2) for _ in range(3)), return_exceptions=True)
    assert [(o.code, o.reason) for o in outcomes] == [
        (E.RESOLVE_ERROR_CODE_SERVER_ERROR, f"{UNAVAILABLE} after 3 attempts")
    ] * 3
    assert len(asked) == 3 and len(slept) == 2
    assert store.statuses == [(pb.TOKEN_STATUS_FAILED, f"{UNAVAILABLE} after 3 attempts")]


async def test_refused_credentials_are_not_retried(monkeypatch) -> None:
    store, slept = Store(), []
    tokens = retrying_tokens(store, slept)
    refused = TokenUnavailable("token endpoint answered HTTP 401", code=E.RESOLVE_ERROR_CODE_AUTH_FAILED)
    asked = scripted_endpoint(tokens, monkeypatch, [refused, "token-2"])
    with pytest.raises(TokenUnavailable) as caught:
        await tokens.token(config(), retries=3)
    assert (caught.value.code, caught.value.reason) == (
        E.RESOLVE_ERROR_CODE_AUTH_FAILED,
        "token endpoint answered HTTP 401",
    )
    assert len(asked) == 1 and slept == []


async def test_retry_after_is_waited_for_up_to_the_limit(monkeypatch) -> None:
    store, slept = Store(), []
    tokens = retrying_tokens(store, slept, max_retry_after_s=3)
    asked = scripted_endpoint(tokens, monkeypatch, [unavailable(retry_after=2), unavailable(retry_after=60)])
    with pytest.raises(TokenUnavailable) as caught:
        await tokens.token(config(), retries=3)
    assert caught.value.reason == f"{UNAVAILABLE} after 2 attempts; Retry-After 60s is beyond the limit"
    assert len(asked) == 2 and slept == [2]


async def test_no_retry_is_made_that_the_callers_deadline_leaves_no_time_for(monkeypatch) -> None:
    store, slept = Store(), []
    tokens = retrying_tokens(store, slept)
    asked = scripted_endpoint(tokens, monkeypatch, [unavailable(retry_after=5), "token-2"])
    with pytest.raises(TokenUnavailable) as caught:
        await tokens.token(config(), wait=2, retries=3)
    reason = f"{UNAVAILABLE} after 1 attempt; no time for another before the caller's deadline"
    assert (caught.value.code, caught.value.reason) == (E.RESOLVE_ERROR_CODE_SERVER_ERROR, reason)
    assert len(asked) == 1 and slept == []
    assert store.statuses == [(pb.TOKEN_STATUS_FAILED, reason)]


async def test_a_caller_whose_deadline_comes_during_a_retry_is_told_the_endpoint_failed(monkeypatch) -> None:
    """The retry goes on for the callers with time left, and its token serves them."""
    store = Store()
    tokens = OAuthTokens(None, store, allow_private=False, backoff=TokenBackoff(0, 0, 30))  # type: ignore[arg-type]
    held = asyncio.Event()
    asked = scripted_endpoint(tokens, monkeypatch, [unavailable(), held, "token-2"])
    patient = asyncio.ensure_future(tokens.token(config(), retries=1))
    with pytest.raises(TokenUnavailable) as caught:
        await tokens.token(config(), wait=0.2, retries=1)
    assert (caught.value.code, caught.value.late) == (E.RESOLVE_ERROR_CODE_SERVER_ERROR, True)
    assert caught.value.reason == f"{UNAVAILABLE}; a retry had not answered by the caller's deadline"
    held.set()
    assert await patient == "token-2" and len(asked) == 2
    assert store.statuses == [(pb.TOKEN_STATUS_ACTIVE, "")]
