"""The webhook server's probes and refusals: `/healthz` says the process answers, `/readyz` follows the
same Redis watch as gRPC health and the start of shutdown; webhooks refused 503 before their body is
read (too many at once, too many body bytes held, shutdown begun) are counted by reason."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from libs.telemetry import setup_telemetry
from services.receipts.server import ReceiptsDeps, ReceiptsService, build_intake, start_receipts
from services.receipts.webhooks import build_webhook_app, start_webhook_app
from tests.integration.test_health_follows_redis import NOT_SERVING, SERVING, health_of
from tests.integration.test_health_follows_redis import until as until_health
from tests.integration.test_operator_metrics import by_attributes, key
from tests.integration.test_receipts_harness import (
    Pii,
    SnsPeer,
    put_messages,
    receipts_settings,
    running_receipts,
    shared_sns_signer,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration


@asynccontextmanager
async def receipts_service(redis_url: str, telemetry: Any = None, **overrides: Any) -> AsyncIterator[Any]:
    """Both servers as `python -m services.receipts` starts them; yields the service and the webhooks' URL."""
    with tempfile.TemporaryDirectory() as directory:
        sns = SnsPeer(shared_sns_signer(), directory)
        await sns.start()
        settings = receipts_settings(redis_url, sns, **overrides)
        service, _ = await start_receipts(settings, ReceiptsDeps.from_settings(settings, telemetry))
        assert isinstance(service, ReceiptsService) and service.webhooks is not None
        try:
            yield service, f"http://127.0.0.1:{service.webhooks.addresses[0][1]}"
        finally:
            await service.stop(0.5)
            await sns.stop()


async def probe(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as reply:
        return reply.status, await reply.json()


async def until_ready(http: aiohttp.ClientSession, url: str, status: int, seconds: float = 10) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        got, body = await probe(http, url + "/readyz")
        if got == status:
            return body
        assert asyncio.get_running_loop().time() < deadline, f"/readyz did not answer {status} in {seconds}s"
        await asyncio.sleep(0.05)


async def test_readyz_follows_redis_like_grpc_health_while_healthz_stays_ok(disposable_redis) -> None:
    async with receipts_service(disposable_redis.url, store_check_seconds=0.2) as (service, url):
        async with aiohttp.ClientSession() as http:
            assert await probe(http, url + "/readyz") == (200, {"status": "ready"})
            disposable_redis.stop()
            body = await until_ready(http, url, 503)
            assert body == {"status": "not ready", "reason": "storage unavailable"}
            assert await health_of(service.port) == NOT_SERVING  # the same watch
            assert await probe(http, url + "/healthz") == (200, {"status": "ok"})  # alive: no restart needed

            disposable_redis.start()
            await until_ready(http, url, 200)
            await until_health(service.port, SERVING)


async def test_once_shutdown_begins_readyz_and_new_webhooks_are_503_and_counted(redis, redis_url) -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    async with receipts_service(redis_url, telemetry) as (service, url):
        async with aiohttp.ClientSession() as http:
            for drain in service.drains:  # what `stop` does first
                drain()
            assert await probe(http, url + "/readyz") == (503, {"status": "not ready", "reason": "shutting down"})
            document = whatsapp_body([whatsapp_status("read", pii)], pii)
            async with http.post(url + "/webhooks/whatsapp/ws/wa-main", json=document) as reply:
                assert reply.status == 503 and reply.headers["Retry-After"] == "1"
                assert reply.headers["Connection"] == "close"  # sent again to another process
            assert await probe(http, url + "/healthz") == (200, {"status": "ok"})
    assert by_attributes(reader, "tokensend.receipts.refused") == {key(provider="whatsapp", code="shutting_down"): 1}
    telemetry.shutdown()


async def test_webhooks_refused_for_too_many_at_once_are_counted(redis, redis_url) -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    async with running_receipts(redis, redis_url, telemetry) as receipts:
        # One request at once, held by a body that is slow to come.
        settings, deps = receipts.settings, receipts.deps
        app = build_webhook_app(settings, build_intake(settings, deps, deps.config_cache), max_concurrent=1)
        runner, port = await start_webhook_app(app, "127.0.0.1", 0, 1)
        finish = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"{"
            await finish.wait()
            yield b"}"

        url = f"http://127.0.0.1:{port}" + receipts.path("whatsapp")
        try:
            slow = asyncio.create_task(receipts.http.post(url, data=slow_body()))
            await asyncio.sleep(0.3)
            body, headers = receipts.whatsapp_request(whatsapp_body([whatsapp_status("read", pii)], pii))
            async with receipts.http.post(url, data=body, headers=headers) as reply:
                assert reply.status == 503 and reply.headers["Retry-After"] == "1"
            finish.set()
            async with await slow as reply:
                assert reply.status == 401  # read, then refused: unsigned
        finally:
            await runner.cleanup()
    assert by_attributes(reader, "tokensend.receipts.refused") == {
        key(provider="whatsapp", code="busy"): 1,
        key(provider="whatsapp", code="signature_missing"): 1,
    }
    telemetry.shutdown()


async def test_webhooks_refused_for_too_many_body_bytes_at_once_are_counted(redis, redis_url) -> None:
    """The bound is one WhatsApp body here (see test_receipts_body_limits.py): a second one waits its turn."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    overrides = {"max_receipt_bytes": 1024, "max_whatsapp_receipt_bytes": 512 * 1024}
    async with running_receipts(redis, redis_url, telemetry, **overrides) as receipts:
        [record] = await put_messages(redis, "whatsapp", 1)
        finish = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"{"
            await finish.wait()
            yield b"}"

        slow = asyncio.create_task(receipts.http.post(receipts.local_url + receipts.path("whatsapp"), data=slow_body()))
        await asyncio.sleep(0.3)
        document = whatsapp_body([whatsapp_status("delivered", pii, message_id=record.message_id)], pii)
        assert (await receipts.post_whatsapp(document)).status == 503
        finish.set()
        async with await slow as reply:
            assert reply.status == 401
    assert by_attributes(reader, "tokensend.receipts.refused") == {
        key(provider="whatsapp", code="body_budget_full"): 1,
        key(provider="whatsapp", code="signature_missing"): 1,
    }
    telemetry.shutdown()
