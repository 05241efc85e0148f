"""OpenTelemetry for every service, redacted by construction.

Layers, each with its own test:
- protobuf messages are logged or put on spans only through `libs.redaction`;
- `RedactingSpanProcessor` sits before every exporter and scrubs span and event names,
  attribute values, event and link attributes (exception messages and stack traces
  included) and status descriptions: blocked keys are dropped, emails, phone numbers and IPs are
  replaced, URL query values are cut, and every value fetched in the current
  batch (the context-local taint set) is removed wherever it appears;
- `ScrubbingFilter` does the same to every log record on every handler (URL query values cut too).
The Collector's redaction processor (deploy/otel-collector.yaml) is the second line.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
from opentelemetry import context as context_api
from opentelemetry import metrics, trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Link, Status

from libs.scrub import fold, redact_values, scrub_text

log = logging.getLogger(__name__)

# Attribute keys whose values are never exported, whatever they hold.
BLOCKED_KEYS = frozenset(
    {
        "http.request.header.authorization",
        "http.request.header.cookie",
        "http.response.header.set-cookie",
        "rpc.request.body",
        "rpc.response.body",
        "messaging.message.body",
        "enduser.id",
        "user.email",
    }
)
_URL_KEYS = frozenset({"http.url", "url.full", "url.query", "http.target", "url.path"})

# Histogram bounds for durations in seconds (`explicit_bucket_boundaries_advisory`). The SDK's default
# bounds (0, 5, 10 ... 10,000) suit milliseconds: every provider request would land in the first bucket.
# A request's, as OpenTelemetry's HTTP conventions advise, up to the 30 s a provider read may take:
REQUEST_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0)
# A dispatch batch's: resolving, rendering, sending within a rate limit and settling, up to ten minutes.
BATCH_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


# Up to this many values, and no more than two per character of the text, searching the text for
# each value is quicker than the index (measured: 16 values in a 70-character line 1.4 µs against
# 17; 140 in it 10.5 against 16.8; 400 in 8,192 characters 1.15 ms against 2.25; but 1,000 values
# in a 70-character line 65 µs against 15).
DIRECT_SEARCH_MAX_VALUES = 400


class TaintedValues(set):
    """The values fetched in one scope: a set, which only grows until the scope ends, that can say
    which of its values a text holds, in any case and form (`libs.scrub.fold`). Few values are each
    searched for; many are found from an index by the first three characters of their folded forms
    (a value folded shorter is searched for): a look-up per position of the text rather than a
    search of the text per value, 82 µs against 731 to scrub a batch's span attributes against its
    2,000 values. The values are folded, and the index built, when a text is first checked after
    values were added, so tainting, which runs for every fetched record, stays a plain set's add."""

    __slots__ = ("_view",)

    def __init__(self) -> None:
        super().__init__()
        # How many values were folded, their folded forms, and (once built) the index of those by their
        # first three characters with those folded shorter: one attribute, replaced whole, so that a
        # look-up never pairs an index with values of another count.
        self._view: tuple[int, frozenset[str], tuple[dict[str, list[str]], tuple[str, ...]] | None] = (
            0,
            frozenset(),
            None,
        )

    def found_in(self, folded: str) -> set[str]:
        """The values, folded, that occur in `folded`, a folded text (`libs.scrub.fold`)."""
        count, values, built = self._view
        if count != len(self):  # values were added (or the scope ended): fold them anew
            # From a copy (made at once): a log line in a worker thread (asyncio.to_thread shares the scope)
            # reads the values while the event loop taints more, and a set changed mid-iteration raises.
            now = self.copy()
            count, values, built = self._view = (len(now), frozenset(map(fold, now)), None)
        if len(values) <= min(2 * len(folded), DIRECT_SEARCH_MAX_VALUES):
            # Few values (a one-recipient call's): a search for each, in C, beats a look-up per position.
            return {value for value in values if value in folded}
        if built is None:
            by_start: dict[str, list[str]] = {}
            for value in values:
                if len(value) >= 3:
                    by_start.setdefault(value[:3], []).append(value)
            built = (by_start, tuple(value for value in values if len(value) < 3))
            self._view = (count, values, built)
        index, short = built
        found = {value for value in short if value in folded} if short else set()
        # A bucket is searched at the first position its three characters stand at, from there on: each
        # value once, where a look at every position cost a step per value and position ("aaaa...").
        searched: set[str] = set()
        for i in range(len(folded) - 2):
            start = folded[i : i + 3]
            bucket = index.get(start)
            if bucket and start not in searched:
                searched.add(start)
                for value in bucket:  # a plain loop: most buckets hold one value; a generator costs more
                    if folded.find(value, i) != -1:
                        found.add(value)
        return found


