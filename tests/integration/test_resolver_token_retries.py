"""ResolveContacts while the PII API's token endpoint is briefly unavailable: retried as the PII API
is, one refresh for every ID, and when it still fails each ID says the token endpoint was
unavailable (not AUTH_FAILED, which says the credentials are wrong), without opening the PII API's
circuit."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver import oauth
from tests.conftest import serving
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def tokens_due_as_the_endpoint_says(monkeypatch):
    """These tests make a token due at once with expires_in 0 (or 1 s): without the resolver's floor."""
    monkeypatch.setattr(oauth, "MIN_TOKEN_LIFETIME_SECONDS", 0.0)


E = pb.ResolveErrorCode
IDS = [f"cust-{n:06d}" for n in range(1, 21)]


async def resolve(resolver, ids, timeout=None):
    request = pb.ResolveContactsRequest(workspace_id="ws-1", channel=common_pb2.CHANNEL_EMAIL, anonymous_ids=ids)
    return await resolver.stub.ResolveContacts(request, timeout=timeout)


async def token_status(resolver) -> pb.OAuthConfig:
    reply = await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="o1"))
    return reply.config


async def save_oauth(resolver, token_url):
    config = pb.OAuthConfig(
        workspace_id="ws-1", oauth_config_id="o1", token_url=token_url, client_id="cid", client_secret="csecret"
    )
    return await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=config))


def token_endpoint(answers: list) -> tuple[web.Application, list[int]]:
    """A token endpoint whose first answer (the check when the config is saved) is a token due at once,
    then `answers` in turn: an HTTP status (with "Retry-After: 0"; or (status, seconds)), "slow" (an
    answer after the timeout), or a token; the last one again once they are used up. Returns it and
    the count of requests."""
    asked = [0]

    async def token(request: web.Request) -> web.StreamResponse:
        asked[0] += 1
        if asked[0] == 1:
            return web.json_response({"access_token": "tok-saved", "token_type": "Bearer", "expires_in": 0})
        answer = answers[min(asked[0] - 2, len(answers) - 1)]
        if answer == "slow":
            await asyncio.sleep(1.5)  # past the token request's timeout
        if isinstance(answer, int):
            answer = (answer, 0)
        if isinstance(answer, tuple):
            status, retry_after = answer
            headers = {"Retry-After": str(retry_after)}
            return web.json_response({"error": "temporarily_unavailable"}, status=status, headers=headers)
        return web.json_response({"access_token": answer, "token_type": "Bearer", "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    return app, asked


async def test_a_token_endpoint_briefly_unavailable_is_retried_and_every_id_resolves(resolver, pii_api, customers):
    """A 503 during the endpoint's own deploy, then a 429: the config's retries get over both, with one
    request per attempt for the 20 IDs waiting, and the config stays Active."""
    app, asked = token_endpoint([503, 429, "tok-fresh"])
    async with serving(app) as base_url:
        await save_oauth(resolver, f"{base_url}/oauth/token")
        await resolver.stub.PutPiiApiConfig(
            pb.PutPiiApiConfigRequest(config=single_config(pii_api.base_url, oauth_config_id="o1"))
        )
        reply = await resolve(resolver, IDS, timeout=10)
        assert [c.contact for c in reply.contacts] == [customers[i].email for i in IDS]
        assert asked[0] == 1 + 3  # the save's check, then the refresh's three attempts for every ID
        assert (await token_status(resolver)).status == pb.TOKEN_STATUS_ACTIVE


async def fail_calls(resolver, code: int, detail: str, calls: int) -> None:
    for _ in range(calls):
        reply = await resolve(resolver, IDS, timeout=10)
        assert {(c.error.code, c.error.detail) for c in reply.contacts} == {(code, detail)}


@pytest.mark.parametrize(
    ("answer", "code", "reason"),
    [
        (503, E.RESOLVE_ERROR_CODE_SERVER_ERROR, "token endpoint answered HTTP 503"),
        (429, E.RESOLVE_ERROR_CODE_RATE_LIMITED, "token endpoint answered HTTP 429"),
        ("slow", E.RESOLVE_ERROR_CODE_TIMEOUT, "token endpoint timed out"),
        ("refused", E.RESOLVE_ERROR_CODE_CONNECTION_FAILED, "token endpoint unreachable (ClientConnectorError)"),
    ],
    ids=["503", "429", "timeout", "refused"],
)
async def test_a_token_endpoint_still_unavailable_says_so_per_id_and_opens_no_pii_api_circuit(
    start_resolver, pii_api, monkeypatch, answer, code, reason
):
    """Each ID's error names the token endpoint's failure and its attempts, and the config is marked
    Failed with it. With a circuit that opens at the PII API's first failure, a second call still
    gets the token endpoint's failure: the API was never asked, and its circuit is its own."""
    monkeypatch.setattr(oauth, "TOKEN_TIMEOUT_S", 1.0)
    resolver = await start_resolver(circuit_failure_threshold=1)
    app, asked = token_endpoint([answer])
    detail = f"{reason} after 2 attempts"
    async with serving(app) as base_url:
        await save_oauth(resolver, f"{base_url}/oauth/token")
        config = single_config(pii_api.base_url, oauth_config_id="o1", max_retries=1)
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
        if answer != "refused":
            await fail_calls(resolver, code, detail, calls=2)
            assert asked[0] == 1 + 2 * 2  # the save's check, then per call one refresh of two attempts for 20 IDs
    if answer == "refused":  # the endpoint gone, its port closed
        await fail_calls(resolver, code, detail, calls=2)
    stored = await token_status(resolver)
    assert (stored.status, stored.status_reason) == (pb.TOKEN_STATUS_FAILED, detail)


async def test_a_retry_after_beyond_the_callers_deadline_fails_each_id_in_time_naming_the_endpoint(resolver, pii_api):
    """A 503 asking for 10 s while the caller waits 3 s: no retry is made that cannot answer in time, and
    each ID says why, rather than the call ending DEADLINE_EXCEEDED."""
    app, asked = token_endpoint([(503, 10), "tok-fresh"])
    async with serving(app) as base_url:
        await save_oauth(resolver, f"{base_url}/oauth/token")
        await resolver.stub.PutPiiApiConfig(
            pb.PutPiiApiConfigRequest(config=single_config(pii_api.base_url, oauth_config_id="o1"))
        )
        reply = await resolve(resolver, IDS, timeout=3.0)
    detail = "token endpoint answered HTTP 503 after 1 attempt; no time for another before the caller's deadline"
    assert {(c.error.code, c.error.detail) for c in reply.contacts} == {(E.RESOLVE_ERROR_CODE_SERVER_ERROR, detail)}
    assert asked[0] == 1 + 1
