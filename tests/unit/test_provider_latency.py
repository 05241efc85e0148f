"""`tokensend.provider.duration`: each attempt at a provider timed by provider and outcome, and the
`error_code` attribute of `tokensend.messages` kept to a bounded set of names."""

# Fixtures imported by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from libs.telemetry import REQUEST_SECONDS_BUCKETS
from services.dispatcher.connectors.base import SendStatus
from services.dispatcher.connectors.http_retry import (
    HttpRequest,
    HttpSender,
    ProviderLatency,
    RetryPolicy,
    timing_attempts,
)
from tests.unit.test_connectors_ses import Sleeps, aws_error, connector, fake_ses, message, ok  # noqa: F401

PHONE = "+447700900123"


def latency_reader() -> tuple[ProviderLatency, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return ProviderLatency(MeterProvider(metric_readers=[reader]).get_meter("test")), reader


def attempts(reader: InMemoryMetricReader) -> dict[tuple[str, str], HistogramDataPoint]:
    """The histogram's points by (provider, outcome), each checked to carry those two attributes only."""
    data = reader.get_metrics_data()
    found: dict[tuple[str, str], HistogramDataPoint] = {}
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != "tokensend.provider.duration":
                    continue
                assert metric.unit == "s"
                for point in metric.data.data_points:
                    assert set(point.attributes) == {"provider", "outcome"}
                    assert tuple(point.explicit_bounds) == REQUEST_SECONDS_BUCKETS
                    found[point.attributes["provider"], point.attributes["outcome"]] = point
    return found


def counts(reader: InMemoryMetricReader) -> Counter[tuple[str, str]]:
    return Counter({key: point.count for key, point in attempts(reader).items()})


@pytest.fixture
async def provider() -> AsyncIterator[Callable[..., str]]:
    """An HTTP provider answering each request with the next status of a script (the last one repeats)."""
    servers: list[TestServer] = []

    async def start(*statuses: int) -> str:
        answered = []

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            answered.append(request)
            return web.json_response({"sid": "SM1"}, status=statuses[min(len(answered), len(statuses)) - 1])

        app = web.Application()
        app.router.add_post("/send", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/send"))

    yield start
    for server in servers:
        await server.close()


async def exchange(url: str, max_retries: int = 3) -> SendStatus:
    async with aiohttp.ClientSession() as http:
        retry = RetryPolicy(max_retries=max_retries, connect_timeout_seconds=2.0, read_timeout_seconds=2.0)
        sender = HttpSender(http, "twilio", retry, sleep=Sleeps(), rng=random.Random(7))
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        request = HttpRequest("POST", url, form, f"To={PHONE}".encode())
        return (await sender.exchange(request)).status


async def test_each_http_attempt_is_timed_with_how_it_ended(provider) -> None:
    latency, reader = latency_reader()
    with timing_attempts(latency):
        assert await exchange(await provider(503, 429, 201)) is SendStatus.SENT
        assert await exchange(await provider(400)) is SendStatus.FAILED
        assert await exchange(await provider(500), max_retries=1) is SendStatus.FAILED  # given up: failed
    assert counts(reader) == {("twilio", "retried"): 3, ("twilio", "sent"): 1, ("twilio", "failed"): 2}
    assert all(0 < point.sum < 5 for point in attempts(reader).values())


async def test_an_attempt_that_may_have_reached_the_provider_is_timed_unknown() -> None:
    async def hang_up(request: web.Request) -> web.Response:
        await request.read()
        request.transport.close()  # the request arrived; no reply comes back
        return web.Response()

    app = web.Application()
    app.router.add_post("/send", hang_up)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    latency, reader = latency_reader()
    try:
        with timing_attempts(latency):
            assert await exchange(str(server.make_url("/send"))) is SendStatus.OUTCOME_UNKNOWN
    finally:
        await server.close()
    assert counts(reader) == {("twilio", "unknown"): 1}


async def test_attempts_outside_a_batch_that_records_metrics_are_not_timed(provider) -> None:
    latency, reader = latency_reader()
    url = await provider(201)
    assert await exchange(url) is SendStatus.SENT
    with timing_attempts(None):  # a dispatcher whose metrics no reader collects
        assert await exchange(url) is SendStatus.SENT
    assert counts(reader) == {}


async def test_each_ses_call_is_timed(fake_ses) -> None:
    base_url, _ = await fake_ses(aws_error(429, "TooManyRequestsException", "Maximum sending rate exceeded."), ok())
    rejected_url, _ = await fake_ses(aws_error(400, "MessageRejected", f"Email address is not verified: {PHONE}"))
    latency, reader = latency_reader()
    for url in (base_url, rejected_url):
        ses = connector(url)
        try:
            with timing_attempts(latency):
                await ses.send([message()])
        finally:
            await ses.close()
    assert counts(reader) == {("ses", "retried"): 1, ("ses", "sent"): 1, ("ses", "failed"): 1}


@pytest.mark.parametrize(
    "code",
    [
        "PROVIDER_AUTH_FAILED",
        "SENDER_REFUSED",
        "RATE_LIMITED",
        "OUTCOME_UNKNOWN",
        "RENDER_FAILED",
        "CAPPED",
        "NOT_FOUND",
        "SMTP_UTF8_UNSUPPORTED",
        "SMTP_TLS_REQUIRED",
        "HTTP_400",
        "HTTP_503",
        "SMTP_550",
        "SES_MessageRejected",
        "SES_Unknown",
    ],
)
def test_known_error_codes_are_counted_as_they_are(code: str) -> None:
    from services.dispatcher.campaign import metric_error_code

    assert metric_error_code(code) == code


@pytest.mark.parametrize(
    "code",
    [
        "SES_JaneDoe",  # a word an SES endpoint made up, in the code's place
        "SES_EmailAddressNotVerifiedJaneExample",
        "HTTP_4474009001",
        "SMTP_99",
        "X_447700900123",
        "jane.doe@mail.example",
        PHONE,
        "A" * 41,
        "Rate limited",
    ],
)
def test_any_other_error_code_is_counted_as_other(code: str) -> None:
    from services.dispatcher.campaign import metric_error_code

    assert metric_error_code(code) == "OTHER"