_TAINT: contextvars.ContextVar[TaintedValues | None] = contextvars.ContextVar("tokensend_taint", default=None)


@contextlib.contextmanager
def taint_scope() -> Iterator[TaintedValues]:
    """A fresh set of fetched values for one request; tasks started inside share it."""
    values = TaintedValues()
    token = _TAINT.set(values)
    try:
        yield values
    finally:
        _TAINT.reset(token)
        values.clear()


def taint(values: Iterable[str]) -> None:
    """Marks fetched values (contacts, names) so no span or log can carry them."""
    current = _TAINT.get()
    if current is None:
        current = TaintedValues()
        _TAINT.set(current)
    add = current.add
    for value in values:  # a plain loop: this runs for every fetched record
        if value and len(value) >= 3:
            add(value)


def tainted() -> TaintedValues:
    """This scope's fetched values: read them where they are asked for (a span's end, a log line),
    in the same thread; nothing keeps them."""
    current = _TAINT.get()
    return current if current is not None else TaintedValues()


def _strip_query(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.query:
        return value
    # A bare `?<key>` is its own value: only names of `name=value` pairs are kept.
    query = "&".join(p.split("=", 1)[0] + "=?" if "=" in p else "?" for p in parts.query.split("&") if p)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


_QUERY_IN_TEXT = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")


def without_query_values(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with the query values of every URL in it cut (`?api_key=?`): a key a URL carries (an
    HTTP client's exception quoting the request) goes no further.

    The values of `extra` are replaced first: a cut ends at a space or a quote, so it would split
    one holding them (`?to=O'Brien`, `?name=Ann Lee`) and leave its rest where no search finds it."""
    if "?" not in text or _QUERY_IN_TEXT.search(text) is None:
        return text
    return _QUERY_IN_TEXT.sub(lambda m: _strip_query(m.group(0)), redact_values(text, extra))


def scrub_value(key: str, value: Any, extra: Iterable[str]) -> Any:
    if isinstance(value, str):
        if key in _URL_KEYS:
            value = _strip_query(value)
        else:
            value = without_query_values(value, extra)
        return scrub_text(value, limit=4096, extra=extra, urls=False, collapse_whitespace=False)
    if isinstance(value, list | tuple):
        return type(value)(scrub_value(key, v, extra) for v in value)
    return value


def scrub_attributes(attributes: Any, extra: Iterable[str]) -> dict[str, Any]:
    return {k: scrub_value(k, v, extra) for k, v in (attributes or {}).items() if k not in BLOCKED_KEYS}


class RedactingSpanProcessor(SpanProcessor):
    """Hands the wrapped processor (and so every exporter) a scrubbed copy of each span."""

    def __init__(self, inner: SpanProcessor) -> None:
        self._inner = inner

    def on_start(self, span, parent_context=None) -> None:
        self._inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self._inner.on_end(redact_span(span, tainted()))

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def redact_span(span: ReadableSpan, extra: Iterable[str]) -> ReadableSpan:
    status = span.status
    if status.description:
        status = Status(status.status_code, scrub_text(status.description, limit=1024, extra=extra, urls=False))
    # Names too: whoever makes a span or an event names it (an instrumentation by its URL, an event by
    # its message), and a link carries attributes of its own.
    return ReadableSpan(
        name=_scrub_name(span.name, extra),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=scrub_attributes(span.attributes, extra),
        events=[
            Event(_scrub_name(e.name, extra), scrub_attributes(e.attributes, extra), e.timestamp) for e in span.events
        ],
        links=[Link(link.context, scrub_attributes(link.attributes, extra)) for link in span.links],
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _scrub_name(name: str, extra: Iterable[str]) -> str:
    return scrub_value("", name, extra) if name else name


def neutralise_line_breaks(text: str) -> str:
    """One record, one line: a value with CR or LF cannot forge a log line of its own."""
    if "\r" in text or "\n" in text:
        return text.replace("\r", "\\r").replace("\n", "\\n")
    return text


class ScrubbingFilter(logging.Filter):
    """Formats each record's message and exception, then scrubs them like span attributes."""

    def filter(self, record: logging.LogRecord) -> bool:
        extra = tainted()
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not take the log line's data with it
            message = str(record.msg)
        record.msg = neutralise_line_breaks(
            scrub_text(
                without_query_values(message, extra), limit=8192, extra=extra, urls=False, collapse_whitespace=False
            )
        )
        record.args = None
        if record.exc_info:
            text = without_query_values(logging.Formatter().formatException(record.exc_info), extra)
            record.exc_text = scrub_text(text, limit=16384, extra=extra, urls=False, collapse_whitespace=False)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub_text(
                without_query_values(record.stack_info, extra),
                limit=16384,
                extra=extra,
                urls=False,
                collapse_whitespace=False,
            )
        return True


def install_log_scrubbing(logger: logging.Logger | None = None) -> None:
    """Adds the scrubbing filter to every handler of `logger` (the root logger by default)."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())


class JsonLinesSpanExporter(SpanExporter):
    """Writes finished spans to a file, one JSON object per line (benchmarks, tests, offline review)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(json.loads(s.to_json()), separators=(",", ":")) for s in spans]
        with self._lock, open(self._path, "a", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class JsonLinesMetricExporter(MetricExporter):
    """Writes metric points to a file, one JSON document per export (benchmarks, tests, offline review)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        self._lock = threading.Lock()

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        line = json.dumps(json.loads(metrics_data.to_json()), separators=(",", ":"))
        with self._lock, open(self._path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider | metrics.NoOpMeterProvider
    recording: bool = True  # False when no span has anywhere to go

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        if isinstance(self.meter_provider, MeterProvider):
            self.meter_provider.shutdown()


def setup_telemetry(
    service_name: str,
    span_exporters: Sequence[SpanExporter] = (),
    metric_readers: Sequence[MetricReader] = (),
    trace_file: str | None = None,
    metrics_file: str | None = None,
) -> Telemetry:
    """Tracer and meter providers for one service; OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    resource = Resource.create({"service.name": service_name, "service.namespace": "tokensend"})
    exporters = list(span_exporters)
    readers = list(metric_readers)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if trace_file:
        exporters.append(JsonLinesSpanExporter(trace_file))
    if metrics_file:
        readers.append(
            PeriodicExportingMetricReader(JsonLinesMetricExporter(metrics_file), export_interval_millis=5000)
        )
    # With nowhere to send them, spans are not recorded: their contexts still carry the trace ID
    # from service to service (unsampled), but building, filling and ending them cost a lookup a
    # tenth of its CPU (docs/performance-history.md).
    tracer_provider = TracerProvider(resource=resource, sampler=None if exporters else ALWAYS_OFF)
    for exporter in exporters:
        tracer_provider.add_span_processor(RedactingSpanProcessor(BatchSpanProcessor(exporter)))
    # Likewise measurements no reader collects: the SDK would still build and aggregate each one
    # (a twentieth of a one-ID lookup's CPU in the resolver).
    meter_provider = (
        MeterProvider(resource=resource, metric_readers=readers) if readers else metrics.NoOpMeterProvider()
    )
    return Telemetry(tracer_provider, meter_provider, recording=bool(exporters))


@contextlib.contextmanager
def named_span(tracer: trace.Tracer, name: str, attributes: dict[str, Any] | None = None) -> Iterator[trace.Span]:
    """A current span whose exceptions are named by type, never recorded: an exception's text may
    quote what was fetched, and the redacting exporter should not be the only thing in the way.

    When the tracer samples nothing (no exporter), no span is made: the caller's own span stays
    current, so its trace ID still travels on, and attributes set on it are dropped as they would be.
    """
    if getattr(tracer, "sampler", None) is ALWAYS_OFF:
        yield trace.get_current_span()
        return
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except Exception as exc:
            span.set_status(Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise


def tracer(provider: TracerProvider | None, name: str) -> trace.Tracer:
    return (provider or trace.get_tracer_provider()).get_tracer(name)


def meter(provider: MeterProvider | None, name: str) -> metrics.Meter:
    return (provider or metrics.get_meter_provider()).get_meter(name)


# -- instrumentation of the libraries the services use ------------------------------------------

_NOT_TRACED = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


# Codes that mean the server failed (OpenTelemetry's RPC conventions); the others are the caller's.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class ServerSpans:
    """A server span per RPC, but for health checks and reflection, continuing the caller's W3C
    trace; it ends with the status the call answered, never an exception's text.

    Opened by `libs.interceptors.ErrorMappingInterceptor` around the handler it already wraps,
    rather than by OpenTelemetry's gRPC server interceptor, a layer of its own that also proxies
    the servicer context: 0.15 ms of the resolver's CPU per call (docs/performance-history.md).
    """

    def __init__(
        self, provider: TracerProvider, untraced: tuple[str, ...] = _NOT_TRACED, recording: bool = True
    ) -> None:
        self._tracer = provider.get_tracer("tokensend.grpc")
        self._untraced = untraced
        self._recording = recording

    def traced(self, method: str) -> bool:
        """A prefix test on the method's name, the only per-call filtering."""
        return not method.startswith(self._untraced)

    def start(self, method: str, context: Any) -> tuple[trace.Span | None, object]:
        """The span, made current; `finish` ends it. When nothing records spans, none is made (10 µs a
        call) and the caller's trace context, if it sent one, is made current instead: its trace ID
        still travels on to the calls this one makes and into the message map."""
        carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        if not self._recording:
            return None, context_api.attach(extract(carrier)) if "traceparent" in carrier else None
        full_name = method.lstrip("/")
        service, _, name = full_name.rpartition("/")
        span = self._tracer.start_span(
            full_name,
            context=extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        return span, context_api.attach(trace.set_span_in_context(span))

    @staticmethod
    def finish(opened: tuple[trace.Span | None, object], context: Any, cancelled: bool = False) -> None:
        span, token = opened
        if token is not None:
            context_api.detach(token)
        if span is None:
            return
        code = grpc.StatusCode.CANCELLED if cancelled else (context.code() or grpc.StatusCode.OK)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(Status(trace.StatusCode.ERROR, code.name))
        span.end()


def server_spans(telemetry: Telemetry | None) -> ServerSpans | None:
    return ServerSpans(telemetry.tracer_provider, recording=telemetry.recording) if telemetry is not None else None


def grpc_client_interceptors(telemetry: Telemetry | None) -> list[Any]:
    """Client spans that carry the W3C trace context to the next service. None when spans are not
    recorded: an intercepted call costs the client 130-300 µs more than a plain one, for a span
    nothing keeps; `trace_metadata` carries the trace on instead."""
    if telemetry is None or not telemetry.recording:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=telemetry.tracer_provider))


def trace_metadata(metadata: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """`metadata` with the current trace context's W3C headers when there is one to carry on to the
    next service: what the client interceptor adds, without a span of its own."""
    if not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    inject(carrier)
    return (*metadata, *carrier.items())


def aiohttp_trace_configs(telemetry: Telemetry | None) -> list[Any]:
    """A client span per outbound HTTP request (PII APIs, token endpoints, SendGrid), W3C context
    sent on. Query values are cut; a failure is named by its exception's type, never its text.

    Ours rather than OpenTelemetry's aiohttp instrumentation, which also keeps a duration
    histogram, parses and filters the URL several times and makes the span current: 0.3 ms of
    the resolver's CPU per call, a sixth of a one-ID lookup (docs/performance-history.md). None when
    spans are not recorded: aiohttp's hooks alone cost a one-ID lookup 5 % of its CPU.
    """
    if telemetry is None or not telemetry.recording:
        return []
    import aiohttp
    from opentelemetry.instrumentation.utils import is_http_instrumentation_enabled

    http_tracer = telemetry.tracer_provider.get_tracer("tokensend.http")
    client = trace.SpanKind.CLIENT

    async def on_start(_session: Any, context: Any, params: aiohttp.TraceRequestStartParams) -> None:
        # Per-message provider requests turn spans off (`suppress_http_instrumentation`): the batch's covers them.
        context.span = None
        if not is_http_instrumentation_enabled():
            return
        url = params.url
        attributes: dict[str, Any] = {
            "http.request.method": params.method,
            "url.full": _strip_query(str(url)),
            "server.address": url.host or "",
        }
        if url.port is not None:
            attributes["server.port"] = url.port
        span = http_tracer.start_span(params.method, kind=client, attributes=attributes)
        context.span = span
        inject(params.headers, context=trace.set_span_in_context(span))

    async def on_end(_session: Any, context: Any, params: aiohttp.TraceRequestEndParams) -> None:
        span = context.span
        if span is None:
            return
        status = params.response.status
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(trace.StatusCode.ERROR))
        span.end()

    async def on_exception(_session: Any, context: Any, params: aiohttp.TraceRequestExceptionParams) -> None:
        span = context.span
        if span is None:
            return
        name = type(params.exception).__name__
        span.set_attribute("error.type", name)
        span.set_status(Status(trace.StatusCode.ERROR, name))
        span.end()

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_start)
    config.on_request_end.append(on_end)
    config.on_request_exception.append(on_exception)
    return [config]


def instrument_redis(client: Any, telemetry: Telemetry | None) -> None:
    """A span per command; none when spans are not recorded (Redis takes no trace context)."""
    if telemetry is None or not telemetry.recording:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client, tracer_provider=telemetry.tracer_provider)
