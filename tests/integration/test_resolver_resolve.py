"""ResolveContacts against the sample PII API: modes, paths, validation, decryption, OAuth, pinning."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import grpc
import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import Customer, OAuthClient
from services.resolver import oauth
from tests.conftest import serving
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def tokens_due_as_the_endpoint_says(monkeypatch):
    """These tests make a token due at once with expires_in 0 (or 1 s): without the resolver's floor."""
    monkeypatch.setattr(oauth, "MIN_TOKEN_LIFETIME_SECONDS", 0.0)


EMAIL = common_pb2.CHANNEL_EMAIL
SMS = common_pb2.CHANNEL_SMS
E = pb.ResolveErrorCode


async def put(resolver, config):
    return await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))


async def resolve(resolver, ids, channel=EMAIL, workspace_id="ws-1", **fields):
    return await resolver.stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id=workspace_id, channel=channel, anonymous_ids=ids, **fields)
    )


@pytest.mark.parametrize(
    "variant",
    ["path", "query", "post_json", "bulk"],
)
async def test_every_request_shape_resolves_contacts_and_names(resolver, pii_api, customers, variant):
    base = pii_api.base_url
    config = {
        "path": single_config(base),
        "query": single_config(base, url=f"{base}/v1/lookup", query_params={"customer_id": "@anonymous_id"}),
        "post_json": single_config(
            base,
            method=pb.HTTP_METHOD_POST,
            url=f"{base}/v1/customers:batchGet",
            body='{"ids": ["@anonymous_id"]}',
            results_path="data.results",
            contact_path="email",
            attribute_paths={"first_name": "profile.first_name", "last_name": "profile.last_name"},
        ),
        "bulk": bulk_config(base),
    }[variant]
    await put(resolver, config)
    ids = ["cust-000001", "cust-000002", "cust-000042"]
    reply = await resolve(resolver, ids)
    assert [c.anonymous_id for c in reply.contacts] == ids
    for contact in reply.contacts:
        customer = customers[contact.anonymous_id]
        assert not contact.HasField("error")
        assert contact.contact == customer.email
        assert contact.attributes["first_name"] == customer.first_name
        assert contact.attributes["last_name"] == customer.last_name


async def test_bulk_batches_missing_and_invalid_ids(resolver, pii_api, customers):
    await put(resolver, bulk_config(pii_api.base_url, batch_size=10))
    pii_api.sandbox.faults.missing_ids = {"cust-000005"}
    pii_api.sandbox.faults.invalid_contacts = {"cust-000006"}
    pii_api.sandbox.faults.empty_contacts = {"cust-000007"}
    ids = [f"cust-{n:06d}" for n in range(1, 26)] + ["", "cust-000001", "has space", "cust-999999"]
    reply = await resolve(resolver, ids)

    assert [c.anonymous_id for c in reply.contacts] == ids
    # 26 unique well-formed IDs in batches of 10; the malformed ones never reach the API.
    assert pii_api.sandbox.stats.by_path["/v1/customers:batchGet"] == 3
    assert pii_api.sandbox.stats.ids_requested == 26
    by_id = {}
    for c in reply.contacts:
        by_id.setdefault(c.anonymous_id, c)
    assert by_id["cust-000005"].error.code == E.RESOLVE_ERROR_CODE_NOT_FOUND
    assert by_id["cust-999999"].error.code == E.RESOLVE_ERROR_CODE_NOT_FOUND
    for bad in ("cust-000006", "cust-000007"):
        assert by_id[bad].error.code == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
        assert by_id[bad].error.message == "Invalid API response (fetching Email ID)"
        assert by_id[bad].contact == ""
    for bad in ("", "has space"):
        assert by_id[bad].error.code == E.RESOLVE_ERROR_CODE_INVALID_ID
        assert by_id[bad].error.message == "Invalid/empty customer identifier in the workspace."
    assert reply.contacts[26].contact == customers["cust-000001"].email  # repeated ID answered again
    good = [c for c in reply.contacts if not c.HasField("error")]
    assert len(good) == 23


async def test_several_batches_of_distinct_ids_answer_in_request_order(resolver, pii_api, customers):
    await put(resolver, bulk_config(pii_api.base_url, batch_size=10))
    pii_api.sandbox.faults.missing_ids = {"cust-000012"}
    ids = [f"cust-{n:06d}" for n in range(25, 0, -1)]  # three batches, written straight into the reply
    reply = await resolve(resolver, ids)

    assert pii_api.sandbox.stats.by_path["/v1/customers:batchGet"] == 3
    assert [c.anonymous_id for c in reply.contacts] == ids
    for c in reply.contacts:
        if c.anonymous_id == "cust-000012":
            assert c.error.code == E.RESOLVE_ERROR_CODE_NOT_FOUND
        else:
            assert c.contact == customers[c.anonymous_id].email


async def test_phone_channels_normalise_to_e164_and_share_the_sms_config(resolver, start_pii_api_server):
    people = {
        "p-1": Customer("p-1", "a@example.com", "+44 7400 123456", "Ann", "Lee"),
        "p-2": Customer("p-2", "b@example.com", "0044 7400 123457", "Bo", "Ng"),
        "p-3": Customer("p-3", "c@example.com", "(202) 555-0123", "Cy", "Ox"),  # no country code
        "p-4": Customer("p-4", "d@example.com", "12ab", "Di", "Po"),
    }
    api = await start_pii_api_server(people)
    await put(resolver, bulk_config(api.base_url, channel=SMS))
    for channel in (SMS, common_pb2.CHANNEL_MMS, common_pb2.CHANNEL_RCS):
        reply = await resolve(resolver, list(people), channel=channel)
        contacts = {c.anonymous_id: c for c in reply.contacts}
        assert contacts["p-1"].contact == "+447400123456"
        assert contacts["p-2"].contact == "+447400123457"
        assert contacts["p-3"].error.code == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
        assert contacts["p-3"].error.message == "Invalid API response (fetching Mobile No.)"
        assert contacts["p-4"].error.code == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # WhatsApp has a config of its own
        await resolve(resolver, ["p-1"], channel=common_pb2.CHANNEL_WHATSAPP)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("config_of", [bulk_config, single_config], ids=["bulk", "single"])
