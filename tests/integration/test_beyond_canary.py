"""The invariant across everything "beyond the reference": a campaign that uses all of it leaks no canary.

Canary customers (unique emails, numbers, names, and content API values that are
PII) go through suppressions, one-click unsubscribes, provider unsubscribe and
spam events, STOP and START replies by SMS and WhatsApp, masked previews, archived
messages and their reconstruction, named content APIs and the egress proxy, with
tracing and metrics on in all three services. Then every Redis key and value,
every log record, every span, every metric point, every gRPC error and every HTTP
reply is scanned for the canaries and for plain hashes of them (a blind index
must be keyed). The suppressions must have taken effect, so the scan is not vacuous.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

from libs.settings import DispatcherSettings
from libs.telemetry import setup_telemetry
from sandbox.pii_api import OAuthClient
from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure
from services.dispatcher.server import DispatcherDeps
from services.dispatcher.server import build_server as build_dispatcher
from services.resolver.server import ResolverDeps
from services.resolver.server import build_server as build_resolver
from tests.canary import canary_customers, hits, needles, redis_dump
from tests.conftest import free_port, resolver_settings
from tests.integration.beyond import ContentApiPeer, ForwardProxy, post, reply_by_sms, reply_by_whatsapp
from tests.integration.test_receipts_harness import log_text, running_receipts

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
WS = "brand"
EMAIL = pb.Content(
    subject="{{ first_name }}, your {{ content.loyalty.points }} points",
    html_body="<p>Dear {{ first_name }} {{ last_name }} ({{ content.loyalty.tier }})</p>",
    text_body="Dear {{ first_name|upper }}, {{ content.loyalty.points }} points",
)
SMS = pb.Content(sms_body="{{ first_name }}: {{ content.loyalty.points }} pts. Reply STOP to opt out")
SCRIPT = {"sendgrid": ["processed", "delivered", "bounce"], "whatsapp": ["sent", "delivered"], "twilio": ["sent"]}


def every_form(people, points: dict[str, str]) -> set[str]:
    """The canaries as given, lower-cased, and as plain (unkeyed) hashes a careless blind index would store."""
    values = needles(people) | set(points.values())
    for person in people.values():
        for raw in (person.phone, person.phone.lstrip("+"), person.email):
            values |= {hashlib.sha256(raw.encode()).hexdigest(), hashlib.md5(raw.encode()).hexdigest()}
    return values


async def test_no_canary_reaches_any_sink(redis, redis_url, secret_key, start_pii_api_server, captured_logs, tmp_path):
    people = canary_customers(12)
    points = {a: f"pts{uuid.uuid4().hex[:10]}" for a in people}
    traces = {name: tmp_path / f"{name}.jsonl" for name in ("resolver", "dispatcher", "receipts")}
    metrics = {name: InMemoryMetricReader() for name in traces}
    telemetry = {
        name: setup_telemetry(name, metric_readers=[metrics[name]], trace_file=str(path))
        for name, path in traces.items()
    }
    replies: list[bytes] = []
    errors: list[bytes] = []

    pii_api = await start_pii_api_server(people, oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET))
    content_api = ContentApiPeer(loyalty={a: {"points": points[a], "tier": "Gold"} for a in people})
    await content_api.start()
    proxy = ForwardProxy()
    await proxy.start()
    http_port = free_port()
    public = f"http://127.0.0.1:{http_port}"
    receipts_cm = running_receipts(
        redis, redis_url, telemetry["receipts"], secret_key=secret_key, http_port=http_port, public_webhook_url=public
    )
    receipts = await receipts_cm.__aenter__()
    providers = ProviderSandbox(
        receipts_url=public, receipt_script=lambda provider, message: list(SCRIPT.get(provider, []))
    )
    providers_runner, providers_port = await start_providers(providers)
    workspace = SandboxWorkspace(
        WS, pii_api.base_url, f"http://127.0.0.1:{providers_port}", providers.sendgrid_public_key
    )
    for account in workspace.provider_accounts():
        providers.add_account(account)

    rsettings = resolver_settings(redis_url, secret_key, egress_proxy=proxy.url, log_level="DEBUG")
    resolver, resolver_port = await build_resolver(
        rsettings, ResolverDeps.from_settings(rsettings, telemetry["resolver"])
    )
    dsettings = DispatcherSettings(
        redis_url=redis_url,
        secret_key=secret_key,
        grpc_host="127.0.0.1",
        grpc_port=0,
        allow_private_networks=True,
        resolver_addr=f"127.0.0.1:{resolver_port}",
        public_webhook_url=public,
        provider_retry_base_ms=10,
        grace_seconds=1,
    )
    dispatcher, dispatcher_port = await build_dispatcher(
        dsettings, DispatcherDeps.from_settings(dsettings, telemetry["dispatcher"])
    )
    r_channel = grpc.aio.insecure_channel(f"127.0.0.1:{resolver_port}")
    d_channel = grpc.aio.insecure_channel(f"127.0.0.1:{dispatcher_port}")
    resolver_stub, stub = rpb_grpc.ResolverServiceStub(r_channel), pb_grpc.DispatcherServiceStub(d_channel)
    try:
        await configure(workspace, resolver_stub, stub)
        await resolver_stub.PutContentApiConfig(
            rpb.PutContentApiConfigRequest(
                config=rpb.ContentApiConfig(
                    workspace_id=WS,
                    name="loyalty",
                    mode=rpb.MODE_SINGLE,
                    method=rpb.HTTP_METHOD_GET,
                    url=f"{content_api.base_url}/loyalty/@anonymous_id",
                    field_paths={"points": "member.points", "tier": "member.tier"},
                    non_sensitive_fields=["tier"],
                )
            )
        )

        def recipients(ids):
            return [pb.Recipient(anonymous_id=f"canary-{i}", attributes={"tier": "gold"}) for i in ids]

        async def dispatch(channel, connector, content, ids, instance):
            return await stub.Dispatch(
                pb.DispatchRequest(
                    workspace_id=WS,
                    campaign_id="spring",
                    campaign_instance_id=instance,
                    channel=channel,
                    connector_id=connector,
                    content=content,
                    recipients=recipients(ids),
                    topic="offers",
                )
            )

        await stub.SuppressRecipients(
            pb.SuppressRecipientsRequest(workspace_id=WS, channel=C.CHANNEL_EMAIL, anonymous_ids=["canary-0"])
        )
        email = await dispatch(C.CHANNEL_EMAIL, "sendgrid", EMAIL, range(6), "run-1")
        sms = await dispatch(C.CHANNEL_SMS, "twilio", SMS, range(6, 9), "run-1")
        wa = await dispatch(C.CHANNEL_WHATSAPP, "whatsapp", SMS, range(9, 12), "run-1")
        assert email.summary.sent == 5 and email.summary.suppressed == 1
        assert sms.summary.sent == 3 and wa.summary.sent == 3
        await providers.drain_receipts()

        # One-click unsubscribe (page, then POST), provider unsubscribe and spam events, STOP and START replies.
        by_id = {m.custom_args["tokensend_message_id"]: m for m in providers.outbox_for("sendgrid")}
        link = by_id[email.results[1].message_id].headers["List-Unsubscribe"].strip("<>").removeprefix(public)
        async with receipts.http.get(receipts.local_url + link) as reply:
            replies.append(await reply.read())
        replies.append((await post(receipts, link, b"List-Unsubscribe=One-Click", {}))[1].encode())
        sg_events = []
        for result, kind in ((email.results[2], "unsubscribe"), (email.results[3], "spamreport")):
            sent = by_id[result.message_id]
            sg_events.append(
                {
                    "email": sent.to,
                    "event": kind,
                    "timestamp": 1700000000,
                    "sg_event_id": uuid.uuid4().hex,
                    "sg_message_id": sent.receipt_message_id,
                    "useragent": f"Mail {sent.to}",
                    "tokensend_message_id": result.message_id,
                }
            )
        body = json.dumps(sg_events).encode()
        headers = {**providers.sendgrid_signer.headers(body), "Content-Type": "application/json"}
        replies.append((await post(receipts, f"/webhooks/sendgrid/{WS}/sendgrid", body, headers))[1].encode())
        for sender, text in ((people["canary-6"].phone, "STOP"), (people["canary-7"].phone, "Hello, is this you?")):
            replies.append((await reply_by_sms(receipts, WS, sender, text))[1].encode())
        replies.append(
            (await reply_by_whatsapp(receipts, WS, people["canary-9"].phone, "Stop promotions", "button"))[1].encode()
        )
        replies.append((await reply_by_whatsapp(receipts, WS, people["canary-10"].phone, "STOP"))[1].encode())
        start = await reply_by_whatsapp(receipts, WS, people["canary-10"].phone, "START", sent_at=1700000060)
        replies.append(start[1].encode())  # a minute after the STOP: in the same second it would lift nothing

        # Masked previews and a reconstruction, and requests that try to put PII where it does not belong.
        previews = [
            await stub.PreviewMessage(
                pb.PreviewMessageRequest(
                    workspace_id=WS, channel=channel, content=content, recipient=recipients([i])[0], topic="offers"
                )
            )
            for channel, content, i in ((C.CHANNEL_EMAIL, EMAIL, 4), (C.CHANNEL_SMS, SMS, 8))
        ]
        assert previews[0].rendered.subject.endswith("*** points") and previews[1].masked_contact.startswith("+44")
        rebuilt = await stub.ReconstructMessage(
            pb.ReconstructMessageRequest(
                workspace_id=WS, message_id=email.results[4].message_id, requested_by="dpo-1", reason="DSAR"
            )
        )
        assert rebuilt.rendered.subject == by_id[email.results[4].message_id].subject
        for request in (
            pb.ReconstructMessageRequest(
                workspace_id=WS,
                message_id=email.results[4].message_id,
                requested_by=people["canary-4"].email,
                reason="x",
            ),
            pb.ReconstructMessageRequest(
                workspace_id=WS, message_id=people["canary-5"].phone, requested_by="dpo-1", reason="DSAR"
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ReconstructMessage(request)
            errors.append((caught.value.details() or "").encode())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PutOptOutKeywords(
                pb.PutOptOutKeywordsRequest(
                    workspace_id=WS, keywords=pb.OptOutKeywords(stop_keywords=[people["canary-3"].email])
                )
            )
        errors.append((caught.value.details() or "").encode())

        # The next campaign skips every opted-out recipient, with nothing fetched for them.
        before = pii_api.sandbox.stats.ids_requested
        again_email = await dispatch(C.CHANNEL_EMAIL, "sendgrid", EMAIL, range(6), "run-2")
        again_sms = await dispatch(C.CHANNEL_SMS, "twilio", SMS, range(6, 9), "run-2")
        again_wa = await dispatch(C.CHANNEL_WHATSAPP, "whatsapp", SMS, range(9, 12), "run-2")
        skipped = [r.anonymous_id for r in (*again_email.results, *again_sms.results, *again_wa.results)
                   if r.status == S.DISPATCH_STATUS_SUPPRESSED]  # fmt: skip
        assert skipped == ["canary-0", "canary-1", "canary-2", "canary-3", "canary-6", "canary-9"]
        assert pii_api.sandbox.stats.ids_requested - before == 12 - len(skipped)
        stats = await receipts.stub.GetCampaignStats(cpb.GetCampaignStatsRequest(workspace_id=WS, campaign_id="spring"))
        assert stats.suppressed == 7 and stats.unsubscribed >= 2 and stats.complained == 1
        assert any("loyalty" in s for s in proxy.seen) and any("oauth/token" in s for s in proxy.seen)
        await providers.drain_receipts()
    finally:
        await r_channel.close()
        await d_channel.close()
        await dispatcher.stop(0.5)
        await resolver.stop(0.5)
        await receipts_cm.__aexit__(None, None, None)
        await providers.close()
        await providers_runner.cleanup()
        await content_api.stop()
        await proxy.stop()
        for t in telemetry.values():
            t.tracer_provider.force_flush()

    canaries = every_form(people, points)
    for preview in previews:
        assert hits(canaries, [str(preview.rendered), preview.masked_contact]) == []
    dump = await redis_dump(redis)
    assert len(dump) > 200
    assert hits(canaries, dump) == []
    assert hits(canaries, log_text(captured_logs)) == []
    assert hits(canaries, replies) == []
    assert hits(canaries, errors) == []
    spans = b"".join(Path(p).read_bytes() for p in traces.values())
    assert b"dispatch.batch" in spans and b"receipts.ingest" in spans and b"pii_api.resolve" in spans
    assert hits(canaries, [spans]) == []
    collected = [r.get_metrics_data() for r in metrics.values()]
    points_data = [json.dumps(json.loads(d.to_json())).encode() for d in collected if d is not None]
    assert any(b"tokensend.messages" in d for d in points_data)
    assert hits(canaries, points_data) == []
    for t in telemetry.values():
        t.shutdown()
