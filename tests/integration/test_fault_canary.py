"""The invariant on the failure paths of a send: canaries reach no sink when things go wrong.

test_beyond_canary.py proves it for sends that succeed. Here every step of a send fails on
the canary customers' own values: the PII API answers errors that quote them (500s, a 200 that
is not JSON, a 404 with the customer's name), providers refuse the numbers and addresses and
say so in their bodies, a gateway echoes what it was sent where the connector looks for its
message ID, templates fail on fetched values, and test sends show the PII API's errors. With
tracing and metrics on in both services, every Redis key and value, log record, span, metric
point, gRPC error and result text is then scanned for the canaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc
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
from tests.conftest import resolver_settings
from tests.integration.test_receipts_harness import log_text

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
WS = "brand"


async def test_no_canary_leaves_a_failing_send(
    redis, redis_url, secret_key, start_pii_api_server, captured_logs, tmp_path
):
    people = canary_customers(10)
    traces = {name: tmp_path / f"{name}.jsonl" for name in ("resolver", "dispatcher")}
    metrics = {name: InMemoryMetricReader() for name in traces}
    telemetry = {
        name: setup_telemetry(name, metric_readers=[metrics[name]], trace_file=str(path))
        for name, path in traces.items()
    }
    texts: list[str] = []  # result and error texts handed back to the caller

    pii_api = await start_pii_api_server(people, oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET))
    providers = ProviderSandbox()
    providers_runner, providers_port = await start_providers(providers)
    workspace = SandboxWorkspace(
        WS, pii_api.base_url, f"http://127.0.0.1:{providers_port}", providers.sendgrid_public_key
    )
    for account in workspace.provider_accounts():
        providers.add_account(account)
    rsettings = resolver_settings(redis_url, secret_key, log_level="DEBUG", circuit_failure_threshold=1000)
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
        provider_retry_base_ms=1,
        provider_retry_max_ms=2,
        grace_seconds=1,
    )
    dispatcher, dispatcher_port = await build_dispatcher(
        dsettings, DispatcherDeps.from_settings(dsettings, telemetry["dispatcher"])
    )
    r_channel = grpc.aio.insecure_channel(f"127.0.0.1:{resolver_port}")
    d_channel = grpc.aio.insecure_channel(f"127.0.0.1:{dispatcher_port}")
    resolver_stub, stub = rpb_grpc.ResolverServiceStub(r_channel), pb_grpc.DispatcherServiceStub(d_channel)
    faults = pii_api.sandbox.faults

    async def dispatch(channel, connector, content, ids, instance):
        reply = await stub.Dispatch(
            pb.DispatchRequest(
                workspace_id=WS,
                campaign_id="spring",
                campaign_instance_id=instance,
                channel=channel,
                connector_id=connector,
                content=content,
                recipients=[pb.Recipient(anonymous_id=f"canary-{i}") for i in ids],
            )
        )
        texts.extend(f"{r.error_code} {r.error_message}" for r in reply.results)
        return reply

    try:
        await configure(workspace, resolver_stub, stub)
        sms = pb.Content(sms_body="Hi {{ first_name }} {{ last_name }}")
        email = pb.Content(subject="{{ first_name }}", text_body="Dear {{ first_name }} {{ last_name }}")

        # Providers refuse each canary's address or number and quote it in their error bodies.
        for provider in ("twilio", "sendgrid", "whatsapp", "custom"):
            providers.set_faults(
                provider, reject_to={p.phone for p in people.values()} | {p.email for p in people.values()}
            )
        refused = [
            await dispatch(C.CHANNEL_SMS, "twilio", sms, range(0, 3), "refused"),
            await dispatch(C.CHANNEL_EMAIL, "sendgrid", email, range(0, 3), "refused"),
            await dispatch(C.CHANNEL_WHATSAPP, "whatsapp", sms, range(0, 3), "refused"),
            await dispatch(C.CHANNEL_SMS, "gateway", sms, range(0, 3), "refused"),
        ]
        assert all(r.summary.sent == 0 for r in refused)
        for provider in ("twilio", "sendgrid", "whatsapp", "custom"):
            providers.set_faults(provider)

        # A gateway that echoes what it was sent where the connector reads the message ID from.
        echo = workspace.connectors()["gateway"]
        echo.connector_id = "echo"
        echo.custom_http.body = echo.custom_http.body.replace("client-ref=@message_id", "client-ref=@text")
        echo.custom_http.message_id_path = 'messages[0]."client-ref"'
        await stub.PutConnector(pb.PutConnectorRequest(connector=echo))
        echoed = await dispatch(C.CHANNEL_SMS, "echo", pb.Content(sms_body="{{ first_name }}"), range(3, 5), "echo")
        assert echoed.summary.sent == 2

        # Templates that fail on the fetched values.
        for n, body in enumerate(
            (
                "{{ first_name.nothing.deeper }}",
                '{{ "%d"|format(first_name) }}',
                "{{ (first_name|length) / 0 }}",
                "{{ first_name|wordwrap(0) }}",
                "{{ first_name[99] }} {{ last_name|attr(first_name) }}",
            )
        ):
            failed = await dispatch(C.CHANNEL_SMS, "twilio", pb.Content(sms_body=body), range(5, 7), f"render-{n}")
            assert [r.error_code for r in failed.results] == ["RENDER_FAILED"] * 2

        # The PII API fails and quotes the customers: 500s, a 200 that is not JSON, invalid contacts.
        faults.echo_pii_in_errors = True
        faults.fail_status, faults.fail_count = 500, -1
        await dispatch(C.CHANNEL_EMAIL, "sendgrid", email, range(7, 10), "api-500")
        await dispatch(C.CHANNEL_SMS, "twilio", sms, range(7, 10), "api-500")
        test = await stub.SendTest(
            pb.SendTestRequest(
                workspace_id=WS,
                campaign_id="spring",
                channel=C.CHANNEL_SMS,
                connector_id="twilio",
                content=sms,
                recipient=pb.Recipient(anonymous_id="canary-7"),
            )
        )
        assert test.result.status == S.DISPATCH_STATUS_RESOLVE_FAILED and "HTTP 500" in test.pii_api_error
        # The marketer sees the PII API's own answer, with the contacts taken out however it spells them.
        texts.append(test.pii_api_error)
        faults.fail_status, faults.fail_count = None, 0
        faults.malformed_count = -1
        await dispatch(C.CHANNEL_SMS, "twilio", sms, range(7, 10), "malformed")
        faults.malformed_count = 0
        faults.invalid_contacts = set(people)
        await dispatch(C.CHANNEL_EMAIL, "sendgrid", email, range(7, 10), "invalid")
        await dispatch(C.CHANNEL_SMS, "twilio", sms, range(7, 10), "invalid")
    finally:
        await r_channel.close()
        await d_channel.close()
        await dispatcher.stop(0.5)
        await resolver.stop(0.5)
        await providers.close()
        await providers_runner.cleanup()
        for t in telemetry.values():
            t.tracer_provider.force_flush()

    canaries = needles(people)
    assert hits(canaries, await redis_dump(redis)) == []
    assert hits(canaries, log_text(captured_logs)) == []
    assert hits(canaries, texts) == []
    spans = b"".join(Path(p).read_bytes() for p in traces.values())
    assert b"dispatch.batch" in spans and b"pii_api.resolve" in spans
    assert hits(canaries, [spans]) == []
    collected = [r.get_metrics_data() for r in metrics.values()]
    points = [json.dumps(json.loads(d.to_json())).encode() for d in collected if d is not None]
    assert hits(canaries, points) == []
    for t in telemetry.values():
        t.shutdown()
