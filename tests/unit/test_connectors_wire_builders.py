"""What the connectors put on the wire, checked against the providers' documented rules.

Messages a provider would refuse after a round trip, whatever else the request holds
(an empty SendGrid subject, an SMS with neither body nor media, a WhatsApp text
without a body), fail here without a request, naming the part and never its text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
from services.dispatcher.connectors import validate_connector
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.sendgrid import SendGridConnector
from services.dispatcher.connectors.ses import SesConnector
from services.dispatcher.connectors.twilio import TwilioConnector
from services.dispatcher.connectors.whatsapp import WhatsAppCloudConnector

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
WAMID = "wamid.HBgLMTIzNDU2Nzg5MDEVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"


@pytest.fixture
async def provider() -> AsyncIterator[Callable[..., Any]]:
    """A local endpoint answering every request with `reply`; records each request's body and type."""
    servers: list[TestServer] = []

    async def start(reply: Callable[[], web.Response]) -> tuple[str, list[tuple[str, bytes]]]:
        seen: list[tuple[str, bytes]] = []

        async def handle(request: web.Request) -> web.Response:
            seen.append((request.content_type, await request.read()))
            return reply()

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), seen

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def message(i: int, **fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=f"customer{i}@mail.example.org",
        subject="Spring sale",
        text_body="20% off",
        sms_body="20% off",
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


# -- SendGrid -------------------------------------------------------------------


def sendgrid(base_url: str, http: aiohttp.ClientSession, sender: str = "news@brand.example.com") -> SendGridConnector:
    return SendGridConnector(api_key="SG.key", sender=sender, http=http, retry=RetryPolicy(), base_url=base_url)


async def test_sendgrid_writes_unicode_domains_in_punycode(provider, http) -> None:
    base_url, seen = await provider(lambda: web.Response(status=202))
    (outcome,) = await sendgrid(base_url, http, sender="news@bücher.example").send(
        [message(1, to="ann@münchen.example")]
    )
    assert outcome.status is SendStatus.SENT
    ((_, body),) = seen
    payload = json.loads(body)
    assert payload["from"] == {"email": "news@xn--bcher-kva.example"}
    assert payload["personalizations"][0]["to"] == [{"email": "ann@xn--mnchen-3ya.example"}]


async def test_sendgrid_fails_an_empty_subject_without_a_request_and_sends_the_rest(provider, http) -> None:
    """SendGrid answers a request without a subject 400 for every recipient in it."""
    base_url, seen = await provider(lambda: web.Response(status=202))
    outcomes = await sendgrid(base_url, http).send([message(1), message(2, subject=""), message(3)])
    assert [o.status for o in outcomes] == [SendStatus.SENT, SendStatus.FAILED, SendStatus.SENT]
    assert (outcomes[1].error_code, outcomes[1].attempts) == ("INVALID_MESSAGE", 0)
    assert "subject is empty" in outcomes[1].error_message
    (payload,) = [json.loads(body) for _, body in seen]
    assert payload["subject"] == "Spring sale" and len(payload["personalizations"]) == 2


# -- Twilio ---------------------------------------------------------------------


def twilio(base_url: str, http: aiohttp.ClientSession) -> TwilioConnector:
    return TwilioConnector(
        account_sid=ACCOUNT_SID,
        auth_token="token",
        sender="+14155550100",
        workspace_id="ws-1",
        connector_id="twilio-1",
        public_webhook_url="https://hooks.example.com",
        http=http,
        retry=RetryPolicy(),
        base_url=base_url,
    )


def created() -> web.Response:
    return web.json_response({"sid": "SM" + "0" * 32, "status": "queued"}, status=201)


async def test_twilio_fails_an_sms_with_neither_body_nor_media_without_a_request(provider, http) -> None:
    """Twilio refuses it with 21602 ("Message body is required") after a round trip."""
    base_url, seen = await provider(created)
    outcomes = await twilio(base_url, http).send(
        [message(1, to="+14155550163", sms_body=""), message(2, to="+14155550164")]
    )
    assert [o.status for o in outcomes] == [SendStatus.FAILED, SendStatus.SENT]
    assert (outcomes[0].error_code, outcomes[0].attempts) == ("INVALID_MESSAGE", 0)
    assert "sms_body is empty" in outcomes[0].error_message
    assert len(seen) == 1


async def test_twilio_sends_media_without_a_body(provider, http) -> None:
    base_url, seen = await provider(created)
    media = ["https://cdn.example.com/a.png"]
    (outcome,) = await twilio(base_url, http).send([message(1, to="+14155550163", sms_body="", media_urls=media)])
    assert outcome.status is SendStatus.SENT
    ((content_type, body),) = seen
    form = parse_qs(body.decode())
    assert content_type == "application/x-www-form-urlencoded"
    assert "Body" not in form and form["MediaUrl"] == media


# -- WhatsApp Cloud -------------------------------------------------------------


async def test_whatsapp_fails_a_text_without_a_body_without_a_request(provider, http) -> None:
    """Meta refuses it ("(#100) The parameter text['body'] is required") after a round trip."""
    base_url, seen = await provider(lambda: web.json_response({"messages": [{"id": WAMID}]}))
    connector = WhatsAppCloudConnector(
        access_token="token", phone_number_id="106540352242922", http=http, retry=RetryPolicy(), base_url=base_url
    )
    outcomes = await connector.send([message(1, to="+14155550163", sms_body=""), message(2, to="+14155550164")])
    assert [o.status for o in outcomes] == [SendStatus.FAILED, SendStatus.SENT]
    assert (outcomes[0].error_code, outcomes[0].attempts) == ("INVALID_MESSAGE", 0)
    assert "sms_body is empty" in outcomes[0].error_message
    assert len(seen) == 1


# -- Saving a connector ----------------------------------------------------------


def sendgrid_connector(sender: str) -> pb.Connector:
    return pb.Connector(
        workspace_id="ws-1",
        connector_id="sg-1",
        kind=pb.CONNECTOR_KIND_SENDGRID,
        channel=common_pb2.CHANNEL_EMAIL,
        sender=sender,
        credentials={"api_key": "SG.key"},
    )


def test_a_sendgrid_sender_with_a_unicode_local_part_is_refused_when_saved() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_connector(sendgrid_connector("jörg@brand.example.com"), allow_private=False)
    assert refused.value.field == "connector.sender"
    assert "SendGrid takes only ASCII before the @" in str(refused.value)


def test_a_sendgrid_sender_with_a_unicode_domain_is_saved() -> None:
    validate_connector(sendgrid_connector("news@bücher.example"), allow_private=False)


# -- SES --------------------------------------------------------------------------


async def test_ses_fails_a_unicode_local_part_without_a_request_and_writes_a_unicode_domain_in_punycode(
    provider, http
) -> None:
    """SESv2's Destination: a local part of 7-bit ASCII only (no SMTPUTF8), a domain in Punycode."""
    base_url, seen = await provider(lambda: web.json_response({"MessageId": "0102018f-ses-id"}))
    ses = SesConnector(
        access_key_id="AKIDEXAMPLE",
        secret_access_key="secret",
        region="eu-west-1",
        sender="news@brand.example.com",
        retry=RetryPolicy(),
        base_url=base_url,
        allow_private=True,
    )
    try:
        outcomes = await ses.send([message(1, to="jörg@mail.example.org"), message(2, to="ann@münchen.example")])
    finally:
        await ses.close()
    assert [o.status for o in outcomes] == [SendStatus.FAILED, SendStatus.SENT]
    assert (outcomes[0].error_code, outcomes[0].attempts) == ("INVALID_ADDRESS", 0)
    assert "jörg" not in outcomes[0].error_message
    ((_, body),) = seen
    assert json.loads(body)["Destination"] == {"ToAddresses": ["ann@xn--mnchen-3ya.example"]}
