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
