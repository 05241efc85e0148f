"""A PII API that seals its values in URL-safe base64 without padding (Java's and JavaScript's usual
encoders) is read as one in standard padded base64 is, through the resolver, in either mode."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from tests.conftest import serving
from tests.pii_configs import bulk_config, customers_api, single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
KEY = os.urandom(32)


def seal_urlsafe_unpadded(plaintext: str) -> str:
    nonce = os.urandom(12)
    raw = nonce + AESGCM(KEY).encrypt(nonce, plaintext.encode(), None)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def record(anonymous_id: str) -> dict:
    return {
        "id": anonymous_id,
        "email": seal_urlsafe_unpadded(f"{anonymous_id}@example.org"),
        "first": seal_urlsafe_unpadded("Zoë ☃ ~~~ ???"),  # bytes whose base64 holds '-' and '_'
    }


@pytest.mark.parametrize("mode", ["single", "bulk"])
async def test_urlsafe_unpadded_values_decrypt(resolver, mode):
    key = base64.b64encode(KEY).decode()
    ids = [f"cust-{i}" for i in range(8)]
    async with serving(customers_api(record)) as base_url:
        if mode == "single":
            config = single_config(base_url, encryption_key=key, attribute_paths={"first_name": "customer.first"})
        else:
            config = bulk_config(base_url, encryption_key=key, attribute_paths={"first_name": "first"})
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
        reply = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=ids)
        )
    for anonymous_id, contact in zip(ids, reply.contacts, strict=True):
        assert not contact.HasField("error"), contact.error.detail
        assert contact.contact == f"{anonymous_id}@example.org"
        assert dict(contact.attributes) == {"first_name": "Zoë ☃ ~~~ ???"}
