"""The SES connector against moto's server (SESv2 SendEmail, SigV4 and all).

moto keeps the sent message (id, source, destinations, subject, body) but not
its tags, so its request recorder shows what SES received, tags included.
"""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json

import boto3
import pytest

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.ses import SesConnector
from tests.integration.peers import MotoServer, moto_ses  # noqa: F401

pytestmark = pytest.mark.integration

SENDER = "news@brand.example.com"
ADDRESS = "ses.canary.2718@mail.example.org"
SECRET = "moto-secret-canary-1618"
REGION = "eu-west-1"


def verify_sender(moto: MotoServer, sender: str = SENDER) -> None:
    client = boto3.client(
        "sesv2",
        region_name=REGION,
        endpoint_url=moto.base_url,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key=SECRET,
    )
    client.create_email_identity(EmailIdentity=sender)


def ses(moto: MotoServer, sender: str = SENDER) -> SesConnector:
    return SesConnector(
        access_key_id="AKIDEXAMPLE",
        secret_access_key=SECRET,
        region=REGION,
        sender=sender,
        retry=RetryPolicy(max_retries=0),
        base_url=moto.base_url,
        allow_private=True,
    )


def message(**fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id="77aa88bb99cc00dd11ee22ff33004411",
        anonymous_id="anon-1",
        campaign_id="spring sale 2025",
        campaign_instance_id="inst-3",
        to=ADDRESS,
        subject="Hello Ann",
        text_body="Hi Ann, 20% off",
        html_body="<p>Hi Ann, 20% off</p>",
        headers={"List-Unsubscribe": "<https://brand.example.com/u>"},
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


async def test_sent_through_moto_with_our_tags(moto_ses, captured_logs) -> None:
    verify_sender(moto_ses)
    moto_ses.start_recording()
    connector = ses(moto_ses)
    try:
        (outcome,) = await connector.send([message()])
    finally:
        await connector.close()
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert outcome.provider_message_id

    stored = {m["id"]: m for m in moto_ses.sent_messages()}
    sent = stored[outcome.provider_message_id]
    assert sent["source"] == SENDER
    assert sent["destinations"] == {"ToAddresses": [ADDRESS]}
    assert sent["subject"] == "Hello Ann"

    (request,) = [r for r in moto_ses.recorded_requests() if r["url"].endswith("/v2/email/outbound-emails")]
    body = json.loads(request["body"])
    assert body["EmailTags"] == [
        {"Name": "tokensend_message_id", "Value": "77aa88bb99cc00dd11ee22ff33004411"},
        {"Name": "tokensend_campaign", "Value": "spring_sale_2025"},
        {"Name": "tokensend_instance", "Value": "inst-3"},
    ]
    assert body["Content"]["Simple"]["Headers"] == [
        {"Name": "List-Unsubscribe", "Value": "<https://brand.example.com/u>"}
    ]
    assert request["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")

    for canary in (ADDRESS, "Hi Ann", SECRET):
        assert canary not in captured_logs.text


async def test_an_unverified_sender_fails_sender_refused_and_stops_the_batch(moto_ses) -> None:
    """Every message would meet the same refusal, whoever the recipient: the first request is the only one."""
    unverified = "nobody.canary@unverified.example.com"
    moto_ses.start_recording()
    connector = ses(moto_ses, sender=unverified)
    try:
        outcomes = await connector.send(
            [message(message_id=f"{i:032x}", to=f"c{i}.canary@mail.example.org") for i in range(3)]
        )
    finally:
        await connector.close()
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [(SendStatus.FAILED, "SENDER_REFUSED", 1)] + [
        (SendStatus.FAILED, "SENDER_REFUSED", 0)
    ] * 2
    assert len([r for r in moto_ses.recorded_requests() if r["url"].endswith("/v2/email/outbound-emails")]) == 1
    # moto's message is "Email address not verified <sender>": read for the identity, never repeated.
    for outcome in outcomes:
        assert unverified not in outcome.error_message and "canary@mail" not in outcome.error_message


async def test_one_connector_sends_many(moto_ses) -> None:
    verify_sender(moto_ses)
    connector = ses(moto_ses)
    try:
        outcomes = await connector.send(
            [message(message_id=f"{i:032x}", to=f"c{i}@mail.example.org") for i in range(5)]
        )
    finally:
        await connector.close()
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 5
    assert len({o.provider_message_id for o in outcomes}) == 5
