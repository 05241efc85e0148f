"""The receipts service as a process, stopped on SIGTERM with webhooks and a gRPC call in flight.

The webhook server and the gRPC server drain at once, each within TOKENSEND_GRACE_SECONDS: the
process exits within one grace period (not two, one after the other), new webhooks are refused at
once, and a webhook whose body is still arriving when the signal comes is answered.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
import pytest
from tokensend.receipts.v1 import receipts_service_pb2 as rpb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as rpb_grpc

from sandbox.processes import start_service
from sandbox.signing import whatsapp_signature
from tests.conftest import free_port, new_secret_key
from tests.integration.test_receipts_harness import (
    CONNECTORS,
    WS,
    Pii,
    ProviderSecrets,
    SnsPeer,
    receipts_settings,
    save_connectors,
    shared_sns_signer,
    sns_confirmation,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.e2e

GRACE = 3.0
# Closing the clients and leaving the process take well under a second; two grace periods one after
# the other would be 6 s.
MARGIN = 2.0


@asynccontextmanager
async def silent_https_peer() -> AsyncIterator[tuple[int, list[int]]]:
    """A port that accepts connections and never answers (not even the TLS handshake): an SNS subscription
    confirmation sent there holds its receipt until the fetch times out. Yields the port and a list that
    grows by one per connection."""
    connections: list[int] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await reader.read()  # until the receipts service gives up on it
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()


def hanging_confirmation(sns: SnsPeer, silent_port: int) -> bytes:
    """A signed SES subscription confirmation whose SubscribeURL never answers."""
    token = uuid.uuid4().hex
    envelope = sns_confirmation(f"https://127.0.0.1:{silent_port}/?Action=ConfirmSubscription&Token={token}", token)
    return json.dumps(sns.sign(envelope, 2)).encode()


async def until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_webhooks_and_grpc_drain_together_within_one_grace_period(redis, redis_url, tmp_path) -> None:
    grpc_port, http_port = free_port(), free_port()
    secret_key = new_secret_key()
    with tempfile.TemporaryDirectory() as directory:
        sns = SnsPeer(shared_sns_signer(), directory)
        await sns.start()
        settings = receipts_settings(redis_url, sns, secret_key=secret_key)
        secrets = ProviderSecrets()
        await save_connectors(redis, settings, secrets)
        async with silent_https_peer() as (silent_port, connections):
            receipts = await start_service(
                "receipts",
                grpc_port,
                {
                    "redis_url": redis_url,
                    "secret_key": secret_key,
                    "grpc_host": "127.0.0.1",
                    "http_host": "127.0.0.1",
                    "allow_private_networks": "true",
                    "public_webhook_url": settings.public_webhook_url,
                    "grace_seconds": str(GRACE),
                    # The certificate from the SNS peer, the confirmations to the silent one.
                    "sns_cert_host_pattern": r"^127\.0\.0\.1:[0-9]+$",
                    "sns_ca_file": sns.ca_file,
                    "sns_signing_ca_file": sns.ca_file,
                    "sns_fetch_timeout_seconds": "60",
                    "receipt_read_timeout_seconds": "60",
                },
                tmp_path,
                http_port=http_port,
            )
            base = f"http://127.0.0.1:{http_port}"
            channel = grpc.aio.insecure_channel(receipts.address)
            http = aiohttp.ClientSession()
            pending: list[asyncio.Future] = []
            try:
                # In flight on gRPC and on the webhooks: each holds its server until the grace period ends.
                relayed = asyncio.ensure_future(
                    rpb_grpc.ReceiptsServiceStub(channel).IngestReceipt(
                        rpb.IngestReceiptRequest(
                            provider=rpb.PROVIDER_SES,
                            workspace_id=WS,
                            connector_id=CONNECTORS["ses"],
                            body=hanging_confirmation(sns, silent_port),
                        ),
                        timeout=30,
                    )
                )
                posted = asyncio.ensure_future(
                    http.post(
                        f"{base}/webhooks/ses/{WS}/{CONNECTORS['ses']}", data=hanging_confirmation(sns, silent_port)
                    )
                )
                pending += [relayed, posted]
                pii = Pii.new()
                body = json.dumps(whatsapp_body([whatsapp_status("read", pii)], pii)).encode()
                rest_of_body = asyncio.Event()

                async def slow_body() -> AsyncIterator[bytes]:
                    yield body[:10]
                    await rest_of_body.wait()
                    yield body[10:]

                slow = asyncio.ensure_future(
                    http.post(
                        f"{base}/webhooks/whatsapp/{WS}/{CONNECTORS['whatsapp']}",
                        data=slow_body(),
                        headers={"X-Hub-Signature-256": whatsapp_signature(secrets.whatsapp_app_secret, body)},
                    )
                )
                pending.append(slow)
                await until(lambda: len(connections) >= 2)  # both confirmations under way
                await asyncio.sleep(0.3)
                assert not relayed.done() and not posted.done() and not slow.done()

                signalled = time.monotonic()
                receipts.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                refused_at = time.monotonic()
                try:
                    async with http.post(
                        f"{base}/webhooks/whatsapp/{WS}/{CONNECTORS['whatsapp']}", data=b"{}"
                    ) as reply:
                        assert reply.status == 503 and reply.headers["Retry-After"] == "1"
                except aiohttp.ClientConnectionError:
                    pass  # the listener closed: refused at once all the same
                assert time.monotonic() - refused_at < 1.0
                rest_of_body.set()
                async with await slow as reply:
                    assert reply.status == 200, await reply.text()
                    assert (await reply.json())["unmapped"] == 1

                code = await asyncio.wait_for(receipts.process.wait(), GRACE + 30)
                took = time.monotonic() - signalled
                log = receipts.log_path.read_text()
                assert code == 0, log
                assert took < GRACE + MARGIN, f"stopped in {took:.1f}s with a {GRACE}s grace period"
                assert "shutting down (grace 3.0s)" in log
                with pytest.raises(grpc.aio.AioRpcError):  # cut off at the end of the grace period
                    await relayed
            finally:
                for future in pending:
                    future.cancel()
                await http.close()
                await channel.close()
                await receipts.stop()
        await sns.stop()
