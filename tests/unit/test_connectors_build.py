"""Unit tests for build_connector, PROVIDER_NAMES, provider-ID hygiene and the payloads of Twilio and WhatsApp."""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors import PROVIDER_NAMES, RetryPolicy, build_connector, validate_connector
from services.dispatcher.connectors.base import OutboundMessage, WhatsAppTemplateContent
from services.dispatcher.connectors.custom_http import CustomHttpConnector
from services.dispatcher.connectors.message_client import USER_AGENT, MessageClient
from services.dispatcher.connectors.provider_ids import holds_recipient, safe_provider_id
from services.dispatcher.connectors.sendgrid import SendGridConnector
from services.dispatcher.connectors.ses import SesConnector
from services.dispatcher.connectors.smtp import SmtpConnector
from services.dispatcher.connectors.twilio import TwilioConnector, basic_authorization
from services.dispatcher.connectors.whatsapp import WhatsAppCloudConnector, message_payload

K = pb.ConnectorKind
C = common_pb2
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
PHONE = "+16505076520"
# A real-shaped wamid: its base64 holds the recipient's number (\x1c\x18\x0b16505076520\x15...).
WAMID_WITH_NUMBER = "wamid.HBgLMTY1MDUwNzY1MjAVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


CONNECTORS = {
    K.CONNECTOR_KIND_SENDGRID: (
        SendGridConnector,
        pb.Connector(channel=C.CHANNEL_EMAIL, sender="n@brand.example.com", credentials={"api_key": "k"}),
    ),
    K.CONNECTOR_KIND_SES: (
        SesConnector,
        pb.Connector(
            channel=C.CHANNEL_EMAIL,
            sender="n@brand.example.com",
            credentials={"access_key_id": "a", "secret_access_key": "s", "region": "us-east-1"},
        ),
    ),
    K.CONNECTOR_KIND_SMTP: (
        SmtpConnector,
        pb.Connector(channel=C.CHANNEL_EMAIL, sender="n@brand.example.com", base_url="smtps://mail.example.com:465"),
    ),
    K.CONNECTOR_KIND_TWILIO: (
        TwilioConnector,
        pb.Connector(
            channel=C.CHANNEL_SMS, sender="+14155550100", credentials={"account_sid": ACCOUNT_SID, "auth_token": "t"}
        ),
    ),
    K.CONNECTOR_KIND_WHATSAPP_CLOUD: (
        WhatsAppCloudConnector,
        pb.Connector(
            channel=C.CHANNEL_WHATSAPP, sender="1065403522", credentials={"access_token": "t"}, webhook_secret="s"
        ),
    ),
    K.CONNECTOR_KIND_CUSTOM_HTTP: (
        CustomHttpConnector,
        pb.Connector(
            channel=C.CHANNEL_SMS,
            custom_http=pb.CustomHttpTemplate(method="POST", url="https://gw.example.com/sms", body="to=@to"),
        ),
    ),
}


@pytest.mark.parametrize("kind", list(CONNECTORS))
async def test_build_connector_picks_the_implementation(kind: int, http) -> None:
    cls, config = CONNECTORS[kind]
    config.workspace_id, config.connector_id, config.kind = "ws", "conn", kind
    validate_connector(config, allow_private=False)
    built = build_connector(
        config, http=http, public_webhook_url="https://hooks.example.com", retry=RetryPolicy(), allow_private=False
    )
    try:
        assert isinstance(built, cls)
        assert built.provider == PROVIDER_NAMES[kind]
        assert built.max_batch >= 1
    finally:
        await built.close()


def _counting_session(seen: list[str], name: str) -> aiohttp.ClientSession:
    hooks = aiohttp.TraceConfig()

    async def started(*_: object) -> None:
        seen.append(name)

    hooks.on_request_start.append(started)
    return aiohttp.ClientSession(trace_configs=[hooks])


