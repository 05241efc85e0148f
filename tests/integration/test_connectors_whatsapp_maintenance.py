"""WhatsApp Cloud's 131057, a business account in maintenance mode, against a local Graph API stand-in: every
message of the batch would meet it, so the first stops the batch, with a code that says to run again later."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.message_client import MessageClient
from services.dispatcher.connectors.whatsapp import WhatsAppCloudConnector

pytestmark = pytest.mark.integration

TOKEN = "EAAG-canary-access-token"
PHONE_NUMBER_ID = "106540352242922"
PHONE = "+16505076520"


def maintenance(status: int) -> web.Response:
    """Meta's reply, its message and details quoting what they may (never to be echoed)."""
    error = {
        "message": f"(#131057) Business account is in maintenance mode for {PHONE}",
        "type": "OAuthException",
        "code": 131057,
        "error_data": {"messaging_product": "whatsapp", "details": f"Business account is in maintenance mode {PHONE}"},
        "fbtrace_id": "AbCdEf",
    }
    return web.json_response({"error": error}, status=status)


@pytest.fixture
async def graph() -> AsyncIterator[Callable[[int], Any]]:
    servers: list[TestServer] = []

    async def start(status: int) -> tuple[str, list[str]]:
        requests: list[str] = []

        async def messages(request: web.Request) -> web.Response:
            requests.append(request.headers.get("Authorization", ""))
            return maintenance(status)

        app = web.Application()
        app.router.add_post("/v21.0/{phone_number_id}/messages", messages)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/v21.0")), requests

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def http(provider_http: aiohttp.ClientSession | MessageClient) -> aiohttp.ClientSession | MessageClient:
    return provider_http


async def no_sleep(_: float) -> None:
    return None


def message(i: int) -> OutboundMessage:
    return OutboundMessage(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=PHONE,
        sms_body="Hi Ann, your order shipped",
    )


@pytest.mark.parametrize("status", [500, 400])
async def test_maintenance_mode_stops_the_batch_to_run_again_later(graph, http, status: int) -> None:
    base_url, requests = await graph(status)
    connector = WhatsAppCloudConnector(
        access_token=TOKEN,
        phone_number_id=PHONE_NUMBER_ID,
        http=http,
        retry=RetryPolicy(max_retries=3),
        base_url=base_url,
        sleep=no_sleep,
    )
    batch = [message(i) for i in range(4)]
    outcomes = await connector.send(batch)
    assert len(requests) == 1  # neither retried (it lasts minutes) nor asked again for the batch's others
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [(SendStatus.FAILED, "RATE_LIMITED", 1)] + [
        (SendStatus.FAILED, "RATE_LIMITED", 0)
    ] * 3
    assert outcomes[0].account_refused
    assert outcomes[0].error_message == (
        f"whatsapp's business account is in maintenance mode (HTTP {status}, whatsapp error 131057), as during a "
        "throughput upgrade: Meta takes no message until it ends; not retried, re-run the instance in a few minutes"
    )
    for outcome in outcomes:
        assert PHONE not in outcome.error_message and PHONE[1:] not in outcome.error_message
        assert TOKEN not in outcome.error_message