async def test_a_default_region_reads_national_numbers_as_that_region_dials_them(
    resolver, start_pii_api_server, config_of
):
    """Without a region, digits without "+" start with a country code: "6046047430", a number of
    Vancouver, is a valid Malaysian number (+60). A config that names the region reads it right."""
    people = {
        "p-1": Customer("p-1", "a@example.com", "6046047430", "Ann", "Lee"),
        "p-2": Customer("p-2", "b@example.com", "(202) 555-0123", "Bo", "Ng"),
        "p-3": Customer("p-3", "c@example.com", "011 44 7400 123456", "Cy", "Ox"),  # dialled out of the US
        "p-4": Customer("p-4", "d@example.com", "+44 7400 123457", "Di", "Po"),
        "p-5": Customer("p-5", "e@example.com", "555", "Ed", "Yu"),
        "p-6": Customer("p-6", "f@example.com", "0044 7400 123458", "Fa", "Wu"),  # "00" stands, as without
    }
    api = await start_pii_api_server(people)
    await put(resolver, config_of(api.base_url, channel=SMS))
    assert (await resolve(resolver, ["p-1"], channel=SMS)).contacts[0].contact == "+6046047430"
    await put(resolver, config_of(api.base_url, channel=SMS, default_region="US"))
    reply = await resolve(resolver, list(people), channel=SMS)
    contacts = {c.anonymous_id: c.contact or E.Name(c.error.code) for c in reply.contacts}
    assert contacts == {
        "p-1": "+16046047430",
        "p-2": "+12025550123",
        "p-3": "+447400123456",
        "p-4": "+447400123457",
        "p-5": "RESOLVE_ERROR_CODE_INVALID_CONTACT",
        "p-6": "+447400123458",
    }


async def test_encrypted_values_are_decrypted(resolver, start_pii_api_server, customers):
    key = os.urandom(32)
    api = await start_pii_api_server(encryption_key=key)

    await put(resolver, bulk_config(api.base_url, encryption_key=base64.b64encode(key).decode()))
    reply = await resolve(resolver, ["cust-000001", "cust-000002"])
    assert reply.contacts[0].contact == customers["cust-000001"].email
    assert reply.contacts[1].attributes["first_name"] == customers["cust-000002"].first_name

    await put(resolver, bulk_config(api.base_url, encryption_key=base64.b64encode(os.urandom(32)).decode()))
    wrong = await resolve(resolver, ["cust-000001"])
    assert wrong.contacts[0].error.code == E.RESOLVE_ERROR_CODE_DECRYPTION_FAILED


@pytest.mark.parametrize("config_of", [bulk_config, single_config], ids=["bulk", "single"])
async def test_a_value_cut_in_half_an_emoji_fails_its_own_id_only(resolver, start_pii_api_server, config_of):
    """A name cut inside a surrogate pair (`"Zo\\ud83d"`, as a JavaScript API that truncates by length
    writes it) is no text a reply can carry: that ID fails, every other resolves."""
    people = {
        "p-1": Customer("p-1", "a@example.com", "+447400123456", "Ann", "Lee"),
        "p-2": Customer("p-2", "b@example.com", "+447400123457", "Zo\ud83d", "Ng"),
        "p-3": Customer("p-3", "c@example.com", "+447400123458", "Cy", "Ox"),
    }
    api = await start_pii_api_server(people)
    await put(resolver, config_of(api.base_url))
    reply = await resolve(resolver, list(people))
    assert [c.anonymous_id for c in reply.contacts] == list(people)
    assert [c.contact for c in reply.contacts] == ["a@example.com", "", "c@example.com"]
    assert reply.contacts[2].attributes["first_name"] == "Cy"
    error = reply.contacts[1].error
    assert error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
    assert error.message == "Invalid API response (fetching Email ID)"
    assert "not valid Unicode text" in error.detail


async def put_oauth(resolver, token_url):
    """Saves workspace ws-1's OAuth config "o1" (client "cid") for `token_url`."""
    return await resolver.stub.PutOAuthConfig(
        pb.PutOAuthConfigRequest(
            config=pb.OAuthConfig(
                workspace_id="ws-1",
                oauth_config_id="o1",
                token_url=token_url,
                client_id="cid",
                client_secret="csecret",
            )
        )
    )


async def test_oauth_token_is_cached_shared_and_refreshed_once_on_401(resolver, start_pii_api_server, customers):
    api = await start_pii_api_server(oauth=OAuthClient("cid", "csecret", token_ttl_seconds=3600))
    await put_oauth(resolver, f"{api.base_url}/oauth/token")
    await put(resolver, single_config(api.base_url, oauth_config_id="o1"))
    assert api.sandbox.stats.token_requests == 1  # the check at save time; its token is reused

    ids = [f"cust-{n:06d}" for n in range(1, 41)]
    replies = await asyncio.gather(*(resolve(resolver, ids[i::4]) for i in range(4)))
    assert sorted(c.anonymous_id for r in replies for c in r.contacts) == ids
    assert all(not c.HasField("error") for r in replies for c in r.contacts)
    assert api.sandbox.stats.token_requests == 1

    api.sandbox.revoke_tokens()  # every call now gets 401 until a new token is fetched
    replies = await asyncio.gather(*(resolve(resolver, ids[i::4]) for i in range(4)))
    assert [[c.contact for c in r.contacts] for r in replies] == [
        [customers[i].email for i in ids[i::4]] for i in range(4)
    ]
    assert api.sandbox.stats.token_requests == 2  # one refresh, not one per caller


