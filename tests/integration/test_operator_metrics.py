"""The metrics an operator runs the suite by, end to end: each named as documented, with the attributes
documented, and none holding a customer's contact or name.

- `tokensend.messages`: a failure carries its error code (`code`);
- `tokensend.provider.duration`: each attempt at a provider, by provider and outcome (HTTP, SMTP);
- `tokensend.dispatch.batch_duration`: each batch, by channel, connector and provider;
- `tokensend.receipts.refused` and `tokensend.receipts.unmapped`: receipts refused by reason (webhooks
  and IngestReceipt alike, each counted once), and events for no known message.
"""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc
from tokensend.receipts.v1 import receipts_service_pb2 as rpb

from libs.settings import DispatcherSettings
from libs.telemetry import BATCH_SECONDS_BUCKETS, setup_telemetry
from sandbox.pii_api import OAuthClient
from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure
from services.dispatcher.connectors.http_retry import timing_attempts
from services.dispatcher.server import DispatcherDeps
from services.dispatcher.server import build_server as build_dispatcher
from tests.canary import canary_customers, hits, needles
from tests.integration.peers import RecordingHandler, smtp_relay  # noqa: F401
from tests.integration.test_connectors_smtp import message, send, smtp
from tests.integration.test_receipts_harness import (
    CONNECTORS,
    WS,
    Pii,
    running_receipts,
    sendgrid_event,
    whatsapp_body,
    whatsapp_status,
)
from tests.unit.test_provider_latency import counts, latency_reader

pytestmark = pytest.mark.integration

C = common_pb2.Channel
SMS = pb.Content(sms_body="Hi {{ first_name }}, 20% off today. Reply STOP to opt out")
EMAIL = pb.Content(subject="{{ first_name }}, spring is here", text_body="Dear {{ first_name }} {{ last_name }}")


def metric_points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    return [
        point
        for rm in (data.resource_metrics if data is not None else ())
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def key(**attributes: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(attributes.items()))


def by_attributes(reader: InMemoryMetricReader, name: str) -> Counter[tuple[tuple[str, Any], ...]]:
    """A counter's values, or a histogram's counts, by their sorted attributes."""
    return Counter(
        {
            tuple(sorted(point.attributes.items())): getattr(point, "value", None) or point.count
            for point in metric_points(reader, name)
        }
    )


def exported(reader: InMemoryMetricReader) -> str:
    """Every point as an exporter writes it, to scan for canaries."""
    data = reader.get_metrics_data()
    return json.dumps(json.loads(data.to_json())) if data is not None else ""


async def test_dispatch_counts_error_codes_and_times_batches_and_provider_attempts(
    redis_url, secret_key, start_pii_api_server, start_resolver
) -> None:
    people = canary_customers(4)
    pii_api = await start_pii_api_server(people, oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET))
    providers = ProviderSandbox()
    runner, providers_port = await start_providers(providers)
    workspace = SandboxWorkspace(
        "brand", pii_api.base_url, f"http://127.0.0.1:{providers_port}", providers.sendgrid_public_key
    )
    for account in workspace.provider_accounts():
        providers.add_account(account)
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("dispatcher", metric_readers=[reader])
    resolver = await start_resolver()
    settings = DispatcherSettings(
        redis_url=redis_url,
        secret_key=secret_key,
        grpc_host="127.0.0.1",
        grpc_port=0,
        allow_private_networks=True,
        resolver_addr=f"127.0.0.1:{resolver.port}",
        provider_retry_base_ms=10,
        grace_seconds=1,
    )
    service, port = await build_dispatcher(settings, DispatcherDeps.from_settings(settings, telemetry))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.DispatcherServiceStub(channel)
    try:
        await configure(workspace, resolver.stub, stub)
        # One request answered 429 (tried again), one number refused (HTTP 400), one ID the PII API does not know.
        providers.set_faults("twilio", rate_limit_count=1, retry_after_seconds=0, reject_to={people["canary-1"].phone})

        async def dispatch(channel: int, connector_id: str, content: pb.Content, ids: list[str]) -> pb.DispatchResponse:
            return await stub.Dispatch(
                pb.DispatchRequest(
                    workspace_id="brand",
                    campaign_id="spring",
                    campaign_instance_id=uuid.uuid4().hex,
                    channel=channel,
                    connector_id=connector_id,
                    content=content,
                    recipients=[pb.Recipient(anonymous_id=i) for i in ids],
                )
            )

        sms = await dispatch(C.CHANNEL_SMS, "twilio", SMS, ["canary-0", "canary-1", "canary-2", "canary-3", "nobody"])
        email = await dispatch(C.CHANNEL_EMAIL, "sendgrid", EMAIL, ["canary-0", "canary-1"])
        assert (sms.summary.sent, email.summary.sent) == (3, 2)
    finally:
        await channel.close()
        await service.stop(0.5)
        await runner.cleanup()
        await providers.close()

    sms = {"channel": "CHANNEL_SMS", "connector": "twilio"}
    assert by_attributes(reader, "tokensend.messages") == {
        key(**sms, status="SENT"): 3,
        key(**sms, status="SEND_FAILED", code="HTTP_400"): 1,
        key(**sms, status="RESOLVE_FAILED", code="NOT_FOUND"): 1,
        key(channel="CHANNEL_EMAIL", connector="sendgrid", status="SENT"): 2,
    }
    assert by_attributes(reader, "tokensend.provider.duration") == {
        key(provider="twilio", outcome="retried"): 1,
        key(provider="twilio", outcome="sent"): 3,
        key(provider="twilio", outcome="failed"): 1,
        key(provider="sendgrid", outcome="sent"): 1,  # one request for the batch's two emails
    }
    assert by_attributes(reader, "tokensend.dispatch.batch_duration") == {
        key(**sms, provider="twilio"): 1,
        key(channel="CHANNEL_EMAIL", connector="sendgrid", provider="sendgrid"): 1,
    }
    batches = metric_points(reader, "tokensend.dispatch.batch_duration")
    assert all(tuple(p.explicit_bounds) == BATCH_SECONDS_BUCKETS and 0 < p.sum < 60 for p in batches)
    assert hits(needles(people), [exported(reader)]) == []
    telemetry.shutdown()


