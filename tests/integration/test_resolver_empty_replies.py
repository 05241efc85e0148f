"""A PII API that answers a lookup with a 200 and no body at all (a handler that returned no record) has
answered, as with a 204: the ID fails INVALID_RESPONSE at once, and the API's circuit stays closed for
the customers it does know."""

from __future__ import annotations

import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from tests.conftest import serving
from tests.pii_configs import bulk_config, single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode


def knowing_only_known(asked: list[str]) -> web.Application:
    """Customers whose ID starts with "known" have a record; any other gets a 200 with `b""` or blanks."""

    async def single(request: web.Request) -> web.Response:
        anonymous_id = request.match_info["id"]
        asked.append(anonymous_id)
        if anonymous_id.startswith("known"):
            return web.json_response({"customer": {"email": f"{anonymous_id}@example.org"}})
        return web.Response(body=b" \r\n" if anonymous_id.endswith("blank") else b"", content_type="application/json")

    async def bulk(request: web.Request) -> web.Response:
        asked.append("batch")
        return web.Response(body=b"", content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", single)
    app.router.add_post("/v1/customers:batchGet", bulk)
    return app


async def test_an_empty_200_is_the_apis_answer_not_retried_nor_held_against_its_circuit(start_resolver):
    resolver = await start_resolver(circuit_failure_threshold=2, circuit_open_seconds=30)
    asked: list[str] = []
    unknown = ["nobody-1", "nobody-2", "nobody-blank", "nobody-4"]
    async with serving(knowing_only_known(asked)) as base_url:
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=single_config(base_url, max_retries=3)))
        reply = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=[*unknown, "known-1"])
        )
        *empty, known = reply.contacts
        later = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=["known-2"])
        )
    for contact in empty:
        assert contact.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
        assert contact.error.detail == "reply is empty (HTTP 200): no record to read"
        assert (contact.error.attempts, contact.error.http_status) == (1, 200)
    assert sorted(asked) == sorted([*unknown, "known-1", "known-2"])  # each asked once
    assert known.contact == "known-1@example.org"
    assert later.contacts[0].contact == "known-2@example.org"  # the circuit did not open


async def test_an_empty_200_to_a_batch_fails_its_ids_once(resolver):
    asked: list[str] = []
    async with serving(knowing_only_known(asked)) as base_url:
        await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=bulk_config(base_url, max_retries=3)))
        reply = await resolver.stub.ResolveContacts(
            pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=["a", "b"])
        )
    assert asked == ["batch"]
    for contact in reply.contacts:
        assert contact.error.code == E.RESOLVE_ERROR_CODE_INVALID_RESPONSE
        assert contact.error.detail == "reply is empty (HTTP 200): no record to read"
