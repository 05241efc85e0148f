"""Servicer exceptions become statuses: the code, the message and the field, and no traceback on a span."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.crypto import SecretBox
from libs.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable, WithDetails
from libs.interceptors import ErrorMappingInterceptor, WrappedHandlers
from libs.telemetry import ServerSpans
from services.dispatcher import resolver_client
from services.dispatcher.resolver_client import ResolverFault

FAILURES = {
    "not-found": NotFound("no PII API config for workspace ws (email)"),
    "invalid": InvalidArgument("anonymous_ids[3]", "must be 1-256 visible characters"),
    "bug": RuntimeError("a value the code choked on: zed@canary.example"),
    # What a call had answered before it failed, carried beside its error.
    "partly-answered": WithDetails(
        RedisConnectionError("Error 111 connecting to 10.0.0.7:6379"),
        "; 2 of 3 answered",
        [health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)],
    ),
    "partly-invalid": WithDetails(
        InvalidArgument("recipients[2]", "is bad"),
        "; 2 of 3 answered",
        [health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)],
    ),
}


class Failing(health_pb2_grpc.HealthServicer):
    def __init__(self, tracer) -> None:
        self._tracer = tracer

    async def Check(self, request, context):
        if request.service == "child":
            with self._tracer.start_as_current_span("lookup"):
                pass
        if request.service in FAILURES:
            raise FAILURES[request.service]
        if request.service.startswith("sealed "):  # a record sealed under a key this process was not given
            record = request.service.removeprefix("sealed ").encode()
            SecretBox([b"n" * 32]).open(SecretBox([b"o" * 32]).seal(b"{}", record), record)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        if request.service == "endless":
            await asyncio.Event().wait()
        raise FAILURES[request.service]


@pytest.fixture
async def served():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(ServerSpans(provider, untraced=()))])
    health_pb2_grpc.add_HealthServicer_to_server(Failing(provider.get_tracer("test")), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield health_pb2_grpc.HealthStub(channel), exporter
    await server.stop(None)


async def test_a_domain_error_is_its_status_and_the_span_holds_no_traceback(served) -> None:
    stub, exporter = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Check(health_pb2.HealthCheckRequest(service="not-found"))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "no PII API config for workspace ws (email)"
    (span,) = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not span.events  # no exception event, no formatted traceback


async def test_a_bad_field_is_named_in_the_rich_status(served) -> None:
    stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Check(health_pb2.HealthCheckRequest(service="invalid"))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(failed.value)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "anonymous_ids[3]"


async def test_an_error_carrying_a_partial_answer_keeps_its_status_and_adds_the_answer_as_a_detail(served) -> None:
    stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Check(health_pb2.HealthCheckRequest(service="partly-answered"))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.value.details() == "storage unavailable, retry later; 2 of 3 answered"
    status = rpc_status.from_call(failed.value)
    answer = health_pb2.HealthCheckResponse()
    assert len(status.details) == 1 and status.details[0].Unpack(answer)
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_partial_answer_goes_after_the_field_violation(served) -> None:
    stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Check(health_pb2.HealthCheckRequest(service="partly-invalid"))
    assert failed.value.details() == "recipients[2]: is bad; 2 of 3 answered"
    status = rpc_status.from_call(failed.value)
    bad_request, answer = error_details_pb2.BadRequest(), health_pb2.HealthCheckResponse()
    assert [status.details[0].Unpack(bad_request), status.details[1].Unpack(answer)] == [True, True]
    assert bad_request.field_violations[0].field == "recipients[2]"


async def test_an_unexpected_exception_is_internal_with_a_reference_and_no_text(served) -> None:
    stub, exporter = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Check(health_pb2.HealthCheckRequest(service="bug"))
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details().startswith("internal error (ref ")
    assert "canary" not in failed.value.details()
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR and "canary" not in span.to_json()


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ("ts:{demo}:connector:sendgrid", "connector 'sendgrid' in workspace 'demo'"),
        ("ts:{demo}:connector:a%3Ab", "connector 'a:b' in workspace 'demo'"),
        ("ts:{demo}:pii:sms", "PII API config for channel family sms in workspace 'demo'"),
        ("ts:{demo}:oauth:crm", "OAuth config 'crm' in workspace 'demo'"),
        ("ts:{demo}:content:loyalty", "content API config 'loyalty' in workspace 'demo'"),
        ("ts:{demo}:archive:0af7651916cd", "a stored config"),  # not a config's key: named by nothing in it
    ],
)
async def test_a_config_sealed_under_another_key_is_named_with_what_to_do(served, record, named) -> None:
    stub, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Check(health_pb2.HealthCheckRequest(service=f"sealed {record}"))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.value.details().startswith(f"{named} does not open with TOKENSEND_SECRET_KEY: ")
    assert failed.value.details().endswith("save it again with its secrets, or delete it")


async def test_a_stream_ends_with_the_status_after_what_it_sent(served) -> None:
    stub, _ = served
    call = stub.Watch(health_pb2.HealthCheckRequest(service="not-found"))
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for message in call:
            received.append(message.status)
    assert received == [health_pb2.HealthCheckResponse.SERVING]
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_server_span_continues_the_callers_trace(served) -> None:
    stub, exporter = served
    caller = "0af7651916cd43dd8448eb211c80319c"
    await stub.Check(
        health_pb2.HealthCheckRequest(service=""), metadata=(("traceparent", f"00-{caller}-b7ad6b7169203331-01"),)
    )
    (span,) = exporter.get_finished_spans()
    assert span.name == "grpc.health.v1.Health/Check"
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == caller
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert span.attributes["rpc.system"] == "grpc"
    assert (span.attributes["rpc.service"], span.attributes["rpc.method"]) == ("grpc.health.v1.Health", "Check")
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.status.status_code == StatusCode.UNSET


async def test_spans_made_in_the_handler_are_its_children(served) -> None:
    stub, exporter = served
    await stub.Check(health_pb2.HealthCheckRequest(service="child"))
    child, server = exporter.get_finished_spans()
    assert child.name == "lookup" and child.parent.span_id == server.context.span_id


async def test_a_callers_error_is_not_the_servers(served) -> None:
    stub, exporter = served
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Check(health_pb2.HealthCheckRequest(service="invalid"))
    (span,) = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span.status.status_code == StatusCode.UNSET


async def test_a_stream_span_ends_with_the_streams_status(served) -> None:
    stub, exporter = served
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in stub.Watch(health_pb2.HealthCheckRequest(service="bug")):
            pass
    (span,) = exporter.get_finished_spans()
    assert span.name == "grpc.health.v1.Health/Watch"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert span.status.status_code == StatusCode.ERROR and "canary" not in span.to_json()


async def test_a_stream_the_client_cancels_ends_its_span(served) -> None:
    stub, exporter = served
    call = stub.Watch(health_pb2.HealthCheckRequest(service="endless"))
    assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
    call.cancel()
    for _ in range(100):
        if exporter.get_finished_spans():
            break
        await asyncio.sleep(0.01)
    (span,) = exporter.get_finished_spans()
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert span.status.status_code == StatusCode.UNSET


def test_health_checks_and_reflection_get_no_span_by_default() -> None:
    spans = ServerSpans(TracerProvider())
    assert not spans.traced("/grpc.health.v1.Health/Check")
    assert spans.traced("/tokensend.resolver.v1.ResolverService/ResolveContacts")


class SeesItsTrace(health_pb2_grpc.HealthServicer):
    """Keeps the trace ID current in each call's handler ("" for none)."""

    seen: list[str]

    def __init__(self) -> None:
        self.seen = []

    async def Check(self, request, context):
        span_context = trace.get_current_span().get_span_context()
        self.seen.append(format(span_context.trace_id, "032x") if span_context.is_valid else "")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_with_nothing_recording_no_span_is_made_and_the_callers_trace_stays_current() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    servicer = SeesItsTrace()
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(ServerSpans(provider, untraced=(), recording=False))]
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    caller = "0af7651916cd43dd8448eb211c80319c"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(
                health_pb2.HealthCheckRequest(), metadata=(("traceparent", f"00-{caller}-b7ad6b7169203331-01"),)
            )
            await stub.Check(health_pb2.HealthCheckRequest())
    finally:
        await server.stop(None)
    assert servicer.seen == [caller, ""]
    assert exporter.get_finished_spans() == ()
    assert not trace.get_current_span().get_span_context().is_valid  # nothing left attached


