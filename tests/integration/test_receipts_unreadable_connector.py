"""A connector the receipts service cannot open: sealed under a key its `TOKENSEND_SECRET_KEY` lacks.

As after a key rotation rolled out of order (docs/operations.md): the connectors were saved by a process
sealing under another key. Every path that opens a connector refuses the receipt for the provider to send
again (503 with Retry-After; `IngestReceipt` FAILED_PRECONDITION), names the setting and the connector in
one log line (no secret, nothing of the receipt), and counts it as `connector_unreadable`. Once the
connector opens (re-sealed under the service's key, as `python -m libs.rekey` does), the same receipt is
recorded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import yarl
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tokensend.receipts.v1 import receipts_service_pb2 as pb

from libs.settings import ReceiptsSettings
from libs.telemetry import Telemetry, setup_telemetry
from tests.conftest import new_secret_key
from tests.integration.test_operator_metrics import by_attributes, key
from tests.integration.test_receipts_harness import (
    CONNECTORS,
    WS,
    Pii,
    RunningReceipts,
    leaks,
    log_text,
    put_messages,
    running_receipts,
    save_connectors,
    sendgrid_event,
    ses_message,
    sns_notification,
    stream_entries,
    twilio_params,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration

RETRY_AFTER = "60"


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
async def telemetry(reader) -> AsyncIterator[Telemetry]:
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    yield telemetry
    telemetry.shutdown()


@pytest.fixture
async def receipts(redis, redis_url, telemetry) -> AsyncIterator[RunningReceipts]:
    async with running_receipts(redis, redis_url, telemetry) as running:
        # The same connectors and secrets, saved by a process whose key this one was not given.
        await save_connectors(redis, ReceiptsSettings(secret_key=new_secret_key()), running.secrets)
        yield running


async def reseal(redis, receipts: RunningReceipts) -> None:
    """What the operator's fix comes to: the connectors sealed under a key the service has."""
    await save_connectors(redis, receipts.settings, receipts.secrets)


def signed_receipt(receipts: RunningReceipts, provider: str, message_id: str, pii: Pii) -> tuple[bytes, dict, str]:
    """A delivery receipt for `message_id` as the provider signs it: (body, headers, query)."""
    if provider == "sendgrid":
        return *receipts.sendgrid_request([sendgrid_event("delivered", pii, message_id=message_id)]), ""
    if provider == "ses":
        return *receipts.ses_request(sns_notification(ses_message("Delivery", pii, message_id=message_id), pii)), ""
    if provider == "twilio":
        return receipts.twilio_request(twilio_params("delivered", pii), message_id)
    # With an inbound STOP: the opt-out path too waits for the connector.
    return *receipts.whatsapp_request(
        whatsapp_body([whatsapp_status("delivered", pii, message_id=message_id)], pii)
    ), ""


async def post(receipts: RunningReceipts, provider: str, request: tuple[bytes, dict, str]) -> tuple[int, str, str]:
    """(status, Retry-After, body text)."""
    body, headers, query = request
    url = receipts.local_url + receipts.path(provider) + (f"?{query}" if query else "")
    async with receipts.http.post(yarl.URL(url, encoded=True), data=body, headers=headers) as reply:
        return reply.status, reply.headers.get("Retry-After", ""), await reply.text()


def secrets_of(receipts: RunningReceipts) -> set[bytes]:
    s = receipts.secrets
    values = (s.sendgrid.public_key_b64, s.twilio_auth_token, s.whatsapp_app_secret, s.whatsapp_verify_token)
    return {v.encode() for v in values}


def loud_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def assert_logged_once(caplog, connector_id: str) -> None:
    [record] = loud_records(caplog)
    message = record.getMessage()
    assert "TOKENSEND_SECRET_KEY" in message and connector_id in message and WS in message, message
    assert record.exc_info is None  # no traceback: the message says it all


