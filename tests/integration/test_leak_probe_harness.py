"""What the leak probes share: a suite of canary customers with tracing and metrics on, and the scan.

Every sink is scanned for every form of every canary value: Redis keys and values (and plain hashes of
the values, which a careless index would store), log records with their tracebacks, spans, metric
points, and the texts a caller is handed (result and error texts, gRPC error details and trailers).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from libs.telemetry import Telemetry, setup_telemetry
from sandbox.pii_api import Customer
from tests.canary import hits, needles, redis_dump

# Loggers of the peers the probes start in the same process (the relay, the sandboxes, the servers'
# access logs): they are the provider's or the brand's side, and see the recipients by right.
PEER_LOGGERS = ("mail.log", "sandbox", "aiohttp.access", "aiohttp.server", "aiohttp.web")
# What the services' own logging setup (libs.logs.configure_logging) keeps at WARNING in production.
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "urllib3")


def canary_forms(people: dict[str, Customer]) -> set[str]:
    """The canaries as the scanners take them, and as plain hashes (SHA-256 and MD5, whole and cut to
    the 40 characters a Redis key holds): a blind index of a fetched value must be keyed."""
    forms = needles(people)
    for person in people.values():
        for raw in (person.email, person.phone, person.phone.lstrip("+"), person.first_name, person.last_name):
            for digest in (hashlib.sha256(raw.encode()).hexdigest(), hashlib.md5(raw.encode()).hexdigest()):
                forms |= {digest, digest[:40]}
    return forms


def log_records(caplog) -> list[str]:
    """Each record of the services' loggers as written, its traceback and its exception's repr included."""
    texts = []
    for record in caplog.records:
        if record.name.startswith(PEER_LOGGERS):
            continue
        parts = [record.name, record.getMessage(), str(record.args), record.exc_text or "", record.stack_info or ""]
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(logging.Formatter().formatException(record.exc_info))
            parts.append(repr(record.exc_info[1]))
        texts.append(" ".join(parts))
    return texts


@dataclass
class Sinks:
    """Telemetry for each service and what callers were handed."""

    traces: dict[str, Path]
    metrics: dict[str, InMemoryMetricReader]
    telemetry: dict[str, Telemetry]
    texts: list[str] = field(default_factory=list)

    def keep(self, *texts: str) -> None:
        self.texts.extend(texts)

    def keep_error(self, error: grpc.aio.AioRpcError) -> None:
        """An RPC's error as a caller sees it: code, details and the trailers with the rich status."""
        trailers = error.trailing_metadata() or ()
        self.texts.append(f"{error.code()} {error.details()} {[(k, v) for k, v in trailers]}")

    def flush(self) -> None:
        for t in self.telemetry.values():
            t.tracer_provider.force_flush()

    def spans(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.traces.values() if p.exists())

    def points(self) -> list[bytes]:
        collected = [r.get_metrics_data() for r in self.metrics.values()]
        return [json.dumps(json.loads(d.to_json())).encode() for d in collected if d is not None]

    async def leaks(self, people: dict[str, Customer], redis: Any, caplog: Any) -> dict[str, list[str]]:
        """Which canaries each sink holds; empty lists everywhere when nothing leaked."""
        forms = canary_forms(people)
        self.flush()
        return {
            "redis": hits(forms, await redis_dump(redis)),
            "logs": hits(forms, log_records(caplog)),
            "texts": hits(forms, self.texts),
            "spans": hits(forms, [self.spans()]),
            "metrics": hits(forms, self.points()),
        }


@asynccontextmanager
async def sinks(tmp_path: Path, *names: str) -> AsyncIterator[Sinks]:
    traces = {name: tmp_path / f"{name}.jsonl" for name in names}
    metrics = {name: InMemoryMetricReader() for name in names}
    telemetry = {
        name: setup_telemetry(name, metric_readers=[metrics[name]], trace_file=str(path))
        for name, path in traces.items()
    }
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield Sinks(traces, metrics, telemetry)
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        for t in telemetry.values():
            t.shutdown()


def nothing_leaked(found: dict[str, list[str]]) -> bool:
    return all(not values for values in found.values())
