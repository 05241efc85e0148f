"""Only a body that does not arrive in time is answered 408: a dependency that times out once the body is
read (the store, an SNS certificate host) is answered 503, for the provider to send the receipt again; so is
a store that does not answer, with the same Retry-After."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.settings import ReceiptsSettings
from services.receipts.intake import BODY_TIMEOUT, DEPENDENCY_TIMEOUT, RawReceipt
from services.receipts.webhooks import DEPENDENCY_RETRY_AFTER_SECONDS, build_webhook_app

PATH = "/webhooks/sendgrid/ws-1/conn-1"
# What a receipt may carry, and no log line may.
RECEIPT = b'[{"event":"delivered","email":"ada@example.com"}]'


class FakeIntake:
    """Finds every connector; `ingest` raises `fault` once it has the body. Records what it was asked."""

    opt_outs = None

    def __init__(self, fault: BaseException | None = None, connector_fault: BaseException | None = None) -> None:
        self.fault = fault
        self.connector_fault = connector_fault
        self.bodies: list[bytes] = []
        self.refused: list[str] = []

    async def find_connector(self, provider: str, workspace_id: str, connector_id: str) -> Any:
        if self.connector_fault is not None:
            raise self.connector_fault
        return object()

    def count_refused(self, provider: str, reason: str) -> None:
        self.refused.append(reason)

    async def ingest(self, receipt: RawReceipt) -> Any:
        self.bodies.append(receipt.body)
        assert self.fault is not None
        raise self.fault


@asynccontextmanager
async def webhooks(
    intake: FakeIntake, path: str = PATH, **settings: Any
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    app = build_webhook_app(ReceiptsSettings(**settings), intake)  # type: ignore[arg-type]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield http, f"http://127.0.0.1:{server.port}{path}"
    finally:
        await server.close()


async def test_a_timeout_after_the_body_was_read_is_answered_503_with_retry_after(caplog) -> None:
    intake = FakeIntake(fault=TimeoutError(RECEIPT.decode()))  # its text quotes the receipt: never logged
    with caplog.at_level(logging.DEBUG, logger="services.receipts.webhooks"):
        async with webhooks(intake) as (http, url):
            async with http.post(url, data=RECEIPT) as reply:
                assert reply.status == 503
                assert int(reply.headers["Retry-After"]) > 0
                text = await reply.text()
    assert intake.bodies == [RECEIPT]  # the body was read: the timeout came after
    assert intake.refused == []  # the intake counts its own refusals, not the webhook a second time
    assert "ada@example.com" not in text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "TimeoutError" in logged and "ada@example.com" not in logged and "delivered" not in logged


async def test_a_timeout_before_the_body_is_read_is_answered_503(caplog) -> None:
    """Finding the connector (the store) timed out: nothing the provider sent was late."""
    intake = FakeIntake(connector_fault=TimeoutError())
    async with webhooks(intake) as (http, url):
        async with http.post(url, data=RECEIPT) as reply:
            assert reply.status == 503 and "Retry-After" in reply.headers
    assert intake.bodies == []
    assert intake.refused == [DEPENDENCY_TIMEOUT]  # neither the sender's timeout nor a store that refused


@pytest.mark.parametrize("fault", [TimeoutError(), None])
async def test_a_body_that_does_not_arrive_in_time_is_still_408(fault) -> None:
    intake = FakeIntake(fault=fault)

    async def trickle() -> AsyncIterator[bytes]:
        yield b"["
        await asyncio.sleep(2)
        yield b"]"

    async with webhooks(intake, receipt_read_timeout_seconds=0.2) as (http, url):
        async with http.post(url, data=trickle()) as reply:
            assert reply.status == 408
    assert intake.bodies == [] and intake.refused == [BODY_TIMEOUT]


STORE_DOWN = RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


@pytest.mark.parametrize(
    "intake",
    [FakeIntake(fault=STORE_DOWN), FakeIntake(connector_fault=STORE_DOWN)],
    ids=["after the body", "before the body"],
)
async def test_a_store_that_does_not_answer_is_answered_503_with_retry_after(intake: FakeIntake) -> None:
    """As for a dependency that timed out: a provider that reads Retry-After does not send again at once."""
    async with webhooks(intake) as (http, url):
        async with http.post(url, data=RECEIPT) as reply:
            assert reply.status == 503
            assert reply.headers.get("Retry-After") == str(DEPENDENCY_RETRY_AFTER_SECONDS)
            assert await reply.json() == {"error": "storage unavailable, retry later"}


@pytest.mark.parametrize("fault", [STORE_DOWN, TimeoutError()], ids=["store down", "timeout"])
async def test_a_dependency_failing_every_request_is_logged_a_line_a_minute_not_one_each(fault, caplog) -> None:
    """Anyone can post to a webhook while the store is away: each request is refused and counted, and the
    log says so once a minute per provider and kind, not once a request."""
    intake = FakeIntake(connector_fault=fault)
    handshake = "/webhooks/whatsapp/ws-1/conn-1?hub.mode=subscribe&hub.verify_token=t&hub.challenge=1234"
    with caplog.at_level(logging.INFO, logger="services.receipts.webhooks"):
        async with webhooks(intake) as (http, url):
            for _ in range(10):
                async with http.post(url, data=RECEIPT) as reply:
                    assert reply.status == 503
                async with http.get(url.replace(PATH, handshake)) as reply:
                    assert reply.status == 503
    assert len(intake.refused) == 10
    lines = [r.getMessage() for r in caplog.records if r.name == "services.receipts.webhooks"]
    assert len([line for line in lines if line.startswith("sendgrid webhook:")]) == 1, lines
    assert len([line for line in lines if line.startswith("whatsapp handshake:")]) == 1, lines


async def test_whatsapps_subscription_check_with_the_store_down_is_answered_503_with_retry_after() -> None:
    handshake = "/webhooks/whatsapp/ws-1/conn-1?hub.mode=subscribe&hub.verify_token=t&hub.challenge=1234"
    async with webhooks(FakeIntake(connector_fault=STORE_DOWN), handshake) as (http, url):
        async with http.get(url) as reply:
            assert reply.status == 503
            assert reply.headers.get("Retry-After") == str(DEPENDENCY_RETRY_AFTER_SECONDS)
