"""Twilio senders as Twilio takes them (a number, a short code, an alphanumeric sender ID or a messaging
service) and a base_url that already holds the API version, from saving the connector to the request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

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
from services.dispatcher.connectors.twilio import TwilioConnector, api_root

K = pb.ConnectorKind
C = common_pb2
ACCOUNT_SID = "AC5ef8732a3c49700934481addd5ce1659"
SERVICE_SID = "MG" + "0123456789abcdef" * 2
PHONE = "+14155550163"
SECRET = "s3cr3t-value-never-echoed"


def twilio_connector(**fields: object) -> pb.Connector:
    values: dict[str, object] = dict(
        channel=C.CHANNEL_SMS, sender="+14155550100", credentials={"account_sid": ACCOUNT_SID, "auth_token": SECRET}
    )
    values.update(fields)
    return pb.Connector(workspace_id="ws-1", connector_id="conn-1", kind=K.CONNECTOR_KIND_TWILIO, **values)  # type: ignore[arg-type]


def refused(connector: pb.Connector) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        validate_connector(connector, False)
    assert SECRET not in caught.value.message
    return caught.value


@pytest.mark.parametrize(
    "sender",
    ["12345", "123456", "BRAND", "Brand", "My Brand", "Shop 24", "A", "B2B", "ABCDEFGHIJK", "MGM Resorts", "MGA"]
    + ["MG123", "AT&T", "Ben-Jerrys", "B_and_Q", "+Plus", "MG2024", "MGCAFE", "MG0123abcd"],
)
def test_a_short_code_or_an_alphanumeric_sender_id_sends_sms(sender: str) -> None:
    validate_connector(twilio_connector(sender=sender), False)


@pytest.mark.parametrize("sender", ["12345", "123456", "+14155550100", SERVICE_SID])
def test_mms_goes_from_a_number_a_short_code_or_a_messaging_service(sender: str) -> None:
    validate_connector(twilio_connector(channel=C.CHANNEL_MMS, sender=sender), False)


def test_mms_from_an_alphanumeric_sender_id_is_refused_naming_the_sender() -> None:
    error = refused(twilio_connector(channel=C.CHANNEL_MMS, sender="BRAND"))
    assert error.field == "connector.sender"
    assert error.description.startswith("is an alphanumeric sender ID, which sends SMS only")
    assert "BRAND" not in error.message


@pytest.mark.parametrize("sender", ["12345", "BRAND", "+14155550100"])
def test_rcs_still_needs_a_messaging_service(sender: str) -> None:
    error = refused(twilio_connector(channel=C.CHANNEL_RCS, sender=sender))
    assert error.field == "connector.sender"
    assert "messaging service" in error.description


@pytest.mark.parametrize(
    ("sender", "hint"),
    [
        ("", "is required: a +E.164 number, a short code (5 or 6 digits), an alphanumeric sender ID"),
        ("1234", "a short code has 5 or 6 digits, a number its + and country code"),
        ("1234567", "a short code has 5 or 6 digits, a number its + and country code"),
        ("14155550100", "a short code has 5 or 6 digits, a number its + and country code"),
        ("ABCDEFGHIJKL", "must be a +E.164 number, a short code"),  # 12 characters
        ("BRAND!", "must be a +E.164 number, a short code"),
        ("BRÄND", "must be a +E.164 number, a short code"),
        ("BRAND.NAME", "must be a +E.164 number, a short code"),
        (" BRAND", "must not start or end with a space"),
        ("BRAND ", "must not start or end with a space"),
        ("12 34", "must be a +E.164 number, a short code"),  # no letter
        ("+0123", "must be a +E.164 number, a short code"),
        ("MG" + "0123456789abcdef" * 2 + "0", "a messaging service SID is MG followed by 32 hex digits"),
        ("MG0123456789", "looks like a messaging service SID cut short"),
        ("MG-0123456789", "a messaging service SID is MG followed by 32 hex digits"),
        ("MG0123abcdef", "looks like a messaging service SID cut short: MG followed by 32 hex digits"),
    ],
)
def test_a_sender_twilio_would_refuse_is_refused_naming_the_field(sender: str, hint: str) -> None:
    error = refused(twilio_connector(sender=sender))
    assert error.field == "connector.sender"
    assert hint in error.description
    assert not sender.strip() or sender.strip() not in error.message


# -- base_url -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "root"),
    [
        ("", "https://api.twilio.com/2010-04-01"),
        ("https://api.twilio.com", "https://api.twilio.com/2010-04-01"),
        ("https://api.twilio.com/", "https://api.twilio.com/2010-04-01"),
        ("https://api.twilio.com/2010-04-01", "https://api.twilio.com/2010-04-01"),
        ("https://api.twilio.com/2010-04-01/", "https://api.twilio.com/2010-04-01"),
        ("https://proxy.example.com/twilio", "https://proxy.example.com/twilio/2010-04-01"),
        ("https://proxy.example.com/twilio/2010-04-01", "https://proxy.example.com/twilio/2010-04-01"),
    ],
)
def test_the_api_version_is_added_once(base_url: str, root: str) -> None:
    assert api_root(base_url) == root


@pytest.mark.parametrize(
    "base_url", ["https://api.twilio.com/2010-04-01", "https://proxy.example.com/twilio", "https://api.twilio.com/"]
)
def test_a_base_url_with_the_api_version_or_a_prefix_is_saved(base_url: str) -> None:
    validate_connector(twilio_connector(base_url=base_url), False)


@pytest.mark.parametrize(
    "base_url",
    [
        f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT_SID}",
        "https://api.twilio.com/2010-04-01/Messages.json",
    ],
)
def test_a_messages_url_pasted_whole_is_refused_naming_base_url(base_url: str) -> None:
    error = refused(twilio_connector(base_url=base_url))
    assert error.field == "connector.base_url"
    assert "not the Messages URL" in error.description and ACCOUNT_SID not in error.message


@pytest.fixture
async def messages_api() -> AsyncIterator[Callable[..., Any]]:
    """A Messages endpoint under `prefix`, recording each form it is sent."""
    servers: list[TestServer] = []

    async def start(prefix: str = "") -> tuple[str, list[dict[str, str]]]:
        forms: list[dict[str, str]] = []

        async def handle(request: web.Request) -> web.Response:
            forms.append(dict(await request.post()))  # type: ignore[arg-type]
            return web.json_response({"sid": "SM" + "0" * 32, "status": "queued"}, status=201)

        app = web.Application()
        app.router.add_post(f"{prefix}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), forms

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sender_of(base_url: str, http: aiohttp.ClientSession, sender: str = "+14155550100") -> TwilioConnector:
    return TwilioConnector(
        account_sid=ACCOUNT_SID,
        auth_token=SECRET,
        sender=sender,
        workspace_id="ws-1",
        connector_id="twilio-1",
        public_webhook_url="https://hooks.example.com",
        http=http,
        retry=RetryPolicy(max_retries=0),
        base_url=base_url,
        suppress_tracing=False,
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


@pytest.mark.parametrize(("prefix", "suffix"), [("", "/2010-04-01"), ("/twilio", ""), ("/twilio", "/2010-04-01/")])
async def test_a_base_url_with_a_path_reaches_the_messages_endpoint(messages_api, http, prefix, suffix) -> None:
    """Twilio's docs write the API's URL with its version: saved as base_url, it is not added twice."""
    root, forms = await messages_api(prefix)
    (outcome,) = await sender_of(root + prefix + suffix, http).send([message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert len(forms) == 1


@pytest.mark.parametrize(
    ("sender", "field"),
    [
        ("BRAND", "From"),
        ("12345", "From"),
        ("MGM Resorts", "From"),  # a sender ID that begins with MG is not a messaging service
        (SERVICE_SID, "MessagingServiceSid"),
    ],
)
async def test_each_sender_goes_in_its_own_field(messages_api, http, sender: str, field: str) -> None:
    root, forms = await messages_api()
    (outcome,) = await sender_of(root, http, sender).send([message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    (form,) = forms
    assert form[field] == sender
    assert {"From", "MessagingServiceSid"} - {field} == {"From", "MessagingServiceSid"} - set(form)
