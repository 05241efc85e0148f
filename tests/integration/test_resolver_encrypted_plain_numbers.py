"""With an encryption key, the values of a PII API's reply that are text are ciphertext; a number or
true/false beside them (loyalty points, a flag: nothing the API sealed) is read as it is. Text that does
not decrypt still fails its ID."""

from __future__ import annotations

import base64
import json
import os

import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import encrypt_value
from tests.conftest import serving
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode
KEY = os.urandom(32)
PATHS = {"first_name": "first", "points": "points", "vip": "vip", "tier": "tier"}


def record(anonymous_id: str) -> dict:
    sealed = {
        "id": anonymous_id,
        "email": encrypt_value(KEY, f"{anonymous_id}@example.org"),
        "first": encrypt_value(KEY, "Zoë"),
        "points": 1200,
        "vip": True,
    }
    if anonymous_id == "plain-tier":
        sealed["tier"] = "Gold"  # text the API forgot to seal: no ciphertext, so no value to trust
    return sealed


def api() -> web.Application:
    async def single(request: web.Request) -> web.Response:
        return web.json_response({"customer": record(request.match_info["id"])})

    async def bulk(request: web.Request) -> web.Response:
        ids = json.loads(await request.read())["ids"]
        return web.json_response({"data": {"results": [record(i) for i in ids]}})

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", single)
    app.router.add_post("/v1/customers:batchGet", bulk)
    return app


@pytest.mark.parametrize("mode", ["single", "bulk"])
async def test_numbers_and_flags_beside_encrypted_values_are_read_as_they_are(resolver, mode):
    key = base64.b64encode(KEY).decode()
    async with serving(api()) as base_url:
        if mode == "single":
            paths = {name: f"customer.{path}" for name, path in PATHS.items()}
            config = single_config(base_url, encryption_key=key, attribute_paths=paths)
        else:
            config = bulk_config(base_url, encryption_key=key, attribute_paths=PATHS)
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
        reply = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=["cust-1", "plain-tier"])
        )
    sealed, plain_tier = reply.contacts
    assert not sealed.HasField("error"), sealed.error.detail
    assert sealed.contact == "cust-1@example.org"
    assert dict(sealed.attributes) == {"first_name": "Zoë", "points": "1200", "vip": "true"}
    assert plain_tier.error.code == E.RESOLVE_ERROR_CODE_DECRYPTION_FAILED
    assert "Gold" not in plain_tier.error.detail