@pytest.mark.parametrize(
    ("kind", "session"),
    [
        (K.CONNECTOR_KIND_SENDGRID, "traced"),
        (K.CONNECTOR_KIND_TWILIO, "per message"),
        (K.CONNECTOR_KIND_WHATSAPP_CLOUD, "per message"),
        (K.CONNECTOR_KIND_CUSTOM_HTTP, "per message"),
    ],
)
async def test_one_request_per_message_connectors_use_the_message_client(kind: int, session: str) -> None:
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        if request.headers.get("User-Agent") == USER_AGENT:
            seen.append("per message")
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app)
    await server.start_server()
    traced, per_message = _counting_session(seen, "traced"), MessageClient(allow_private=True)
    _, config = CONNECTORS[kind]
    config = pb.Connector.FromString(config.SerializeToString())
    config.workspace_id, config.connector_id, config.kind = "ws", "conn", kind
    config.base_url = str(server.make_url("/"))
    config.custom_http.url = "/sms" if kind == K.CONNECTOR_KIND_CUSTOM_HTTP else ""
    built = build_connector(
        config,
        http=traced,
        message_http=per_message,
        public_webhook_url="https://hooks.example.com",
        retry=RetryPolicy(max_retries=0),
        allow_private=True,
    )
    message = OutboundMessage(
        message_id="m1",
        anonymous_id="a1",
        campaign_id="c",
        campaign_instance_id="i",
        to="+447700900123" if kind != K.CONNECTOR_KIND_SENDGRID else "a@example.com",
        subject="s",
        html_body="<p>h</p>",
        text_body="h",
        sms_body="h",
    )
    try:
        await built.send([message])
        assert seen == [session]
    finally:
        await built.close()
        await traced.close()
        await per_message.close()
        await server.close()


def test_provider_names() -> None:
    assert PROVIDER_NAMES == {
        K.CONNECTOR_KIND_SENDGRID: "sendgrid",
        K.CONNECTOR_KIND_SES: "ses",
        K.CONNECTOR_KIND_SMTP: "smtp",
        K.CONNECTOR_KIND_TWILIO: "twilio",
        K.CONNECTOR_KIND_WHATSAPP_CLOUD: "whatsapp",
        K.CONNECTOR_KIND_CUSTOM_HTTP: "custom",
    }


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.base_seconds, policy.cap_seconds, policy.max_retry_after_seconds) == (
        3,
        0.2,
        5.0,
        30.0,
    )


# -- provider IDs -------------------------------------------------------------------------


def test_a_wamid_that_embeds_the_number_is_not_kept() -> None:
    assert holds_recipient(WAMID_WITH_NUMBER, PHONE)
    assert safe_provider_id(WAMID_WITH_NUMBER, PHONE) == ""


@pytest.mark.parametrize(
    ("wa_id", "sent_to"),
    [
        ("551187654321", "+5511987654321"),  # Brazil: WhatsApp's ID drops the mobile 9
        ("5215512345678", "+525512345678"),  # Mexico: it adds a 1
        ("16505076520", "+16505076520"),
    ],
)
def test_a_wamid_whose_wa_id_is_written_otherwise_than_the_number_is_not_kept(wa_id: str, sent_to: str) -> None:
    record = b"\x18\x0c" + wa_id.encode() + b"\x15\x02\x00\x12\x18\x14" + b"3EB0C4A1B2C3D4E5F6A7"
    wamid = "wamid." + base64.b64encode(record).decode()
    assert safe_provider_id(wamid, sent_to) == ""


@given(before=st.binary(max_size=24), after=st.binary(max_size=24))
def test_a_number_inside_base64_is_found_in_either_alphabet(before: bytes, after: bytes) -> None:
    record = before + PHONE.removeprefix("+").encode() + after
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        assert holds_recipient("id." + encode(record).decode().rstrip("="), PHONE)


def _holds_recipient_plainly(text: str, recipient: str) -> bool:
    """holds_recipient spelled out with the base64 module: every needle against every decoding."""
    needles = [recipient.lower().encode()]
    digits = re.sub(r"\D", "", recipient)
    if len(digits) >= 6:
        needles.append(digits[-7:].encode())  # the last seven: a provider may write the rest otherwise
    haystacks = [text.lower().encode()]
    for segment in re.findall(r"[A-Za-z0-9+/_-]{8,}={0,2}", text):
        body = segment.rstrip("=")
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                haystacks.append(decode(body + "=" * (-len(body) % 4)).lower())
            except (binascii.Error, ValueError):
                continue
    return any(needle in haystack for needle in needles for haystack in haystacks)


_RECIPIENTS = st.one_of(
    st.from_regex(r"\+[1-9][0-9]{5,14}", fullmatch=True),
    st.from_regex(r"[a-zA-Z0-9._-]{1,12}@[a-z0-9-]{1,12}\.[a-z]{2,4}", fullmatch=True),
)


