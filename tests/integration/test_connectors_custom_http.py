"""The CUSTOM_HTTP connector, built from a saved Connector, against local gateways.

A JSON gateway, a Vonage-style form gateway (always 200, verdict per message)
and a GET gateway: each asserts the exact request that arrived.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs
from xml.etree import ElementTree

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.errors import InvalidArgument
from services.dispatcher.connectors import RetryPolicy, build_connector, validate_connector
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.message_client import MessageClient

pytestmark = pytest.mark.integration

PHONE = "+447700900123"
API_KEY = "gw-key-canary-777"
TEXT = 'Hi "Ann" & co — 50% off!\nReply STOP @sender {x}'


@dataclass
class Gateway:
    reply: Callable[[], web.Response]
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def gateway() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(reply: Callable[[], web.Response]) -> tuple[str, Gateway]:
        gw = Gateway(reply)

        async def handle(request: web.Request) -> web.Response:
            gw.requests.append(
                {
                    "method": request.method,
                    "path": request.path,
                    "query": dict(request.query),
                    "headers": request.headers.copy(),  # case-insensitive, like HTTP
                    "body": await request.read(),
                }
            )
            return gw.reply()

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), gw

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def http(
    provider_http: aiohttp.ClientSession | MessageClient,
) -> AsyncIterator[tuple[aiohttp.ClientSession, MessageClient | None]]:
    """The connector's shared session and, in the dispatcher's way, the per-message client."""
    if isinstance(provider_http, MessageClient):
        async with aiohttp.ClientSession() as session:
            yield session, provider_http
    else:
        yield provider_http, None


def saved_connector(template: pb.CustomHttpTemplate, base_url: str = "") -> pb.Connector:
    connector = pb.Connector(
        workspace_id="ws-1",
        connector_id="gw-1",
        kind=pb.CONNECTOR_KIND_CUSTOM_HTTP,
        channel=common_pb2.CHANNEL_SMS,
        sender="BrandCo",
        credentials={"api_key": API_KEY, "api_secret": "sec ret&="},
        custom_http=template,
        base_url=base_url,
    )
    validate_connector(connector, allow_private=True)
    return connector


def client(  # noqa: ANN201
    connector: pb.Connector,
    http: tuple[aiohttp.ClientSession, MessageClient | None],
    retry: RetryPolicy = RetryPolicy(max_retries=0),  # noqa: B008 (frozen)
):
    session, message_http = http
    return build_connector(
        connector,
        http=session,
        message_http=message_http,
        public_webhook_url="https://hooks.example.com",
        retry=retry,
        allow_private=True,
    )


def message(**fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id="abcdefabcdefabcdefabcdefabcdef01",
        anonymous_id="anon-1",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=PHONE,
        sms_body=TEXT,
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


async def test_json_gateway(gateway, http) -> None:
    base_url, gw = await gateway(lambda: web.json_response({"result": {"id": "gw-msg-42"}}))
    template = pb.CustomHttpTemplate(
        method="POST",
        url=f"{base_url}/v1/messages",
        headers={"Authorization": "Bearer @credentials.api_key", "X-Correlation-Id": "@message_id"},
        body='{"to": "@to", "from": "@sender", "text": "@text", "ref": "@message_id"}',
        message_id_path="result.id",
    )
    (outcome,) = await client(saved_connector(template), http).send([message()])
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == "gw-msg-42"
    (request,) = gw.requests
    assert (request["method"], request["path"]) == ("POST", "/v1/messages")
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert request["headers"]["X-Correlation-Id"] == "abcdefabcdefabcdefabcdefabcdef01"
    assert request["headers"]["Content-Type"] == "application/json"
    assert json.loads(request["body"]) == {
        "to": PHONE,
        "from": "BrandCo",
        "text": TEXT,
        "ref": "abcdefabcdefabcdefabcdefabcdef01",
    }


def vonage_reply(status: str, message_id: str | None = None) -> Callable[[], web.Response]:
    entry: dict[str, str] = {"to": PHONE[1:], "status": status}
    if message_id:
        entry["message-id"] = message_id
    else:
        entry["error-text"] = f"Non-whitelisted destination {PHONE}"
    return lambda: web.json_response({"message-count": "1", "messages": [entry]})


VONAGE = pb.CustomHttpTemplate(
    method="POST",
    url="/sms/json",
    body="api_key=@credentials.api_key&api_secret=@credentials.api_secret&from=@sender&to=@to&text=@text"
    "&client-ref=@message_id",
    message_id_path='messages[0]."message-id"',
)


async def test_vonage_style_form_gateway(gateway, http) -> None:
    base_url, gw = await gateway(vonage_reply("0", "0A0000000123ABCD1"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http).send([message()])
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == "0A0000000123ABCD1"
    (request,) = gw.requests
    assert request["path"] == "/sms/json"
    assert request["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(request["body"].decode(), strict_parsing=True) == {
        "api_key": [API_KEY],
        "api_secret": ["sec ret&="],
        "from": ["BrandCo"],
        "to": [PHONE],
        "text": [TEXT],
        "client-ref": ["abcdefabcdefabcdefabcdefabcdef01"],
    }


async def test_vonage_style_rejection_in_a_200(gateway, http) -> None:
    base_url, _ = await gateway(vonage_reply("6"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http).send([message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "GATEWAY_REJECTED")
    assert outcome.error_message == "gateway refused the message (status 6)"
    assert PHONE not in outcome.error_message and PHONE[1:] not in outcome.error_message


QUICK_RETRIES = RetryPolicy(max_retries=2, base_seconds=0.001, cap_seconds=0.001)


def in_turn(*replies: Callable[[], web.Response]) -> Callable[[], web.Response]:
    left = iter(replies)
    return lambda: next(left)()


async def test_vonage_style_throttled_status_is_tried_again_like_a_429(gateway, http) -> None:
    """Status "1": over the account's rate, nothing sent. Tried again, not failed at once."""
    replies = in_turn(vonage_reply("1"), vonage_reply("1"), vonage_reply("0", "0A0000000123ABCD1"))
    base_url, gw = await gateway(replies)
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.provider_message_id, outcome.attempts) == (SendStatus.SENT, "0A0000000123ABCD1", 3)
    assert len(gw.requests) == 3

    base_url, gw = await gateway(vonage_reply("1"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "RATE_LIMITED")
    assert outcome.error_message == "rate limited by custom after 3 attempts" and len(gw.requests) == 3

    base_url, gw = await gateway(vonage_reply("6"))  # any other status is final
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.error_code, len(gw.requests)) == (SendStatus.FAILED, "GATEWAY_REJECTED", 1)


