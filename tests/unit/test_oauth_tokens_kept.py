"""The OAuth token cache keeps a bounded number of tokens: each scope or rotated secret adds one. A
refresh is shared by the callers that need it meanwhile, each waiting only until its own deadline."""

from __future__ import annotations

import asyncio

import pytest
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver import oauth
from services.resolver.oauth import OAuthTokens


class Store:
    def __init__(self) -> None:
        self.statuses: list[tuple[int, str]] = []  # (status, reason), as stored

    async def set_status(self, workspace_id: str, oauth_config_id: str, status: int, reason: str, **_: object) -> None:
        self.statuses.append((status, reason))


def config(n: int) -> pb.OAuthConfig:
    return pb.OAuthConfig(
        workspace_id="ws", oauth_config_id="o", token_url="https://idp.example/token", client_id="c", scope=f"s{n}"
    )


async def test_the_oldest_token_makes_room_and_is_fetched_again_when_needed(monkeypatch) -> None:
    monkeypatch.setattr(oauth, "TOKENS_KEPT", 3)
    tokens = OAuthTokens(None, Store(), allow_private=False)  # type: ignore[arg-type]
    fetched: list[str] = []

    async def request_token(c: pb.OAuthConfig) -> tuple[str, float]:
        fetched.append(c.scope)
        return f"token-{c.scope}", 3600.0

    monkeypatch.setattr(tokens, "request_token", request_token)
    for n in range(4):
        assert await tokens.token(config(n)) == f"token-s{n}"
    assert await tokens.token(config(3)) == "token-s3" and fetched == ["s0", "s1", "s2", "s3"]  # kept
    assert await tokens.token(config(0)) == "token-s0" and fetched[-1] == "s0"  # made room: fetched again


async def test_a_refresh_goes_on_when_redis_cannot_take_the_status(monkeypatch) -> None:
    class Down:
        async def set_status(self, *_: object, **__: object) -> None:
            raise ConnectionError("redis down")

    now = [0.0]
    tokens = OAuthTokens(None, Down(), allow_private=False, clock=lambda: now[0])  # type: ignore[arg-type]

    async def request_token(c: pb.OAuthConfig) -> tuple[str, float]:
        return f"token-{now[0]}", 60.0

    monkeypatch.setattr(tokens, "request_token", request_token)
    assert await tokens.token(config(0)) == "token-0.0"
    now[0] = 100.0  # expired: refreshed, though the status cannot be written
    assert await tokens.token(config(0)) == "token-100.0"


DEADLINE_MISSED = "token endpoint did not answer before the caller's deadline"


def held_token_endpoint(tokens: OAuthTokens, monkeypatch, failure: str | None = None) -> asyncio.Event:
    """`tokens`' token endpoint answers (a token, or `failure`) once the returned event is set."""
    answer = asyncio.Event()

    async def request_token(c: pb.OAuthConfig) -> tuple[str, float]:
        tokens.requests += 1
        await answer.wait()
        if failure is not None:
            raise oauth.TokenUnavailable(failure)
        return f"token-{tokens.requests}", 3600.0

    monkeypatch.setattr(tokens, "request_token", request_token)
    return answer


async def test_a_caller_out_of_time_stops_waiting_and_the_refresh_serves_the_others(monkeypatch) -> None:
    store = Store()
    tokens = OAuthTokens(None, store, allow_private=False)  # type: ignore[arg-type]
    answer = held_token_endpoint(tokens, monkeypatch)
    patient = asyncio.ensure_future(tokens.token(config(0)))
    with pytest.raises(oauth.TokenUnavailable) as caught:
        await tokens.token(config(0), wait=0.05)
    assert caught.value.reason == DEADLINE_MISSED
    assert store.statuses == []  # a caller's deadline is no failure of the config
    answer.set()
    assert await patient == "token-1"  # the same refresh, not failed for the others
    assert await tokens.token(config(0), wait=0) == "token-1"  # kept: no second request
    assert tokens.requests == 1 and store.statuses == [(pb.TOKEN_STATUS_ACTIVE, "")]


async def test_a_refresh_its_only_caller_gave_up_on_still_serves_the_next(monkeypatch) -> None:
    store = Store()
    tokens = OAuthTokens(None, store, allow_private=False)  # type: ignore[arg-type]
    answer = held_token_endpoint(tokens, monkeypatch)
    with pytest.raises(oauth.TokenUnavailable):
        await tokens.token(config(0), wait=0.05)
    gone = asyncio.ensure_future(tokens.token(config(0)))
    await asyncio.sleep(0)
    gone.cancel()  # its gRPC call cancelled
    answer.set()
    for _ in range(100):
        if store.statuses:
            break
        await asyncio.sleep(0.01)
    assert store.statuses == [(pb.TOKEN_STATUS_ACTIVE, "")]
    assert await tokens.token(config(0), wait=0) == "token-1" and tokens.requests == 1


async def test_a_failed_refresh_is_every_waiters_answer_and_the_configs_status(monkeypatch) -> None:
    store = Store()
    tokens = OAuthTokens(None, store, allow_private=False)  # type: ignore[arg-type]
    answer = held_token_endpoint(tokens, monkeypatch, failure="token endpoint answered HTTP 503")
    waiting = [asyncio.ensure_future(tokens.token(config(0), wait=5)) for _ in range(3)]
    await asyncio.sleep(0)
    answer.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert [getattr(o, "reason", o) for o in outcomes] == ["token endpoint answered HTTP 503"] * 3
    assert tokens.requests == 1
    assert store.statuses == [(pb.TOKEN_STATUS_FAILED, "token endpoint answered HTTP 503")]
    with pytest.raises(oauth.TokenUnavailable):  # a later call asks again
        await tokens.token(config(0))
    assert tokens.requests == 2


async def test_a_refresh_in_flight_at_shutdown_stops_without_a_status(monkeypatch) -> None:
    """Closed before the HTTP session and Redis: the refresh is cancelled, not left to fail on a closed
    session and store a Failed status the endpoint did not earn."""
    store = Store()
    tokens = OAuthTokens(None, store, allow_private=False)  # type: ignore[arg-type]
    started = asyncio.Event()

    async def request_token(c: pb.OAuthConfig) -> tuple[str, float]:
        started.set()
        await asyncio.sleep(60)
        return "late", 3600.0

    monkeypatch.setattr(tokens, "request_token", request_token)
    caller = asyncio.create_task(tokens.token(config(0)))
    await started.wait()
    await asyncio.wait_for(tokens.close(), 5)
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert store.statuses == []
