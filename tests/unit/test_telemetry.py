"""Each redaction layer on its own: the span processor, the log filter and the Collector config.

Every test also runs with its layer switched off and shows the canary gets through,
so a test that passes only because the canary never reached the sink is impossible.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from libs.telemetry import RedactingSpanProcessor, ScrubbingFilter, ServerSpans, named_span, taint, taint_scope

ROOT = Path(__file__).resolve().parents[2]
EMAIL = "zed.quux@canary.example"
PHONE = "+447400918273"
NAME = "Zedediah"  # a name no detector can find: only the taint set knows it


def spans_text(exporter: InMemorySpanExporter) -> str:
    return "\n".join(span.to_json() for span in exporter.get_finished_spans())


def emit_span(redacting: bool) -> str:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider = TracerProvider()
    provider.add_span_processor(RedactingSpanProcessor(processor) if redacting else processor)
    tracer = provider.get_tracer("test")
    with taint_scope():
        taint([NAME, EMAIL, PHONE])
        with tracer.start_as_current_span("batch") as span:
            span.set_attribute("tokensend.batch.size", 3)
            span.set_attribute("note", f"sent to {EMAIL} and {PHONE}")
            span.set_attribute("greeting", f"Hello {NAME}")
            span.set_attribute("http.url", f"https://pii.example/v1/lookup?email={EMAIL}&name={NAME}")
            span.set_attribute("http.request.header.authorization", "Bearer s3cret-token")
            span.set_attribute("names", [NAME, "ok"])
            span.add_event("retry", {"detail": f"provider said {EMAIL} is invalid"})
            span.record_exception(ValueError(f"could not render for {NAME} <{EMAIL}>"))
            span.set_status(Status(StatusCode.ERROR, f"failed for {PHONE}"))
    return spans_text(exporter)


@pytest.mark.parametrize("redacting", [True, False])
def test_span_processor_scrubs_every_place_a_value_can_hide(redacting: bool) -> None:
    text = emit_span(redacting)
    leaked = [v for v in (EMAIL, PHONE, NAME, "s3cret-token") if v in text]
    if redacting:
        assert leaked == []
        assert '"tokensend.batch.size": 3' in text  # counts survive
        assert "https://pii.example/v1/lookup?email=?&name=?" in text
    else:
        assert set(leaked) == {EMAIL, PHONE, NAME, "s3cret-token"}


def emit_log(scrubbing: bool) -> str:
    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = ListHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    if scrubbing:
        handler.addFilter(ScrubbingFilter())
    logger = logging.getLogger(f"test.scrub.{scrubbing}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    with taint_scope():
        taint([NAME])
        logger.info("sending to %s (%s) for %s", EMAIL, PHONE, NAME)
        try:
            raise RuntimeError(f"provider refused {EMAIL} for {NAME}")
        except RuntimeError:
            logger.exception("send failed")
    logger.removeHandler(handler)
    return "\n".join(records)


@pytest.mark.parametrize("scrubbing", [True, False])
def emit_named_span(redacting: bool) -> str:
    """A span whose name, event name and link carry values: names are set by whoever makes the span
    (an instrumentation naming a span by its URL, an event named by its message), not by our code."""
    from opentelemetry.trace import Link

    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider = TracerProvider()
    provider.add_span_processor(RedactingSpanProcessor(processor) if redacting else processor)
    tracer = provider.get_tracer("test")
    with taint_scope():
        taint([NAME])
        with tracer.start_as_current_span("caller") as caller:
            linked = caller.get_span_context()
        with tracer.start_as_current_span(
            f"POST /v1/customers/{EMAIL}/{NAME}", links=[Link(linked, {"link.note": f"for {PHONE}"})]
        ) as span:
            span.add_event(f"refused {NAME} <{EMAIL}>")
    return spans_text(exporter)


@pytest.mark.parametrize("redacting", [True, False])
def test_span_processor_scrubs_span_names_event_names_and_links(redacting: bool) -> None:
    text = emit_named_span(redacting)
    leaked = [v for v in (EMAIL, PHONE, NAME) if v in text]
    if redacting:
        assert leaked == []
        assert '"name": "POST [email]/[redacted]"' in text  # the path's "user@host" shape goes whole
        assert '"name": "refused [redacted] <[email]>"' in text
        assert '"name": "caller"' in text  # a plain name is kept as it is
    else:
        assert set(leaked) == {EMAIL, PHONE, NAME}


@pytest.mark.parametrize("scrubbing", [True, False])
def test_log_filter_scrubs_messages_arguments_and_tracebacks(scrubbing: bool) -> None:
    text = emit_log(scrubbing)
    leaked = [v for v in (EMAIL, PHONE, NAME) if v in text]
    if scrubbing:
        assert leaked == []
        assert "sending to [email] ([phone]) for [redacted]" in text
        assert "RuntimeError" in text  # the traceback stays useful
    else:
        assert set(leaked) == {EMAIL, PHONE, NAME}


# Fetched values a URL's query can carry unescaped (yarl leaves "'" as it is; a raw URL keeps a space),
# where the cut of the query value ends: only the taint set knows the part after it.
QUOTED_NAMES = ["D'Zedediah", "Ann Zedediah"]


def log_and_span_of_query(name: str) -> str:
    """A log line, a traceback and a span event quoting an HTTP client's exception whose URL's query
    holds `name`, through the log filter and the span processor."""
    import aiohttp

    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = ListHandler()
    handler.addFilter(ScrubbingFilter())
    logger = logging.getLogger("test.scrub.query")
    logger.propagate = False
    logger.addHandler(handler)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(RedactingSpanProcessor(SimpleSpanProcessor(exporter)))
    refused = aiohttp.InvalidURL(f"https://gw.example/send?to={name}&text=hi")
    with taint_scope():
        taint([name])
        logger.warning("gateway refused %s", refused)
        try:
            raise refused
        except aiohttp.InvalidURL as exc:
            logger.exception("send failed")
            with provider.get_tracer("test").start_as_current_span("send") as span:
                span.record_exception(exc)
    logger.removeHandler(handler)
    return "\n".join(records) + spans_text(exporter)


@pytest.mark.parametrize("name", QUOTED_NAMES)
def test_a_query_cut_does_not_split_a_fetched_value_out_of_reach(name: str) -> None:
    text = log_and_span_of_query(name)
    assert "Zedediah" not in text
    assert "https://gw.example/send?to=?&text=?" in text  # the URL is still cut where it should be


def emit_quoted(redacting: bool, quoted: str) -> str:
    """A log line and a span quoting the fetched name as a provider wrote it back."""
    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = ListHandler()
    if redacting:
        handler.addFilter(ScrubbingFilter())
    logger = logging.getLogger(f"test.scrub.quoted.{redacting}")
    logger.propagate = False
    logger.addHandler(handler)
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider = TracerProvider()
    provider.add_span_processor(RedactingSpanProcessor(processor) if redacting else processor)
    with taint_scope():
        taint([f"{NAME} Quux"])
        logger.warning("provider refused %s", quoted)
        with provider.get_tracer("test").start_as_current_span("send") as span:
            span.set_attribute("error.message", f"no consent for {quoted}")
            span.set_status(Status(StatusCode.ERROR, f"refused {quoted}"))
    logger.removeHandler(handler)
    return "\n".join(records) + spans_text(exporter)


@pytest.mark.parametrize("redacting", [True, False])
@pytest.mark.parametrize("quoted", ["ZEDEDIAH QUUX", "zedediah quux", "Ｚｅｄｅｄｉａｈ Ｑｕｕｘ", "Zedediah&#32;Quux"])
def test_a_fetched_value_quoted_in_another_case_or_form_is_removed(redacting: bool, quoted: str) -> None:
    text = emit_quoted(redacting, quoted)
    if redacting:
        assert "zedediah" not in text.lower() and "ｚｅｄｅｄｉａｈ" not in text.lower()
        assert "provider refused [redacted]" in text and "no consent for [redacted]" in text
    else:  # the span's attribute as exported (JSON escapes what is not ASCII): the log line may meet
        # another test's filter left on a handler of the root logger
        assert json.dumps(f"no consent for {quoted}")[1:-1] in text


def test_taint_scope_is_per_request() -> None:
    with taint_scope() as first:
        taint([NAME])
        assert NAME in first
    with taint_scope() as second:
        assert NAME not in second


def test_collector_redacts_before_exporting_and_allows_no_pii_keys() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["processors"][0] == "redaction"  # first, before batching and export
    redaction = config["processors"]["redaction"]
    assert redaction["allow_all_keys"] is False
    allowed = set(redaction["allowed_keys"])
    for key in ("email", "user.email", "enduser.id", "http.request.header.authorization", "url.query", "db.statement"):
        assert key not in allowed
    patterns = [re.compile(p) for p in redaction["blocked_values"]]
    for value in (EMAIL, PHONE, "+1 (202) 555-0143"):
        assert any(p.search(value) for p in patterns), value
    json.dumps(config)  # plain data, no YAML tags


@pytest.mark.parametrize(
    ("method", "traced"),
    [
        ("/tokensend.resolver.v1.ResolverService/ResolveContacts", True),
        ("/tokensend.dispatcher.v1.DispatcherService/DispatchStream", True),
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", False),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", False),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
        ("/grpc.health.v1.HealthCheckLike/Check", True),
    ],
)
def test_server_spans_skip_health_checks_and_reflection(method, traced) -> None:
    assert ServerSpans(TracerProvider()).traced(method) is traced


def test_a_named_span_names_an_exception_by_type_and_keeps_none_of_its_text() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with pytest.raises(KeyError), named_span(tracer, "dispatch.batch", {"tokensend.batch.size": 2}):
        raise KeyError(EMAIL)
    with named_span(tracer, "pii_api.resolve"):
        pass
    failed, fine = exporter.get_finished_spans()
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "KeyError"
    assert not failed.events and EMAIL not in failed.to_json()
    assert failed.attributes["tokensend.batch.size"] == 2
    assert fine.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize("exporting", [True, False])
def test_spans_are_recorded_only_when_they_have_somewhere_to_go(exporting: bool) -> None:
    """With no exporter a span is not recorded, yet its context still carries the caller's trace on."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract, inject

    from libs.telemetry import setup_telemetry

    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("test", span_exporters=[exporter] if exporting else [])
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("lookup", context=extract({"traceparent": caller})) as span:
        carrier: dict[str, str] = {}
        inject(carrier)
        context = span.get_span_context()
        recorded = span.is_recording()
    telemetry.shutdown()
    assert telemetry.recording is recorded is exporting
    assert format(context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert carrier["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert context.trace_flags.sampled is exporting
    assert [s.name for s in exporter.get_finished_spans()] == (["lookup"] if exporting else [])
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize("exporting", [True, False])
def test_a_named_span_is_made_only_when_recorded_and_the_callers_trace_goes_on_either_way(exporting: bool) -> None:
    from opentelemetry.propagate import extract, inject

    from libs.telemetry import named_span, setup_telemetry

    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry("test", span_exporters=[exporter] if exporting else [])
    tracer = telemetry.tracer_provider.get_tracer("test")
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer.start_as_current_span("rpc", context=extract({"traceparent": caller})) as server:
        with named_span(tracer, "pii_api.resolve") as inner:
            inner.set_attribute("tokensend.batch.size", 3)
            carrier: dict[str, str] = {}
            inject(carrier)
    telemetry.shutdown()
    assert carrier["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    if exporting:
        assert inner is not server
        spans = {s.name: s for s in exporter.get_finished_spans()}
        assert spans["pii_api.resolve"].parent.span_id == server.get_span_context().span_id
        assert spans["pii_api.resolve"].attributes["tokensend.batch.size"] == 3
    else:
        assert inner is server  # nothing made: the caller's span, not recording, stays current
        assert not inner.is_recording() and exporter.get_finished_spans() == ()


def test_measurements_go_to_the_sdk_only_when_a_reader_collects_them() -> None:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from libs.telemetry import setup_telemetry

    reader = InMemoryMetricReader()
    read = setup_telemetry("test", metric_readers=[reader])
    unread = setup_telemetry("test")
    assert isinstance(read.meter_provider, MeterProvider)
    assert isinstance(unread.meter_provider, metrics.NoOpMeterProvider)
    for telemetry in (read, unread):
        telemetry.meter_provider.get_meter("test").create_counter("tokensend.test").add(2, {"outcome": "ok"})
    [metric] = [m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    assert (metric.name, metric.data.data_points[0].value) == ("tokensend.test", 2)
    for telemetry in (read, unread):
        telemetry.shutdown()  # both shut down cleanly


# Upper case, a decomposed accent (which composes with the letter before it, so a value of three
# characters can fold to two) and full-width letters: forms a value and a text are compared without.
@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.text(alphabet="abA@.+1 éÉ\u0301ｂ", min_size=1, max_size=6), max_size=40),
    text=st.text(alphabet="abAB@.+1 éxÉ\u0301ｂ", max_size=30),
)
def test_tainted_values_find_in_a_text_what_a_search_for_each_finds(values: list[str], text: str) -> None:
    from unittest import mock

    from libs import telemetry
    from libs.scrub import fold

    with taint_scope() as scope:
        taint(values)
        kept = {v for v in values if len(v) >= 3}
        assert set(scope) == kept and len(scope) == len(kept)
        folded = fold(text)
        for limit in (0, 10_000):  # the index every time; a search per value when the text allows
            with mock.patch.object(telemetry, "DIRECT_SEARCH_MAX_VALUES", limit):
                assert scope.found_in(folded) == {fold(v) for v in kept if fold(v) in folded}
        assert all(v in scope for v in kept)
    assert len(scope) == 0  # forgotten with the scope


async def test_a_resolver_call_carries_the_callers_trace_without_a_client_span_when_nothing_records() -> None:
    import grpc
    from opentelemetry import context as context_api
    from opentelemetry.propagate import extract
    from tokensend.resolver.v1 import resolver_service_pb2 as rpb
    from tokensend.resolver.v1 import resolver_service_pb2_grpc as rpb_grpc

    from libs.telemetry import grpc_client_interceptors, setup_telemetry
    from services.dispatcher.resolver_client import ResolverClient

    seen: list[dict[str, str]] = []

    class Capturing(rpb_grpc.ResolverServiceServicer):
        async def ResolveContacts(self, request, context):
            seen.append(dict(context.invocation_metadata()))
            return rpb.ResolveContactsResponse(contacts=[rpb.ResolvedContact(anonymous_id="c-1", contact="x")])

    server = grpc.aio.server()
    rpb_grpc.add_ResolverServiceServicer_to_server(Capturing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    telemetry = setup_telemetry("test", span_exporters=[])
    interceptors = grpc_client_interceptors(telemetry)
    client = ResolverClient(f"127.0.0.1:{port}", 5.0, interceptors, token="secret")
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        token = context_api.attach(extract({"traceparent": caller}))
        try:
            await client.resolve("ws", 1, ["c-1"], "", "")
        finally:
            context_api.detach(token)
        await client.resolve("ws", 1, ["c-1"], "", "")  # no trace to carry on
    finally:
        await client.close()
        await server.stop(None)
        telemetry.shutdown()
    assert interceptors == []
    assert seen[0]["traceparent"] == caller and seen[0]["authorization"] == "Bearer secret"
    assert "traceparent" not in seen[1] and seen[1]["authorization"] == "Bearer secret"


# Keys our spans carry that the Collector drops on purpose: a URL's path can hold a key or an ID
# (its query values are cut already).
WITHHELD_FROM_BACKEND = {"url.full"}


def literal_keys(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Dict):
        return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return set()


def emitted_attribute_keys() -> tuple[set[str], set[str]]:
    """The attribute keys the code puts on spans, and those it puts on measurements, read from the source."""
    span_keys: set[str] = set()
    metric_keys: set[str] = set()
    sources = [ROOT / "libs" / "telemetry.py", *sorted((ROOT / "services").rglob("*.py"))]
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name == "set_attribute" and node.args and isinstance(node.args[0], ast.Constant):
                    span_keys.add(node.args[0].value)
                elif name == "set_attributes" and node.args:
                    span_keys |= literal_keys(node.args[0])
                elif name == "named_span" and len(node.args) > 2:
                    span_keys |= literal_keys(node.args[2])
                elif name in ("add", "record", "Observation") and len(node.args) == 2:
                    metric_keys |= literal_keys(node.args[1])
                for keyword in node.keywords:
                    if keyword.arg == "attributes":
                        span_keys |= literal_keys(keyword.value)
            elif isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name) and target.id == "attributes":
                        span_keys |= literal_keys(node.value)
                    elif (
                        isinstance(target, ast.Subscript)
                        and getattr(target.value, "id", "") == "attributes"
                        and isinstance(target.slice, ast.Constant)
                    ):
                        span_keys.add(target.slice.value)
    return span_keys, metric_keys


def test_the_collector_passes_on_every_attribute_key_the_services_emit() -> None:
    """The allow-list is the second line: a count or an ID our own code adds must reach the backend."""
    from libs.telemetry import setup_telemetry

    span_keys, metric_keys = emitted_attribute_keys()
    assert {"tokensend.batch.size", "receipt.mapped", "rpc.grpc.status_code", "error.type"} <= span_keys
    assert {"channel", "connector", "status", "code", "outcome"} <= metric_keys
    telemetry = setup_telemetry("test")
    resource_keys = {k for k in telemetry.tracer_provider.resource.attributes if not k.startswith("telemetry.sdk.")}
    telemetry.shutdown()
    config = yaml.safe_load((ROOT / "deploy" / "otel-collector.yaml").read_text())
    allowed = set(config["processors"]["redaction"]["allowed_keys"])
    dropped = (span_keys | metric_keys | resource_keys) - WITHHELD_FROM_BACKEND - allowed
    assert dropped == set(), f"the Collector drops {sorted(dropped)}"


def test_tainted_values_are_read_while_a_call_in_another_thread_adds_one() -> None:
    """A log line in a worker thread (asyncio.to_thread shares the scope) reads the values while the
    event loop taints more: the values are folded from a copy, never from the set as it changes."""
    from unittest import mock

    from libs import scrub, telemetry

    with taint_scope() as scope:
        taint(["Jane Doe", "Zoë Smith"])
        added = []

        def fold_while_another_thread_adds(text: str) -> str:
            if not added:
                added.append(scope.add("Late Value"))
            return scrub.fold(text)

        with mock.patch.object(telemetry, "fold", fold_while_another_thread_adds):
            assert scope.found_in(scrub.fold("for jane doe")) == {"jane doe"}
        assert scope.found_in(scrub.fold("and LATE VALUE")) == {"late value"}  # folded at the next look
