"""Calls held back by a half-open circuit's probe learn its verdict; URLs the HTTP client cannot send to."""

from __future__ import annotations

import asyncio

import pytest
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.errors import InvalidArgument
from services.resolver.circuit import CircuitBreaker
from services.resolver.requests import single_request
from services.resolver.validation import check_url

API = "ws-1 HTTP_METHOD_GET https://api.example.com/v1/customers/@anonymous_id"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def half_open() -> CircuitBreaker:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, open_seconds=30, clock=clock)
    breaker.record_failure(API)
    clock.now += 30
    assert breaker.allow(API), "the probe"
    assert not breaker.allow(API)
    return breaker


@pytest.mark.parametrize(
    ("verdict", "then_allowed"),
    [
        (CircuitBreaker.record_success, True),  # closed: every call goes
        (CircuitBreaker.record_failure, False),  # open again for a full period
        (CircuitBreaker.release_probe, True),  # no verdict: the next call is the probe
    ],
)
async def test_a_call_held_back_by_the_probe_wakes_at_its_end(verdict, then_allowed) -> None:
    breaker = half_open()
    waiting = asyncio.ensure_future(breaker.probe_ended(API, timeout=5))
    await asyncio.sleep(0)
    assert not waiting.done()
    verdict(breaker, API)
    assert await waiting is True
    assert breaker.allow(API) is then_allowed


async def test_a_probe_that_does_not_end_in_time_lets_the_wait_go() -> None:
    breaker = half_open()
    assert await breaker.probe_ended(API, timeout=0.01) is False
    assert await breaker.probe_ended(API, timeout=0) is False
    assert breaker.probing(API)


async def test_no_probe_out_is_no_wait() -> None:
    breaker = CircuitBreaker(threshold=3, open_seconds=30)
    assert await breaker.probe_ended(API, timeout=0) is True
    breaker.record_failure(API)
    assert await breaker.probe_ended(API, timeout=0) is True


@pytest.mark.parametrize(
    "url",
    [
        "https://a\u200bpi.example.com/x/@anonymous_id",
        "https://\u00adapi.example.com/x/@anonymous_id",
        f"https://{'a' * 64}.example.com/x/@anonymous_id",
        "https://api..example.com/x/@anonymous_id",
        "https://api.example.com:0/x/@anonymous_id",
        "https://api.example.com/x/\x01@anonymous_id",
        "https://api.example.com/x/@anonymous_id?k=\x7f",
    ],
)
def test_a_url_the_http_client_cannot_send_to_is_refused(url: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_url(url, "config.url", allow_private=False)
    assert caught.value.field == "config.url"


@pytest.mark.parametrize(
    "url",
    [
        "https://exämple.com/x/@anonymous_id",
        "https://api.example.com./x/@anonymous_id",
        "https://[2606:4700:4700::1111]/x",
    ],
)
def test_international_and_fully_qualified_hosts_stand(url: str) -> None:
    check_url(url, "config.url", allow_private=False)


def test_an_id_in_a_url_whose_host_yarl_refuses_is_put_in_place_not_raised() -> None:
    config = pb.PiiApiConfig(method=pb.HTTP_METHOD_GET, url="https://a\u200bpi.example.com/c/@anonymous_id")
    request = single_request(config, "a/b")
    assert str(request.url) == "https://a\u200bpi.example.com/c/a%2Fb"
