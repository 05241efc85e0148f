"""The whole suite as operators run it: three service processes, the sample PII API and the
sandbox providers posting signed receipts back, driven through gRPC and grpcurl.

One campaign over every channel to canary customers, with a bounce quoting the address,
a PII API error echoing a contact and a provider refusal quoting a number; then the
receipts' stats must match what was sent, every Dispatch must be one trace across the
services, and no canary may be found in Redis, logs, spans, metrics, errors or events.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as dpb_grpc
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as cpb_grpc
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from sandbox.pii_api import OAuthClient
from sandbox.processes import start_service
from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure
from tests.canary import canary_customers, hits, needles, redis_dump
from tests.conftest import free_port, grpcurl_path, new_secret_key

pytestmark = pytest.mark.e2e

C = common_pb2.Channel

# Even-numbered customers are delivered (and engage), odd ones bounce or fail.
SCRIPTS = {
    "sendgrid": (["processed", "delivered", "open", "click"], ["processed", "bounce"]),
    "twilio": (["sent", "delivered"], ["sent", "undelivered"]),
    "whatsapp": (["sent", "delivered", "read"], ["sent", "failed"]),
}


async def grpcurl(address: str, method: str, data: dict) -> dict:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        "-plaintext",
        "-d",
        json.dumps(data),
        address,
        method,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_campaign_over_every_channel_end_to_end(redis, redis_url, start_pii_api_server, tmp_path):
    people = canary_customers(24)
    index_of = {p.email: int(a.split("-")[1]) for a, p in people.items()}
    index_of |= {p.phone.lstrip("+"): int(a.split("-")[1]) for a, p in people.items()}

    def script(provider: str, message) -> list[str]:
        good, bad = SCRIPTS[provider]
        return list(good if index_of[message.to.lstrip("+")] % 2 == 0 else bad)

    pii_api = await start_pii_api_server(people, oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET))
    http_port = free_port()
    common = dict(
        redis_url=redis_url,
        secret_key=new_secret_key(),
        allow_private_networks="true",
        log_level="DEBUG",
        public_webhook_url=f"http://127.0.0.1:{http_port}",
        pii_retry_base_ms="20",
        circuit_failure_threshold="100",
    )

    def with_files(name: str) -> dict[str, str]:
        return {
            **common,
            "trace_export_file": str(tmp_path / f"{name}.spans.jsonl"),
            "metrics_export_file": str(tmp_path / f"{name}.metrics.jsonl"),
        }

    services = []
    providers = ProviderSandbox(receipts_url=f"http://127.0.0.1:{http_port}", receipt_script=script)
    runner, providers_port = await start_providers(providers)
    try:
        resolver = await start_service("resolver", free_port(), with_files("resolver"), tmp_path)
        services.append(resolver)
        receipts = await start_service("receipts", free_port(), with_files("receipts"), tmp_path, http_port=http_port)
        services.append(receipts)
        dispatcher = await start_service(
            "dispatcher", free_port(), {**with_files("dispatcher"), "resolver_addr": resolver.address}, tmp_path
        )
        services.append(dispatcher)

        workspace = SandboxWorkspace(
            "acme", pii_api.base_url, f"http://127.0.0.1:{providers_port}", providers.sendgrid_public_key
        )
        for account in workspace.provider_accounts():
            providers.add_account(account)
        channels = {
            name: grpc.aio.insecure_channel(s.address)
            for name, s in (("resolver", resolver), ("dispatcher", dispatcher), ("receipts", receipts))
        }
        resolver_stub = rpb_grpc.ResolverServiceStub(channels["resolver"])
        dispatcher_stub = dpb_grpc.DispatcherServiceStub(channels["dispatcher"])
        receipts_stub = cpb_grpc.ReceiptsServiceStub(channels["receipts"])
        await configure(workspace, resolver_stub, dispatcher_stub)

        ids = list(people)
        errors: list[str] = []
        # Email through grpcurl, as an operator would.
        email = await grpcurl(
            dispatcher.address,
            "tokensend.dispatcher.v1.DispatcherService/Dispatch",
            {
                "workspace_id": "acme",
                "campaign_id": "launch",
                "campaign_instance_id": "launch-email",
                "channel": "CHANNEL_EMAIL",
                "connector_id": "sendgrid",
                "content": {
                    "subject": "Hi {{ first_name }}",
                    "text_body": "Hello {{ first_name }} {{ last_name }}",
                    "html_body": "<b>{{ first_name }}</b>",
                },
                "recipients": [{"anonymous_id": a, "attributes": {"tier": "gold"}} for a in ids],
            },
        )
        assert email["summary"]["sent"] == len(ids)
        sms = await dispatcher_stub.Dispatch(
            dpb.DispatchRequest(
                workspace_id="acme",
                campaign_id="launch",
                campaign_instance_id="launch-sms",
                channel=C.CHANNEL_SMS,
                connector_id="twilio",
                content=dpb.Content(sms_body="Hi {{ first_name }}"),
                recipients=[dpb.Recipient(anonymous_id=a) for a in ids],
            )
        )
        assert sms.summary.sent == len(ids)
        whatsapp = await dispatcher_stub.Dispatch(
            dpb.DispatchRequest(
                workspace_id="acme",
                campaign_id="launch",
                campaign_instance_id="launch-wa",
                channel=C.CHANNEL_WHATSAPP,
                connector_id="whatsapp",
                content=dpb.Content(
                    whatsapp_template=dpb.WhatsAppTemplate(name="launch", language="en", params=["{{ first_name }}"])
                ),
                recipients=[dpb.Recipient(anonymous_id=a) for a in ids],
            )
        )
        assert whatsapp.summary.sent == len(ids)
        # A repeat of the grpcurl call sends nothing new.
        repeat = await grpcurl(
            dispatcher.address,
            "tokensend.dispatcher.v1.DispatcherService/Dispatch",
            {
                "workspace_id": "acme",
                "campaign_id": "launch",
                "campaign_instance_id": "launch-email",
                "channel": "CHANNEL_EMAIL",
                "connector_id": "sendgrid",
                "content": {"subject": "Hi", "text_body": "Hello"},
                "recipients": [{"anonymous_id": a} for a in ids[:5]],
            },
        )
        assert repeat["summary"]["duplicate"] == 5

        # Failure paths that put canaries in front of the suite.
        a_phone = people[ids[1]].phone
        providers.set_faults("twilio", reject_to={a_phone})
        refused = await dispatcher_stub.Dispatch(
            dpb.DispatchRequest(
                workspace_id="acme",
                campaign_id="launch",
                campaign_instance_id="launch-sms-2",
                channel=C.CHANNEL_SMS,
                connector_id="twilio",
                content=dpb.Content(sms_body="again"),
                recipients=[dpb.Recipient(anonymous_id=ids[1])],
            )
        )
        errors.append(str(refused))
        assert refused.results[0].status == dpb.DISPATCH_STATUS_SEND_FAILED
        pii_api.sandbox.faults.echo_pii_in_errors = True
        pii_api.sandbox.faults.fail_status, pii_api.sandbox.faults.fail_count = 500, -1
        test = await dispatcher_stub.SendTest(
            dpb.SendTestRequest(
                workspace_id="acme",
                campaign_id="launch",
                channel=C.CHANNEL_EMAIL,
                connector_id="sendgrid",
                content=dpb.Content(subject="x", text_body="y"),
                recipient=dpb.Recipient(anonymous_id=ids[2]),
            )
        )
        errors.append(str(test))
        assert test.result.status == dpb.DISPATCH_STATUS_RESOLVE_FAILED and "HTTP 500" in test.pii_api_error
        pii_api.sandbox.faults.fail_count = 0

        await providers.drain_receipts()
        expected_even = sum(1 for a in ids if int(a.split("-")[1]) % 2 == 0)
        expected_odd = len(ids) - expected_even
        expected = {
            "launch-email": {
                "sent": 24,
                "delivered": expected_even,
                "opened": expected_even,
                "clicked": expected_even,
                "bounced": expected_odd,
            },
            "launch-sms": {"sent": 24, "delivered": expected_even, "failed": expected_odd},
            "launch-wa": {"sent": 24, "delivered": expected_even, "opened": expected_even, "failed": expected_odd},
        }
        for instance, want in expected.items():
            for _ in range(50):  # receipts are posted asynchronously; give the last ones a moment
                stats = await receipts_stub.GetCampaignStats(
                    cpb.GetCampaignStatsRequest(
                        workspace_id="acme", campaign_id="launch", campaign_instance_id=instance
                    )
                )
                got = {k: getattr(stats, k) for k in want}
                if got == want:
                    break
                await asyncio.sleep(0.1)
            assert got == want, instance
            assert stats.unmapped == 0

        events = []
        stream = receipts_stub.StreamDeliveryEvents(cpb.StreamDeliveryEventsRequest(workspace_id="acme"), timeout=3)
        try:
            async for event in stream:
                events.append(event)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        statuses = Counter(cpb.DeliveryStatus.Name(e.status) for e in events)
        assert statuses["DELIVERY_STATUS_DELIVERED"] == 3 * expected_even
        assert {e.anonymous_id for e in events} <= set(ids)

        for channel in channels.values():
            await channel.close()
    finally:
        codes = {s.name: await s.stop() for s in services}
        await providers.close()
        await runner.cleanup()
    assert codes == {"resolver": 0, "receipts": 0, "dispatcher": 0}

    # One Dispatch is one trace: dispatcher server span → resolver → PII API HTTP → provider HTTP → Redis.
    spans = {
        name: [json.loads(line) for line in (tmp_path / f"{name}.spans.jsonl").read_text().splitlines()]
        for name in ("resolver", "dispatcher", "receipts")
    }
    dispatch_spans = [
        s
        for s in spans["dispatcher"]
        if s["name"].endswith("DispatcherService/Dispatch") and s["kind"] == "SpanKind.SERVER"
    ]
    assert dispatch_spans
    trace_id = dispatch_spans[0]["context"]["trace_id"]
    in_trace = [s for name in spans for s in spans[name] if s["context"]["trace_id"] == trace_id]
    services_in_trace = {s["resource"]["attributes"]["service.name"] for s in in_trace}
    assert services_in_trace >= {"dispatcher", "resolver"}
    names = {s["name"] for s in in_trace}
    assert "dispatch.batch" in names and "pii_api.resolve" in names
    assert (
        sum(
            1
            for s in in_trace
            if s["kind"] == "SpanKind.CLIENT"
            and s["attributes"].get("http.method", s["attributes"].get("http.request.method"))
        )
        >= 2
    )
    assert any(s["attributes"].get("db.system") == "redis" for s in in_trace)
    receipt_links = [link for s in spans["receipts"] for link in s.get("links", [])]
    assert receipt_links, "receipt spans link back to the send"

    canaries = needles(people)
    stored = await redis_dump(redis)
    logs = [s.log_path.read_text() for s in services]
    exported = [(tmp_path / f"{n}.spans.jsonl").read_text() for n in spans]
    exported += [p.read_text() for p in tmp_path.glob("*.metrics.jsonl")]
    for metric in (
        "tokensend.messages",
        "tokensend.pii_api.duration",
        "tokensend.pii_api.errors",
        "tokensend.receipts",
    ):
        assert any(metric in text for text in exported), f"{metric} was exported"
    event_texts = [str(e) for e in events]
    assert hits(canaries, stored) == []
    assert hits(canaries, logs) == []
    assert hits(canaries, exported) == []
    assert hits(canaries, errors) == []
    assert hits(canaries, event_texts) == []
