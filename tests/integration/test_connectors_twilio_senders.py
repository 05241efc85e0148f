"""Twilio senders other than a number, and a base_url holding the API version, against Prism serving
Twilio's official Messages spec and against the sandbox Twilio (which checks `From` as Twilio does)."""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from sandbox.providers import ProviderSandbox, start_providers
from sandbox.providers.model import TWILIO, ProviderAccount
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.message_client import MessageClient
from services.dispatcher.connectors.twilio import TwilioConnector
from tests.integration.peers import PeerProcess, prism_twilio  # noqa: F401

pytestmark = pytest.mark.integration

ACCOUNT_SID = "AC5ef8732a3c49700934481addd5ce1659"
AUTH_TOKEN = "canary-token-9d1c"
PHONE = "+14155550163"


@pytest.fixture
def http(provider_http: aiohttp.ClientSession | MessageClient) -> aiohttp.ClientSession | MessageClient:
    return provider_http


@pytest.fixture
async def sandbox() -> AsyncIterator[tuple[ProviderSandbox, str]]:
    providers = ProviderSandbox([ProviderAccount(TWILIO, ACCOUNT_SID, "ws-1", "twilio-1", AUTH_TOKEN)])
    runner, port = await start_providers(providers)
    try:
        yield providers, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def twilio(base_url: str, http: aiohttp.ClientSession | MessageClient, sender: str) -> TwilioConnector:
    return TwilioConnector(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        sender=sender,
        workspace_id="ws-1",
        connector_id="twilio-1",
        public_webhook_url="https://hooks.example.com",
        http=http,
        retry=RetryPolicy(max_retries=0),
        base_url=base_url,
    )


def message() -> OutboundMessage:
    return OutboundMessage(
        message_id="9a8b7c6d5e4f30211203f4e5d6c7b8a9",
        anonymous_id="anon-1",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=PHONE,
        sms_body="Your code is 1234",
    )


@pytest.mark.parametrize("sender", ["BRAND", "My Shop 24", "12345", "MGM Resorts"])
async def test_a_short_code_or_a_sender_id_matches_the_spec(prism_twilio: PeerProcess, http, sender: str) -> None:
    (outcome,) = await twilio(prism_twilio.base_url, http, sender).send([message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message


async def test_a_base_url_with_the_api_version_matches_the_spec(prism_twilio: PeerProcess, http) -> None:
    """Twilio's docs write its API's URL with the version: saved so, every message used to be refused 404."""
    (outcome,) = await twilio(prism_twilio.base_url + "/2010-04-01", http, "+14155550100").send([message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message


@pytest.mark.parametrize("sender", ["BRAND", "My Shop 24", "12345", "MGM Resorts"])
async def test_the_sandbox_takes_each_sender_as_from(sandbox, http, sender: str) -> None:
    providers, base_url = sandbox
    (outcome,) = await twilio(base_url + "/2010-04-01/", http, sender).send([message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    (sent,) = providers.outbox_for(TWILIO)
    assert sent.sender == sender
