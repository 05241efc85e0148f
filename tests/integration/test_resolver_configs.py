"""PII API and OAuth configs through the real resolver on real Redis: validation, versions, secrets."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from aiohttp import web
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import OAuthClient
from services.resolver.configs import OAuthConfigStore, PiiApiConfigStore
from tests.conftest import serving
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration


async def raw_redis_dump(redis) -> bytes:
    dump = b""
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        dump += key + b"\n"
        if kind == "string":
            dump += await redis.get(key)
        elif kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                dump += k + b"=" + v + b"\n"
    return dump


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields.extend(v.field for v in bad.field_violations)
    return fields


async def test_saved_config_is_versioned_masked_and_sealed(resolver, pii_api, redis):
    config = single_config(pii_api.base_url, headers={"X-Api-Key": "key-s3cr3t-123"})
    first = await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    assert first.version == 1
    assert first.config.headers["X-Api-Key"] == "********"
    assert first.config.max_retries == 3 and first.config.timeout_ms == 2000

    config.attribute_paths["tier"] = "customer.tier"
    second = await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    assert second.version == 2

    latest = await resolver.stub.GetPiiApiConfig(
        pb.GetPiiApiConfigRequest(workspace_id="ws-1", channel=common_pb2.CHANNEL_EMAIL)
    )
    assert latest.version == 2 and "tier" in latest.config.attribute_paths
    assert latest.config.headers["X-Api-Key"] == "********"
    old = await resolver.stub.GetPiiApiConfig(
        pb.GetPiiApiConfigRequest(workspace_id="ws-1", channel=common_pb2.CHANNEL_EMAIL, version=1)
    )
    assert old.version == 1 and "tier" not in old.config.attribute_paths

    dump = await raw_redis_dump(redis)
    assert b"key-s3cr3t-123" not in dump
    assert pii_api.base_url.encode() not in dump  # the whole config is sealed, not just the secrets


async def test_resaving_a_masked_config_keeps_its_secrets(resolver, start_pii_api_server, customers):
    api = await start_pii_api_server(api_key="brand-key-42")
    config = single_config(api.base_url, headers={"X-Api-Key": "brand-key-42"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    read = await resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id="ws-1", channel=1))
    read.config.timeout_ms = 3000
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=read.config))

    reply = await resolver.stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id="ws-1", channel=1, anonymous_ids=["cust-000001"])
    )
    assert reply.config_version == 2
    assert reply.contacts[0].contact == customers["cust-000001"].email


async def test_a_fixed_query_value_is_masked_on_read_and_kept_when_saved_back(resolver):
    """`?api_key=...` is as secret as a header; a value holding @anonymous_id is a template, shown."""
    keys_seen = []

    async def lookup(request: web.Request) -> web.Response:
        keys_seen.append((request.query.get("api_key"), request.query.get("token")))
        return web.json_response({"customer": {"email": "ann@mail.example.org"}})

    app = web.Application()
    app.router.add_get("/v1/lookup", lookup)
    async with serving(app) as base_url:
        config = single_config(
            base_url,
            url=f"{base_url}/v1/lookup?token=url-s3cr3t-88",
            query_params={"customer_id": "@anonymous_id", "api_key": "query-s3cr3t-77"},
            attribute_paths={},
        )
        saved = await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
        read = await resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id="ws-1", channel=1))
        for shown in (saved.config, read.config):
            assert dict(shown.query_params) == {"customer_id": "@anonymous_id", "api_key": "********"}
            assert shown.url == f"{base_url}/v1/lookup?token=********"  # a query in the URL too
        read.config.timeout_ms = 3000
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=read.config))
        reply = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=1, anonymous_ids=["cust-000001"])
        )
    assert reply.config_version == 2 and reply.contacts[0].contact == "ann@mail.example.org"
    assert keys_seen[-1] == ("query-s3cr3t-77", "url-s3cr3t-88")  # the masked values read back replaced nothing


@pytest.mark.parametrize("name", ["recipient", "content"])
async def test_an_attribute_named_as_templates_name_other_values_is_refused_and_nothing_saved(resolver, name):
    """{{ recipient }} and {{ content }} are the recipient's attributes and the content APIs' fields: a fetched
    attribute by either name would be hidden by them, saved yet never rendered."""
    config = single_config("https://pii.example.com")
    config.attribute_paths[name] = "customer.tier"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == [f"config.attribute_paths['{name}']"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id="ws-1", channel=config.channel))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": "ftp://example.com/@anonymous_id"}, "config.url"),
        ({"url": ""}, "config.url"),
        ({"contact_path": "customer.[email"}, "config.contact_path"),
        ({"contact_path": ""}, "config.contact_path"),
        ({"timeout_ms": 120_000}, "config.timeout_ms"),
        ({"max_retries": 11}, "config.max_retries"),
        ({"encryption_key": "c2hvcnQ="}, "config.encryption_key"),
        ({"method": pb.HTTP_METHOD_UNSPECIFIED}, "config.method"),
        ({"workspace_id": "bad workspace"}, "config.workspace_id"),
        ({"attribute_paths": {"first-name": "customer.x"}}, "config.attribute_paths['first-name']"),
        # never sent: a fragment, and an Authorization header the OAuth token replaces
        ({"url": "https://pii.example.com/lookup#id=@anonymous_id"}, "config.url"),
        (
            {"oauth_config_id": "o1", "headers": {"Authorization": "Customer @anonymous_id"}},
            "config.headers['Authorization']",
        ),
        # written by the HTTP client from the request itself
        ({"headers": {"Content-Length": "3"}}, "config.headers['Content-Length']"),
        ({"headers": {"host": "@anonymous_id.example.com"}}, "config.headers['host']"),
    ],
)
async def test_bad_single_config_names_the_field(resolver, change, field):
    config = single_config("https://pii.example.com")
    for name, value in change.items():
        if name in ("attribute_paths", "headers"):
            getattr(config, name).clear()
            getattr(config, name).update(value)
        else:
            setattr(config, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field)
    assert field_violations(caught.value) == [field]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method": pb.HTTP_METHOD_GET}, "config.method"),
        ({"batch_size": 1001}, "config.batch_size"),
        ({"body": '{"ids": []}'}, "config.body"),
        ({"results_path": ""}, "config.results_path"),
        ({"id_path": ""}, "config.id_path"),
        ({"url": "https://pii.example.com/@anonymous_id"}, "config.url"),
    ],
)
async def test_bad_bulk_config_names_the_field(resolver, change, field):
    config = bulk_config("https://pii.example.com")
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == [field]


async def test_private_urls_are_refused_unless_allowed(start_resolver):
    guarded = await start_resolver(allow_private_networks=False)
    for url in (
        "https://127.0.0.1/v1/@anonymous_id",
        "https://10.1.2.3/@anonymous_id",
        "https://localhost/@anonymous_id",
        "https://[::1]/@anonymous_id",
        "https://169.254.169.254/@anonymous_id",
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await guarded.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=single_config("x", url=url)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "private" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await guarded.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=single_config("http://pii.example.com")))
    assert field_violations(caught.value) == ["config.url"]


async def test_missing_config_is_not_found(resolver):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id="ws-none", channel=1))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-none", channel=2, anonymous_ids=["a"])
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_oauth_config_is_checked_masked_and_sealed(resolver, start_pii_api_server, redis):
    api = await start_pii_api_server(oauth=OAuthClient("brand-client", "oauth-s3cret-77"))
    good = pb.OAuthConfig(
        workspace_id="ws-1",
        oauth_config_id="brand",
        token_url=f"{api.base_url}/oauth/token?tenant=tenant-s3cret-5",
        client_id="brand-client",
        client_secret="oauth-s3cret-77",
        scope="customers:read",
    )
    saved = await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=good))
    assert saved.config.status == pb.TOKEN_STATUS_ACTIVE
    assert saved.config.client_secret == "********"
    assert saved.config.token_url == f"{api.base_url}/oauth/token?tenant=********"
    read = await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="brand"))
    assert read.config.status == pb.TOKEN_STATUS_ACTIVE and read.config.client_secret == "********"

    bad = pb.OAuthConfig()
    bad.CopyFrom(good)
    bad.oauth_config_id, bad.client_secret = "wrong", "not-the-secret"
    failed = await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=bad))
    assert failed.config.status == pb.TOKEN_STATUS_FAILED
    assert "401" in failed.config.status_reason

    # Only an ACTIVE OAuth config can back a PII API config.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutPiiApiConfig(
            pb.PutPiiApiConfigRequest(config=single_config(api.base_url, oauth_config_id="wrong"))
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "config.oauth_config_id" in caught.value.details() and "TOKEN_STATUS_FAILED" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutPiiApiConfig(
            pb.PutPiiApiConfigRequest(config=single_config(api.base_url, oauth_config_id="missing"))
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    ok = await resolver.stub.PutPiiApiConfig(
        pb.PutPiiApiConfigRequest(config=single_config(api.base_url, oauth_config_id="brand"))
    )
    assert ok.version == 1

    # Re-saving with the masked secret keeps the stored one.
    resaved = await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=read.config))
    assert resaved.config.status == pb.TOKEN_STATUS_ACTIVE
    stored = await OAuthConfigStore(redis, resolver.deps.box).load("ws-1", "brand")
    assert (stored.client_secret, stored.token_url) == ("oauth-s3cret-77", good.token_url)  # and the URL's query
    assert b"oauth-s3cret-77" not in await raw_redis_dump(redis)


async def test_unsaved_config_can_be_tested_before_saving(resolver, pii_api, customers):
    reply = await resolver.stub.TestPiiApiConfig(
        pb.TestPiiApiConfigRequest(config=single_config(pii_api.base_url), test_anonymous_id="cust-000007")
    )
    customer = customers["cust-000007"]
    assert reply.http_status == 200
    assert "customer.email" in reply.response_keys and "customer.profile.first_name" in reply.response_keys
    assert reply.contact == customer.email
    assert reply.attributes["first_name"] == customer.first_name
    assert customer.email in reply.response_body
    assert not reply.HasField("error")

    missing = await resolver.stub.TestPiiApiConfig(
        pb.TestPiiApiConfigRequest(config=single_config(pii_api.base_url), test_anonymous_id="cust-999999")
    )
    assert missing.http_status == 404
    assert missing.error.code == pb.RESOLVE_ERROR_CODE_NOT_FOUND
    assert "not_found" in missing.response_body

    wrong_path = await resolver.stub.TestPiiApiConfig(
        pb.TestPiiApiConfigRequest(
            config=single_config(pii_api.base_url, contact_path="customer.Email_ID"), test_anonymous_id="cust-000007"
        )
    )
    assert wrong_path.error.code == pb.RESOLVE_ERROR_CODE_INVALID_CONTACT
    assert wrong_path.error.message == "Invalid API response (fetching Email ID)"
    assert "customer.email" in wrong_path.response_keys


async def test_saved_bulk_config_can_be_tested(resolver, pii_api, customers):
    await resolver.stub.PutPiiApiConfig(
        pb.PutPiiApiConfigRequest(config=bulk_config(pii_api.base_url, channel=common_pb2.CHANNEL_SMS))
    )
    reply = await resolver.stub.TestPiiApiConfig(
        pb.TestPiiApiConfigRequest(
            saved=pb.TestPiiApiConfigRequest.SavedConfig(workspace_id="ws-1", channel=common_pb2.CHANNEL_RCS),
            test_anonymous_id="cust-000003",
        )
    )
    assert reply.contact == customers["cust-000003"].phone
    assert "data.results[0].phone" in reply.response_keys


@pytest.mark.parametrize("service", ["resolver", "dispatcher", "receipts"])
async def test_secret_key_missing_refuses_to_start_with_one_line(service):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env["TOKENSEND_GRPC_PORT"] = "0"
    proc = subprocess.run([sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, timeout=30)
    assert proc.returncode == 2
    # Nothing was opened before the key was looked for, so nothing is reported left unclosed.
    assert proc.stderr.decode().splitlines() == [
        f"{service}: TOKENSEND_SECRET_KEY is not set; set it (32 random bytes, urlsafe base64) "
        "or TOKENSEND_DEV_MODE=true for a throwaway key"
    ]


async def test_a_masked_secret_is_never_sent_to_another_host(resolver, pii_api, start_pii_api_server):
    """A config read back (masked) with its URL pointed elsewhere, tested or saved, would have sent the
    saved key to that host: the mask must be replaced by the value there."""
    config = single_config(pii_api.base_url, headers={"X-Api-Key": "key-s3cr3t-5"}, query_params={"k": "q-s3cr3t"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    read = await resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id="ws-1", channel=1))
    elsewhere = await start_pii_api_server()
    read.config.url = read.config.url.replace(pii_api.base_url, elsewhere.base_url.replace("127.0.0.1", "localhost"))
    await refused_when_tested_and_saved(
        resolver, read.config, "config.headers['X-Api-Key']: is masked, and the URL now points", "key-s3cr3t"
    )


async def refused_when_tested_and_saved(resolver, config: pb.PiiApiConfig, says: str, secret: str) -> None:
    """Tested or saved, `config` is refused INVALID_ARGUMENT starting with `says`, `secret` not quoted."""
    for call in (
        resolver.stub.TestPiiApiConfig(pb.TestPiiApiConfigRequest(config=config, test_anonymous_id="cust-000001")),
        resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(says)
        assert secret not in caught.value.details()


async def test_a_secret_written_again_into_the_body_is_never_sent_to_another_host(resolver, pii_api):
    """The body's copy of a key is masked on read like the header's; a config read back with its URL
    pointed elsewhere and its headers dropped would have posted the saved body, key and all, there."""
    config = single_config(
        pii_api.base_url,
        method=pb.HTTP_METHOD_POST,
        url=f"{pii_api.base_url}/v1/lookup",
        headers={"X-Api-Key": "body-s3cr3t-77"},
        body='{"key": "body-s3cr3t-77", "id": "@anonymous_id"}',
    )
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    read = await resolver.stub.GetPiiApiConfig(pb.GetPiiApiConfigRequest(workspace_id="ws-1", channel=1))
    assert read.config.body == '{"key": "********", "id": "@anonymous_id"}'
    read.config.url = "https://collector.example.net/grab"
    read.config.headers.clear()
    await refused_when_tested_and_saved(
        resolver, read.config, "config.body: holds a masked value (********), and the URL now points", "body-s3cr3t"
    )


async def test_a_mask_with_nothing_saved_behind_it_is_refused_and_header_names_match_in_any_case(resolver, pii_api):
    masked = single_config(pii_api.base_url, headers={"X-Api-Key": "********"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=masked))
    assert caught.value.details().startswith("config.headers['X-Api-Key']: is masked (********) but no saved value")
    saved = single_config(pii_api.base_url, headers={"X-Api-Key": "key-s3cr3t-6"})
    await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=saved))
    lower = single_config(pii_api.base_url, headers={"x-api-key": "********"})  # as some clients write names
    reply = await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=lower))
    assert reply.version == 2
    stored = await PiiApiConfigStore(resolver.deps.redis, resolver.deps.box, 10, 60).load("ws-1", 1)
    assert dict(stored.headers) == {"x-api-key": "key-s3cr3t-6"}


async def test_a_masked_client_secret_is_never_sent_to_another_token_endpoint(resolver, start_pii_api_server):
    api = await start_pii_api_server(oauth=OAuthClient("brand-client", "oauth-s3cret-9"))
    config = pb.OAuthConfig(
        workspace_id="ws-1",
        oauth_config_id="brand",
        token_url=f"{api.base_url}/oauth/token",
        client_id="brand-client",
        client_secret="oauth-s3cret-9",
    )
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=config))
    config.client_secret = "********"
    config.token_url = config.token_url.replace("127.0.0.1", "localhost")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=config))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("config.client_secret: is masked, and token_url points at another host")


async def test_a_secret_written_again_into_the_url_path_is_masked_there_too_and_kept(resolver):
    seen = []

    async def lookup(request: web.Request) -> web.Response:
        seen.append(request.match_info["key"])
        return web.json_response({"customer": {"email": "ann@mail.example.org"}})

    app = web.Application()
    app.router.add_get("/v1/{key}/lookup", lookup)
    async with serving(app) as base_url:
        config = single_config(
            base_url,
            url=f"{base_url}/v1/path-s3cr3t-42/lookup",
            headers={"X-Api-Key": "path-s3cr3t-42"},
            query_params={"id": "@anonymous_id"},
            attribute_paths={},
        )
        saved = await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
        assert saved.config.url == f"{base_url}/v1/********/lookup"
        saved.config.timeout_ms = 3000
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=saved.config))
        reply = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=1, anonymous_ids=["cust-000001"])
        )
    assert reply.config_version == 2 and seen[-1] == "path-s3cr3t-42"


async def test_a_masked_token_url_query_value_keeps_its_saved_value_by_name_and_only_that(
    resolver, start_pii_api_server
):
    api = await start_pii_api_server(oauth=OAuthClient("brand-client", "oauth-s3cret-8"))
    config = pb.OAuthConfig(
        workspace_id="ws-1",
        oauth_config_id="brand",
        token_url=f"{api.base_url}/oauth/token?tenant=tenant-s3cret-8",
        client_id="brand-client",
        client_secret="oauth-s3cret-8",
    )
    read = (await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=config))).config
    store = OAuthConfigStore(resolver.deps.redis, resolver.deps.box)
    # Read back, then edited on the same host: `tenant=********` still stands for the saved tenant.
    read.token_url = read.token_url.replace("/oauth/token?", "/oauth/token?region=eu&")
    await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=read))
    edited = f"{api.base_url}/oauth/token?region=eu&tenant=tenant-s3cret-8"
    assert (await store.load("ws-1", "brand")).token_url == edited
    # A mask under a name the saved URL does not have: nothing stands behind it.
    read.token_url = read.token_url.replace("tenant=", "team=")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.PutOAuthConfig(pb.PutOAuthConfigRequest(config=read))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["config.token_url"]
    assert "enter it" in caught.value.details()
    assert (await store.load("ws-1", "brand")).token_url == edited  # the saved URL and its secret are untouched
