"""Tests for the sample PII API the demo, tests and benchmarks use in place of a brand's API."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import phonenumbers
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandbox.pii_api import (
    MAX_BATCH_IDS,
    Customer,
    Faults,
    OAuthClient,
    PiiApiSandbox,
    encrypt_value,
    generate_customers,
    main,
    start_pii_api,
)

KEY = bytes(range(32))
OAUTH = OAuthClient(client_id="brand-client", client_secret="s3cret+with:odd chars", token_ttl_seconds=60)
BATCH = "/v1/customers:batchGet"


@asynccontextmanager
async def serve(sandbox: PiiApiSandbox) -> AsyncIterator[TestClient]:
    # TestClient turns off aiohttp's silent retry of idempotent requests, so dropped connections show.
    async with TestClient(TestServer(sandbox.build_app())) as client:
        yield client


def make_sandbox(**kwargs) -> PiiApiSandbox:
    return PiiApiSandbox(generate_customers(5), **kwargs)


def basic(client_id: str, client_secret: str, *, form_encode: bool = False) -> dict[str, str]:
    if form_encode:  # RFC 6749 §2.3.1
        client_id, client_secret = urllib.parse.quote_plus(client_id), urllib.parse.quote_plus(client_secret)
    encoded = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def decrypt(value: str) -> str:
    raw = base64.b64decode(value, validate=True)
    return AESGCM(KEY).decrypt(raw[:12], raw[12:], None).decode()


async def fetch_token(client: TestClient) -> str:
    resp = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(OAUTH.client_id, OAUTH.client_secret),
    )
    assert resp.status == 200
    return (await resp.json())["access_token"]


# -- made-up customers ------------------------------------------------------------------------------


def test_generate_customers_is_deterministic_and_plausible() -> None:
    customers = generate_customers(500, seed=3)
    assert customers == generate_customers(500, seed=3)
    assert customers != generate_customers(500, seed=4)
    assert list(customers)[:2] == ["cust-000001", "cust-000002"]
    regions = set()
    for anonymous_id, customer in customers.items():
        assert customer.anonymous_id == anonymous_id
        local, _, domain = customer.email.partition("@")
        assert domain in {"example.com", "example.org", "example.net"}
        assert local == f"{customer.first_name.lower()}.{customer.last_name.lower()}.{int(anonymous_id[5:])}"
        number = phonenumbers.parse(customer.phone)
        assert phonenumbers.is_valid_number(number), customer.phone
        assert phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164) == customer.phone
        regions.add(phonenumbers.region_code_for_number(number))
    assert {"GB", "US", "FR", "DE", "AU"} <= regions


# -- single and bulk shapes -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_single_found_and_not_found() -> None:
    sandbox = make_sandbox()
    expected = sandbox.customers["cust-000002"]
    async with serve(sandbox) as client:
        resp = await client.get("/v1/customers/cust-000002")
        assert resp.status == 200
        assert await resp.json() == {
            "customer": {
                "id": "cust-000002",
                "email": expected.email,
                "phone": expected.phone,
                "profile": {"first_name": expected.first_name, "last_name": expected.last_name},
            }
        }
        resp = await client.get("/v1/customers/cust-999999")
        assert resp.status == 404
        assert await resp.json() == {"error": {"code": "not_found", "message": "customer not found"}}


@pytest.mark.asyncio
async def test_lookup_by_query_parameter() -> None:
    sandbox = make_sandbox()
    async with serve(sandbox) as client:
        resp = await client.get("/v1/lookup", params={"customer_id": "cust-000003"})
        assert resp.status == 200
        assert (await resp.json())["customer"]["email"] == sandbox.customers["cust-000003"].email
        assert (await client.get("/v1/lookup", params={"customer_id": "nope"})).status == 404
        assert (await client.get("/v1/lookup")).status == 400


@pytest.mark.asyncio
async def test_bulk_omits_unknown_ids() -> None:
    sandbox = make_sandbox()
    async with serve(sandbox) as client:
        resp = await client.post(BATCH, json={"ids": ["cust-000001", "ghost", "cust-000004"]})
        assert resp.status == 200
        body = await resp.json()
        assert [r["id"] for r in body["data"]["results"]] == ["cust-000001", "cust-000004"]
        assert body["meta"] == {"requested": 3, "found": 2}
        first = body["data"]["results"][0]
        assert first["phone"] == sandbox.customers["cust-000001"].phone
        assert first["profile"]["last_name"] == sandbox.customers["cust-000001"].last_name

        resp = await client.post(BATCH, json={"customer_ids": ["cust-000005"]})
        assert [r["id"] for r in (await resp.json())["data"]["results"]] == ["cust-000005"]


@pytest.mark.asyncio
async def test_bulk_rejects_bad_requests() -> None:
    async with serve(make_sandbox()) as client:
        assert (await client.post(BATCH, json={"ids": ["x"] * MAX_BATCH_IDS})).status == 200
        assert (await client.post(BATCH, json={"ids": ["x"] * (MAX_BATCH_IDS + 1)})).status == 400
        bad_json = await client.post(BATCH, data=b"{not json", headers={"Content-Type": "application/json"})
        assert bad_json.status == 400
        assert (await client.post(BATCH, json={"ids": "cust-000001"})).status == 400
        assert (await client.post(BATCH, json=["cust-000001"])).status == 400


# -- auth -------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_oauth_required_and_basic_token_flow() -> None:
    async with serve(make_sandbox(oauth=OAUTH)) as client:
        resp = await client.get("/v1/customers/cust-000001")
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        bogus = await client.get("/v1/customers/cust-000001", headers={"Authorization": "Bearer nope"})
        assert bogus.status == 401

        resp = await client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "scope": "contacts.read", "audience": "pii"},
            headers=basic(OAUTH.client_id, OAUTH.client_secret, form_encode=True),
        )
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        token = await resp.json()
        assert token["token_type"] == "Bearer"
        assert token["expires_in"] == 60
        assert token["scope"] == "contacts.read"
        authed = await client.get(
            "/v1/customers/cust-000001", headers={"Authorization": f"Bearer {token['access_token']}"}
        )
        assert authed.status == 200


@pytest.mark.asyncio
async def test_oauth_form_credentials_and_errors() -> None:
    async with serve(make_sandbox(oauth=OAUTH)) as client:
        form = {"grant_type": "client_credentials", "client_id": OAUTH.client_id, "client_secret": OAUTH.client_secret}
        resp = await client.post("/oauth/token", data=form)
        assert resp.status == 200
        token = (await resp.json())["access_token"]
        ok = await client.post(BATCH, json={"ids": ["cust-000001"]}, headers={"Authorization": f"Bearer {token}"})
        assert ok.status == 200

        wrong = await client.post("/oauth/token", data={**form, "client_secret": "guess"})
        assert wrong.status == 401
        assert await wrong.json() == {"error": "invalid_client"}
        wrong_basic = await client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(OAUTH.client_id, "guess"),
        )
        assert wrong_basic.status == 401
        grant = await client.post("/oauth/token", data={**form, "grant_type": "password"})
        assert grant.status == 400
        assert await grant.json() == {"error": "unsupported_grant_type"}


@pytest.mark.asyncio
async def test_revoke_and_expiry_force_a_new_token() -> None:
    now = [1000.0]
    sandbox = make_sandbox(oauth=OAUTH, clock=lambda: now[0])
    async with serve(sandbox) as client:
        headers = {"Authorization": f"Bearer {await fetch_token(client)}"}
        assert (await client.get("/v1/customers/cust-000001", headers=headers)).status == 200
        revoked = await client.post("/_admin/tokens/revoke")
        assert await revoked.json() == {"revoked": 1}
        assert (await client.get("/v1/customers/cust-000001", headers=headers)).status == 401

        headers = {"Authorization": f"Bearer {await fetch_token(client)}"}
        now[0] += OAUTH.token_ttl_seconds - 1
        assert (await client.get("/v1/customers/cust-000001", headers=headers)).status == 200
        now[0] += 1
        assert (await client.get("/v1/customers/cust-000001", headers=headers)).status == 401


@pytest.mark.asyncio
async def test_static_api_key() -> None:
    async with serve(make_sandbox(api_key="k-123")) as client:
        assert (await client.get("/v1/customers/cust-000001")).status == 401
        assert (await client.get("/v1/customers/cust-000001", headers={"X-Api-Key": "k-12"})).status == 401
        assert (await client.get("/v1/customers/cust-000001", headers={"X-Api-Key": "k-123"})).status == 200


# -- encryption -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_encrypted_fields_round_trip() -> None:
    sandbox = make_sandbox(encryption_key=KEY, faults=Faults(empty_contacts={"cust-000002"}))
    expected = sandbox.customers["cust-000001"]
    async with serve(sandbox) as client:
        single = (await (await client.get("/v1/customers/cust-000001")).json())["customer"]
        resp = await client.post(BATCH, json={"ids": ["cust-000001", "cust-000002"]})
        bulk = (await resp.json())["data"]["results"]
    for record in (single, bulk[0]):
        assert record["id"] == "cust-000001"
        assert decrypt(record["email"]) == expected.email
        assert decrypt(record["phone"]) == expected.phone
        assert decrypt(record["profile"]["first_name"]) == expected.first_name
        assert decrypt(record["profile"]["last_name"]) == expected.last_name
    assert single["email"] != bulk[0]["email"]  # fresh nonce every time
    assert decrypt(bulk[1]["email"]) == ""


def test_encrypt_value_layout_and_key_size() -> None:
    raw = base64.b64decode(encrypt_value(KEY, "alice@example.com"))
    assert len(raw) == 12 + len("alice@example.com") + 16
    assert AESGCM(KEY).decrypt(raw[:12], raw[12:], None) == b"alice@example.com"
    with pytest.raises(ValueError):
        encrypt_value(b"short", "x")
    with pytest.raises(ValueError):
        PiiApiSandbox({}, encryption_key=b"short")


# -- faults -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_latency_fault() -> None:
    async with serve(make_sandbox(faults=Faults(latency_ms=60))) as client:
        started = time.monotonic()
        assert (await client.get("/v1/customers/cust-000001")).status == 200
        assert time.monotonic() - started >= 0.06


@pytest.mark.asyncio
async def test_fail_status_counts_down_or_sticks() -> None:
    sandbox = make_sandbox(faults=Faults(fail_status=503, fail_count=2))
    async with serve(sandbox) as client:
        for _ in range(2):
            resp = await client.post(BATCH, json={"ids": ["cust-000001"]})
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "injected_failure"
        assert (await client.post(BATCH, json={"ids": ["cust-000001"]})).status == 200

        sandbox.faults = Faults(fail_status=500, fail_count=-1)
        for _ in range(3):
            assert (await client.get("/v1/customers/cust-000001")).status == 500


@pytest.mark.asyncio
async def test_rate_limit_fault() -> None:
    async with serve(make_sandbox(faults=Faults(rate_limit_count=1, retry_after_seconds=7))) as client:
        resp = await client.get("/v1/customers/cust-000001")
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        assert (await client.get("/v1/customers/cust-000001")).status == 200


@pytest.mark.asyncio
async def test_malformed_body_fault() -> None:
    async with serve(make_sandbox(faults=Faults(malformed_count=2))) as client:
        single = await client.get("/v1/customers/cust-000001")
        bulk = await client.post(BATCH, json={"ids": ["cust-000001"]})
        for resp in (single, bulk):
            assert resp.status == 200
            assert resp.content_type == "application/json"
            with pytest.raises(json.JSONDecodeError):
                json.loads(await resp.text())
        assert (await (await client.get("/v1/customers/cust-000001")).json())["customer"]["id"] == "cust-000001"


@pytest.mark.asyncio
async def test_missing_invalid_and_empty_contact_faults() -> None:
    faults = Faults(missing_ids={"cust-000001"}, invalid_contacts={"cust-000002"}, empty_contacts={"cust-000003"})
    async with serve(make_sandbox(faults=faults)) as client:
        assert (await client.get("/v1/customers/cust-000001")).status == 404
        body = await (await client.post(BATCH, json={"ids": ["cust-000001", "cust-000002", "cust-000003"]})).json()
    results = {r["id"]: r for r in body["data"]["results"]}
    assert set(results) == {"cust-000002", "cust-000003"}
    assert body["meta"] == {"requested": 3, "found": 2}
    assert (results["cust-000002"]["email"], results["cust-000002"]["phone"]) == ("not-an-email", "12ab")
    assert (results["cust-000003"]["email"], results["cust-000003"]["phone"]) == ("", "")
    assert results["cust-000003"]["profile"]["first_name"]  # only contacts are blanked


@pytest.mark.asyncio
async def test_echo_pii_in_errors_fault() -> None:
    sandbox = make_sandbox(faults=Faults(fail_status=500, fail_count=1, rate_limit_count=1))
    customer = sandbox.customers["cust-000001"]
    async with serve(sandbox) as client:
        for _ in range(2):
            text = await (await client.get("/v1/customers/cust-000001")).text()
            assert customer.email not in text and customer.phone not in text

        sandbox.faults = Faults(fail_status=500, fail_count=1, rate_limit_count=1, echo_pii_in_errors=True)
        limited = await client.post(BATCH, json={"ids": ["ghost", "cust-000001"]})
        failed = await client.get("/v1/customers/cust-000001")
        for resp in (limited, failed):
            text = await resp.text()
            assert customer.email in text and customer.phone in text
            assert (await resp.json())["customer"]["last_name"] == customer.last_name
        assert (limited.status, failed.status) == (429, 500)


@pytest.mark.asyncio
async def test_token_fail_status_fault() -> None:
    async with serve(make_sandbox(oauth=OAUTH, faults=Faults(token_fail_status=503))) as client:
        resp = await client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers=basic(OAUTH.client_id, OAUTH.client_secret),
        )
        assert resp.status == 503


@pytest.mark.asyncio
async def test_drop_connection_fault() -> None:
    sandbox = make_sandbox(faults=Faults(drop_connection_count=1))
    async with serve(sandbox) as client:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await client.get("/v1/customers/cust-000001")
        assert (await client.get("/v1/customers/cust-000001")).status == 200
    assert sandbox.stats.dropped_connections == 1


# -- admin and stats --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_admin_faults_endpoints() -> None:
    sandbox = make_sandbox()
    async with serve(sandbox) as client:
        faults = {"fail_status": 502, "fail_count": 1, "missing_ids": ["cust-000004"]}
        resp = await client.post("/_admin/faults", json=faults)
        assert resp.status == 200
        assert sandbox.faults == Faults(fail_status=502, fail_count=1, missing_ids={"cust-000004"})
        assert (await client.get("/v1/customers/cust-000001")).status == 502

        await client.post("/_admin/faults", json={"latency_ms": 1})  # replaces, does not merge
        assert sandbox.faults == Faults(latency_ms=1)
        assert (await (await client.get("/_admin/faults")).json())["latency_ms"] == 1

        assert (await client.post("/_admin/faults", json={"explode": True})).status == 400
        assert (await client.post("/_admin/faults", json={"fail_count": "many"})).status == 400
        assert (await client.delete("/_admin/faults")).status == 200
        assert sandbox.faults == Faults()


@pytest.mark.asyncio
async def test_admin_stats_and_reset() -> None:
    sandbox = make_sandbox(oauth=OAUTH)
    async with serve(sandbox) as client:
        headers = {"Authorization": f"Bearer {await fetch_token(client)}"}
        await client.get("/v1/customers/cust-000001", headers=headers)
        await client.get("/v1/customers/ghost", headers=headers)
        await client.post(BATCH, json={"ids": ["cust-000001", "cust-000002", "ghost"]}, headers=headers)
        await client.get("/v1/lookup?customer_id=cust-000001")  # no token

        stats = await (await client.get("/_admin/stats")).json()
        assert stats["requests"] == 5
        assert stats["by_path"] == {
            "/oauth/token": 1,
            "/v1/customers/{anonymous_id}": 2,
            BATCH: 1,
            "/v1/lookup": 1,
        }
        assert stats["ids_requested"] == 5
        assert stats["token_requests"] == 1
        assert stats["statuses"] == {"200": 3, "404": 1, "401": 1}

        assert (await client.post("/_admin/stats/reset")).status == 200
        assert sandbox.stats.requests == 0
        assert (await (await client.get("/_admin/stats")).json())["statuses"] == {}


# -- running it -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_start_pii_api_on_ephemeral_port() -> None:
    sandbox = PiiApiSandbox({"a-1": Customer("a-1", "a@example.com", "+447400123456", "A", "B")})
    runner, port = await start_pii_api(sandbox)
    try:
        assert port > 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/v1/customers/a-1") as resp:
                assert (await resp.json())["customer"]["phone"] == "+447400123456"
    finally:
        await runner.cleanup()


def test_cli_help_and_argument_checks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "--encryption-key" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["--encryption-key", base64.b64encode(b"too short").decode()])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        main(["--oauth-client-id", "only-the-id"])


@pytest.mark.asyncio
async def test_echo_credentials_in_errors_fault() -> None:
    sandbox = make_sandbox(api_key="sandbox-k3y", faults=Faults(fail_status=500, fail_count=-1))
    headers = {"X-Api-Key": "sandbox-k3y"}
    async with serve(sandbox) as client:
        quiet = await (await client.get("/v1/lookup?customer_id=cust-000001&tenant=t-1", headers=headers)).json()
        assert "request" not in quiet

        sandbox.faults = Faults(fail_status=500, fail_count=-1, echo_credentials_in_errors=True)
        failed = await client.get("/v1/lookup?customer_id=cust-000001&tenant=t-1", headers=headers)
        body = await failed.json()
        assert failed.status == 500 and body["error"]["code"] == "injected_failure"
        assert body["request"] == {
            "query": "customer_id=cust-000001&tenant=t-1",
            "x_api_key": "sandbox-k3y",
            "authorization": "",
        }
