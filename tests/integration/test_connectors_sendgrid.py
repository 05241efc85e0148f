"""The SendGrid connector against Prism serving SendGrid's official Mail Send spec (`--errors`).

Prism answers 400/401 when a request breaks the spec (e-mail formats, empty
content values, more than 1,000 personalizations, missing auth), so SENT here
means our request matches what SendGrid documents. Prism returns no
X-Message-Id (the spec does not declare it), so no provider ID comes back.
"""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.sendgrid import SendGridConnector
from services.dispatcher.rendering import ContentTemplates
from tests.integration.peers import PeerProcess, prism_sendgrid  # noqa: F401

pytestmark = pytest.mark.integration

API_KEY = "SG.canary-api-key-31337"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sendgrid(peer: PeerProcess, http: aiohttp.ClientSession) -> SendGridConnector:
    return SendGridConnector(
        api_key=API_KEY,
        sender="news@brand.example.com",
        http=http,
        retry=RetryPolicy(max_retries=0),
        base_url=peer.base_url,
    )


def message(i: int, **fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="spring-sale",
        campaign_instance_id="2025-03-01",
        to=f"customer.{i}@mail.example.org",
        subject="Spring sale",
        text_body="20% off everything",
        html_body="<p>20% off everything</p>",
        headers={"List-Unsubscribe": "<https://brand.example.com/unsubscribe>"},
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


async def test_one_message_matches_the_spec(prism_sendgrid, http) -> None:
    (outcome,) = await sendgrid(prism_sendgrid, http).send([message(1)])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert outcome.provider_message_id == ""  # the spec (and so Prism) has no X-Message-Id


async def test_a_shared_request_of_many_personalizations_matches_the_spec(prism_sendgrid, http) -> None:
    outcomes = await sendgrid(prism_sendgrid, http).send([message(i) for i in range(1000)])
    assert {o.status for o in outcomes} == {SendStatus.SENT}


async def test_personalised_messages_sharing_a_request_through_substitutions_match_the_spec(
    prism_sendgrid, http
) -> None:
    templates = ContentTemplates(
        pb.Content(
            subject="{{ first_name }}, 20% off",
            text_body="Dear {{ first_name }} {{ last_name }}",
            html_body="<p>Dear {{ first_name }} {{ last_name }}</p>",
        )
    )
    messages = []
    for i, (first, last) in enumerate([("Jade", "Evans"), ("Ben", "O'Neil"), ("Zoë", "Ng")]):
        rendered = templates.render({"first_name": first, "last_name": last}, {})
        messages.append(
            message(
                i,
                subject=rendered.subject,
                text_body=rendered.text_body,
                html_body=rendered.html_body,
                pattern=rendered.pattern,
                substitutions=rendered.substitutions,
            )
        )
    outcomes = await sendgrid(prism_sendgrid, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 3, [o.error_message for o in outcomes]


async def test_text_only_and_html_only_match_the_spec(prism_sendgrid, http) -> None:
    outcomes = await sendgrid(prism_sendgrid, http).send([message(1, html_body=""), message(2, text_body="")])
    assert [o.status for o in outcomes] == [SendStatus.SENT, SendStatus.SENT]


async def test_prism_refuses_a_malformed_address_and_the_error_does_not_quote_it(prism_sendgrid, http) -> None:
    """Proves the peer validates: `to.email` must be an e-mail address."""
    bad = "not-an-address.canary"
    (outcome,) = await sendgrid(prism_sendgrid, http).send([message(1, to=bad)])
    assert outcome.status is SendStatus.FAILED
    assert outcome.error_code == "HTTP_400"
    assert bad not in outcome.error_message and API_KEY not in outcome.error_message
