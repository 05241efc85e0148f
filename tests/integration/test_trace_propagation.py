"""One campaign is one trace across the services: each DispatchStream batch's span is the ancestor of the
resolver's ResolveContacts span for its recipients (W3C traceparent in the gRPC metadata), within the
stream's server span, and no span of either service holds a customer's contact or name."""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.telemetry import setup_telemetry
from sandbox.pii_api import OAuthClient
from sandbox.providers import ProviderSandbox, start_providers
from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure
from tests.canary import canary_customers, hits, needles

pytestmark = pytest.mark.integration

SMS = pb.Content(sms_body="Hi {{ first_name }}, 20% off today. Reply STOP to opt out")


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """`span`'s parent, its parent and so on, as far as the services' spans go."""
    found = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        found.append(span)
    return found


async def test_each_stream_batch_span_is_an_ancestor_of_the_resolver_span_of_its_lookup(
    start_pii_api_server, start_resolver, start_dispatcher
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
    dispatcher_spans, resolver_spans = InMemorySpanExporter(), InMemorySpanExporter()
    dispatcher_telemetry = setup_telemetry("dispatcher", span_exporters=[dispatcher_spans])
    resolver_telemetry = setup_telemetry("resolver", span_exporters=[resolver_spans])
    resolver = await start_resolver(telemetry=resolver_telemetry)
    dispatcher = await start_dispatcher(resolver=resolver, telemetry=dispatcher_telemetry, batch_size=2)
    try:
        await configure(workspace, resolver.stub, dispatcher.stub)
        dispatcher_spans.clear()
        resolver_spans.clear()

        async def requests():
            yield pb.DispatchStreamRequest(
                header=pb.DispatchStreamRequest.Header(
                    workspace_id="brand",
                    campaign_id="spring",
                    campaign_instance_id=uuid.uuid4().hex,
                    channel=common_pb2.CHANNEL_SMS,
                    connector_id="twilio",
                    content=SMS,
                )
            )
            yield pb.DispatchStreamRequest(
                recipients=pb.DispatchStreamRequest.Recipients(
                    recipients=[pb.Recipient(anonymous_id=f"canary-{i}") for i in range(4)]
                )
            )

        results = [r for reply in [x async for x in dispatcher.stub.DispatchStream(requests())] for r in reply.results]
        assert len(results) == 4 and all(r.status == pb.DISPATCH_STATUS_SENT for r in results)
    finally:
        await runner.cleanup()
        await providers.close()
        dispatcher_telemetry.shutdown()  # its spans exported, for the reading below
        resolver_telemetry.shutdown()

    sent, received = dispatcher_spans.get_finished_spans(), resolver_spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in (*sent, *received)}
    batches = [s for s in sent if s.name == "dispatch.batch"]
    lookups = [s for s in received if s.name.endswith("ResolverService/ResolveContacts")]
    assert len(batches) == 2 and len(lookups) == 2
    batch_of_lookup = []
    for lookup in lookups:
        chain = ancestors(lookup, by_id)
        assert chain[-1].name.endswith("DispatcherService/DispatchStream"), [a.name for a in chain]
        batch_of_lookup.append(next(a.context.span_id for a in chain if a.name == "dispatch.batch"))
    assert sorted(batch_of_lookup) == sorted(s.context.span_id for s in batches)  # each batch its own lookup
    assert {s.context.trace_id for s in (*batches, *lookups)} == {batches[0].context.trace_id}
    assert hits(needles(people), [s.to_json() for s in (*sent, *received)]) == []
