"""Lines a peer can repeat at will are kept to one a minute per kind: anyone can post a receipt to the
webhooks, and whoever holds an email's unsubscribe link can post it again and again."""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import aiohttp
import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.unsubscribe import UnsubscribeTokens, link_key
from services.receipts.opt_outs import OptOuts
from tests.integration.beyond import post, receipts_for
from tests.integration.test_receipts_harness import WS, Pii, running_receipts, sendgrid_event

pytestmark = pytest.mark.integration


async def test_forged_receipts_are_logged_a_line_per_reason_not_one_each(redis, redis_url, caplog) -> None:
    pii = Pii.new()
    async with running_receipts(redis, redis_url) as receipts:
        body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii)])
        forged = body.replace(b"delivered", b"bounce")
        with caplog.at_level(logging.INFO, logger="services.receipts.intake"):
            for _ in range(25):
                assert (await receipts.post("sendgrid", forged, headers)).status == 403
            for _ in range(25):
                assert (await receipts.post("sendgrid", body, {"Content-Type": "application/json"})).status == 401
    lines = [r.getMessage() for r in caplog.records if "receipt refused" in r.getMessage()]
    assert lines == ["sendgrid receipt refused: SignatureInvalid", "sendgrid receipt refused: SignatureMissing"]


async def test_a_one_click_link_posted_again_and_again_is_logged_once(redis, redis_url, secret_key, caplog) -> None:
    """Whoever holds an email's link can post it at will: a line when it suppresses someone, and a line a
    minute for links whose message is no longer known, not one per post."""
    known, unknown = uuid.uuid4().hex, uuid.uuid4().hex
    await redis.set(link_key(WS, known), "linked-0", ex=600)
    tokens = UnsubscribeTokens(SecretStr(secret_key))
    expires_at = int(time.time()) + 600
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        with caplog.at_level(logging.INFO, logger="services.receipts.opt_outs"):
            for _ in range(10):
                assert (await post(receipts, f"/unsubscribe/{tokens.sign(WS, known, expires_at)}", b"", {}))[0] == 200
                assert (await post(receipts, f"/unsubscribe/{tokens.sign(WS, unknown, expires_at)}", b"", {}))[0] == 410
    lines = [r.getMessage() for r in caplog.records if r.name == "services.receipts.opt_outs"]
    assert lines == [
        f"one-click unsubscribe in workspace {WS} (email): 1 new",
        f"unsubscribe link for workspace {WS} names a message no longer known",
    ]


async def slow_body(port: int, path: str) -> bytes:
    """A request whose body never finishes arriving; the reply's status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n[".encode())
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 5)).strip()
    finally:
        writer.close()


async def test_bodies_a_peer_can_send_again_and_again_are_logged_a_line_per_kind(redis, redis_url, caplog) -> None:
    """Anyone can post a body too large, too slow or that does not decode, to a webhook or a one-click link:
    a line a minute per provider and kind, not one per request. Each is still refused."""
    async with running_receipts(redis, redis_url, max_receipt_bytes=64, receipt_read_timeout_seconds=0.3) as receipts:
        undecodable = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        with caplog.at_level(logging.INFO, logger="services.receipts"):
            for _ in range(10):
                assert (await receipts.post("sendgrid", b"[" + b" " * 100 + b"]")).status == 413
                for path in (receipts.path("twilio"), "/unsubscribe/abc"):
                    async with aiohttp.ClientSession() as http:  # a connection of its own: the reply closes it
                        async with http.post(receipts.local_url + path, data=b"not gzip", headers=undecodable) as reply:
                            assert reply.status == 400
            replies = await asyncio.gather(*(slow_body(receipts.webhook_port, receipts.path("ses")) for _ in range(4)))
            assert set(replies) == {b"HTTP/1.1 408 Request Timeout"}
    lines = sorted(
        r.getMessage()
        for r in caplog.records
        if r.name in ("services.receipts.webhooks", "services.receipts.unsubscribe_page")
    )
    assert lines == [
        "sendgrid webhook: body over the limit (TOKENSEND_MAX_RECEIPT_BYTES, 64 bytes)",
        "ses webhook: body not received within 0.3s",
        "twilio webhook: body could not be decoded",
        "unsubscribe: body could not be decoded",
    ]


async def test_one_click_links_posted_while_the_store_is_away_are_logged_a_line_per_kind(
    redis, redis_url, secret_key, caplog, monkeypatch
) -> None:
    """Whoever holds a link can open or post it at will: while the store is away each gets its 503, and the
    log a line a minute for the page and one for the unsubscribe."""

    async def store_down(self, token):
        raise RedisConnectionError("the store went away")

    monkeypatch.setattr(OptOuts, "check", store_down)
    monkeypatch.setattr(OptOuts, "unsubscribe", store_down)
    path = f"/unsubscribe/{UnsubscribeTokens(SecretStr(secret_key)).sign(WS, uuid.uuid4().hex, int(time.time()) + 600)}"
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        with caplog.at_level(logging.INFO, logger="services.receipts.unsubscribe_page"):
            for _ in range(10):
                async with receipts.http.get(receipts.local_url + path) as reply:
                    assert reply.status == 503
                assert (await post(receipts, path, b"List-Unsubscribe=One-Click", {}))[0] == 503
    lines = [r.getMessage() for r in caplog.records if r.name == "services.receipts.unsubscribe_page"]
    assert lines == [
        "unsubscribe page: store unavailable (ConnectionError)",
        "unsubscribe: store unavailable (ConnectionError)",
    ]
