"""SendTest's PII API error for an error reply larger than what a Test reply shows of a body."""

from __future__ import annotations

import pytest
from aiohttp import web
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from tests.conftest import serving
from tests.integration.test_dispatcher_campaigns import EMAIL
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration


async def test_a_large_json_error_reply_shows_the_record_it_quotes_only_by_its_shape(start_suite):
    """A 422 of JSON past the part of a body the Test reply carries (256 KiB), its customer's record first:
    cut short, it no longer reads as JSON, and must not be shown as text for that."""
    suite = await start_suite()

    async def refused(request: web.Request) -> web.Response:
        record = {"name": "Zebulon Quartermaine", "city": "Ravensworth Fell"}
        history = [{"note": f"entry {n}"} for n in range(30_000)]  # about 600 KB
        body = {"customer": record, "message": "customer is restricted", "history": history}
        return web.json_response(body, status=422)

    app = web.Application()
    app.router.add_get("/v1/customers/{id}", refused)
    async with serving(app) as base_url:
        config = single_config(base_url, workspace_id=suite.workspace_id, max_retries=0)
        await suite.resolver.stub.PutPiiApiConfig(rpb.PutPiiApiConfigRequest(config=config))
        reply = await suite.dispatcher.stub.SendTest(
            pb.SendTestRequest(
                workspace_id=suite.workspace_id,
                campaign_id="spring",
                channel=common_pb2.CHANNEL_EMAIL,
                connector_id="sendgrid",
                content=EMAIL,
                recipient=pb.Recipient(anonymous_id="cust-000001"),
            )
        )
    assert reply.pii_api_http_status == 422
    assert "bytes that open as JSON but do not parse (cut short?), not shown" in reply.pii_api_error
    for value in ("Zebulon", "Quartermaine", "Ravensworth"):
        assert value not in reply.pii_api_error, reply.pii_api_error[:300]
