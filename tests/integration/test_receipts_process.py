"""`python -m services.receipts` as a process: refuses to start without a key, serves, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb

from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from sandbox.signing import whatsapp_signature
from tests.conftest import free_port, grpcurl_path, new_secret_key
from tests.integration.test_receipts_harness import WS, Pii, put_messages, whatsapp_body, whatsapp_status

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def service_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update({f"TOKENSEND_{k.upper()}": v for k, v in values.items()})
    return env


async def test_missing_secret_key_exits_2(redis_url):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.receipts",
        cwd=ROOT, env=service_env(redis_url=redis_url, grpc_port="0", http_port="0"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"TOKENSEND_SECRET_KEY" in stderr


async def save_whatsapp_connector(redis, secret_key: str, app_secret: str) -> None:
    box = SecretBox([base64.urlsafe_b64decode(secret_key + "==")])
    await ConnectorStore(redis, box).save(
        dpb.Connector(
            workspace_id=WS,
            connector_id="wa-main",
            kind=dpb.CONNECTOR_KIND_WHATSAPP_CLOUD,
            channel=common_pb2.CHANNEL_WHATSAPP,
            credentials={"verify_token": "vt"},
            webhook_secret=app_secret,
        )
    )


async def read_until(stream: asyncio.StreamReader, needle: bytes, timeout: float = 10.0) -> bytes:
    seen = b""

    async def read() -> None:
        nonlocal seen
        while needle not in seen:
            chunk = await stream.read(4096)
            if not chunk:
                return
            seen += chunk

    await asyncio.wait_for(read(), timeout)
    return seen


async def test_serves_streams_live_to_grpcurl_then_stops_on_sigterm(redis, redis_url):
    grpc_port, http_port = free_port(), free_port()
    secret_key, app_secret = new_secret_key(), "app-secret"
    await save_whatsapp_connector(redis, secret_key, app_secret)
    [record] = await put_messages(redis, "whatsapp", 1)
    env = service_env(
        redis_url=redis_url,
        secret_key=secret_key,
        grpc_host="127.0.0.1",
        grpc_port=str(grpc_port),
        http_host="127.0.0.1",
        http_port=str(http_port),
        grace_seconds="1",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.receipts", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{http_port}/healthz") as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("webhooks never came up")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # An operator tails the events with grpcurl (reflection, no protos); a receipt arrives; it shows up.
        tail = await asyncio.create_subprocess_exec(
            grpcurl_path(), "-plaintext", "-d", json.dumps({"workspace_id": WS}), f"127.0.0.1:{grpc_port}",
            "tokensend.receipts.v1.ReceiptsService/StreamDeliveryEvents",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await asyncio.sleep(0.5)
            pii = Pii.new()
            body = json.dumps(whatsapp_body([whatsapp_status("read", pii, message_id=record.message_id)], pii))
            headers = {"X-Hub-Signature-256": whatsapp_signature(app_secret, body.encode())}
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{http_port}/webhooks/whatsapp/{WS}/wa-main"
                async with http.post(url, data=body, headers=headers) as reply:
                    assert reply.status == 200
            assert tail.stdout is not None
            shown = await read_until(tail.stdout, record.message_id.encode())
            assert b"DELIVERY_STATUS_READ" in shown and b"anon-0" in shown
        finally:
            tail.kill()
            await tail.wait()
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, stderr
        assert b"shutting down" in stderr
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
