"""SendGrid's addresses as its official Mail Send spec takes them, checked by Prism (`--errors`).

The spec's `email` format is ASCII only: an address whose domain is Unicode goes
with the domain in Punycode, and one whose local part is Unicode cannot go at all;
it fails alone, without costing the request's other recipients their send.
"""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.sendgrid import SendGridConnector
from tests.integration.peers import PeerProcess, prism_sendgrid  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sendgrid(peer: PeerProcess, http: aiohttp.ClientSession, sender: str = "news@brand.example.com"):
    return SendGridConnector(
        api_key="SG.canary-api-key-4242",
        sender=sender,
        http=http,
        retry=RetryPolicy(max_retries=0),
        base_url=peer.base_url,
    )


def message(i: int, to: str) -> OutboundMessage:
    return OutboundMessage(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="spring-sale",
        campaign_instance_id="2025-03-01",
        to=to,
        subject="Grüße 🌷",
        text_body="20% off everything",
    )


async def test_recipients_and_a_sender_with_unicode_domains_match_the_spec(prism_sendgrid, http) -> None:
    connector = sendgrid(prism_sendgrid, http, sender="news@bücher.example")
    outcomes = await connector.send([message(1, "kim@bücher.example"), message(2, "ann@münchen.example")])
    assert [o.status for o in outcomes] == [SendStatus.SENT, SendStatus.SENT], [o.error_message for o in outcomes]


async def test_a_unicode_local_part_fails_alone_and_the_others_are_sent(prism_sendgrid, http) -> None:
    unsendable = "jörg@mail.example.org"
    messages = [message(1, "ann@mail.example.org"), message(2, unsendable), message(3, "ben@mail.example.org")]
    outcomes = await sendgrid(prism_sendgrid, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT, SendStatus.FAILED, SendStatus.SENT]
    refused = outcomes[1]
    assert (refused.error_code, refused.attempts) == ("INVALID_ADDRESS", 0)
    assert "ASCII before the @" in refused.error_message and unsendable not in refused.error_message
