"""SendGrid requests under its size limit, over HTTP: against the sandbox SendGrid (its 413 over a limit
lowered for the test, and a forced 413) and against Prism serving SendGrid's official Mail Send spec."""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from sandbox.providers import ProviderSandbox, start_providers
from sandbox.providers import sendgrid as sandbox_sendgrid
from sandbox.providers.model import SENDGRID, ProviderAccount
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.sendgrid import MAX_REQUEST_BYTES, SendGridConnector
from tests.integration.peers import PeerProcess, prism_sendgrid  # noqa: F401

pytestmark = pytest.mark.integration

API_KEY = "SG.canary-api-key-0413"
LIMIT = 20_000  # the sandbox's (and in some tests the connector's) size limit, far under SendGrid's 30MB


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def providers(monkeypatch) -> AsyncIterator[tuple[ProviderSandbox, str]]:
    monkeypatch.setattr(sandbox_sendgrid, "MAX_REQUEST_BYTES", LIMIT)
    sandbox = ProviderSandbox([ProviderAccount(SENDGRID, API_KEY, "acme", "sendgrid")])
    runner, port = await start_providers(sandbox)
    try:
        yield sandbox, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def sendgrid(base_url: str, http: aiohttp.ClientSession, max_request_bytes: int = MAX_REQUEST_BYTES):
    return SendGridConnector(
        api_key=API_KEY,
        sender="news@brand.example.com",
        http=http,
        retry=RetryPolicy(max_retries=0),
        base_url=base_url,
        max_request_bytes=max_request_bytes,
    )


def message(i: int, text: str = "20% off everything") -> OutboundMessage:
    return OutboundMessage(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="spring-sale",
        campaign_instance_id="2025-03-01",
        to=f"customer.{i}@mail.example.org",
        subject="Spring sale",
        text_body=text,
        html_body=f"<p>{text}</p>",
    )


def delivered(sandbox: ProviderSandbox) -> list[str]:
    return [m.custom_args["tokensend_message_id"] for m in sandbox.outbox_for(SENDGRID)]


async def test_an_over_limit_group_is_delivered_in_several_requests(providers, http) -> None:
    sandbox, base_url = providers
    messages = [message(i) for i in range(300)]
    outcomes = await sendgrid(base_url, http, LIMIT).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 300
    assert sandbox.stats.requests[SENDGRID] > 1
    assert sandbox.stats.statuses == {f"{SENDGRID} 202": sandbox.stats.requests[SENDGRID]}  # no 413
    assert delivered(sandbox) == [m.message_id for m in messages]


async def test_the_sandbox_answers_413_over_its_limit_and_the_requests_are_halved(providers, http) -> None:
    """A connector that takes SendGrid's limit to be larger than it is: its 413s are split, not failed."""
    sandbox, base_url = providers
    messages = [message(i) for i in range(300)]
    outcomes = await sendgrid(base_url, http).send(messages)
    assert [o.message_id for o in outcomes] == [m.message_id for m in messages]
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 300
    assert sandbox.stats.statuses[f"{SENDGRID} 413"] >= 1
    assert sorted(delivered(sandbox)) == sorted(m.message_id for m in messages)


async def test_a_forced_413_is_sent_again_one_recipient_then_in_halves(providers, http) -> None:
    sandbox, base_url = providers
    sandbox.set_faults(SENDGRID, status=413, status_count=1)
    messages = [message(i) for i in range(10)]
    outcomes = await sendgrid(base_url, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 10
    assert sandbox.stats.statuses == {f"{SENDGRID} 413": 1, f"{SENDGRID} 202": 3}
    assert delivered(sandbox) == [m.message_id for m in messages]


async def test_a_message_sendgrid_refuses_as_too_large_alone_fails_alone(providers, http) -> None:
    sandbox, base_url = providers
    secret = "Dear Jade Evans, " * 800  # over the sandbox's limit on its own
    messages = [message(0), message(1, text=secret), message(2)]
    outcomes = await sendgrid(base_url, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT, SendStatus.FAILED, SendStatus.SENT]
    refused = outcomes[1]
    assert (refused.error_code, refused.attempts) == ("INVALID_MESSAGE", 1)
    assert "(HTTP 413)" in refused.error_message and "Jade" not in refused.error_message
    assert sorted(delivered(sandbox)) == [messages[0].message_id, messages[2].message_id]


async def test_requests_split_for_size_match_the_spec(prism_sendgrid) -> None:
    requests: list[int] = []

    async def counted(_: aiohttp.ClientSession, __: object, ___: aiohttp.TraceRequestStartParams) -> None:
        requests.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(counted)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        outcomes = await sendgrid(prism_sendgrid.base_url, session, LIMIT).send([message(i) for i in range(300)])
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 300, {o.error_message for o in outcomes}
    assert len(requests) > 1


async def test_the_sandbox_takes_a_request_of_several_megabytes_as_sendgrid_does(http) -> None:
    """Under SendGrid's 30MB, a request of a few MB (large HTML) is sent, not refused by the sandbox's own
    body limit."""
    sandbox = ProviderSandbox([ProviderAccount(SENDGRID, API_KEY, "acme", "sendgrid")])
    runner, port = await start_providers(sandbox)
    try:
        outcomes = await sendgrid(f"http://127.0.0.1:{port}", http).send([message(0, text="x" * 3_000_000)])
    finally:
        await runner.cleanup()
    assert [o.status for o in outcomes] == [SendStatus.SENT], outcomes[0].error_message
    assert sandbox.stats.statuses == {f"{SENDGRID} 202": 1}