def vonage_parts(*statuses: str) -> Callable[[], web.Response]:
    """Vonage's reply to a multi-part SMS: one entry per part, each with its own status."""
    entries: list[dict[str, str]] = []
    for part, status in enumerate(statuses, 1):
        entry = {"to": PHONE[1:], "status": status}
        if status == "0":
            entry["message-id"] = f"0A000000000000{part:02d}"
        else:
            entry["error-text"] = f"Quota exceeded sending to {PHONE}"
        entries.append(entry)
    return lambda: web.json_response({"message-count": str(len(entries)), "messages": entries})


async def test_a_multi_part_sms_with_a_part_refused_is_kept_as_reached_and_not_sent_again(gateway, http) -> None:
    """Part 1 went out (its ID is the one `message_id_path` selects), part 2 did not: the recipient has
    part of the message. OUTCOME_UNKNOWN naming the part, its claim so kept: never resent, which would
    send part 1 twice."""
    base_url, gw = await gateway(vonage_parts("0", "9", "0"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.error_code, outcome.provider_message_id) == (
        SendStatus.OUTCOME_UNKNOWN,
        "GATEWAY_REJECTED",
        "0A00000000000001",
    )
    assert outcome.error_message == "gateway refused part 2 of 3 (status 9); the other parts went out"
    assert len(gw.requests) == 1

    # Even when the refused part was only throttled, or the platform failed on it.
    for statuses in (("0", "1"), ("1", "0"), ("0", "5")):
        base_url, gw = await gateway(vonage_parts(*statuses))
        (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
        assert (outcome.status, outcome.error_code, len(gw.requests)) == (
            SendStatus.OUTCOME_UNKNOWN,
            "GATEWAY_REJECTED",
            1,
        )
        assert outcome.error_message.endswith("; the other part went out")
        assert PHONE not in outcome.error_message and PHONE[1:] not in outcome.error_message


async def test_a_multi_part_sms_with_every_part_refused_fails_with_the_first_code(gateway, http) -> None:
    """Nothing went out: the first part's code decides, as for a single part."""
    base_url, gw = await gateway(vonage_parts("9", "4", "9"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.error_code, len(gw.requests)) == (SendStatus.FAILED, "GATEWAY_REJECTED", 1)
    assert outcome.error_message == "gateway refused the message (status 9)"

    # The first part's "1" (throttled) or "5" (internal error) is tried again, whatever the others say.
    base_url, gw = await gateway(vonage_parts("1", "1"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.error_code, len(gw.requests)) == (SendStatus.FAILED, "RATE_LIMITED", 3)

    base_url, gw = await gateway(vonage_parts("5", "9"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.error_code, len(gw.requests)) == (SendStatus.FAILED, "SERVER_ERROR", 3)


async def test_vonage_style_internal_error_is_tried_again_like_a_5xx(gateway, http) -> None:
    """Status "5": the gateway's platform failed on the message, nothing sent."""
    replies = in_turn(vonage_reply("5"), vonage_reply("0", "0A0000000123ABCD1"))
    base_url, gw = await gateway(replies)
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.provider_message_id, outcome.attempts) == (SendStatus.SENT, "0A0000000123ABCD1", 2)
    assert len(gw.requests) == 2

    base_url, gw = await gateway(vonage_reply("5"))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http, QUICK_RETRIES).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SERVER_ERROR", 3)
    assert outcome.error_message == "custom reported a server error (HTTP 200) after 3 attempts"
    assert len(gw.requests) == 3


async def test_a_gateway_status_holding_a_number_is_not_quoted(gateway, http) -> None:
    base_url, _ = await gateway(vonage_reply(PHONE.removeprefix("+")))
    (outcome,) = await client(saved_connector(VONAGE, base_url=base_url), http).send([message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "GATEWAY_REJECTED")
    assert outcome.error_message == "gateway refused the message (status ?)"


async def test_a_status_that_is_not_a_code_is_not_read_as_a_rejection(gateway, http) -> None:
    """Infobip answers 200 with each message's status as an object ("PENDING_ACCEPTED"): sent, not refused."""
    accepted = {"groupId": 1, "groupName": "PENDING", "id": 26, "name": "PENDING_ACCEPTED"}
    reply = {"bulkId": "b-1", "messages": [{"messageId": "ib-42", "status": accepted, "to": PHONE[1:]}]}
    base_url, gw = await gateway(lambda: web.json_response(reply))
    template = pb.CustomHttpTemplate(method="POST", url=f"{base_url}/sms/2/text/advanced", body='{"to": "@to"}')
    (outcome,) = await client(saved_connector(template), http).send([message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.SENT, "")
    assert len(gw.requests) == 1


async def test_get_gateway_with_placeholders_in_the_url(gateway, http) -> None:
    base_url, gw = await gateway(lambda: web.Response(text="OK"))
    template = pb.CustomHttpTemplate(
        method="GET",
        url=f"{base_url}/send/@to?text=@text&key=@credentials.api_key&ref=@message_id",
        headers={"Accept": "text/plain"},
    )
    (outcome,) = await client(saved_connector(template), http).send([message()])
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == ""
    (request,) = gw.requests
    assert request["method"] == "GET" and request["body"] == b""
    assert request["path"] == f"/send/{PHONE}"
    assert request["query"] == {"text": TEXT, "key": API_KEY, "ref": "abcdefabcdefabcdefabcdefabcdef01"}


async def test_a_message_id_path_that_selects_the_number_records_nothing(gateway, http) -> None:
    base_url, _ = await gateway(lambda: web.json_response({"to": PHONE, "id": "x"}))
    template = pb.CustomHttpTemplate(method="POST", url=f"{base_url}/sms", body='{"to": "@to"}', message_id_path="to")
    (outcome,) = await client(saved_connector(template), http).send([message()])
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == ""


@pytest.mark.parametrize(
    ("reply", "path"),
    [
        ('{"ids": "abc"}', "join('', ids)"),  # join() over a string: a type error inside JMESPath
        ('{"ids": ' + "[" * 990 + "]" * 990 + "}", "to_string(ids)"),  # too deep to write out
    ],
)
async def test_a_message_id_path_that_cannot_apply_to_the_reply_still_reports_the_send(
    gateway, http, reply, path
) -> None:
    """The message went out: its outcome is SENT without a provider ID, not an error for the batch."""
    base_url, gw = await gateway(lambda: web.Response(text=reply, content_type="application/json"))
    template = pb.CustomHttpTemplate(method="POST", url=f"{base_url}/sms", body='{"to": "@to"}', message_id_path=path)
    (outcome,) = await client(saved_connector(template), http).send([message()])
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == ""
    assert len(gw.requests) == 1


async def test_gateway_error_does_not_quote_the_reply(gateway, http) -> None:
    base_url, _ = await gateway(lambda: web.json_response({"error": f"bad number {PHONE}"}, status=422))
    template = pb.CustomHttpTemplate(method="POST", url=f"{base_url}/sms", body='{"to": "@to"}')
    (outcome,) = await client(saved_connector(template), http).send([message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "HTTP_422")
    assert PHONE not in outcome.error_message and API_KEY not in outcome.error_message


def test_a_header_carrying_the_text_is_refused_when_saved() -> None:
    """A message can be several lines: refused at once, not for each multi-line SMS after its contact
    was fetched."""
    template = pb.CustomHttpTemplate(
        method="POST", url="https://gw.example.com/sms", headers={"X-Text": "@text"}, body='{"to": "@to"}'
    )
    with pytest.raises(InvalidArgument) as caught:
        saved_connector(template)
    assert caught.value.field == "connector.custom_http.headers['X-Text']"


async def test_a_line_break_in_a_header_value_fails_the_message_without_a_request(gateway, http) -> None:
    """A connector saved before @text was refused in headers: the message fails naming the header."""
    base_url, gw = await gateway(lambda: web.Response(text="OK"))
    template = pb.CustomHttpTemplate(
        method="POST", url=f"{base_url}/sms", headers={"X-Text": "@text"}, body='{"to": "@to"}'
    )
    connector = saved_connector(pb.CustomHttpTemplate(method="POST", url=f"{base_url}/sms", body='{"to": "@to"}'))
    connector.custom_http.CopyFrom(template)  # as stored before the rule
    (outcome,) = await client(connector, http).send([message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "INVALID_MESSAGE")
    assert "custom_http.headers['X-Text']" in outcome.error_message and "@text" in outcome.error_message
    assert "line" in outcome.error_message and PHONE not in outcome.error_message
    assert gw.requests == []


def refused(status: int) -> Callable[[], web.Response]:
    return lambda: web.json_response({"error": f"refused {PHONE}"}, status=status)


async def test_a_refusal_of_the_credentials_leaves_the_rest_of_the_batch_unsent(gateway, http) -> None:
    """A 403 (the gateway will not serve a destination) is the message's; a 401 refuses the connector's
    credentials, which every message after it would meet: those fail with it, with no request."""
    base_url, gw = await gateway(
        in_turn(refused(403), vonage_reply("0", "0A0000000123ABCD1"), refused(401), vonage_reply("0", "0A01"))
    )
    batch = [message(message_id=f"{i:032x}") for i in range(5)]
    outcomes = await client(saved_connector(VONAGE, base_url=base_url), http).send(batch)
    assert len(gw.requests) == 3
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [
        (SendStatus.FAILED, "HTTP_403", 1),
        (SendStatus.SENT, "", 1),
        (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1),
    ] + [(SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 0)] * 2
    assert outcomes[2].error_message == (
        "the gateway refused the connector's credentials (HTTP 401); not retried: check the connector's credentials"
    )
    assert all(o.error_message.startswith("not attempted: an earlier message") for o in outcomes[3:])


async def test_xml_gateway_gets_the_text_as_written(gateway, http) -> None:
    """A gateway taking XML (`text/xml`) parses the message as it was written: a `<`, an `&` or a line
    break in it neither breaks the document nor arrives form-encoded."""
    base_url, gw = await gateway(lambda: web.Response(text="<result><id>gw-7</id></result>", content_type="text/xml"))
    template = pb.CustomHttpTemplate(
        method="POST",
        url=f"{base_url}/sms.xml",
        headers={"Content-Type": "text/xml; charset=utf-8"},
        body='<?xml version="1.0" encoding="utf-8"?>\n<sms ref="@message_id"><to>@to</to><from>@sender</from>'
        "<text>@text</text><key>@credentials.api_secret</key></sms>",
    )
    text = "Tom & Jerry <3 you\nline two: 'a' > \"b\" ✓"
    (outcome,) = await client(saved_connector(template), http).send([message(sms_body=text)])
    assert outcome.status is SendStatus.SENT
    (request,) = gw.requests
    assert request["headers"]["Content-Type"] == "text/xml; charset=utf-8"
    root = ElementTree.fromstring(request["body"])
    assert root.get("ref") == "abcdefabcdefabcdefabcdefabcdef01"
    assert (root.findtext("to"), root.findtext("from"), root.findtext("text"), root.findtext("key")) == (
        PHONE,
        "BrandCo",
        text,
        "sec ret&=",
    )