@pytest.mark.parametrize("provider", ["sendgrid", "ses", "twilio", "whatsapp"])
async def test_a_webhook_for_a_connector_sealed_under_another_key_is_refused_for_redelivery(
    receipts, redis, reader, captured_logs, provider
):
    pii = Pii.new()
    [record] = await put_messages(redis, provider, 1)
    request = signed_receipt(receipts, provider, record.message_id, pii)

    status, retry_after, text = await post(receipts, provider, request)
    assert (status, retry_after) == (503, RETRY_AFTER), text
    assert "TOKENSEND_SECRET_KEY" in text
    assert_logged_once(captured_logs, CONNECTORS[provider])
    assert await stream_entries(redis) == []  # nothing recorded: its redelivery is not a duplicate
    assert by_attributes(reader, "tokensend.receipts.refused") == {
        key(provider=provider, code="connector_unreadable"): 1
    }
    assert leaks(pii.needles() | secrets_of(receipts), [*log_text(captured_logs), text.encode()]) == []

    await reseal(redis, receipts)
    status, _, text = await post(receipts, provider, request)  # the provider's redelivery
    assert status == 200, text
    [entry] = await stream_entries(redis)
    assert (entry["message_id"], entry["status"]) == (record.message_id, "delivered")


async def test_a_connector_that_does_not_open_is_logged_once_a_minute_not_once_a_receipt(
    receipts, redis, reader, captured_logs
):
    """A provider retries every refused receipt, and a campaign's receipts come by the thousand: one ERROR
    line each would bury the log. Each is still refused and counted."""
    records = await put_messages(redis, "sendgrid", 3)
    for record in records:
        status, _, text = await post(
            receipts, "sendgrid", signed_receipt(receipts, "sendgrid", record.message_id, Pii.new())
        )
        assert status == 503, text
    assert_logged_once(captured_logs, CONNECTORS["sendgrid"])
    assert by_attributes(reader, "tokensend.receipts.refused") == {
        key(provider="sendgrid", code="connector_unreadable"): 3
    }


async def test_ingest_receipt_for_a_connector_sealed_under_another_key_is_a_failed_precondition(
    receipts, redis, reader, captured_logs
):
    pii = Pii.new()
    [record] = await put_messages(redis, "sendgrid", 1)
    body, headers, _ = signed_receipt(receipts, "sendgrid", record.message_id, pii)
    request = pb.IngestReceiptRequest(
        workspace_id=WS,
        connector_id=CONNECTORS["sendgrid"],
        provider=pb.PROVIDER_SENDGRID,
        headers=headers,
        body=body,
    )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await receipts.stub.IngestReceipt(request)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "TOKENSEND_SECRET_KEY" in refused.value.details()
    assert_logged_once(captured_logs, CONNECTORS["sendgrid"])
    assert by_attributes(reader, "tokensend.receipts.refused") == {
        key(provider="sendgrid", code="connector_unreadable"): 1
    }
    assert leaks(pii.needles() | secrets_of(receipts), log_text(captured_logs)) == []

    await reseal(redis, receipts)
    reply = await receipts.stub.IngestReceipt(request)
    assert (reply.events, reply.mapped) == (1, 1)


async def test_the_whatsapp_handshake_for_a_connector_sealed_under_another_key_asks_for_later(
    receipts, redis, captured_logs
):
    query = {"hub.mode": "subscribe", "hub.verify_token": receipts.secrets.whatsapp_verify_token, "hub.challenge": "c1"}
    url = receipts.local_url + receipts.path("whatsapp")

    async with receipts.http.get(url, params=query) as reply:
        assert (reply.status, reply.headers.get("Retry-After")) == (503, RETRY_AFTER)
        assert "TOKENSEND_SECRET_KEY" in await reply.text()
    assert_logged_once(captured_logs, CONNECTORS["whatsapp"])
    assert leaks(secrets_of(receipts), log_text(captured_logs)) == []

    await reseal(redis, receipts)
    async with receipts.http.get(url, params=query) as reply:
        assert (reply.status, await reply.text()) == (200, "c1")
