"""With an encryption key, the values of a PII API's reply that are text are ciphertext; a number or
true/false beside them (loyalty points, a flag: nothing the API sealed) is read as it is. Text that does
not decrypt still fails its ID."""

from __future__ import annotations

import base64
import os

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import encrypt_value
from tests.conftest import serving
from tests.pii_configs import bulk_config, customers_api, single_config

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


@pytest.mark.parametrize("mode", ["single", "bulk"])
async def test_numbers_and_flags_beside_encrypted_values_are_read_as_they_are(resolver, mode):
    key = base64.b64encode(KEY).decode()
    async with serving(customers_api(record)) as base_url:
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
