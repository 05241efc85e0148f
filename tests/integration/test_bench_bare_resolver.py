"""`python -m bench.bare_resolver` against the real sample PII API: it answers what the PII API holds,
one ID by a GET and several by one bulk POST, so the benchmark's reference calls do the same work."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as pb_grpc

from bench import peers
from bench.baseline import pii_api_token
from bench.workload import anonymous_id

pytestmark = pytest.mark.integration


async def test_the_bare_server_answers_what_the_pii_api_holds(tmp_path) -> None:
    pii = await peers.start_pii_api(tmp_path, customers=50)
    pii_url = f"http://127.0.0.1:{pii.port}"
    try:
        bare = await peers.start_bare_resolver(tmp_path, pii_url)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{bare.port}") as channel:
                stub = pb_grpc.ResolverServiceStub(channel)
                one = await stub.ResolveContacts(
                    pb.ResolveContactsRequest(channel=common_pb2.CHANNEL_SMS, anonymous_ids=[anonymous_id(7)])
                )
                ids = [anonymous_id(3), "cust-999999", anonymous_id(4)]
                several = await stub.ResolveContacts(
                    pb.ResolveContactsRequest(channel=common_pb2.CHANNEL_EMAIL, anonymous_ids=ids)
                )
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": f"Bearer {await pii_api_token(http, pii_url)}"}
                customers = {}
                for number in (3, 4, 7):
                    async with http.get(f"{pii_url}/v1/customers/{anonymous_id(number)}", headers=headers) as reply:
                        customers[number] = (await reply.json())["customer"]
                async with http.get(f"{pii_url}/_admin/stats") as reply:
                    stats = await reply.json()
        finally:
            await bare.stop()
    finally:
        await pii.stop()
    [seven] = one.contacts
    assert (seven.anonymous_id, seven.contact) == (anonymous_id(7), customers[7]["phone"])
    assert dict(seven.attributes) == {"first_name": customers[7]["profile"]["first_name"]}
    assert [c.anonymous_id for c in several.contacts] == ids  # in request order
    for contact, number in ((several.contacts[0], 3), (several.contacts[2], 4)):
        profile = customers[number]["profile"]
        assert contact.contact == customers[number]["email"]
        assert dict(contact.attributes) == {"first_name": profile["first_name"], "last_name": profile["last_name"]}
    assert several.contacts[1].error.code == pb.RESOLVE_ERROR_CODE_NOT_FOUND
    # One GET for the one ID and one bulk POST for the three (the test's own three GETs besides), with the
    # token fetched once at start.
    assert stats["by_path"] == {"/oauth/token": 2, "/v1/customers/{anonymous_id}": 1 + 3, "/v1/customers:batchGet": 1}
