"""A PII API that says "no such customer" with JSON null (`{"customer": null}`, a null in a bulk reply's
results, a record whose customer is null) gets NOT_FOUND for that ID, as a 404 or a missing bulk record
do; a customer who is there without a contact stays INVALID_CONTACT."""

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
NULL_CUSTOMER = "the API has no record for this ID (null at customer)"


async def put(resolver, config):
    return await resolver.stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))


async def resolve(resolver, ids):
    return await resolver.stub.ResolveContacts(
        pb.ResolveContactsRequest(workspace_id="ws-1", channel=EMAIL, anonymous_ids=ids)
    )


@pytest.mark.parametrize("mode", ["single", "bulk"])
async def test_a_null_record_is_not_found_and_an_empty_contact_still_invalid(resolver, pii_api, customers, mode):
    config = single_config(pii_api.base_url) if mode == "single" else bulk_config(pii_api.base_url)
    await put(resolver, config)
    faults = pii_api.sandbox.faults
    faults.null_records, faults.empty_contacts = {"cust-000002"}, {"cust-000003"}
    reply = await resolve(resolver, ["cust-000001", "cust-000002", "cust-000003"])
    found, null, empty = reply.contacts
    assert found.contact == customers["cust-000001"].email
    assert null.error.code == E.RESOLVE_ERROR_CODE_NOT_FOUND and null.contact == ""
    assert null.error.message == "Invalid API response (fetching Email ID)"
    if mode == "single":
        assert null.error.detail == NULL_CUSTOMER and null.error.http_status == 200
    else:
        assert null.error.detail == "ID not in the reply"
    assert empty.error.code == E.RESOLVE_ERROR_CODE_INVALID_CONTACT


async def test_the_test_screen_says_not_found_for_a_null_record(resolver, pii_api):
    pii_api.sandbox.faults.null_records = {"cust-000002"}
    reply = await resolver.stub.TestPiiApiConfig(
        pb.TestPiiApiConfigRequest(config=single_config(pii_api.base_url), test_anonymous_id="cust-000002")
    )
    assert reply.http_status == 200
    assert (reply.error.code, reply.error.detail) == (E.RESOLVE_ERROR_CODE_NOT_FOUND, NULL_CUSTOMER)


def replying(body: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        ("null", E.RESOLVE_ERROR_CODE_NOT_FOUND, "the API has no record for this ID (the reply is null)"),
        ('{"customer": null}', E.RESOLVE_ERROR_CODE_NOT_FOUND, NULL_CUSTOMER),
        ('{"customer": {"id": "cust-000001", "email": null}}', E.RESOLVE_ERROR_CODE_INVALID_CONTACT, None),
        ('{"customer": {"id": "cust-000001"}}', E.RESOLVE_ERROR_CODE_INVALID_CONTACT, "contact_path matched nothing"),
        ('{"client": {"id": "cust-000001"}}', E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, None),  # no ID at id_path
    ],
)
async def test_single_replies_with_and_without_a_record(resolver, body, code, detail):
    async with serving(replying(body)) as base_url:
        await put(resolver, single_config(base_url, id_path="customer.id", max_retries=0))
        [contact] = (await resolve(resolver, ["cust-000001"])).contacts
    assert contact.error.code == code, contact.error.detail
    if detail is not None:
        assert contact.error.detail == detail


async def test_a_bulk_record_whose_customer_is_null_is_not_found(resolver):
    records = (
        '{"results": [{"id": "a", "customer": null}, {"id": "b", "customer": {"email": null}},'
        ' {"id": "c", "customer": {"email": "c@example.org"}}]}'
    )
    async with serving(replying(records)) as base_url:
        config = bulk_config(
            base_url, results_path="results", contact_path="customer.email", attribute_paths={}, max_retries=0
        )
        await put(resolver, config)
        a, b, c = (await resolve(resolver, ["a", "b", "c"])).contacts
    assert (a.error.code, a.error.detail) == (E.RESOLVE_ERROR_CODE_NOT_FOUND, NULL_CUSTOMER)
    assert b.error.code == E.RESOLVE_ERROR_CODE_INVALID_CONTACT
    assert c.contact == "c@example.org"


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        ('{"data": {"results": null}}', E.RESOLVE_ERROR_CODE_NOT_FOUND, "ID not in the reply"),
        ('{"data": null}', E.RESOLVE_ERROR_CODE_NOT_FOUND, "ID not in the reply"),
        ("null", E.RESOLVE_ERROR_CODE_NOT_FOUND, "ID not in the reply"),
        ('{"data": {}}', E.RESOLVE_ERROR_CODE_INVALID_RESPONSE, "results_path did not select a list"),
    ],
)
async def test_a_bulk_reply_with_null_for_its_list_knows_none_of_the_batch(resolver, body, code, detail):
    """An API that knows none of a batch's IDs may say so with null for the list: each ID NOT_FOUND. A
    reply without the field results_path names is a path to mend."""
    async with serving(replying(body)) as base_url:
        await put(resolver, bulk_config(base_url, max_retries=0))
        reply = await resolve(resolver, ["a", "b"])
        test = await resolver.stub.TestPiiApiConfig(
            pb.TestPiiApiConfigRequest(config=bulk_config(base_url, max_retries=0), test_anonymous_id="a")
        )
    for contact in [*reply.contacts, test]:
        assert (contact.error.code, contact.error.detail) == (code, detail)