async def test_a_method_s_wrapped_handler_is_made_once_and_reused() -> None:
    made = []

    async def behavior(request, context):
        return None

    handler = grpc.unary_unary_rpc_method_handler(behavior)

    async def continuation(details):
        return handler

    class Details:
        method = "/tokensend.resolver.v1.ResolverService/ResolveContacts"
        invocation_metadata = ()

    mapping = ErrorMappingInterceptor()
    for _ in range(3):
        made.append(await mapping.intercept_service(continuation, Details()))
    assert made[0] is made[1] is made[2]
    assert made[0] is not handler and made[0].unary_unary is not behavior


def test_wrapped_handlers_stay_within_their_bound() -> None:
    wrapped = WrappedHandlers()
    for key in range(WrappedHandlers.LIMIT + 10):
        assert wrapped.get(key, lambda key=key: key) == key
    assert len(wrapped._made) <= WrappedHandlers.LIMIT


@pytest.mark.parametrize(
    ("resolver_code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
        (grpc.StatusCode.NOT_FOUND, FailedPrecondition),
        (grpc.StatusCode.PERMISSION_DENIED, FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.INTERNAL, ResolverFault),
        (grpc.StatusCode.UNKNOWN, ResolverFault),
    ],
)
def test_a_resolver_error_reaches_the_campaign_engine_as_what_it_is(resolver_code, kind) -> None:
    """A resolver that failed is a fault of the suite's (INTERNAL), not the caller's state to fix
    (FAILED_PRECONDITION); a resolver out of capacity says retry later."""
    error = grpc.aio.AioRpcError(resolver_code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="what happened")
    assert type(resolver_client._translate(error)) is kind


def test_a_resolver_error_code_this_contract_does_not_declare_is_unknown_not_a_failed_batch() -> None:
    """A newer resolver may answer with a code added after this dispatcher was built."""
    assert resolver_client.resolve_error_code(2) == "NOT_FOUND"
    assert resolver_client.resolve_error_code(999) == "UNKNOWN"
