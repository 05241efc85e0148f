"""Provider requests over TLS, through both HTTP clients a connector can use: what is trusted and what is not."""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services.dispatcher.connectors.base import SendStatus
from services.dispatcher.connectors.http_retry import HttpRequest, HttpSender, RetryPolicy
from services.dispatcher.connectors.message_client import MessageClient
from tests.integration.peers import TlsMaterial, tls_material  # noqa: F401

pytestmark = pytest.mark.integration

PHONE = "+447700900123"


class TlsGateway:
    def __init__(self) -> None:
        self.requests = 0
        self.url = ""


@pytest.fixture
async def tls_gateway(tls_material: TlsMaterial) -> AsyncIterator[TlsGateway]:
    gateway = TlsGateway()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        gateway.requests += 1
        return web.json_response({"id": "m-1"})

    app = web.Application()
    app.router.add_post("/sms", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_material.server_context())
    await site.start()
    port = runner.addresses[0][1]
    gateway.url = f"https://localhost:{port}/sms"
    yield gateway
    await runner.cleanup()


async def send(http: aiohttp.ClientSession | MessageClient, url: str) -> object:
    async def no_sleep(_: float) -> None:
        pass

    sender = HttpSender(http, "acme", RetryPolicy(max_retries=3), sleep=no_sleep, rng=random.Random(1))
    return await sender.exchange(HttpRequest("POST", url, {}, f"to={PHONE}".encode()))


async def test_an_untrusted_certificate_fails_at_once_and_sends_nothing(provider_http, tls_gateway) -> None:
    exchange = await send(provider_http, tls_gateway.url)
    assert (exchange.status, exchange.error_code, exchange.attempts) == (SendStatus.FAILED, "CONNECTION_FAILED", 1)
    assert exchange.error_message == "acme TLS certificate not trusted"
    assert tls_gateway.requests == 0


async def test_the_message_client_trusts_the_system_store(
    tls_gateway, tls_material: TlsMaterial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Provider certificates are checked against the machine's trust store, which SSL_CERT_FILE can name."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text(tls_material.ca_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    client = MessageClient(allow_private=True)
    try:
        exchange = await send(client, tls_gateway.url)
    finally:
        await client.close()
    assert exchange.status is SendStatus.SENT and tls_gateway.requests == 1