async def test_expired_token_is_refreshed_before_use(resolver, start_pii_api_server):
    api = await start_pii_api_server(oauth=OAuthClient("cid", "csecret", token_ttl_seconds=1))
    await put_oauth(resolver, f"{api.base_url}/oauth/token")
    await put(resolver, bulk_config(api.base_url, oauth_config_id="o1"))
    await asyncio.sleep(1.0)
    reply = await resolve(resolver, ["cust-000001"])
    assert not reply.contacts[0].HasField("error")
    assert api.sandbox.stats.token_requests == 2
    assert api.sandbox.stats.statuses.get("401", 0) == 0  # refreshed ahead of expiry, not after a refusal


async def test_failing_token_endpoint_fails_ids_and_marks_config_failed(resolver, start_pii_api_server):
    """A token endpoint answering 503 is unavailable, not refusing the credentials: it is retried as the
    PII API is (max_retries, 3 by default), then each ID says SERVER_ERROR naming the token endpoint.
    AUTH_FAILED, which this test once expected, is kept for the endpoint's 400, 401 and 403."""
    api = await start_pii_api_server(oauth=OAuthClient("cid", "csecret"))
    await put_oauth(resolver, f"{api.base_url}/oauth/token")
    await put(resolver, bulk_config(api.base_url, oauth_config_id="o1"))
    api.sandbox.revoke_tokens()
    api.sandbox.faults.token_fail_status = 503
    before = api.sandbox.stats.token_requests
    reply = await resolve(resolver, ["cust-000001", "cust-000002"])
    assert {(c.error.code, c.error.detail) for c in reply.contacts} == {
        (E.RESOLVE_ERROR_CODE_SERVER_ERROR, "token endpoint answered HTTP 503 after 4 attempts")
    }
    assert api.sandbox.stats.token_requests - before == 4
    status = await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="o1"))
    assert status.config.status == pb.TOKEN_STATUS_FAILED
    assert "503" in status.config.status_reason

    api.sandbox.faults.token_fail_status = None
    reply = await resolve(resolver, ["cust-000001"])
    assert not reply.contacts[0].HasField("error")
    status = await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="o1"))
    assert status.config.status == pb.TOKEN_STATUS_ACTIVE


async def test_campaign_instance_keeps_its_config_version(start_resolver, pii_api, customers):
    resolver = await start_resolver(config_versions_kept=3)
    await put(resolver, bulk_config(pii_api.base_url))
    first = await resolve(resolver, ["cust-000001"], campaign_id="c1", campaign_instance_id="c1-run1")
    assert first.config_version == 1
    # The brand switches the Email config to a broken path; the running instance is not affected.
    await put(resolver, bulk_config(pii_api.base_url, contact_path="no_such_field"))
    again = await resolve(resolver, ["cust-000002"], campaign_id="c1", campaign_instance_id="c1-run1")
    assert again.config_version == 1 and again.contacts[0].contact == customers["cust-000002"].email
    following = await resolve(resolver, ["cust-000002"], campaign_id="c1", campaign_instance_id="c1-run2")
    assert following.config_version == 2
    assert following.contacts[0].error.code == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
    explicit = await resolve(resolver, ["cust-000002"], config_version=1)
    assert explicit.config_version == 1 and not explicit.contacts[0].HasField("error")

    for _ in range(4):  # versions 3..6: the last three are kept, and those a running instance holds
        await put(resolver, bulk_config(pii_api.base_url))
    still = await resolve(resolver, ["cust-000003"], campaign_id="c1", campaign_instance_id="c1-run1")
    assert still.config_version == 1 and still.contacts[0].contact == customers["cust-000003"].email
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(resolver, ["cust-000002"], config_version=3)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 3 is not kept any more" in caught.value.details()


async def test_request_level_errors_name_the_field(resolver, pii_api):
    await put(resolver, bulk_config(pii_api.base_url))
    cases = [
        (pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=["a"] * 1001), "anonymous_ids"),
        (pb.ResolveContactsRequest(channel=EMAIL, anonymous_ids=["a"]), "workspace_id"),
        (pb.ResolveContactsRequest(workspace_id="ws-1", anonymous_ids=["a"]), "channel"),
        (
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, campaign_instance_id="bad id!"),
            "campaign_instance_id",
        ),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await resolver.stub.ResolveContacts(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:")
    empty = await resolver.stub.ResolveContacts(pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL))
    assert list(empty.contacts) == []


