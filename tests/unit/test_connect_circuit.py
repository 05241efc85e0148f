"""How a connector's attempts at an unreachable provider are counted, whoever makes them."""

from __future__ import annotations

import random

from services.dispatcher.connectors.circuit import ConnectCircuit
from services.dispatcher.connectors.http_retry import RetryPolicy


def circuit() -> ConnectCircuit:
    return ConnectCircuit(RetryPolicy(max_retries=3), random.Random(3), "acme")


def test_requests_failing_together_while_the_provider_answered_count_as_one_try() -> None:
    """A hundred requests in flight meet the provider gone at once: one try of the round, not a hundred,
    so the tries after it are paced and the provider still gets all its retries."""
    acme = circuit()
    acme.opened()
    assert [acme.failed("CONNECTION_FAILED", "could not connect", side_by_side=True) for _ in range(100)] == [
        None
    ] * 100
    assert not acme.answering and acme.backoff() is not None
    assert acme.failed("CONNECTION_FAILED", "could not connect") is None
    assert acme.failed("CONNECTION_FAILED", "could not connect") is None
    outage = acme.failed("CONNECTION_FAILED", "could not connect")
    assert outage is not None and outage.text == "could not connect after 4 attempts"
    assert acme.outage() is outage


def test_a_reply_starts_the_count_afresh() -> None:
    acme = circuit()
    for _ in range(3):
        assert acme.failed("CONNECTION_FAILED", "could not connect") is None
    acme.opened()
    assert acme.answering and acme.backoff() is None
    assert [acme.failed("CONNECTION_FAILED", "could not connect") for _ in range(3)] == [None] * 3
