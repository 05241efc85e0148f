"""The invariant for receipts: PII planted in every field of every documented shape reaches no sink.

Each provider's receipts (every event type, both SES shapes, inbound WhatsApp
messages, redeliveries, unknown messages, forged and malformed ones, and the
same through IngestReceipt) carry unique canaries in every field that can
hold PII. Afterwards every Redis key and value of every type (the event
stream included), every log record, every HTTP reply and every gRPC error is
scanned for them. The events themselves must still have been counted, so the
scan is not vacuous.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import grpc
import pytest
from tokensend.receipts.v1 import receipts_service_pb2 as pb

from libs.telemetry import setup_telemetry
from sandbox.signing import whatsapp_signature
from tests.integration.test_receipts_harness import (
    SENDGRID_EVENTS,
    SES_EVENT_TYPES,
    Pii,
    leaks,
    log_text,
    put_messages,
    redis_dump,
    running_receipts,
    sendgrid_event,
    ses_message,
    sns_notification,
    stats,
    stream_entries,
    twilio_params,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def trace_file(tmp_path) -> Path:
    return tmp_path / "spans.jsonl"


@pytest.fixture
async def receipts(redis, redis_url, trace_file):
    """With tracing on (spans written to a file), so the spans are scanned too."""
    telemetry = setup_telemetry("receipts", trace_file=str(trace_file))
    try:
        async with running_receipts(redis, redis_url, telemetry) as running:
            yield running
    finally:
        telemetry.shutdown()


async def test_no_receipt_pii_reaches_any_sink(receipts, redis, captured_logs, trace_file):
    pii = Pii.new()
    replies: list[bytes] = []

    def keep(reply) -> None:
        replies.append(json.dumps(reply.body).encode() if isinstance(reply.body, dict) else str(reply.body).encode())

    # SendGrid: every event, mapped, then redelivered, plus unmapped ones naming campaigns.
    sg = await put_messages(redis, "sendgrid", len(SENDGRID_EVENTS))
    events = [
        sendgrid_event(kind, pii, message_id=r.message_id, campaign=r.campaign_id, instance=r.campaign_instance_id)
        for kind, r in zip(SENDGRID_EVENTS, sg, strict=True)
    ]
    events += [sendgrid_event("bounce", pii, message_id=uuid.uuid4().hex, campaign="camp-1")]
    events += [sendgrid_event("open", pii, tokensend_message_id=pii.email, tokensend_campaign=pii.digits)]
    events += [sendgrid_event("click", pii, sg_event_id=pii.email, sg_message_id=f"{pii.digits}.{pii.ip}")]
    for _ in range(2):
        reply = await receipts.post_sendgrid(events)
        assert reply.status == 200
        keep(reply)

    # SES: every event type, both shapes, v1 and v2 signatures.
    ses_ids = [f"0100{uuid.uuid4().hex}" for _ in range(3)]
    ses = await put_messages(redis, "ses", len(SES_EVENT_TYPES) + 3, provider_ids=[""] * len(SES_EVENT_TYPES) + ses_ids)
    for n, kind in enumerate(SES_EVENT_TYPES):
        message = ses_message(kind, pii, message_id=ses[n].message_id, campaign="camp-1")
        reply = await receipts.post_ses(message, pii, version=1 + n % 2)
        assert reply.status == 200, (kind, reply.body)
        keep(reply)
    for n, kind in enumerate(("Bounce", "Complaint", "Delivery")):
        message = ses_message(kind, pii, ses_message_id=ses_ids[n], notification=True)
        reply = await receipts.post_ses(message, pii)
        assert reply.status == 200
        keep(reply)
    keep(await receipts.post_ses(ses_message("Open", pii, message_id=pii.email), pii))  # unmapped

    # Twilio: every status, PII in To/From/Body/ErrorMessage and the extra parameters, SMS and WhatsApp-via-Twilio.
    statuses = ["queued", "accepted", "sending", "sent", "delivered", "undelivered", "failed", "read", "canceled"]
    tw = await put_messages(redis, "twilio", len(statuses))
    for state, record in zip(statuses, tw, strict=True):
        code = "30003" if state in ("undelivered", "failed") else ""
        prefix = "whatsapp:" if state == "read" else ""
        reply = await receipts.post_twilio(
            twilio_params(state, pii, error_code=code, channel_prefix=prefix), record.message_id
        )
        assert reply.status == 200
        keep(reply)
    keep(await receipts.post_twilio(twilio_params("delivered", pii, error_code=pii.digits), pii.digits))

    # WhatsApp: several statuses per POST, errors with PII, inbound messages and contacts.
    wa = await put_messages(redis, "whatsapp", 4)
    document = whatsapp_body(
        [
            whatsapp_status("sent", pii, message_id=wa[0].message_id),
            whatsapp_status("delivered", pii, message_id=wa[1].message_id),
            whatsapp_status("read", pii, message_id=wa[2].message_id),
            whatsapp_status("failed", pii, message_id=wa[3].message_id, error_code=131026),
            whatsapp_status("failed", pii, message_id=pii.phone, wamid=pii.wamid + "x", error_code=int(pii.digits)),
        ],
        pii,
    )
    for _ in range(2):
        reply = await receipts.post_whatsapp(document)
        assert reply.status == 200
        keep(reply)

    # Forged, unsigned and malformed receipts full of PII.
    body, headers = receipts.sendgrid_request(events)
    keep(await receipts.post("sendgrid", body.replace(b"open", b"bounce"), headers))
    keep(
        await receipts.post(
            "sendgrid", pii.bounce_text.encode(), receipts.sendgrid_request(pii.bounce_text.encode())[1]
        )
    )
    keep(await receipts.post("whatsapp", pii.email.encode(), {"X-Hub-Signature-256": whatsapp_signature("x", b"")}))
    keep(
        await receipts.post(
            "whatsapp",
            json.dumps({"entry": pii.email}).encode(),
            receipts.whatsapp_request(json.dumps({"entry": pii.email}).encode())[1],
        )
    )  # noqa: E501
    keep(await receipts.post("twilio", f"To={pii.phone}".encode(), {"X-Twilio-Signature": pii.email}))
    keep(await receipts.post("ses", json.dumps(sns_notification(ses_message("Bounce", pii), pii)).encode()))
    keep(await receipts.post("ses", pii.user_agent.encode()))
    keep(await receipts.post("sendgrid", body, headers, connector_id=pii.digits))
    keep(await receipts.post("sendgrid", body, headers, workspace_id=pii.tag))

    # The same receipts through IngestReceipt, and its errors.
    grpc_errors: list[bytes] = []
    tw_body, tw_headers, query = receipts.twilio_request(twilio_params("delivered", pii), tw[0].message_id)
    response = await receipts.stub.IngestReceipt(
        pb.IngestReceiptRequest(
            workspace_id="ws-receipts",
            connector_id="tw-main",
            provider=pb.PROVIDER_TWILIO,
            url=receipts.public_url("twilio", query=query),
            headers=tw_headers,
            body=tw_body,
        )
    )
    assert (response.events, response.mapped) == (1, 1)
    for request in (
        pb.IngestReceiptRequest(
            workspace_id="ws-receipts",
            connector_id="sg-main",
            provider=pb.PROVIDER_SENDGRID,
            headers=headers,
            body=body.replace(b"open", b"click"),
        ),  # noqa: E501
        pb.IngestReceiptRequest(
            workspace_id="ws-receipts",
            connector_id="wa-main",
            provider=pb.PROVIDER_WHATSAPP,
            headers=receipts.whatsapp_request(pii.email.encode())[1],
            body=pii.email.encode(),
        ),  # noqa: E501
        pb.IngestReceiptRequest(
            workspace_id=pii.email, connector_id="sg-main", provider=pb.PROVIDER_SENDGRID, body=body
        ),
        pb.IngestReceiptRequest(
            workspace_id="ws-receipts",
            connector_id="tw-main",
            provider=pb.PROVIDER_TWILIO,
            url=pii.url,
            headers={"X-Twilio-Signature": "x"},
            body=tw_body,
        ),  # noqa: E501
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await receipts.stub.IngestReceipt(request)
        grpc_errors.append((error.value.details() or "").encode())
        grpc_errors.append(repr(error.value.trailing_metadata()).encode())

    # The receipts were counted, so the scan below looks at real writes.
    counts = await stats(receipts.redis)
    assert counts["delivered"] >= 3 and counts["bounced"] >= 2 and counts["opened"] >= 2 and counts["unmapped"] >= 1
    entries = await stream_entries(receipts.redis)
    assert len(entries) >= len(SENDGRID_EVENTS) + len(SES_EVENT_TYPES) + len(statuses) + 4 - 1

    dump = await redis_dump(redis)
    assert len(dump) > 100
    assert leaks(pii.needles(), dump) == []
    assert leaks(pii.needles(), log_text(captured_logs)) == []
    assert leaks(pii.needles(), replies) == []
    assert leaks(pii.needles(), grpc_errors) == []
    receipts.deps.telemetry.tracer_provider.force_flush()
    spans = trace_file.read_bytes()
    assert b"receipts.ingest" in spans and b"EVALSHA" in spans.upper()
    assert leaks(pii.needles(), [spans]) == []
    assert any(r.levelno >= logging.INFO for r in captured_logs.records)  # the logs were captured at all


async def test_unhandled_errors_do_not_log_the_receipt(receipts, redis, captured_logs, monkeypatch):
    """Even a crash inside parsing logs the exception's type and place, never its text."""
    pii = Pii.new()
    from services.receipts import intake

    def explode(document, received_at, *_):
        raise RuntimeError(f"could not handle {pii.email} from {pii.ip}")

    monkeypatch.setattr(intake, "parse_whatsapp", explode)
    reply = await receipts.post_whatsapp(whatsapp_body([whatsapp_status("read", pii)], pii))
    assert reply.status == 500
    assert leaks(pii.needles(), [json.dumps(reply.body).encode()]) == []
    assert any("RuntimeError" in r.getMessage() for r in captured_logs.records)
    assert leaks(pii.needles(), log_text(captured_logs)) == []
