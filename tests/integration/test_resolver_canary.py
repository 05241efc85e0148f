"""The invariant for the resolver: canary contacts and names reach the caller and nowhere else.

Unique canary values are served by the PII API, the resolver's whole surface is
exercised (saves, tests, single and bulk lookups, OAuth, decryption failures,
errors whose bodies echo the canaries), then every Redis key and value, every
log record and every gRPC error is scanned for them.
"""

from __future__ import annotations

import base64
import os

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from sandbox.pii_api import OAuthClient
from tests.canary import canary_customers, hits, needles, redis_dump
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration


async def test_no_canary_leaves_the_response(start_resolver, start_pii_api_server, redis, captured_logs):
    people = canary_customers(30)
    key = os.urandom(32)
    plain = await start_pii_api_server(people, oauth=OAuthClient("cid", "csecret"))
    encrypted = await start_pii_api_server(people, encryption_key=key)
    resolver = await start_resolver(circuit_failure_threshold=50)
    stub = resolver.stub
    errors: list[str] = []

    await stub.PutOAuthConfig(
        pb.PutOAuthConfigRequest(
            config=pb.OAuthConfig(
                workspace_id="ws-c",
                oauth_config_id="o1",
                token_url=f"{plain.base_url}/oauth/token",
                client_id="cid",
                client_secret="csecret",
            )
        )
    )
    configs = [
        bulk_config(plain.base_url, workspace_id="ws-c", oauth_config_id="o1", batch_size=7),
        single_config(plain.base_url, workspace_id="ws-c", channel=common_pb2.CHANNEL_SMS, oauth_config_id="o1"),
        bulk_config(
            encrypted.base_url,
            workspace_id="ws-c",
            channel=common_pb2.CHANNEL_WHATSAPP,
            encryption_key=base64.b64encode(key).decode(),
        ),
    ]
    for config in configs:
        await stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
        await stub.TestPiiApiConfig(pb.TestPiiApiConfigRequest(config=config, test_anonymous_id="canary-1"))

    ids = list(people) + ["", "unknown-id"]
    channels = (common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_WHATSAPP)
    resolved = 0
    for channel in channels:
        reply = await stub.ResolveContacts(
            pb.ResolveContactsRequest(
                workspace_id="ws-c", channel=channel, anonymous_ids=ids, campaign_id="c", campaign_instance_id="i"
            )
        )
        resolved += sum(1 for c in reply.contacts if c.contact)
    assert resolved == 3 * len(people)  # the canaries did reach the caller

    # Faults whose bodies quote the canaries, and contacts that fail validation.
    plain.sandbox.faults.echo_pii_in_errors = True
    plain.sandbox.faults.fail_status, plain.sandbox.faults.fail_count = 500, -1
    plain.sandbox.faults.invalid_contacts = set(people)
    for channel in channels[:2]:
        reply = await stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-c", channel=channel, anonymous_ids=ids)
        )
        errors += [str(c.error) for c in reply.contacts]
        test = await stub.TestPiiApiConfig(
            pb.TestPiiApiConfigRequest(
                saved=pb.TestPiiApiConfigRequest.SavedConfig(workspace_id="ws-c", channel=channel),
                test_anonymous_id="canary-2",
            )
        )
        errors.append(str(test.error))
    plain.sandbox.faults.fail_count = 0
    reply = await stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id="ws-c", channel=common_pb2.CHANNEL_EMAIL, anonymous_ids=ids)
    )
    errors += [str(c.error) for c in reply.contacts]
    await stub.PutPiiApiConfig(
        pb.PutPiiApiConfigRequest(
            config=bulk_config(
                encrypted.base_url,
                workspace_id="ws-c",
                channel=common_pb2.CHANNEL_WHATSAPP,
                encryption_key=base64.b64encode(os.urandom(32)).decode(),
            )
        )
    )
    reply = await stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id="ws-c", channel=common_pb2.CHANNEL_WHATSAPP, anonymous_ids=ids)
    )
    errors += [str(c.error) for c in reply.contacts]
    for bad in (pb.ResolveContactsRequest(workspace_id="ws-c", anonymous_ids=list(people)),):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ResolveContacts(bad)
        errors.append(caught.value.details() or "")

    canaries = needles(people)
    stored = await redis_dump(redis)
    assert stored, "the resolver wrote configs to Redis"
    assert hits(canaries, stored) == []
    logged = [r.getMessage() + (r.exc_text or "") for r in captured_logs.records]
    assert logged, "the resolver logged something"
    assert hits(canaries, logged) == []
    assert hits(canaries, errors) == []
