"""The Twilio connector against Prism serving Twilio's official Messages spec (`--errors`).

Prism answers 422/401 when a request breaks the spec (AccountSid pattern, field
types, auth), so SENT here means our request matches what Twilio documents.
"""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import aiohttp
import pytest

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.message_client import MessageClient
from services.dispatcher.connectors.twilio import TwilioConnector
from tests.integration.peers import PeerProcess, prism_twilio  # noqa: F401

pytestmark = pytest.mark.integration

ACCOUNT_SID = "AC5ef8732a3c49700934481addd5ce1659"
SERVICE_SID = "MG" + "9752274e9e519418a7406176694466fa"
PHONE = "+14155550163"


@pytest.fixture
def http(provider_http: aiohttp.ClientSession | MessageClient) -> aiohttp.ClientSession | MessageClient:
    return provider_http


def twilio(
    peer: PeerProcess, http: aiohttp.ClientSession | MessageClient, *, sender: str = "+14155550100", **overrides: str
):
    values = dict(account_sid=ACCOUNT_SID, auth_token="canary-token-9d1c")
    values.update(overrides)
    return TwilioConnector(
        sender=sender,
        workspace_id="ws-1",
        connector_id="twilio-1",
        public_webhook_url="https://hooks.example.com",
        http=http,
        retry=RetryPolicy(max_retries=0),
        base_url=peer.base_url,
        **values,
    )


def message(**fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id="9a8b7c6d5e4f30211203f4e5d6c7b8a9",
        anonymous_id="anon-1",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=PHONE,
        sms_body="Your code is 1234",
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


async def test_sms_from_a_number_matches_the_spec(prism_twilio, http) -> None:
    (outcome,) = await twilio(prism_twilio, http).send([message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert outcome.provider_message_id.startswith("SM") and len(outcome.provider_message_id) == 34


async def test_mms_with_media_through_a_messaging_service_matches_the_spec(prism_twilio, http) -> None:
    m = message(media_urls=["https://cdn.example.com/a.png", "https://cdn.example.com/b.jpg"])
    (outcome,) = await twilio(prism_twilio, http, sender=SERVICE_SID).send([m])
    assert outcome.status is SendStatus.SENT, outcome.error_message


async def test_rcs_through_a_messaging_service_matches_the_spec(prism_twilio, http) -> None:
    (outcome,) = await twilio(prism_twilio, http, sender=SERVICE_SID).send([message(sms_body="Rich hello")])
    assert outcome.status is SendStatus.SENT, outcome.error_message


async def test_prism_refuses_an_invalid_account_sid(prism_twilio, http) -> None:
    """Proves the peer validates: a bad AccountSid in the path (validation bypassed) is refused."""
    (outcome,) = await twilio(prism_twilio, http, account_sid="ACnot-a-sid").send([message()])
    assert outcome.status is SendStatus.FAILED
    assert outcome.error_code == "HTTP_422"
    assert PHONE not in outcome.error_message
