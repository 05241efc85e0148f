"""The OAuth token cache keeps a bounded number of tokens: each scope or rotated secret adds one."""

from __future__ import annotations

from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver import oauth
from services.resolver.oauth import OAuthTokens


class Store:
    async def set_status(self, *_: object) -> None:
        pass


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
        async def set_status(self, *_: object) -> None:
            raise ConnectionError("redis down")

    now = [0.0]
    tokens = OAuthTokens(None, Down(), allow_private=False, clock=lambda: now[0])  # type: ignore[arg-type]

    async def request_token(c: pb.OAuthConfig) -> tuple[str, float]:
        return f"token-{now[0]}", 60.0

    monkeypatch.setattr(tokens, "request_token", request_token)
    assert await tokens.token(config(0)) == "token-0.0"
    now[0] = 100.0  # expired: refreshed, though the status cannot be written
    assert await tokens.token(config(0)) == "token-100.0"
