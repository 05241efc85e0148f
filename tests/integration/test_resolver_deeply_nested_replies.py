"""A PII API (or token endpoint) reply nested deeper than JSON can be read (1,024 levels) is reported as
that, under the code a reply that is not JSON gets, quoting nothing of it; asked again the API answers
the same, so it is neither retried nor held against the circuit."""

from __future__ import annotations

import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from tests.conftest import serving
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration

E = pb.ResolveErrorCode
DETAIL = "reply is JSON nested deeper than 1,024 levels, which cannot be read"
EMAIL = "ann.deep@example.org"


def deep(levels: int) -> str:
    """A record with its email, and a list nested `levels` deep beside it."""
    return '{"customer": {"email": "' + EMAIL + '", "tags": ' + "[" * levels + "]" * levels + "}}"


def customers(asked: list[str]) -> web.Application:
    async def customer(request: web.Request) -> web.Response:
        anonymous_id = request.match_info["id"]
        asked.append(anonymous_id)
        if anonymous_id == "cust-deep":
            return web.Response(text=deep(5000), content_type="application/json")
        return web.json_response({"customer": {"email": f"{anonymous_id}@example.org"}})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", customer)
    return app


async def test_a_deep_reply_is_named_as_such_asked_once_and_opens_no_circuit(start_resolver):
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=30)
    asked: list[str] = []
    async with serving(customers(asked)) as base_url:
        config = single_config(base_url, max_retries=2, attribute_paths={})
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
        for _ in range(3):
            reply = await resolver.stub.ResolveContacts(
                pb.ResolveContactsRequest(
                    workspace_id="ws-1", channel=common_pb2.CHANNEL_EMAIL, anonymous_ids=["cust-deep"]
                )
            )
            error = reply.contacts[0].error
            assert (error.code, error.http_status, error.attempts) == (E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, 200, 1)
            assert error.detail == DETAIL
            assert EMAIL not in str(reply)
        reply = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=common_pb2.CHANNEL_EMAIL, anonymous_ids=["cust-1"])
        )
    assert reply.contacts[0].contact == "cust-1@example.org"  # the circuit is closed
    assert asked == ["cust-deep"] * 3 + ["cust-1"]


async def test_the_test_screen_names_a_deep_reply(resolver):
    async with serving(customers([])) as base_url:
        reply = await resolver.stub.TestPiiApiConfig(
            pb.TestPiiApiConfigRequest(
                config=single_config(base_url, attribute_paths={}), test_anonymous_id="cust-deep"
            )
        )
    assert reply.http_status == 200
    assert reply.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE and reply.error.detail == DETAIL
    assert EMAIL not in reply.error.detail and EMAIL not in reply.error.message
    assert not reply.response_keys  # its paths cannot be listed


async def test_a_deep_token_reply_is_named_as_such(resolver):
    async def token(request: web.Request) -> web.Response:
        body = '{"access_token": ' + "[" * 3000 + "]" * 3000 + "}"
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/token", token)
    async with serving(app) as base_url:
        config = pb.OAuthConfig(
            workspace_id="ws-1", oauth_config_id="o1", token_url=f"{base_url}/token", client_id="c", client_secret="s"
        )
        saved = await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=config))
    assert saved.config.status == pb.TOKEN_STATUS_FAILED
    assert saved.config.status_reason == "token endpoint reply is JSON nested deeper than 1,024 levels"
