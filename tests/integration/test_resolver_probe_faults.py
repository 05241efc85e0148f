"""ResolveContacts and the config screens as a campaign engine and an operator meet them: URLs the HTTP
client cannot send to, a Test call on a large reply, Retry-After past the caller's deadline, and a PII API
that goes away and comes back."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from services.resolver.configs import PiiApiConfigStore
from services.resolver.validation import apply_defaults
from tests.conftest import free_port, serving
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode
IDS = [f"cust-{n:06d}" for n in range(1, 11)]


async def put(resolver, config):
    return await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))


async def resolve(resolver, ids, timeout=None):
    return await resolver.stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=ids), timeout=timeout
    )


def lookups() -> web.Application:
    """A PII API that knows every customer, in single and bulk mode."""

    async def single(request: web.Request) -> web.Response:
        return web.json_response({"customer": {"email": f"{request.match_info['id']}@example.org"}})

    async def bulk(request: web.Request) -> web.Response:
        ids = (await request.json())["ids"]
        return web.json_response({"data": {"results": [{"id": i, "email": f"{i}@example.org"} for i in ids]}})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", single)
    app.router.add_post("/v1/customers:batchGet", bulk)
    return app


@pytest.mark.parametrize(
    "url",
    [
        "http://a\u200bpi.example.com/v1/customers/@anonymous_id",  # a zero-width space copied with the name
        "http://\u00adapi.example.com/v1/customers/@anonymous_id",  # a soft hyphen
        f"http://{'a' * 64}.example.com/v1/customers/@anonymous_id",  # a label too long to look up
        "http://api..example.com/v1/customers/@anonymous_id",
        "http://api.example.com:0/v1/customers/@anonymous_id",
        "http://api.example.com/v1/\x00customers/@anonymous_id",
    ],
)
async def test_a_url_the_http_client_cannot_send_to_is_refused_at_save_naming_it(resolver, url):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await put(resolver, single_config("http://x", url=url))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("config.url: ")
    oauth = pb.OAuthConfig(
        workspace_id="ws-1", oauth_config_id="crm", token_url=url, client_id="brand", client_secret="s3cret-7"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=oauth))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("config.token_url: ")


async def test_a_saved_url_whose_host_the_client_refuses_fails_each_id_not_the_call(resolver):
    """A config saved before such URLs were refused: each ID gets its error, the reply comes back."""
    config = single_config("http://x", url="http://a\u200bpi.example.com/v1/customers/@anonymous_id", max_retries=2)
    apply_defaults(config)
    await PiiApiConfigStore(resolver.deps.redis, resolver.deps.box, 10, 60).save(config)
    reply = await resolve(resolver, IDS[:2])
    assert [c.anonymous_id for c in reply.contacts] == IDS[:2]
    for contact in reply.contacts:
        assert contact.error.code == E.RESOLVE_ERROR_CODE_CONNECTION_FAILED
        assert contact.error.attempts == 1  # asked again, it cannot be built either
        assert contact.error.detail.startswith("request could not be built")


async def test_a_test_call_on_a_large_reply_reaches_a_client_with_the_default_message_limit(resolver):
    """grpcurl and the generated stubs take 4 MiB by default: the Test screen shows the start of a larger
    reply, and no more of its paths than a screen can list, rather than failing RESOURCE_EXHAUSTED."""
    body = {"customer": {"email": "jade@example.org"}, "history": {f"visit_{n}": "x" * 40 for n in range(100_000)}}

    async def large(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", large)
    async with serving(app) as base_url:
        reply = await resolver.stub.TestPiiApiConfig(
            pb.TestPiiApiConfigRequest(config=single_config(base_url), test_anonymous_id="cust-000001")
        )
    assert reply.http_status == 200 and reply.contact == "jade@example.org"
    assert reply.ByteSize() < 2 * 1024 * 1024
    shown = len(json.dumps(body)) - 256 * 1024
    assert reply.response_body.endswith(f"[... {shown} more characters not shown]")
    assert reply.response_keys[0] == "customer.email"
    assert len(reply.response_keys) == 1000


async def test_a_bulk_body_with_the_single_mode_placeholder_is_refused(resolver):
    config = bulk_config("http://x", body='{"ids": "@anonymous_ids", "requested_for": "@anonymous_id"}')
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await put(resolver, config)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("config.body: holds @anonymous_id, which bulk mode does not fill in")


async def test_a_retry_after_past_the_callers_deadline_says_so_after_one_attempt(resolver):
    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "5"})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", busy)
    async with serving(app) as base_url:
        await put(resolver, single_config(base_url, max_retries=3))
        reply = await resolve(resolver, IDS[:1], timeout=2)
    error = reply.contacts[0].error
    assert error.code == E.RESOLVE_ERROR_CODE_SERVER_ERROR and error.attempts == 1
    assert error.detail == "HTTP 503; no time for another before the caller's deadline"


@pytest.mark.parametrize("mode", ["single", "bulk"])
async def test_an_api_that_comes_back_serves_every_id_of_the_call_its_probe_is_part_of(start_resolver, mode):
    """Down, its calls fail with why; back after the open period, the calls held back by the probe follow
    its verdict: every ID is resolved, not one probe's worth and the rest CIRCUIT_OPEN."""
    # Open long enough that the call right after the outage still finds it open on a busy machine.
    resolver = await start_resolver(circuit_failure_threshold=3, circuit_open_seconds=1.0)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    if mode == "single":
        config = single_config(base_url, max_retries=1)
    else:
        config = bulk_config(base_url, max_retries=1, batch_size=2)
    await put(resolver, config)

    down = await resolve(resolver, IDS)
    for contact in down.contacts:
        # The last attempt's failure, whether or not the circuit then stopped a retry.
        assert contact.error.code == E.RESOLVE_ERROR_CODE_CONNECTION_FAILED, contact.error.detail
        assert contact.error.attempts >= 1

    runner = web.AppRunner(lookups())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        held = await resolve(resolver, IDS)  # within the open period: failed fast, nothing sent
        assert {c.error.code for c in held.contacts} == {E.RESOLVE_ERROR_CODE_CIRCUIT_OPEN}
        assert {c.error.attempts for c in held.contacts} == {0}
        await asyncio.sleep(1.1)
        back = await resolve(resolver, IDS)
    finally:
        await runner.cleanup()
    assert [c.contact for c in back.contacts] == [f"{i}@example.org" for i in IDS]
