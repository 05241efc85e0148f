"""Receipt bodies up to each provider's documented maximum are taken, within a bound on the bytes held at once."""

from __future__ import annotations

import asyncio
import gzip
import json

import grpc
import pytest
from tokensend.receipts.v1 import receipts_service_pb2 as rpb

from tests.integration.test_receipts_harness import (
    CONNECTORS,
    WS,
    Pii,
    put_messages,
    running_receipts,
    sendgrid_event,
    stats,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


async def test_a_whatsapp_batch_over_a_mebibyte_is_counted(redis, redis_url):
    """Meta's webhooks carry up to 3 MB of statuses and messages; refused (413), Meta retried and then dropped
    them. The other providers keep their 1 MiB limit."""
    pii = Pii.new()
    async with running_receipts(redis, redis_url) as receipts:
        records = await put_messages(redis, "whatsapp", 3)
        statuses = [
            whatsapp_status("delivered", pii, message_id=r.message_id, wamid=f"wamid.M{n}")
            for n, r in enumerate(records)
        ]
        # The rest of the batch: statuses of messages this workspace no longer knows.
        statuses += [whatsapp_status("read", pii, wamid=f"wamid.X{n}") for n in range(5000)]
        body = json.dumps(whatsapp_body(statuses, pii)).encode()
        assert 1.2 * MIB < len(body) < 3 * MIB
        reply = await receipts.post("whatsapp", *receipts.whatsapp_request(body))
        assert reply.status == 200, reply.body
        assert reply.json()["mapped"] == 3 and reply.json()["unmapped"] == 5000
        assert (await stats(redis))["delivered"] == 3

        events = [sendgrid_event("open", pii) for _ in range(MIB // 600)]
        body, headers = receipts.sendgrid_request(events)
        assert len(body) > MIB
        reply = await receipts.post("sendgrid", body, headers)
        assert reply.status == 413
        assert f"{MIB}-byte limit (TOKENSEND_MAX_RECEIPT_BYTES)" in reply.json()["error"]


async def test_the_whatsapp_limit_names_its_own_variable(redis, redis_url):
    pii = Pii.new()
    async with running_receipts(redis, redis_url, max_whatsapp_receipt_bytes=8192) as receipts:
        statuses = [whatsapp_status("read", pii, wamid=f"wamid.X{n}") for n in range(40)]
        body, headers = receipts.whatsapp_request(whatsapp_body(statuses, pii))
        assert len(body) > 8192
        reply = await receipts.post("whatsapp", body, headers)
        assert reply.status == 413
        assert "8192-byte limit (TOKENSEND_MAX_WHATSAPP_RECEIPT_BYTES)" in reply.json()["error"]
        # Relayed over gRPC: the same limit.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await receipts.stub.IngestReceipt(
                rpb.IngestReceiptRequest(
                    provider=rpb.PROVIDER_WHATSAPP,
                    workspace_id=WS,
                    connector_id=CONNECTORS["whatsapp"],
                    headers=headers,
                    body=body,
                )
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(TOKENSEND_MAX_WHATSAPP_RECEIPT_BYTES)" in error.value.details()


async def test_bodies_held_at_once_are_bounded_whatever_their_provider(redis, redis_url):
    """A body of undeclared length holds its provider's whole limit while it arrives. Here the bound
    (256 × TOKENSEND_MAX_RECEIPT_BYTES, at least one WhatsApp body) is one WhatsApp body: a second request
    is answered 503 with Retry-After, and taken once the first is answered."""
    pii = Pii.new()
    async with running_receipts(
        redis, redis_url, max_receipt_bytes=1024, max_whatsapp_receipt_bytes=512 * 1024
    ) as receipts:
        [record] = await put_messages(redis, "whatsapp", 1)
        finish = asyncio.Event()

        async def slow_body():
            yield b"{"
            await finish.wait()
            yield b"}"

        url = receipts.local_url + receipts.path("whatsapp")
        slow = asyncio.create_task(receipts.http.post(url, data=slow_body()))
        await asyncio.sleep(0.3)
        document = whatsapp_body([whatsapp_status("delivered", pii, message_id=record.message_id)], pii)
        reply = await receipts.post_whatsapp(document)
        assert reply.status == 503 and "send again later" in reply.json()["error"]
        finish.set()
        async with await slow as response:
            assert response.status == 401  # read, then refused: unsigned
        reply = await receipts.post_whatsapp(document)  # what the first held is given back
        assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body


async def test_a_compressed_body_holds_its_providers_whole_limit(redis, redis_url):
    """A gzip body's Content-Length says nothing of what it holds once decoded (up to its provider's limit):
    while one arrives, the bound (one WhatsApp body here) is full, as for a body of undeclared length."""
    pii = Pii.new()
    async with running_receipts(
        redis, redis_url, max_receipt_bytes=1024, max_whatsapp_receipt_bytes=512 * 1024
    ) as receipts:
        [record] = await put_messages(redis, "whatsapp", 1)
        document = whatsapp_body([whatsapp_status("delivered", pii, message_id=record.message_id)], pii)
        compressed = gzip.compress(receipts.whatsapp_request(document)[0])
        reader, writer = await asyncio.open_connection("127.0.0.1", receipts.webhook_port)
        head = (
            f"POST {receipts.path('whatsapp')} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(compressed)}\r\n\r\n"
        )
        writer.write(head.encode() + compressed[:10])  # the rest is slow to come
        await writer.drain()
        await asyncio.sleep(0.3)
        reply = await receipts.post_whatsapp(document)
        assert reply.status == 503 and "send again later" in reply.json()["error"], reply.body
        writer.close()  # its sender gives up: what it held is given back once the service notices
        for _ in range(50):
            reply = await receipts.post_whatsapp(document)
            if reply.status != 503:
                break
            await asyncio.sleep(0.1)
        assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body
