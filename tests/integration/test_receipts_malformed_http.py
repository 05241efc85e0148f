"""Requests that are not valid HTTP, which anyone can send to the public webhook port, are logged a line a
minute per kind at INFO, as the other refusals a peer can repeat at will are.

aiohttp refuses them (400) before any handler runs and logged each at ERROR: a scanner or a broken client
filled the log with ERROR lines, one a request, where an operator's alerts look.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.integration.test_receipts_harness import Pii, leaks, log_text, running_receipts

pytestmark = pytest.mark.integration


async def send_raw(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(64), 5)
    finally:
        writer.close()


def server_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "services.receipts.http"]


async def test_malformed_requests_are_logged_a_line_a_minute_per_kind_not_an_error_each(
    redis, redis_url, captured_logs
):
    pii = Pii.new()
    async with running_receipts(redis, redis_url) as receipts:
        bad_version = f"GET /webhooks/{pii.email} HTTP/9.9\r\n\r\n".encode()
        bad_header = f"GET / HTTP/1.1\r\nHost: x\r\nX-To: {pii.email}\x00\r\n\r\n".encode()
        for raw in [bad_version] * 5 + [bad_header] * 5:
            assert (await send_raw(receipts.webhook_port, raw)).startswith(b"HTTP/1.0 400")
        # A valid request after them is served as ever.
        async with receipts.http.get(receipts.local_url + "/healthz") as reply:
            assert reply.status == 200

    lines = server_lines(captured_logs)
    assert [r.levelno for r in lines] == [logging.INFO, logging.INFO], [r.getMessage() for r in lines]
    assert "BadStatusLine" in lines[0].getMessage() and "BadHttpMessage" in lines[1].getMessage()
    assert all("not valid HTTP" in r.getMessage() for r in lines)
    assert leaks(pii.needles(), log_text(captured_logs)) == []
