"""5xx replies that may follow a send are never resent; the others are tried again.

A gateway's 504 says it passed the request on and gave up waiting for the provider, which may
have taken it (RFC 9110, 15.6.5): as after a read timeout of our own, the message ends
OUTCOME_UNKNOWN, its claim kept, and neither a retry nor a re-run sends it again. Twilio documents
the same of its 500 (20500: "an error in the server handling logic or a timeout in the API";
retrying a message create "may send multiple messages"). A 503 says the request was not taken.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.ses import SesConnector
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus


@pytest.mark.parametrize(
    ("channel", "connector_id", "provider", "status"),
    [
        (C.CHANNEL_SMS, "twilio", "twilio", 500),
        (C.CHANNEL_SMS, "twilio", "twilio", 504),
        (C.CHANNEL_WHATSAPP, "whatsapp", "whatsapp", 504),
        (C.CHANNEL_SMS, "gateway", "custom", 504),
    ],
    ids=["twilio-500", "twilio-504", "whatsapp-504", "gateway-504"],
)
async def test_a_server_error_that_may_follow_a_send_is_never_resent(
    start_suite, channel, connector_id, provider, status
):
    suite = await start_suite()
    suite.providers.set_faults(provider, status=status, status_count=1)
    reply = await dispatch(suite, channel, connector_id, SMS, recipients(1))
    (result,) = reply.results
    assert (S.Name(result.status), result.error_code) == ("DISPATCH_STATUS_SEND_FAILED", "OUTCOME_UNKNOWN")
    assert f"HTTP {status}" in result.error_message and "not resent" in result.error_message
    assert result.message_id  # kept: the provider may have it, and its receipts still map
    assert suite.providers.stats.requests[provider] == 1

    again = await dispatch(suite, channel, connector_id, SMS, recipients(1))
    assert again.results[0].status == S.DISPATCH_STATUS_DUPLICATE
    assert suite.providers.stats.requests[provider] == 1


async def test_twilio_s_503_is_still_tried_again(start_suite):
    suite = await start_suite()
    suite.providers.set_faults("twilio", status=503, status_count=1)
    reply = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(1))
    assert reply.results[0].status == S.DISPATCH_STATUS_SENT
    assert suite.providers.stats.requests["twilio"] == 2
    assert len(suite.providers.outbox_for("twilio")) == 1


# -- SES, through an SESv2 stand-in (moto cannot answer a 504) ---------------------------------------


@pytest.fixture
async def ses_answering() -> AsyncIterator:
    servers: list[TestServer] = []

    async def start(status: int) -> tuple[str, list[int]]:
        requests: list[int] = []

        async def send_email(request: web.Request) -> web.Response:
            await request.read()
            requests.append(status)
            return web.Response(status=status, text="upstream timed out", content_type="text/html")

        app = web.Application()
        app.router.add_post("/v2/email/outbound-emails", send_email)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), requests

    yield start
    for server in servers:
        await server.close()


async def no_sleep(_: float) -> None:
    return None


@pytest.mark.parametrize(("status", "expected", "requests"), [(504, "OUTCOME_UNKNOWN", 1), (503, "SERVER_ERROR", 3)])
async def test_ses_504_is_never_resent_and_503_is_tried_again(ses_answering, status, expected, requests) -> None:
    base_url, seen = await ses_answering(status)
    connector = SesConnector(
        access_key_id="AKIDEXAMPLE",
        secret_access_key="ses-secret",
        region="eu-west-1",
        sender="news@brand.example",
        retry=RetryPolicy(max_retries=2),
        base_url=base_url,
        allow_private=True,
        sleep=no_sleep,
    )
    message = OutboundMessage("m-1", "anon-1", "camp-1", "inst-1", to="c.canary@mail.example.org", text_body="Hi")
    try:
        (outcome,) = await connector.send([message])
    finally:
        await connector.close()
    assert outcome.error_code == expected and len(seen) == requests
    if status == 504:
        assert outcome.status is SendStatus.OUTCOME_UNKNOWN and "not resent" in outcome.error_message