@given(
    recipient=_RECIPIENTS,
    before=st.binary(max_size=12),
    after=st.binary(max_size=12),
    junk=st.text(alphabet="ABCDEFabcdef0123456789+/_-.=:", max_size=40),
    hide=st.sampled_from(["no", "plain", "digits", "b64", "urlsafe", "upper"]),
)
def test_the_recipient_check_agrees_with_a_plain_spelling_of_it(recipient, before, after, junk, hide) -> None:
    secret = recipient.removeprefix("+").encode() if hide == "digits" else recipient.encode()
    record = before + secret + after
    hidden = {
        "no": "",
        "plain": recipient,
        "digits": secret.decode(),
        "b64": base64.b64encode(record).decode(),
        "urlsafe": base64.urlsafe_b64encode(record).decode().rstrip("="),
        "upper": base64.b64encode(before + recipient.upper().encode() + after).decode(),
    }[hide]
    text = junk[: len(junk) // 2] + hidden + junk[len(junk) // 2 :]
    assert holds_recipient(text, recipient) is _holds_recipient_plainly(text, recipient)


_HEX_CHARACTERS = "0123456789abcdefABCDEF"


def test_base64_of_hex_digits_never_decodes_to_three_ascii_digits_in_a_row() -> None:
    # Every group of four hex digits: the first of its three bytes is never "0"-"9", so a run of
    # ASCII digits in the decoded bytes is at most two long (the group's second and third bytes).
    digits = set(b"0123456789")
    for group in itertools.product(_HEX_CHARACTERS, repeat=4):
        decoded = binascii.a2b_base64("".join(group))
        assert decoded[0] not in digits, group


@given(
    recipient=st.from_regex(r"\+[1-9][0-9]{5,14}", fullmatch=True),
    before=st.text(alphabet=_HEX_CHARACTERS, max_size=40),
    after=st.text(alphabet=_HEX_CHARACTERS, max_size=40),
    spelled=st.sampled_from(["no", "digits", "half"]),
)
def test_a_hex_id_is_judged_as_the_plain_spelling_judges_it(recipient, before, after, spelled) -> None:
    # A hex ID is not decoded for an E.164 number; it may still hold the number's digits as they are.
    digits = recipient.removeprefix("+")
    middle = {"no": "", "digits": digits, "half": digits[: len(digits) // 2]}[spelled]
    text = before + middle + after
    if text:
        assert holds_recipient(text, recipient) is _holds_recipient_plainly(text, recipient)


@pytest.mark.parametrize(
    ("value", "recipient", "kept"),
    [
        ("SM" + "a" * 32, PHONE, True),
        ("wamid.opaque-0123", PHONE, True),
        (12345, PHONE, True),
        (PHONE, PHONE, False),
        ("16505076520", PHONE, False),
        ("msg-16505076520-1", PHONE, False),
        ("ann@example.com", "ann@example.com", False),
        ("has space", PHONE, False),
        ("x" * 257, PHONE, False),
        (True, PHONE, False),
        ({"id": 1}, PHONE, False),
        (None, PHONE, False),
    ],
)
def test_safe_provider_id(value: object, recipient: str, kept: bool) -> None:
    assert (safe_provider_id(value, recipient) != "") is kept


# -- payloads ---------------------------------------------------------------------------------


def outbound(**fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id="c0ffee00c0ffee00c0ffee00c0ffee00",
        anonymous_id="anon",
        campaign_id="camp",
        campaign_instance_id="inst",
        to=PHONE,
        sms_body="Hi Ann",
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


def test_whatsapp_text_payload() -> None:
    assert message_payload(outbound()) == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "16505076520",
        "biz_opaque_callback_data": "c0ffee00c0ffee00c0ffee00c0ffee00",
        "type": "text",
        "text": {"body": "Hi Ann", "preview_url": False},
    }


def test_whatsapp_template_without_params_has_no_components() -> None:
    payload = message_payload(outbound(whatsapp_template=WhatsAppTemplateContent("hello_world", "en_US")))
    assert payload["template"] == {"name": "hello_world", "language": {"code": "en_US"}}


async def test_twilio_form_and_callback(http) -> None:
    twilio = TwilioConnector(
        account_sid=ACCOUNT_SID,
        auth_token="tok",
        sender="MG" + "0" * 32,
        workspace_id="ws 1",
        connector_id="conn/1",
        public_webhook_url="https://hooks.example.com/",
        http=http,
        retry=RetryPolicy(),
    )
    form = twilio.form(outbound(media_urls=["https://cdn.example.com/a.png", "https://cdn.example.com/b.png"]))
    assert form[:3] == [("To", PHONE), ("MessagingServiceSid", "MG" + "0" * 32), ("Body", "Hi Ann")]
    assert [v for k, v in form if k == "MediaUrl"] == ["https://cdn.example.com/a.png", "https://cdn.example.com/b.png"]
    callback = dict(form)["StatusCallback"]
    parts = urlsplit(callback)
    assert parts.path == "/webhooks/twilio/ws%201/conn%2F1"
    assert parse_qsl(parts.query) == [("message_id", "c0ffee00c0ffee00c0ffee00c0ffee00")]


def test_basic_authorization() -> None:
    assert basic_authorization("AC1", "tok") == "Basic QUMxOnRvaw=="