async def test_a_bad_request_is_invalid_argument_whether_or_not_a_config_is_saved(resolver):
    """Nothing is saved for the workspace: a malformed request still says what is wrong with it, not NOT_FOUND."""
    request = pb.ResolveContactsRequest(
        workspace_id="ws-unset", channel=EMAIL, anonymous_ids=["a"], content_api_names=["offers", "spring offers"]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.ResolveContacts(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "content_api_names[1]: must be an identifier"


async def test_a_version_pinned_for_a_content_api_not_named_is_refused_naming_it(resolver):
    """A pin for an API the call does not fetch would pin nothing: a name misspelt in one of the two fields."""
    pinned = {"offers": 2, "ofers": 3}
    request = pb.ResolveContactsRequest(
        workspace_id="ws-1",
        channel=EMAIL,
        anonymous_ids=["a"],
        content_api_names=["offers"],
        content_api_versions=pinned,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.ResolveContacts(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        caught.value.details()
        == "content_api_versions['ofers']: pins a content API that content_api_names does not name"
    )
    request.content_api_versions.clear()
    request.content_api_versions["not a name " + "x" * 200] = 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolver.stub.ResolveContacts(request)
    assert caught.value.details().startswith("content_api_versions: pins")  # a key that is no name is not repeated


async def test_token_and_contacts_that_arrive_in_pieces_are_read_whole(resolver, start_pii_api_server, customers):
    api = await start_pii_api_server(oauth=OAuthClient("cid", "csecret"))
    api.sandbox.faults.trickle_count = -1  # the token endpoint's replies too
    await put_oauth(resolver, f"{api.base_url}/oauth/token")
    await put(resolver, bulk_config(api.base_url, oauth_config_id="o1", max_retries=0))
    reply = await resolve(resolver, ["cust-000001", "cust-000002"])
    assert [c.contact for c in reply.contacts] == [customers["cust-000001"].email, customers["cust-000002"].email]
    status = await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="o1"))
    assert status.config.status == pb.TOKEN_STATUS_ACTIVE


async def test_a_token_reply_over_its_size_limit_is_refused_without_being_read_whole(resolver):
    """A token endpoint that answers 200 with far more than a token: the save says why, nothing is kept."""

    async def huge(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t" * 100_000, "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/oauth/token", huge)
    async with serving(app) as base_url:
        reply = await put_oauth(resolver, f"{base_url}/oauth/token")
    assert reply.config.status == pb.TOKEN_STATUS_FAILED
    assert reply.config.status_reason == "token endpoint reply is larger than 65536 bytes"


async def test_a_token_a_header_cannot_carry_is_refused_and_each_contact_says_auth_failed(resolver, pii_api):
    """A token holding a line break would fail every call while cached; it is refused when issued."""
    issued = 0

    async def token(request: web.Request) -> web.Response:
        nonlocal issued
        issued += 1
        if issued == 1:  # a good token that is due at once, then a broken one
            return web.json_response({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 0})
        return web.json_response({"access_token": "abc\r\nX-Injected: 1", "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    async with serving(app) as base_url:
        await put_oauth(resolver, f"{base_url}/oauth/token")
        await put(resolver, single_config(pii_api.base_url, oauth_config_id="o1", max_retries=0))
        reply = await resolve(resolver, ["cust-000001", "cust-000002"])
        again = await put_oauth(resolver, f"{base_url}/oauth/token")
    assert [c.error.code for c in reply.contacts] == [E.RESOLVE_ERROR_CODE_AUTH_FAILED] * 2
    assert "characters a header cannot carry" in reply.contacts[0].error.detail
    assert again.config.status == pb.TOKEN_STATUS_FAILED
    assert "X-Injected" not in reply.contacts[0].error.detail + again.config.status_reason


async def test_a_token_lifetime_that_is_not_a_number_is_taken_as_an_hour(resolver, pii_api):
    """`expires_in: NaN` once made every call fetch a new token."""
    issued = 0

    async def token(request: web.Request) -> web.Response:
        nonlocal issued
        issued += 1
        body = '{"access_token": "tok-1", "token_type": "Bearer", "expires_in": NaN}'
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    async with serving(app) as base_url:
        await put_oauth(resolver, f"{base_url}/oauth/token")
        await put(resolver, single_config(pii_api.base_url, oauth_config_id="o1"))
        for _ in range(3):
            reply = await resolve(resolver, ["cust-000001"])
            assert reply.contacts[0].contact
    assert issued == 1


async def test_a_token_endpoint_slower_than_the_callers_deadline_fails_that_call_in_time(resolver, pii_api, customers):
    """The token endpoint takes 1.5 s; a caller that waits 0.4 s gets each ID's TIMEOUT in time,
    rather than DEADLINE_EXCEEDED (nor AUTH_FAILED: the credentials may be fine). The refresh goes on,
    and its token serves the next call: no second request, and the config is not marked Failed for a
    caller's deadline."""
    issued, answered = 0, 0

    async def token(request: web.Request) -> web.Response:
        nonlocal issued, answered
        issued += 1
        if issued == 1:  # the check at save time: a token that is due at once
            body = {"access_token": "tok-1", "token_type": "Bearer", "expires_in": 0}
        else:
            await asyncio.sleep(1.5)
            body = {"access_token": f"tok-{issued}", "token_type": "Bearer", "expires_in": 3600}
        answered += 1
        return web.json_response(body)

    async def status() -> int:
        reply = await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="o1"))
        return reply.config.status

    app = web.Application()
    app.router.add_post("/oauth/token", token)
    request = pb.ResolveContactsRequest(
        workspace_id="ws-1", channel=EMAIL, anonymous_ids=["cust-000001", "cust-000002"]
    )
    async with serving(app) as base_url:
        await put_oauth(resolver, f"{base_url}/oauth/token")
        await put(resolver, single_config(pii_api.base_url, oauth_config_id="o1", max_retries=0))
        started = time.monotonic()
        reply = await resolver.stub.ResolveContacts(request, timeout=0.4)
        assert time.monotonic() - started < 1.0
        assert [c.error.code for c in reply.contacts] == [E.RESOLVE_ERROR_CODE_TIMEOUT] * 2
        assert reply.contacts[0].error.detail == "token endpoint did not answer before the caller's deadline"
        assert await status() == pb.TOKEN_STATUS_ACTIVE

        for _ in range(300):  # the refresh, on its own now
            if answered == 2:
                break
            await asyncio.sleep(0.01)
        reply = await resolver.stub.ResolveContacts(request, timeout=0.4)
    assert [c.contact for c in reply.contacts] == [customers["cust-000001"].email, customers["cust-000002"].email]
    assert issued == 2
    assert await status() == pb.TOKEN_STATUS_ACTIVE


async def test_an_id_that_is_a_dot_segment_is_invalid_not_another_resource(resolver, pii_api, customers):
    """In a URL's path "." and ".." are resolved away by every HTTP client: `/customers/../profile`
    asks for `/profile`, whose record would have been taken as that ID's contact."""
    await put(resolver, single_config(pii_api.base_url))
    reply = await resolve(resolver, [".", "..", "cust-000001"])
    codes = [c.error.code for c in reply.contacts]
    assert codes[:2] == [E.RESOLVE_ERROR_CODE_INVALID_ID] * 2
    assert reply.contacts[2].contact == customers["cust-000001"].email


async def test_a_token_endpoint_failing_again_after_the_config_is_saved_anew_marks_it_failed_again(
    resolver, start_pii_api_server
):
    api = await start_pii_api_server(oauth=OAuthClient("cid", "csecret"))
    token_url = f"{api.base_url}/oauth/token"
    await put_oauth(resolver, token_url)
    await put(resolver, bulk_config(api.base_url, oauth_config_id="o1"))
    api.sandbox.revoke_tokens()
    api.sandbox.faults.token_fail_status = 503
    await resolve(resolver, ["cust-000001"])
    # The brand fixes its token endpoint and saves the config again: Active.
    api.sandbox.faults.token_fail_status = None
    saved = await put_oauth(resolver, token_url)
    assert saved.config.status == pb.TOKEN_STATUS_ACTIVE

    api.sandbox.revoke_tokens()
    api.sandbox.faults.token_fail_status = 500
    reply = await resolve(resolver, ["cust-000001"])
    assert reply.contacts[0].error.code == E.RESOLVE_ERROR_CODE_SERVER_ERROR  # the endpoint down, retried: not AUTH
    status = await resolver.stub.GetOAuthConfig(pb.GetOAuthConfigRequest(workspace_id="ws-1", oauth_config_id="o1"))
    assert status.config.status == pb.TOKEN_STATUS_FAILED
    assert "500" in status.config.status_reason


async def test_a_failing_token_endpoint_is_asked_by_one_refresh_for_the_callers_waiting_not_once_per_id(
    resolver, start_pii_api_server
):
    """The refresh is retried (3 retries, the config's default) once for all 20 IDs: 4 requests, not 80.
    It was asked once when a 503 was not retried; each ID now says SERVER_ERROR, not AUTH_FAILED."""
    api = await start_pii_api_server(oauth=OAuthClient("cid", "csecret", token_ttl_seconds=1))
    await put_oauth(resolver, f"{api.base_url}/oauth/token")
    await put(resolver, single_config(api.base_url, oauth_config_id="o1"))
    await asyncio.sleep(1.0)  # the token is due: every ID's call waits for one refresh
    api.sandbox.faults.token_fail_status = 503
    before = api.sandbox.stats.token_requests
    ids = [f"cust-{n:06d}" for n in range(1, 21)]
    reply = await resolve(resolver, ids)
    assert {c.error.code for c in reply.contacts} == {E.RESOLVE_ERROR_CODE_SERVER_ERROR}
    # That refresh's failure, retries included, is the answer for every call that waited on it.
    assert api.sandbox.stats.token_requests - before == 4

    api.sandbox.faults.token_fail_status = None  # the next call asks again
    reply = await resolve(resolver, ids[:3])
    assert not any(c.HasField("error") for c in reply.contacts)


async def test_a_version_never_saved_is_not_found_as_such_not_as_one_no_longer_kept(resolver, pii_api):
    await put(resolver, bulk_config(pii_api.base_url))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(resolver, ["cust-000001"], config_version=7)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no version 7" in caught.value.details() and "latest is 1" in caught.value.details()
    assert "not kept" not in caught.value.details()


def reply_of(records_text: str) -> web.Application:
    """A PII API answering every lookup, single or bulk, with `{"results": [<records_text>]}` as written."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=f'{{"results": [{records_text}]}}', content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def reply_config(base_url: str, mode: int, channel: int = SMS, **fields):
    """Records `{"id": ..., "phone": ..., "email": ..., "first": ...}` under "results", single or bulk."""
    values = dict(
        workspace_id="ws-1",
        channel=channel,
        mode=mode,
        method=pb.HTTP_METHOD_POST,
        url=f"{base_url}/lookup",
        body='{"ids": "@anonymous_ids"}' if mode == pb.MODE_BULK else '{"id": "@anonymous_id"}',
        results_path="results",
        id_path="id" if mode == pb.MODE_BULK else "",
        contact_path="phone" if channel != EMAIL else "email",
        attribute_paths={"first_name": "first"},
        timeout_ms=2000,
    )
    values.update(fields)
    return pb.PiiApiConfig(**values)


@pytest.mark.parametrize("mode", [pb.MODE_BULK, pb.MODE_SINGLE], ids=["bulk", "single"])
async def test_a_number_written_as_a_float_is_the_number_not_another_one(resolver, mode):
    """A phone number kept in a float column (pandas, a spreadsheet export) comes as 4369912345678.0.
    It is the number +4369912345678: read as text "4369912345678.0", the dot was dropped as a
    separator and +43699123456780, another valid Austrian number, was taken as the contact. An ID
    echoed as 7.0 is the ID "7"."""
    records = '{"id": 7.0, "phone": 4369912345678.0, "first": 12.0}'
    async with serving(reply_of(records)) as base_url:
        await put(resolver, reply_config(base_url, mode))
        reply = await resolve(resolver, ["7"], channel=SMS)
    [contact] = reply.contacts
    assert not contact.HasField("error"), contact.error.detail
    assert contact.contact == "+4369912345678"
    assert contact.attributes["first_name"] == "12"


@pytest.mark.parametrize("path", ["first", "first || `1`"], ids=["field", "expression"])
@pytest.mark.parametrize("mode", [pb.MODE_BULK, pb.MODE_SINGLE], ids=["bulk", "single"])
async def test_a_value_nested_too_deeply_to_write_out_is_no_value_not_a_failed_call(resolver, mode, path):
    """A record's attribute nested a thousand lists deep parses (the JSON parser takes 1024 levels) but
    cannot be written out as text: the attribute is missing, as a null one is; the call, and every
    other ID of the batch, went INTERNAL."""
    deep = "[" * 1000 + "]" * 1000
    records = f'{{"id": "a", "email": "a@example.com", "first": {deep}}}'
    if mode == pb.MODE_BULK:  # a single lookup's reply holds its customer alone
        records += ', {"id": "b", "email": "b@example.com"}'
    async with serving(reply_of(records)) as base_url:
        await put(resolver, reply_config(base_url, mode, channel=EMAIL, attribute_paths={"first_name": path}))
        reply = await resolve(resolver, ["a", "b"] if mode == pb.MODE_BULK else ["a"])
    assert reply.contacts[0].contact == "a@example.com"
    assert "first_name" not in reply.contacts[0].attributes
    assert not any(c.HasField("error") for c in reply.contacts)


async def test_an_id_reaches_the_pii_api_as_it_was_encoded(resolver):
    """The ID is percent-encoded into the URL's path and sent so: the HTTP client had decoded `%3B`,
    `%26`, `%3D`... back, and `/customers/a;b` is customer `a` to Tomcat and Spring (the rest a
    matrix parameter): another customer's contact would have come back."""
    seen: list[str] = []

    async def customer(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"customer": {"email": "ann@example.com"}})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", customer)
    async with serving(app) as base_url:
        await put(resolver, single_config(base_url, url=f"{base_url}/v1/customers/@anonymous_id?src=ts"))
        reply = await resolve(resolver, ["a;b", "c&d=e@f"])
    assert not any(c.HasField("error") for c in reply.contacts)
    assert sorted(seen) == ["/v1/customers/a%3Bb?src=ts", "/v1/customers/c%26d%3De%40f?src=ts"]


@pytest.mark.parametrize("batch_size", [500, 2], ids=["one-call", "batches"])
async def test_records_of_one_id_that_disagree_fail_that_id_and_no_other(resolver, batch_size):
    """A bulk reply holding two records for one ID took the first: when they give different contacts,
    either may be another customer's, and the message went to whichever came first."""
    records = ", ".join(
        [
            '{"id": "a", "phone": "+447400123456", "first": "Ann"}',
            '{"id": "b", "phone": "+447400123457", "first": "Bo"}',
            '{"id": "a", "phone": "+447400123458", "first": "Ann"}',  # another number
            '{"id": "c", "phone": "+447400123459", "first": "Cy"}',
            '{"id": "c", "phone": "+447400123459", "first": "Cy"}',  # the same record again
            '{"id": "d", "phone": "+447400123460", "first": "Di"}',
            '{"id": "d", "phone": "+447400123460", "first": "Dot"}',  # another name
            '{"id": "e", "phone": "+447400123461", "first": "Ed"}',
            '{"id": "e", "phone": "+44 7400 123461", "first": "Ed"}',  # the same number spelled otherwise
            '{"id": "f", "phone": "+447400123462"}',
            '{"id": "f", "phone": "12ab"}',  # no number: the other may still be someone else's
            '{"id": "g", "phone": "+447400123463"}',
            '{"id": "g", "phone": "+447400123463"}',
            '{"id": "g", "phone": "+447400123464"}',
        ]
    )
    async with serving(reply_of(records)) as base_url:
        await put(resolver, reply_config(base_url, pb.MODE_BULK, batch_size=batch_size))
        reply = await resolve(resolver, ["a", "b", "c", "d", "e", "f", "g"], channel=SMS)
    by_id = {c.anonymous_id: c for c in reply.contacts}
    assert [c.anonymous_id for c in reply.contacts] == ["a", "b", "c", "d", "e", "f", "g"]
    expected = {
        "a": "the bulk reply holds 2 records for this ID with different contacts",
        "d": "the bulk reply holds 2 records for this ID with different fields",
        "f": "the bulk reply holds 2 records for this ID with different contacts",
        "g": "the bulk reply holds 3 records for this ID with different contacts",
    }
    for anonymous_id, detail in expected.items():
        contact = by_id[anonymous_id]
        assert contact.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
        assert contact.error.detail == detail
        assert contact.error.message == "Invalid API response (fetching Mobile No.)"
        assert contact.contact == "" and not contact.attributes
    assert by_id["b"].contact == "+447400123457" and by_id["b"].attributes["first_name"] == "Bo"
    assert by_id["c"].contact == "+447400123459" and by_id["c"].attributes["first_name"] == "Cy"
    assert by_id["e"].contact == "+447400123461" and by_id["e"].attributes["first_name"] == "Ed"


async def test_the_test_button_refuses_an_id_whose_bulk_records_disagree(resolver):
    records = '{"id": "a", "email": "ann@example.com"}, {"id": "a", "email": "bob@example.com"}'
    async with serving(reply_of(records)) as base_url:
        config = reply_config(base_url, pb.MODE_BULK, channel=EMAIL)
        reply = await resolver.stub.TestPiiApiConfig(pb.TestPiiApiConfigRequest(config=config, test_anonymous_id="a"))
    assert reply.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
    assert reply.error.detail == "the bulk reply holds 2 records for this ID with different contacts"
    assert reply.contact == ""


async def test_a_single_lookup_answered_with_several_customers_takes_none_of_them(resolver):
    """In single mode `results_path` may select a list, whose first record was taken: an API that ignores
    a filter it does not know answers every lookup with every customer, and each ID got the first's contact."""
    differing = '{"phone": "+447400123456", "first": "Ann"}, {"phone": "+447400123457", "first": "Bo"}'
    same = '{"phone": "+447400123456", "first": "Ann"}, {"phone": "+44 7400 123456", "first": "Ann"}'
    async with serving(reply_of(differing)) as base_url:
        await put(resolver, reply_config(base_url, pb.MODE_SINGLE))
        [contact] = (await resolve(resolver, ["a"], channel=SMS)).contacts
    assert contact.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
    assert contact.error.detail == "the reply holds 2 records with different contacts"
    assert contact.contact == ""
    async with serving(reply_of(same)) as base_url:
        await put(resolver, reply_config(base_url, pb.MODE_SINGLE))
        [contact] = (await resolve(resolver, ["a"], channel=SMS)).contacts
    assert not contact.HasField("error"), contact.error.detail
    assert contact.contact == "+447400123456"


async def test_a_bulk_record_is_matched_by_its_id_exactly(resolver):
    """Records are matched by the ID as written, or a number's digits: no case folding, no trimming, no
    leading zeros dropped; true, lists and objects name no customer, and a record without an ID is no one's."""
    records = ", ".join(
        [
            '{"phone": "+447400123450"}',  # no ID
            '{"id": "b", "phone": "+447400123452"}',  # out of the request's order
            '{"id": 7, "phone": "+447400123457"}',
            '{"id": "007", "phone": "+447400123458"}',
            '{"id": "ABC", "phone": "+447400123459"}',
            '{"id": " abc", "phone": "+447400123460"}',
            '{"id": true, "phone": "+447400123461"}',
            '{"id": ["x"], "phone": "+447400123462"}',
            '{"id": {"v": 1}, "phone": "+447400123463"}',
            '{"id": "a", "phone": "+447400123451"}',
        ]
    )
    ids = ["a", "b", "7", "007", "07", "abc", "true", '["x"]', '{"v":1}', "null"]
    async with serving(reply_of(records)) as base_url:
        await put(resolver, reply_config(base_url, pb.MODE_BULK))
        reply = await resolve(resolver, ids, channel=SMS)
    by_id = {c.anonymous_id: c for c in reply.contacts}
    assert by_id["a"].contact == "+447400123451"
    assert by_id["b"].contact == "+447400123452"
    assert by_id["7"].contact == "+447400123457"
    assert by_id["007"].contact == "+447400123458"
    for unknown in ("07", "abc", "true", '["x"]', '{"v":1}', "null"):
        assert by_id[unknown].error.code == E.RESOLVE_ERROR_CODE_NOT_FOUND, unknown
        assert by_id[unknown].contact == ""


@pytest.mark.parametrize("mode", [pb.MODE_BULK, pb.MODE_SINGLE], ids=["bulk", "single"])
async def test_a_number_written_out_of_a_float_as_text_is_the_number(resolver, mode):
    """ "4369912345678.0" as a string (a float column exported as text) was read as +43699123456780,
    another valid Austrian number."""
    async with serving(reply_of('{"id": "8", "phone": "4369912345678.0"}')) as base_url:
        await put(resolver, reply_config(base_url, mode))
        [contact] = (await resolve(resolver, ["8"], channel=SMS)).contacts
    assert not contact.HasField("error"), contact.error.detail
    assert contact.contact == "+4369912345678"


async def test_an_id_a_header_cannot_carry_fails_alone_and_never_goes_out(resolver):
    """A config may put the ID in a header. Header values are ASCII: "Zoë" went out as raw UTF-8 bytes,
    which servers read as Latin-1, percent-encoded or not at all. It fails, and no other ID does."""
    seen: list[str] = []

    async def customer(request: web.Request) -> web.Response:
        seen.append(request.headers["X-Customer-Id"])
        return web.json_response({"customer": {"email": "ann@example.com"}})

    app = web.Application()
    app.router.add_get("/v1/customer", customer)
    async with serving(app) as base_url:
        config = single_config(base_url, url=f"{base_url}/v1/customer", headers={"X-Customer-Id": "id=@anonymous_id"})
        await put(resolver, config)
        reply = await resolve(resolver, ["Zoë", "ann-1"])
        test = await resolver.stub.TestPiiApiConfig(pb.TestPiiApiConfigRequest(config=config, test_anonymous_id="Zoë"))
    zoe, ann = reply.contacts
    assert zoe.error.code == E.RESOLVE_ERROR_CODE_INVALID_ID
    assert zoe.error.detail == (
        "the ID holds characters other than ASCII, which the config's header with @anonymous_id cannot carry"
    )
    assert zoe.error.attempts == 0 and zoe.contact == ""
    assert ann.contact == "ann@example.com"
    assert seen == ["id=ann-1"]
    assert test.error.code == E.RESOLVE_ERROR_CODE_INVALID_ID


async def test_records_of_one_id_nested_too_deeply_to_compare_are_compared_by_what_is_read(resolver):
    deep = "[" * 1000 + "]" * 1000
    record = f'{{"id": "a", "email": "a@example.com", "first": {deep}}}'
    async with serving(reply_of(f"{record}, {record}")) as base_url:
        await put(resolver, reply_config(base_url, pb.MODE_BULK, channel=EMAIL))
        [contact] = (await resolve(resolver, ["a"])).contacts
    assert not contact.HasField("error"), contact.error.detail
    assert contact.contact == "a@example.com"


@pytest.mark.parametrize("mode", [pb.MODE_BULK, pb.MODE_SINGLE], ids=["bulk", "single"])
async def test_a_content_api_s_records_of_one_id_that_disagree_give_no_fields(resolver, mode):
    records = '{"id": "a", "points": 10}, {"id": "a", "points": 99}'
    async with serving(reply_of(records)) as base_url:
        config = pb.ContentApiConfig(
            workspace_id="ws-1",
            name="loyalty",
            mode=mode,
            method=pb.HTTP_METHOD_POST,
            url=f"{base_url}/lookup",
            body='{"ids": "@anonymous_ids"}' if mode == pb.MODE_BULK else '{"id": "@anonymous_id"}',
            results_path="results",
            id_path="id" if mode == pb.MODE_BULK else "",
            field_paths={"points": "points"},
        )
        reply = await resolver.stub.TestContentApiConfig(
            pb.TestContentApiConfigRequest(config=config, test_anonymous_id="a")
        )
    assert reply.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
    where = "the bulk reply holds 2 records for this ID" if mode == pb.MODE_BULK else "the reply holds 2 records"
    assert reply.error.detail == f"{where} with different fields"
    assert not reply.fields


@pytest.mark.parametrize("mode", [pb.MODE_BULK, pb.MODE_SINGLE], ids=["bulk", "single"])
async def test_a_content_api_s_disagreeing_records_fail_the_id_it_personalises(resolver, mode):
    records = '{"id": "a", "email": "a@example.com", "points": 10}, {"id": "a", "email": "a@example.com", "points": 99}'
    async with serving(reply_of(records)) as base_url:
        await put(resolver, reply_config(base_url, pb.MODE_BULK, channel=EMAIL))
        await resolver.stub.PutContentApiConfig(
            pb.PutContentApiConfigRequest(
                config=pb.ContentApiConfig(
                    workspace_id="ws-1",
                    name="loyalty",
                    mode=mode,
                    method=pb.HTTP_METHOD_POST,
                    url=f"{base_url}/loyalty",
                    body='{"ids": "@anonymous_ids"}' if mode == pb.MODE_BULK else '{"id": "@anonymous_id"}',
                    results_path="results",
                    id_path="id" if mode == pb.MODE_BULK else "",
                    field_paths={"points": "points"},
                )
            )
        )
        [contact] = (await resolve(resolver, ["a"], content_api_names=["loyalty"])).contacts
    assert contact.error.code == E.RESOLVE_ERROR_CODE_CONTENT_API_FAILED
    assert "records" in contact.error.detail and "with different fields" in contact.error.detail
    assert contact.contact == "" and not contact.content


@pytest.mark.parametrize("mode", [pb.MODE_BULK, pb.MODE_SINGLE], ids=["bulk", "single"])
async def test_a_path_with_indexes_one_after_another_reads_a_list_of_lists(resolver, mode):
    """`phones[0][0]` (a list of lists, and what the Test screen's response_keys offer for one) saved, and
    then every lookup of the config failed the whole call INTERNAL: the fast reader took two children only."""
    records = '{"id": "a", "phones": [["+447400123456", "mobile"]], "names": [["Ann"]]}'
    async with serving(reply_of(records)) as base_url:
        config = reply_config(
            base_url, mode, contact_path="phones[0][0]", attribute_paths={"first_name": "names[0][0]"}
        )
        await put(resolver, config)
        reply = await resolve(resolver, ["a"], channel=SMS)
    [contact] = reply.contacts
    assert not contact.HasField("error"), contact.error.detail
    assert contact.contact == "+447400123456"
    assert contact.attributes["first_name"] == "Ann"


def one_customer_for_every_id(customer_id: object) -> web.Application:
    """A single-mode PII API that ignores the ID in the URL (a misrouted path, a cache keyed wrongly) and
    answers every lookup with one customer's record, whose ID is `customer_id` (absent when None)."""

    async def customer(request: web.Request) -> web.Response:
        record: dict[str, object] = {"email": "zed@example.org", "profile": {"first_name": "Zedediah"}}
        if customer_id is not None:
            record["id"] = customer_id
        return web.json_response({"customer": record})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", customer)
    return app


@pytest.mark.parametrize(
    ("customer_id", "detail"),
    [
        ("cust-000002", "the reply is for another customer: its ID at id_path is not the one asked for"),
        (None, "the reply holds no ID at id_path"),
    ],
    ids=["another", "none"],
)
async def test_a_single_lookup_answered_with_another_customer_s_record_gives_no_contact(
    resolver, captured_logs, customer_id, detail
):
    """With `id_path` set, a single-mode reply must carry the ID asked for there: an API that answered
    every lookup with one customer's record had every message of the batch sent to that customer."""
    async with serving(one_customer_for_every_id(customer_id)) as base_url:
        await put(resolver, single_config(base_url, id_path="customer.id"))
        reply = await resolve(resolver, ["cust-000001", "cust-000002", "cust-000003"])
        tested = await resolver.stub.TestPiiApiConfig(
            pb.TestPiiApiConfigRequest(
                config=single_config(base_url, id_path="customer.id"), test_anonymous_id="cust-000001"
            )
        )
    by_id = {c.anonymous_id: c for c in reply.contacts}
    if customer_id is not None:
        assert by_id.pop(customer_id).contact == "zed@example.org"  # the one lookup the reply was for
    for contact in by_id.values():
        assert contact.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
        assert contact.error.detail == detail
        assert contact.contact == "" and not contact.attributes
    assert tested.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
    assert tested.error.detail == detail
    assert tested.contact == "" and not tested.attributes
    assert "customer.email" in tested.response_keys  # the reply's paths are shown, to pick id_path from
    logged = "\n".join(record.getMessage() for record in captured_logs.records)
    assert "zed@example.org" not in logged and "Zedediah" not in logged


async def test_a_single_lookup_whose_reply_carries_the_id_asked_for_resolves(resolver, pii_api, customers):
    """The sample PII API answers each ID with its own customer: every ID resolves as without `id_path`."""
    chosen = list(customers.values())[:3]
    await put(resolver, single_config(pii_api.base_url, id_path="customer.id"))
    reply = await resolve(resolver, [c.anonymous_id for c in chosen])
    assert [c.contact for c in reply.contacts] == [c.email for c in chosen]
    assert not any(c.HasField("error") for c in reply.contacts)


async def test_a_single_mode_id_path_that_does_not_compile_is_refused_at_save(resolver, pii_api):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await put(resolver, single_config(pii_api.base_url, id_path="customer..id"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("config.id_path: is not a valid JMESPath expression")


async def test_a_single_mode_content_api_answered_for_another_customer_gives_no_fields(resolver):
    """A content API's fields are a customer's too: with `id_path` set, a reply for another customer fails
    the ID CONTENT_API_FAILED (its contact dropped), as the Test call shows."""
    records = '{"id": "cust-000002", "email": "zed@example.org", "points": 99}'
    async with serving(reply_of(records)) as base_url:
        config = pb.ContentApiConfig(
            workspace_id="ws-1",
            name="loyalty",
            mode=pb.MODE_SINGLE,
            method=pb.HTTP_METHOD_POST,
            url=f"{base_url}/lookup",
            body='{"id": "@anonymous_id"}',
            results_path="results",
            id_path="id",
            field_paths={"points": "points"},
        )
        tested = await resolver.stub.TestContentApiConfig(
            pb.TestContentApiConfigRequest(config=config, test_anonymous_id="cust-000001")
        )
        await put(resolver, reply_config(base_url, pb.MODE_SINGLE, channel=EMAIL))  # the PII API checks no ID
        await resolver.stub.PutContentApiConfig(pb.PutContentApiConfigRequest(config=config))
        [contact] = (await resolve(resolver, ["cust-000002"], content_api_names=["loyalty"])).contacts
        [other] = (await resolve(resolver, ["cust-000001"], content_api_names=["loyalty"])).contacts
    another = "the reply is for another customer: its ID at id_path is not the one asked for"
    assert tested.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
    assert tested.error.detail == another
    assert not tested.fields
    assert not contact.HasField("error"), contact.error.detail
    assert contact.content["loyalty"].fields["points"] == "99"
    assert other.error.code == E.RESOLVE_ERROR_CODE_CONTENT_API_FAILED
    assert another in other.error.detail
    assert other.contact == "" and not other.content
