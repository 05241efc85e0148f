"""Unit tests for services/resolver/backoff.py and services/resolver/circuit.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from libs.backoff import full_jitter_delay, parse_retry_after
from services.resolver import circuit
from services.resolver.circuit import CircuitBreaker

# --- full jitter ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "ceiling"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (12, 5.0)],
)
def test_full_jitter_stays_within_the_exponential_ceiling(retry: int, ceiling: float) -> None:
    rng = random.Random(1234)
    draws = [full_jitter_delay(retry, base_s=0.5, cap_s=5.0, rng=rng) for _ in range(2000)]
    assert all(0 <= d <= ceiling for d in draws)
    assert len(set(draws)) > 1000, "jittered, not constant"
    # full jitter spreads over the whole range, not just near the ceiling
    assert min(draws) < ceiling * 0.05
    assert max(draws) > ceiling * 0.95


def test_full_jitter_is_reproducible_with_a_seeded_rng() -> None:
    a = [full_jitter_delay(3, 0.5, 5.0, random.Random(7)) for _ in range(3)]
    b = [full_jitter_delay(3, 0.5, 5.0, random.Random(7)) for _ in range(3)]
    assert a == b


def test_full_jitter_without_rng_uses_the_module_random() -> None:
    draws = {full_jitter_delay(2, 0.5, 5.0) for _ in range(50)}
    assert all(0 <= d <= 1.0 for d in draws)
    assert len(draws) > 1


# --- Retry-After ----------------------------------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5", 5.0),
        ("0", 0.0),
        (" 120 ", 120.0),
        ("17330000000000", 1e12),
        ("9" * 400, 1e12),
        ("86400000000", 86400000000.0),
    ],
)
def test_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_http_date_in_the_future() -> None:
    header = format_datetime(NOW + timedelta(seconds=90), usegmt=True)  # 'Sat, 01 Mar 2025 12:01:30 GMT'
    assert parse_retry_after(header, now=NOW) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    header = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(header, now=NOW) == 0.0


def test_retry_after_http_date_without_zone_is_utc() -> None:
    assert parse_retry_after("Sat, 01 Mar 2025 12:00:30 -0000", now=NOW) == pytest.approx(30.0)


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", "5s", "Mon, 99 Foo 2025", "   "])
def test_retry_after_garbage_is_none(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize("value", [None, ""])
def test_retry_after_absent_is_none(value) -> None:
    assert parse_retry_after(value, now=NOW) is None


@pytest.mark.parametrize("value", ["²", "1²"])
def test_retry_after_non_ascii_digits_are_unreadable_not_an_exception(value: str) -> None:
    assert parse_retry_after(value, now=NOW) is None


# --- circuit breaker ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


API = "https://pii.example.com/v1/customers"
OTHER = "https://other.example.com/v1/customers"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, open_seconds=30.0, clock=clock)


def fail(breaker: CircuitBreaker, endpoint: str, times: int) -> None:
    for _ in range(times):
        assert breaker.allow(endpoint)
        breaker.record_failure(endpoint)


def test_new_endpoint_is_closed(breaker: CircuitBreaker) -> None:
    assert breaker.state(API) == "closed"
    assert breaker.allow(API)


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    fail(breaker, API, 2)
    assert breaker.state(API) == "closed"
    assert breaker.allow(API)
    breaker.record_failure(API)
    assert breaker.state(API) == "open"
    assert not breaker.allow(API)


def test_success_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    fail(breaker, API, 2)
    breaker.record_success(API)
    fail(breaker, API, 2)
    assert breaker.state(API) == "closed"
    assert breaker.allow(API)


def test_fails_fast_while_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, API, 3)
    for _ in range(5):
        clock.advance(5.9)
        assert not breaker.allow(API)
        assert breaker.state(API) == "open"


def test_after_open_seconds_exactly_one_probe(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, API, 3)
    clock.advance(29.9)
    assert not breaker.allow(API)
    clock.advance(0.1)
    assert breaker.state(API) == "half_open"
    assert breaker.allow(API), "the probe"
    assert breaker.state(API) == "half_open"
    assert not breaker.allow(API), "only one probe at a time"
    clock.advance(100)
    assert not breaker.allow(API), "still probing, however long it takes"


def test_probe_success_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, API, 3)
    clock.advance(30)
    assert breaker.allow(API)
    breaker.record_success(API)
    assert breaker.state(API) == "closed"
    assert breaker.allow(API)
    assert breaker.allow(API)
    # the count starts from zero again
    fail(breaker, API, 2)
    assert breaker.state(API) == "closed"


def test_probe_failure_reopens_for_a_full_period(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, API, 3)
    clock.advance(30)
    assert breaker.allow(API)
    breaker.record_failure(API)
    assert breaker.state(API) == "open"
    assert not breaker.allow(API)
    clock.advance(29)
    assert not breaker.allow(API)
    clock.advance(1)
    assert breaker.allow(API), "a new probe after another open period"


def test_release_probe_frees_the_slot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, API, 3)
    clock.advance(30)
    assert breaker.allow(API)
    assert not breaker.allow(API)
    breaker.release_probe(API)
    assert breaker.state(API) == "half_open"
    assert breaker.allow(API), "another probe may go"
    assert not breaker.allow(API)


def test_release_probe_of_an_unknown_endpoint_is_harmless(breaker: CircuitBreaker) -> None:
    breaker.release_probe("https://never-seen.example.com")
    assert breaker.state("https://never-seen.example.com") == "closed"


def test_endpoints_are_independent(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, API, 3)
    assert breaker.state(API) == "open"
    assert breaker.state(OTHER) == "closed"
    assert breaker.allow(OTHER)
    fail(breaker, OTHER, 2)
    breaker.record_success(API)  # closing one does not touch the other's count
    breaker.record_failure(OTHER)
    assert breaker.state(OTHER) == "open"
    assert breaker.state(API) == "closed"


def test_state_reports_each_phase(breaker: CircuitBreaker, clock: FakeClock) -> None:
    seen = [breaker.state(API)]
    fail(breaker, API, 3)
    seen.append(breaker.state(API))
    clock.advance(30)
    seen.append(breaker.state(API))
    breaker.allow(API)
    seen.append(breaker.state(API))
    breaker.record_success(API)
    seen.append(breaker.state(API))
    assert seen == ["closed", "open", "half_open", "half_open", "closed"]


def test_default_clock_is_monotonic_time() -> None:
    breaker = CircuitBreaker(threshold=1, open_seconds=60)
    breaker.record_failure(API)
    assert breaker.state(API) == "open"
    assert not breaker.allow(API)


def test_only_failing_endpoints_are_remembered_and_at_most_a_bounded_number(clock, monkeypatch) -> None:
    monkeypatch.setattr(circuit, "ENDPOINTS_KEPT", 3)
    breaker = CircuitBreaker(threshold=1, open_seconds=30.0, clock=clock)
    assert breaker.allow("GET https://a.example/x") and breaker.open_endpoints() == []
    for name in "abcd":
        breaker.record_failure(f"GET https://{name}.example/x")
    assert breaker.open_endpoints() == [f"GET https://{name}.example/x" for name in "bcd"]  # a went first
    breaker.record_success("GET https://c.example/x")
    assert breaker.open_endpoints() == ["GET https://b.example/x", "GET https://d.example/x"]


def test_open_endpoints_are_read_while_the_event_loop_closes_a_circuit() -> None:
    """The metric reader calls `open_endpoints` from its own thread, between any two steps of the event loop's."""
    reading = False

    def clock() -> float:
        nonlocal reading
        if reading:  # asked for an open endpoint's state: the event loop's success lands meanwhile
            reading = False
            breaker.record_success(API)
        return 0.0

    breaker = CircuitBreaker(threshold=1, open_seconds=30.0, clock=clock)
    breaker.record_failure(API)
    breaker.record_failure("GET https://another.example/x")
    reading = True
    assert "GET https://another.example/x" in breaker.open_endpoints()