async def test_each_smtp_transaction_is_timed(smtp_relay) -> None:
    latency, reader = latency_reader()
    relay = smtp_relay()
    greylisting = smtp_relay(RecordingHandler(rcpt_reply="451 4.7.1 Greylisted, try again"))
    with timing_attempts(latency):
        await send(smtp(relay), [message(1), message(2)])
        await send(smtp(greylisting), [message(3)])  # deferred each time: tried three times in all
    assert counts(reader) == {("smtp", "sent"): 2, ("smtp", "retried"): 2, ("smtp", "failed"): 1}


async def test_an_unreachable_relay_is_timed_per_try_not_per_message(smtp_relay) -> None:
    """Nothing listens: the relay's three tries are timed; the messages that then found it given up on
    reached nothing, and are not timed."""
    latency, reader = latency_reader()
    relay = smtp_relay()
    relay.controller.stop()
    with timing_attempts(latency):
        outcomes = await send(smtp(relay), [message(i) for i in range(1, 4)])
    assert [o.attempts for o in outcomes] == [3, 0, 0]
    assert counts(reader) == {("smtp", "retried"): 2, ("smtp", "failed"): 1}


async def test_refused_and_unmapped_receipts_are_counted_by_provider_and_reason(redis, redis_url) -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    async with running_receipts(redis, redis_url, telemetry, max_receipt_bytes=4096) as receipts:
        body, headers = receipts.sendgrid_request([sendgrid_event("delivered", pii)])
        forged = body.replace(b"delivered", b"bounce")
        assert (await receipts.post("sendgrid", forged, headers)).status == 403
        with pytest.raises(grpc.aio.AioRpcError):  # the same forgery relayed over gRPC
            await receipts.stub.IngestReceipt(
                rpb.IngestReceiptRequest(
                    provider=rpb.PROVIDER_SENDGRID,
                    workspace_id=WS,
                    connector_id=CONNECTORS["sendgrid"],
                    headers=headers,
                    body=forged,
                )
            )
        assert (await receipts.post("sendgrid", body, {"Content-Type": "application/json"})).status == 401
        assert (await receipts.post("sendgrid", body, headers, connector_id="nope")).status == 404
        big = [sendgrid_event("open", pii) for _ in range(40)]
        assert (await receipts.post_sendgrid(big)).status == 413
        malformed = b'{"object":"whatsapp_business_account"}'
        assert (await receipts.post("whatsapp", malformed, receipts.whatsapp_request(malformed)[1])).status == 400
        reply = await receipts.post_whatsapp(whatsapp_body([whatsapp_status("read", pii)], pii))
        assert reply.json()["unmapped"] == 1
        reply = await receipts.post_sendgrid([sendgrid_event("delivered", pii, message_id=uuid.uuid4().hex)])
        assert reply.json()["unmapped"] == 1

    assert by_attributes(reader, "tokensend.receipts.refused") == {
        key(provider="sendgrid", code="signature_invalid"): 2,
        key(provider="sendgrid", code="signature_missing"): 1,
        key(provider="sendgrid", code="unknown_connector"): 1,
        key(provider="sendgrid", code="too_large"): 1,
        key(provider="whatsapp", code="malformed"): 1,
    }
    assert by_attributes(reader, "tokensend.receipts.unmapped") == {
        key(provider="whatsapp"): 1,
        key(provider="sendgrid"): 1,
    }
    assert hits({n.decode() for n in pii.needles()}, [exported(reader)]) == []
    telemetry.shutdown()
