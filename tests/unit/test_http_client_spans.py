"""The client span of each outbound aiohttp request: what it records and what it never does."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.instrumentation.utils import suppress_http_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from libs.telemetry import Telemetry, aiohttp_trace_configs, setup_telemetry

pytestmark = pytest.mark.asyncio


@pytest.fixture
def spans():
    """A recording provider whose spans are read as recorded, before any redaction."""
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TracerProvider(), MeterProvider())
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield telemetry, exporter
    telemetry.shutdown()


@pytest.fixture
async def server():
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": True}, status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_a_request_gets_one_client_span_with_the_trace_sent_on(spans, server) -> None:
    telemetry, exporter = spans
    base, seen = server
    tracer = telemetry.tracer_provider.get_tracer("test")
    async with aiohttp.ClientSession(trace_configs=aiohttp_trace_configs(telemetry)) as session:
        with tracer.start_as_current_span("pii_api.resolve") as parent:
            async with session.get(f"{base}/v1/customers/cust-1?email=zed%40canary.example&fields=a") as reply:
                assert reply.status == 200
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "GET"]
    assert span.kind == SpanKind.CLIENT
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["url.full"] == f"{base}/v1/customers/cust-1?email=?&fields=?"
    assert span.attributes["server.address"] == "127.0.0.1"
    assert span.attributes["http.response.status_code"] == 200
    assert span.status.status_code == StatusCode.UNSET
    trace_id = format(span.context.trace_id, "032x")
    span_id = format(span.context.span_id, "016x")
    assert seen[0]["traceparent"].startswith(f"00-{trace_id}-{span_id}-")


async def test_an_error_status_marks_the_span(spans, server) -> None:
    telemetry, exporter = spans
    base, _ = server
    async with aiohttp.ClientSession(trace_configs=aiohttp_trace_configs(telemetry)) as session:
        async with session.post(f"{base}/send?status=503", data=b"to=%2B447400918273") as reply:
            assert reply.status == 503
    (span,) = exporter.get_finished_spans()
    assert (span.name, span.attributes["http.response.status_code"]) == ("POST", 503)
    assert span.attributes["error.type"] == "503"
    assert span.status.status_code == StatusCode.ERROR


async def test_a_failed_request_is_named_by_type_only(spans) -> None:
    telemetry, exporter = spans
    async with aiohttp.ClientSession(trace_configs=aiohttp_trace_configs(telemetry)) as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get("http://127.0.0.1:9/lookup?phone=%2B447400918273")
    (span,) = exporter.get_finished_spans()
    assert span.attributes["error.type"] == "ClientConnectorError"
    assert span.status.description == "ClientConnectorError"
    assert span.events == ()  # no exception event: its text could quote the request
    assert "447400918273" not in span.to_json()


async def test_no_telemetry_no_trace_configs() -> None:
    assert aiohttp_trace_configs(None) == []


async def test_no_exporter_no_trace_configs() -> None:
    """Spans that go nowhere are not recorded, so aiohttp's hooks would only cost."""
    telemetry = setup_telemetry("test")
    assert aiohttp_trace_configs(telemetry) == []
    telemetry.shutdown()


async def test_a_suppressed_request_gets_no_span_and_sends_no_trace(spans, server) -> None:
    """What per-message connectors on a traced session rely on: the batch span covers them."""
    telemetry, exporter = spans
    base, seen = server
    async with aiohttp.ClientSession(trace_configs=aiohttp_trace_configs(telemetry)) as session:
        with suppress_http_instrumentation():
            async with session.post(f"{base}/send", data=b"x") as reply:
                assert reply.status == 200
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get("http://127.0.0.1:9/lookup")
    assert exporter.get_finished_spans() == ()
    assert "traceparent" not in seen[0]
