"""Tests for the sandbox providers the demo, benchmarks and end-to-end tests send through.

Each test serves the sandbox on port 0 and talks real HTTP to it; receipts go to a small aiohttp
receiver started by the test, and their signatures are checked the way a receiver would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDictProxy

from sandbox.providers import (
    CUSTOM,
    SENDGRID,
    TWILIO,
    WHATSAPP,
    Faults,
    OutboxMessage,
    ProviderAccount,
    ProviderSandbox,
    default_receipt_script,
    main,
    start_providers,
)
from sandbox.signing import SENDGRID_SIGNATURE_HEADER, SENDGRID_TIMESTAMP_HEADER, twilio_signature, whatsapp_signature
from tests.conftest import serving

SPECS = Path(__file__).resolve().parents[3] / "shared" / "specs"

SG_KEY = "SG.test-key"
TWILIO_SID = "AC" + "0123456789abcdef" * 2
TWILIO_TOKEN = "twilio-auth-token"
WA_PHONE_ID = "106540352242922"
WA_TOKEN = "wa-access-token"
WA_SECRET = "wa-app-secret"
GW_KEY = "abcd1234"
GW_SECRET = "gw-secret-1"

TWILIO_PATH = f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
WA_PATH = f"/v21.0/{WA_PHONE_ID}/messages"


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


TWILIO_AUTH = basic(TWILIO_SID, TWILIO_TOKEN)
WA_AUTH = {"Authorization": f"Bearer {WA_TOKEN}"}
SG_AUTH = {"Authorization": f"Bearer {SG_KEY}"}


def accounts() -> list[ProviderAccount]:
    return [
        ProviderAccount(SENDGRID, SG_KEY, "ws-1", "sg-conn"),
        ProviderAccount(TWILIO, TWILIO_SID, "ws-1", "tw-conn", secret=TWILIO_TOKEN),
        ProviderAccount(WHATSAPP, WA_PHONE_ID, "ws-1", "wa-conn", secret=WA_SECRET, access_token=WA_TOKEN),
        ProviderAccount(CUSTOM, GW_KEY, "ws-1", "gw-conn", secret=GW_SECRET),
    ]


def mail(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "personalizations": [{"to": [{"email": "ada@example.com"}], "custom_args": {"message_id": "m-1"}}],
        "from": {"email": "news@brand.example", "name": "Brand"},
        "subject": "Hello",
        "content": [
            {"type": "text/plain", "value": "Hi"},
            {"type": "text/html", "value": '<p>Hi <a href="https://brand.example/offer">offer</a></p>'},
        ],
    }
    body.update(overrides)
    return body


def sms(**overrides: str) -> dict[str, str]:
    return {"To": "+447700900001", "From": "+15005550006", "Body": "Hi there", **overrides}


def wa_text(**overrides: Any) -> dict[str, Any]:
    return {"messaging_product": "whatsapp", "to": "447700900001", "type": "text", "text": {"body": "Hi"}, **overrides}


def _template_with_param(text: str) -> dict[str, Any]:
    return {
        "name": "spring_sale",
        "language": {"code": "en_GB"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": text}]}],
    }


def gateway(**overrides: str) -> dict[str, str]:
    return {"api_key": GW_KEY, "api_secret": GW_SECRET, "from": "Brand", "to": "447700900001", "text": "Hi"} | overrides


# -- servers ----------------------------------------------------------------------------------------


@dataclass
class Running:
    sandbox: ProviderSandbox
    http: aiohttp.ClientSession

    async def send(self, provider: str, payload: Any = None, **kwargs: Any) -> aiohttp.ClientResponse:
        """A valid send for `provider` unless `payload` overrides it."""
        if provider == SENDGRID:
            return await self.http.post("/v3/mail/send", json=payload or mail(), headers=SG_AUTH, **kwargs)
        if provider == TWILIO:
            return await self.http.post(TWILIO_PATH, data=payload or sms(), headers=TWILIO_AUTH, **kwargs)
        if provider == WHATSAPP:
            return await self.http.post(WA_PATH, json=payload or wa_text(), headers=WA_AUTH, **kwargs)
        return await self.http.post("/sms/json", data=payload or gateway(), **kwargs)


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Starts sandboxes on port 0 with fast receipts: `await start(receipts_url=..., receipt_script=...)`."""
    started: list[tuple[web.AppRunner, aiohttp.ClientSession]] = []

    async def _start(**kwargs: Any) -> Running:
        kwargs.setdefault("receipt_delay_seconds", 0)
        kwargs.setdefault("receipt_retry_base_seconds", 0.01)
        sandbox = ProviderSandbox(accounts(), **kwargs)
        runner, port = await start_providers(sandbox)
        http = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
        started.append((runner, http))
        return Running(sandbox, http)

    yield _start
    for runner, http in started:
        await http.close()
        await runner.cleanup()


@dataclass
class Received:
    url: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass
class Receiver:
    """Stands in for the receipts service: records every POST, answers 500 while `failures` lasts (-1: always)."""

    base_url: str = ""
    received: list[Received] = field(default_factory=list)
    failures: int = 0


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    catcher = Receiver()

    async def record(request: web.Request) -> web.Response:
        catcher.received.append(Received(str(request.url), request.headers, await request.read()))
        if catcher.failures:
            catcher.failures -= 1 if catcher.failures > 0 else 0
            return web.Response(status=500)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", record)
    async with serving(app) as catcher.base_url:
        yield catcher


def script(statuses: dict[str, list[str]] | list[str]) -> Callable[[str, OutboxMessage], list[str]]:
    """A receipt script by recipient (dict) or the same statuses for everyone (list)."""
    return lambda _provider, message: statuses if isinstance(statuses, list) else statuses.get(message.to, [])


# -- SendGrid ---------------------------------------------------------------------------------------


async def test_sendgrid_accepts_mail_and_records_each_recipient(start) -> None:
    running = await start()
    body = mail(
        personalizations=[
            {"to": [{"email": "ada@example.com"}, {"email": "bo@example.org"}], "custom_args": {"message_id": "m-1"}},
            {"to": [{"email": "cy@example.net"}], "subject": "Just for you", "custom_args": {"message_id": "m-2"}},
        ],
        custom_args={"campaign": "c-9", "message_id": "top"},
    )
    resp = await running.send(SENDGRID, body)
    assert resp.status == 202
    assert await resp.read() == b""
    message_id = resp.headers["X-Message-Id"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", message_id)

    outbox = running.sandbox.outbox_for(SENDGRID)
    assert [m.to for m in outbox] == ["ada@example.com", "bo@example.org", "cy@example.net"]
    assert [m.subject for m in outbox] == ["Hello", "Hello", "Just for you"]
    assert [m.custom_args for m in outbox] == [
        {"campaign": "c-9", "message_id": "m-1"},
        {"campaign": "c-9", "message_id": "m-1"},
        {"campaign": "c-9", "message_id": "m-2"},
    ]
    first = outbox[0]
    assert (first.provider_message_id, first.sender, first.text) == (message_id, "news@brand.example", "Hi")
    assert "offer" in first.html and (first.workspace_id, first.connector_id) == ("ws-1", "sg-conn")
    assert len({m.receipt_message_id for m in outbox}) == 3
    assert all(m.receipt_message_id.startswith(message_id + ".") for m in outbox)


async def test_sendgrid_template_needs_no_subject_or_content(start) -> None:
    running = await start()
    body = mail(template_id="d-123", subject=None, content=None)
    del body["subject"], body["content"]
    body["personalizations"][0]["dynamic_template_data"] = {"first_name": "Ada"}
    assert (await running.send(SENDGRID, body)).status == 202
    assert running.sandbox.outbox[0].template == {
        "template_id": "d-123",
        "dynamic_template_data": {"first_name": "Ada"},
    }


async def test_sendgrid_allows_1000_personalizations(start) -> None:
    running = await start()
    body = mail(personalizations=[{"to": [{"email": f"u{i}@example.com"}]} for i in range(1000)])
    assert (await running.send(SENDGRID, body)).status == 202
    assert len(running.sandbox.outbox) == 1000


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer SG.wrong"}, {"Authorization": f"Basic {SG_KEY}"}],
    ids=["missing", "wrong-key", "wrong-scheme"],
)
async def test_sendgrid_refuses_bad_keys(start, headers) -> None:
    running = await start()
    resp = await running.http.post("/v3/mail/send", json=mail(), headers=headers)
    assert resp.status == 401
    assert await resp.json() == {
        "errors": [
            {
                "message": "The provided authorization grant is invalid, expired, or revoked",
                "field": None,
                "help": None,
            }
        ]
    }
    assert len(running.sandbox.outbox) == 0


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.pop(key)


@pytest.mark.parametrize(
    ("mutate", "field_name", "message"),
    [
        (_without("personalizations"), "personalizations", "at least one personalization"),
        (lambda b: b.update(personalizations=[]), "personalizations", "at least one personalization"),
        (lambda b: b["personalizations"][0].update(to=[]), "personalizations.0.to", "The to array is required"),
        (lambda b: b["personalizations"][0].pop("to"), "personalizations.0.to", "The to array is required"),
        (
            lambda b: b["personalizations"][0].update(to=[{"email": "not-an-address"}]),
            "personalizations.0.to.0.email",
            "Does not contain a valid address.",
        ),
        (
            lambda b: b["personalizations"][0].update(to=[{"email": "a@example.com"}], cc=[{"email": "A@example.com"}]),
            "personalizations.0",
            "should be unique",
        ),
        (_without("from"), "from.email", "The from object must be provided"),
        (lambda b: b.update({"from": {"email": "brand"}}), "from.email", "does not contain a valid address"),
        (_without("subject"), "subject", "The subject is required"),
        (_without("content"), "content", "the content parameter is required"),
        (lambda b: b.update(content=[]), "content", "the content parameter is required"),
        (lambda b: b["content"].reverse(), "content", "text/plain must be first"),
        (lambda b: b["content"][0].update(value=""), "content.0.value", "at least one character"),
        (
            lambda b: b["personalizations"][0].update(custom_args={"attempt": 1}),
            "personalizations.0.custom_args.attempt",
            "Expected: string, given: integer",
        ),
        (lambda b: b.update(custom_args={"flag": True}), "custom_args.flag", "Expected: string, given: boolean"),
        (
            lambda b: b["personalizations"][0].update(substitutions={"-n-": 7}),
            "personalizations.0.substitutions.-n-",
            "Expected: string, given: integer",
        ),
        (
            lambda b: b["personalizations"][0].update(substitutions={"-n-": "x" * 9_998}),
            "personalizations.0.substitutions",
            "10000 bytes or less",
        ),
        (
            lambda b: b["personalizations"][0].update(headers={"Reply-To": "help@brand.example"}),
            "personalizations.0.headers.Reply-To",
            "Header can not be one of the reserved keys.",
        ),
        (
            lambda b: b.update(headers={"x-sg-id": "1"}),
            "headers.x-sg-id",
            "Header can not be one of the reserved keys.",
        ),
        (
            lambda b: b.update(personalizations=[{"to": [{"email": f"u{i}@example.com"}]} for i in range(1001)]),
            "personalizations",
            "between 1 and 1000",
        ),
        (
            lambda b: b.update(personalizations=[{"to": [{"email": f"u{i}@example.com"} for i in range(1001)]}]),
            "personalizations",
            "total number of recipients",
        ),
    ],
)
async def test_sendgrid_validation_errors(start, mutate, field_name, message) -> None:
    running = await start()
    body = mail()
    mutate(body)
    resp = await running.send(SENDGRID, body)
    assert resp.status == 400
    errors = (await resp.json())["errors"]
    assert any(e["field"] == field_name and message in e["message"] for e in errors), errors
    assert all(set(e) == {"message", "field", "help"} for e in errors)
    assert "X-Message-Id" not in resp.headers
    assert len(running.sandbox.outbox) == 0


async def test_sendgrid_subject_may_come_from_every_personalization(start) -> None:
    running = await start()
    body = mail()
    del body["subject"]
    body["personalizations"][0]["subject"] = "Per person"
    assert (await running.send(SENDGRID, body)).status == 202


async def test_sendgrid_substitutions_fill_in_each_recipient_s_message(start) -> None:
    running = await start()
    body = mail(
        subject="[ts:0], hello",
        content=[
            {"type": "text/plain", "value": "Dear [ts:0] [ts:10]"},
            {"type": "text/html", "value": "<p>[ts:1]</p>"},
        ],
        personalizations=[
            {
                "to": [{"email": "ada@example.com"}],
                "substitutions": {"[ts:0]": "[ts:1]", "[ts:1]": "A&amp;B", "[ts:10]": "L"},
            },
            {"to": [{"email": "bo@example.org"}]},
        ],
    )
    assert (await running.send(SENDGRID, body)).status == 202
    ada, bo = running.sandbox.outbox_for(SENDGRID)
    # One pass: a value that looks like a tag stays as it is; "[ts:1]" is not read inside "[ts:10]".
    assert (ada.subject, ada.text, ada.html) == ("[ts:1], hello", "Dear [ts:1] L", "<p>A&amp;B</p>")
    assert (bo.subject, bo.text) == ("[ts:0], hello", "Dear [ts:0] [ts:10]")


async def test_sendgrid_reports_all_errors_and_bad_json(start) -> None:
    running = await start()
    resp = await running.send(SENDGRID, {"personalizations": [{"to": []}]})
    fields = {e["field"] for e in (await resp.json())["errors"]}
    assert {"personalizations.0.to", "from.email", "subject", "content"} <= fields
    resp = await running.http.post(
        "/v3/mail/send", data=b"{nope", headers={**SG_AUTH, "Content-Type": "application/json"}
    )
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["field"] is None


async def test_sendgrid_takes_only_json_bodies(start) -> None:
    running = await start()
    body = json.dumps(mail()).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        resp = await running.http.post("/v3/mail/send", data=body, headers={**SG_AUTH, "Content-Type": content_type})
        assert resp.status == 415, content_type
        assert await resp.json() == {
            "errors": [{"message": "Content-Type should be application/json.", "field": None, "help": None}]
        }
    assert len(running.sandbox.outbox) == 0
    resp = await running.http.post(
        "/v3/mail/send", data=body, headers={**SG_AUTH, "Content-Type": "application/json; charset=utf-8"}
    )
    assert resp.status == 202


# -- Twilio -----------------------------------------------------------------------------------------


async def test_twilio_queues_a_message(start) -> None:
    running = await start()
    callback = "https://hooks.example/webhooks/twilio/ws-1/tw-conn?message_id=m-1"
    resp = await running.send(TWILIO, sms(StatusCallback=callback))
    assert resp.status == 201
    reply = await resp.json()
    assert re.fullmatch(r"SM[0-9a-f]{32}", reply["sid"])
    assert reply["status"] == "queued"
    assert (reply["to"], reply["from"], reply["body"]) == ("+447700900001", "+15005550006", "Hi there")
    assert (reply["num_media"], reply["account_sid"], reply["messaging_service_sid"]) == ("0", TWILIO_SID, None)
    assert reply["uri"] == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages/{reply['sid']}.json"
    assert reply["date_created"].endswith("+0000")
    [message] = running.sandbox.outbox_for(TWILIO)
    assert (message.provider_message_id, message.to, message.body) == (reply["sid"], "+447700900001", "Hi there")
    assert message.status_callback == callback


async def test_twilio_messaging_service_and_media(start) -> None:
    running = await start()
    service = "MG" + "a" * 32
    form = [("To", "+447700900001"), ("MessagingServiceSid", service)]
    form += [("MediaUrl", "https://cdn.example/a.png"), ("MediaUrl", "https://cdn.example/b.png")]
    resp = await running.send(TWILIO, form)
    assert resp.status == 201
    reply = await resp.json()
    assert (reply["status"], reply["from"], reply["messaging_service_sid"]) == ("accepted", None, service)
    assert reply["num_media"] == "2" and reply["body"] == ""
    assert running.sandbox.outbox[0].media_urls == ("https://cdn.example/a.png", "https://cdn.example/b.png")


@pytest.mark.parametrize(
    ("path", "auth", "status", "code"),
    [
        (TWILIO_PATH, basic(TWILIO_SID, "wrong"), 401, 20003),
        (TWILIO_PATH, {}, 401, 20003),
        (TWILIO_PATH.replace("0123", "4567", 1), TWILIO_AUTH, 401, 20003),
        ("/2010-04-01/Accounts/ACnope/Messages.json", TWILIO_AUTH, 404, 20404),
    ],
    ids=["wrong-token", "no-auth", "other-account", "malformed-sid"],
)
async def test_twilio_refuses_bad_credentials(start, path, auth, status, code) -> None:
    running = await start()
    resp = await running.http.post(path, data=sms(), headers=auth)
    assert resp.status == status
    body = await resp.json()
    assert body == {
        "code": code,
        "message": "Authenticate" if status == 401 else f"The requested resource {path} was not found",
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


@pytest.mark.parametrize(
    ("form", "code", "message"),
    [
        ({"From": "+15005550006", "Body": "x"}, 21604, "A 'To' phone number is required."),
        (sms(To="07700 900001"), 21211, "The 'To' number 07700 900001 is not a valid phone number."),
        ({"To": "+447700900001", "Body": "x"}, 21603, "A 'From' phone number is required."),
        (sms(From="+12"), 21212, "is not a valid phone number, shortcode, or alphanumeric sender ID."),
        (sms(From="", MessagingServiceSid="MG123"), 21701, "is invalid"),
        (sms(Body=""), 21602, "Message body is required."),
        (sms(Body="x" * 1601), 21617, "exceeds the 1600 character limit"),
        (sms(StatusCallback="not a url"), 21609, "StatusCallback"),
        (sms(StatusCallback="https://receipts_1.example/webhooks/twilio/ws/c"), 21609, "StatusCallback"),
        (sms(StatusCallback="https://hooks.example/" + "a" * 4000), 21609, "StatusCallback"),
        (
            [*sms().items(), *(("MediaUrl", f"https://cdn.example/{n}.png") for n in range(11))],
            21623,
            "Number of media files exceeds allowed limit",
        ),
    ],
)
async def test_twilio_validation_errors(start, form, code, message) -> None:
    running = await start()
    resp = await running.send(TWILIO, form)
    assert resp.status == 400
    body = await resp.json()
    assert (body["code"], body["status"], body["more_info"]) == (
        code,
        400,
        f"https://www.twilio.com/docs/errors/{code}",
    )
    assert message in body["message"]
    assert len(running.sandbox.outbox) == 0


async def test_twilio_accepts_alphanumeric_senders_and_long_bodies(start) -> None:
    running = await start()
    resp = await running.send(TWILIO, sms(From="BrandCo", Body="x" * 1600))
    assert resp.status == 201
    assert (await resp.json())["num_segments"] == "11"


# -- WhatsApp Cloud ---------------------------------------------------------------------------------


async def test_whatsapp_text_and_template(start) -> None:
    running = await start()
    resp = await running.send(WHATSAPP, wa_text(to="+447700900001", biz_opaque_callback_data="m-7"))
    assert resp.status == 200
    reply = await resp.json()
    assert reply["messaging_product"] == "whatsapp"
    assert reply["contacts"] == [{"input": "+447700900001", "wa_id": "447700900001"}]
    [sent] = reply["messages"]
    assert sent["id"].startswith("wamid.") and "message_status" not in sent
    # Like Meta's, the ID carries the recipient's number: consumers must not store it as a token.
    assert b"447700900001" in base64.b64decode(sent["id"].removeprefix("wamid."))

    template = {"name": "spring_sale", "language": {"code": "en_GB"}, "components": []}
    resp = await running.send(WHATSAPP, wa_text(type="template", template=template, text=None))
    assert resp.status == 200
    assert (await resp.json())["messages"][0]["message_status"] == "accepted"

    text_message, template_message = running.sandbox.outbox_for(WHATSAPP)
    assert (text_message.text, text_message.biz_opaque_callback_data) == ("Hi", "m-7")
    assert text_message.provider_message_id == sent["id"]
    assert template_message.template == template and template_message.text == ""


async def test_whatsapp_refuses_bad_tokens_and_foreign_numbers(start) -> None:
    running = await start()
    resp = await running.http.post(WA_PATH, json=wa_text(), headers={"Authorization": "Bearer stolen"})
    assert resp.status == 401
    error = (await resp.json())["error"]
    assert (error["message"], error["type"], error["code"]) == ("Invalid OAuth access token.", "OAuthException", 190)
    assert error["fbtrace_id"]

    resp = await running.http.post("/v21.0/999/messages", json=wa_text(), headers=WA_AUTH)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["error_subcode"]) == (100, 33)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"to": "447700900001", "text": {"body": "Hi"}}, "(#100) The parameter messaging_product is required."),
        (wa_text(messaging_product="sms"), "(#100) Invalid parameter"),
        ({"messaging_product": "whatsapp", "text": {"body": "Hi"}}, "(#100) The parameter to is required."),
        (wa_text(to="call me"), "(#100) Invalid parameter"),
        (wa_text(text={}), "(#100) The parameter text['body'] is required."),
        (wa_text(type="template", template={"language": {"code": "en"}}), "(#100) The parameter template['name']"),
        (wa_text(type="template", template={"name": "t"}), "(#100) The parameter template['language']['code']"),
        (wa_text(type="sticker"), "(#100) Invalid parameter"),
        (wa_text(biz_opaque_callback_data="x" * 513), "(#100) Param biz_opaque_callback_data"),
        *(
            (wa_text(type="template", template=_template_with_param(text)), "(#100) Invalid parameter")
            for text in ("Dear\nAda", "Dear\tAda", "Dear     Ada")
        ),
    ],
)
async def test_whatsapp_validation_errors(start, body, message) -> None:
    running = await start()
    resp = await running.send(WHATSAPP, body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["message"].startswith(message)
    assert (error["type"], error["code"]) == ("OAuthException", 100)
    assert error["fbtrace_id"]
    if "error_data" in error:
        assert error["error_data"]["messaging_product"] == "whatsapp"
    assert len(running.sandbox.outbox) == 0


async def test_whatsapp_template_params_may_hold_up_to_four_spaces(start) -> None:
    running = await start()
    resp = await running.send(WHATSAPP, wa_text(type="template", template=_template_with_param("Dear    Ada")))
    assert resp.status == 200
    resp = await running.send(WHATSAPP, wa_text(type="template", template=_template_with_param("Dear\nAda")))
    error = (await resp.json())["error"]
    assert error["error_data"]["details"] == (
        "Param text cannot have new-line/tab characters or more than 4 consecutive spaces"
    )


# -- custom gateway (Vonage SMS shape) --------------------------------------------------------------


async def test_gateway_accepts_form_and_json(start) -> None:
    running = await start()
    resp = await running.send(CUSTOM, gateway(**{"client-ref": "m-1", "callback": "https://hooks.example/dlr"}))
    assert resp.status == 200
    reply = await resp.json()
    assert reply["message-count"] == "1"
    [sent] = reply["messages"]
    assert re.fullmatch(r"[0-9A-F]{16}", sent["message-id"])
    assert sent == {
        "to": "447700900001",
        "message-id": sent["message-id"],
        "status": "0",
        "remaining-balance": "10.0",
        "message-price": "0.03",
        "network": "23410",
        "client-ref": "m-1",
    }
    resp = await running.http.post("/sms/json", json=gateway(to="+447700900002"))
    assert (await resp.json())["messages"][0]["status"] == "0"
    first, second = running.sandbox.outbox_for(CUSTOM)
    assert (first.text, first.client_ref, first.callback, first.sender) == (
        "Hi",
        "m-1",
        "https://hooks.example/dlr",
        "Brand",
    )
    assert second.to == "+447700900002"


@pytest.mark.parametrize(
    ("form", "status", "error_text"),
    [
        (gateway(api_secret="guess"), "4", "Bad Credentials"),
        (gateway(api_key="nobody00"), "4", "Bad Credentials"),
        ({k: v for k, v in gateway().items() if k != "api_secret"}, "2", "Missing api_secret"),
        ({k: v for k, v in gateway().items() if k != "to"}, "2", "Missing to param"),
        ({k: v for k, v in gateway().items() if k != "from"}, "2", "Missing from param"),
        ({k: v for k, v in gateway().items() if k != "text"}, "2", "Missing text param"),
        (gateway(to="12ab"), "3", "Invalid to param"),
    ],
)
async def test_gateway_errors_are_http_200(start, form, status, error_text) -> None:
    running = await start()
    resp = await running.send(CUSTOM, form)
    assert resp.status == 200
    assert await resp.json() == {"message-count": "1", "messages": [{"status": status, "error-text": error_text}]}
    assert len(running.sandbox.outbox) == 0


# -- faults -----------------------------------------------------------------------------------------

PROVIDER_IDS = [SENDGRID, TWILIO, WHATSAPP, CUSTOM]


def _error_code(provider: str, body: Any) -> Any:
    if provider == SENDGRID:
        return body["errors"][0]["message"]
    if provider == TWILIO:
        return body["code"]
    if provider == WHATSAPP:
        return body["error"]["code"]
    return body["messages"][0]["status"]


@pytest.mark.parametrize(
    ("provider", "expected"),
    [(SENDGRID, "too many requests"), (TWILIO, 20429), (WHATSAPP, 130429), (CUSTOM, "1")],
)
async def test_rate_limit_fault(start, provider, expected) -> None:
    running = await start(faults={provider: Faults(rate_limit_count=2, retry_after_seconds=7)})
    for _ in range(2):
        resp = await running.send(provider)
        assert resp.status == 429
        if provider == SENDGRID:
            # SendGrid says when in X-RateLimit-Reset (Unix seconds) and sends no Retry-After.
            assert "Retry-After" not in resp.headers
            assert resp.headers["X-RateLimit-Remaining"] == "0"
            assert 6 <= int(resp.headers["X-RateLimit-Reset"]) - running.sandbox.clock() <= 7
        else:
            assert resp.headers["Retry-After"] == "7"
        assert _error_code(provider, await resp.json()) == expected
    assert (await running.send(provider)).status in (200, 201, 202)
    assert len(running.sandbox.outbox) == 1
    assert running.sandbox.stats.faults[f"{provider} rate_limit"] == 2


@pytest.mark.parametrize(
    ("provider", "expected"),
    [(SENDGRID, "service unavailable"), (TWILIO, 20503), (WHATSAPP, 2), (CUSTOM, "5")],
)
async def test_status_fault(start, provider, expected) -> None:
    running = await start()
    running.sandbox.set_faults(provider, status=503, status_count=-1)
    for _ in range(3):
        resp = await running.send(provider)
        assert resp.status == 503
        assert _error_code(provider, await resp.json()) == expected
    running.sandbox.set_faults(provider, status=500, status_count=1)
    assert (await running.send(provider)).status == 500
    assert (await running.send(provider)).status in (200, 201, 202)
    assert running.sandbox.stats.statuses[f"{provider} 503"] == 3


@pytest.mark.parametrize("provider", PROVIDER_IDS)
async def test_reset_fault_leaves_the_outcome_unknown(start, provider) -> None:
    running = await start(faults={provider: Faults(reset_count=1)})
    with pytest.raises(aiohttp.ClientConnectionError):
        await running.send(provider)
    # The client saw only a dropped connection, yet the provider took the message.
    [message] = running.sandbox.outbox_for(provider)
    assert message.to in ("ada@example.com", "+447700900001", "447700900001")
    assert running.sandbox.stats.resets == 1
    assert (await running.send(provider)).status in (200, 201, 202)
    assert len(running.sandbox.outbox) == 2


@pytest.mark.parametrize(
    ("provider", "status", "expected"),
    [
        (SENDGRID, 400, "Does not contain a valid address."),
        (TWILIO, 400, 21211),
        (WHATSAPP, 400, 131026),
        (CUSTOM, 200, "3"),
    ],
)
async def test_reject_to_refuses_chosen_recipients(start, provider, status, expected) -> None:
    # One set, both spellings: reject_to matches numbers by digits and emails case-insensitively.
    running = await start(faults={provider: Faults(reject_to={"+447700900001", "ADA@example.com"})})
    resp = await running.send(provider)
    assert resp.status == status
    assert _error_code(provider, await resp.json()) == expected
    others = {
        SENDGRID: mail(personalizations=[{"to": [{"email": "bo@example.com"}]}]),
        TWILIO: sms(To="+447700900002"),
        WHATSAPP: wa_text(to="447700900002"),
        CUSTOM: gateway(to="447700900002"),
    }
    resp = await running.send(provider, others[provider])
    assert resp.status in (200, 201, 202)
    [accepted] = running.sandbox.outbox  # the gateway answers 200 either way: only the outbox tells
    assert accepted.to in ("bo@example.com", "+447700900002", "447700900002")


async def test_latency_fault_delays_the_answer(start) -> None:
    running = await start(faults={TWILIO: Faults(latency_ms=400)})
    with pytest.raises(asyncio.TimeoutError):
        await running.send(TWILIO, timeout=aiohttp.ClientTimeout(total=0.1))
    assert (await running.send(SENDGRID)).status == 202  # faults are per provider
    # The client gave up, but the provider had the request and still takes the message.
    for _ in range(100):
        if running.sandbox.outbox_for(TWILIO):
            break
        await asyncio.sleep(0.02)
    assert len(running.sandbox.outbox_for(TWILIO)) == 1


async def test_admin_faults_outbox_and_stats(start) -> None:
    running = await start()
    http = running.http
    resp = await http.post("/_admin/faults/whatsapp", json={"rate_limit_count": 1, "reject_to": ["447700900009"]})
    assert resp.status == 200
    assert (await resp.json())["reject_to"] == ["447700900009"]
    assert running.sandbox.faults[WHATSAPP].rate_limit_count == 1
    assert (await http.post("/_admin/faults/ses", json={})).status == 404
    assert (await http.post("/_admin/faults/twilio", json={"bogus": 1})).status == 400
    assert (await http.post("/_admin/faults/twilio", json={"status": 200})).status == 400
    assert (
        await http.post("/_admin/faults/twilio", data=b"{", headers={"Content-Type": "application/json"})
    ).status == 400
    assert (await (await http.get("/_admin/faults")).json())[WHATSAPP]["rate_limit_count"] == 1
    assert (await http.delete("/_admin/faults")).status == 200
    assert running.sandbox.faults[WHATSAPP] == Faults()

    for to in ("+447700900001", "+447700900002", "+447700900003"):
        await running.send(TWILIO, sms(To=to))
    await running.send(SENDGRID)
    outbox = await (await http.get("/_admin/outbox", params={"provider": "twilio", "limit": "2"})).json()
    assert outbox["total"] == 3
    assert [m["to"] for m in outbox["messages"]] == ["+447700900002", "+447700900003"]
    assert outbox["messages"][0]["provider"] == TWILIO and outbox["messages"][0]["received_at"] > 0
    assert (await (await http.get("/_admin/outbox")).json())["total"] == 4
    assert (await http.get("/_admin/outbox", params={"limit": "x"})).status == 400

    stats = await (await http.get("/_admin/stats")).json()
    assert stats["requests"] == {TWILIO: 3, SENDGRID: 1}
    assert stats["accepted"] == {TWILIO: 3, SENDGRID: 1}
    assert stats["statuses"] == {"twilio 201": 3, "sendgrid 202": 1}
    assert stats["outbox"] == 4
    assert (await (await http.post("/_admin/stats/reset")).json())["requests"] == {}
    assert (await http.delete("/_admin/outbox")).status == 200
    assert len(running.sandbox.outbox) == 0
    key = await (await http.get("/_admin/sendgrid/public-key")).json()
    assert key == {"public_key": running.sandbox.sendgrid_public_key}


async def test_outbox_is_bounded(start) -> None:
    running = await start(outbox_limit=3)
    for n in range(5):
        await running.send(TWILIO, sms(Body=f"message {n}"))
    assert [m.body for m in running.sandbox.outbox] == ["message 2", "message 3", "message 4"]
    assert running.sandbox.outbox[-1].body == "message 4"
    assert [m.body for m in running.sandbox.outbox[:2]] == ["message 2", "message 3"]
    assert running.sandbox.stats.accepted[TWILIO] == 5


# -- receipts ---------------------------------------------------------------------------------------


def verify_sendgrid(public_key_b64: str, received: Received) -> None:
    key = serialization.load_der_public_key(base64.b64decode(public_key_b64))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    signature = base64.b64decode(received.headers[SENDGRID_SIGNATURE_HEADER])
    signed = received.headers[SENDGRID_TIMESTAMP_HEADER].encode() + received.body
    key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature


async def test_sendgrid_receipts_are_signed_batches(start, receiver) -> None:
    statuses = {"ada@example.com": ["processed", "delivered", "open", "click"], "bo@example.org": ["bounce"]}
    running = await start(receipts_url=receiver.base_url, receipt_script=script(statuses))
    body = mail(
        personalizations=[
            {"to": [{"email": "ada@example.com"}], "custom_args": {"message_id": "m-1"}},
            {"to": [{"email": "bo@example.org"}], "custom_args": {"message_id": "m-2"}},
        ]
    )
    resp = await running.send(SENDGRID, body)
    message_id = resp.headers["X-Message-Id"]
    await running.sandbox.drain_receipts()

    [received] = receiver.received
    assert received.url == f"{receiver.base_url}/webhooks/sendgrid/ws-1/sg-conn"
    verify_sendgrid(running.sandbox.sendgrid_public_key, received)
    events = json.loads(received.body)
    assert [(e["email"], e["event"]) for e in events] == [
        ("ada@example.com", "processed"),
        ("ada@example.com", "delivered"),
        ("ada@example.com", "open"),
        ("ada@example.com", "click"),
        ("bo@example.org", "bounce"),
    ]
    assert len({e["sg_event_id"] for e in events}) == 5
    assert all(e["sg_message_id"].split(".", 1)[0] == message_id for e in events)
    assert [e["message_id"] for e in events] == ["m-1"] * 4 + ["m-2"]  # custom_args as top-level keys
    opened, clicked, bounced = events[2], events[3], events[4]
    assert opened["ip"] and opened["useragent"]
    assert clicked["url"] == "https://brand.example/offer"
    assert (bounced["type"], bounced["status"]) == ("bounce", "5.1.1") and bounced["reason"]
    assert all(isinstance(e["timestamp"], int) for e in events)
    stats = running.sandbox.stats
    assert (stats.receipts_posted[SENDGRID], stats.receipt_events[SENDGRID]) == (1, 5)


async def test_twilio_status_callbacks_are_signed_over_the_callback_url(start, receiver) -> None:
    running = await start(receipts_url=None, receipt_script=script(["sent", "undelivered"]))
    callback = f"{receiver.base_url}/webhooks/twilio/ws-1/tw-conn?message_id=m-1&x=a%20b"
    reply = await (await running.send(TWILIO, sms(StatusCallback=callback))).json()
    await running.send(TWILIO, sms(To="+447700900002"))  # no StatusCallback: nowhere to post
    await running.sandbox.drain_receipts()

    assert [r.url for r in receiver.received] == [callback, callback]
    forms = [r.form() for r in receiver.received]
    assert [f["MessageStatus"] for f in forms] == ["sent", "undelivered"]
    for received, form in zip(receiver.received, forms, strict=True):
        assert received.headers["X-Twilio-Signature"] == twilio_signature(TWILIO_TOKEN, callback, form)
        assert received.headers["I-Twilio-Idempotency-Token"]
        assert form["MessageSid"] == form["SmsSid"] == reply["sid"]
        assert form["SmsStatus"] == form["MessageStatus"]
        assert (form["AccountSid"], form["From"], form["To"], form["ApiVersion"]) == (
            TWILIO_SID,
            "+15005550006",
            "+447700900001",
            "2010-04-01",
        )
    assert "ErrorCode" not in forms[0] and forms[1]["ErrorCode"] == "30003"
    assert running.sandbox.stats.receipts_skipped[TWILIO] == 1


async def test_whatsapp_statuses_are_signed_with_the_app_secret(start, receiver) -> None:
    statuses = {"447700900001": ["sent", "delivered", "read"], "447700900002": ["failed"]}
    running = await start(receipts_url=receiver.base_url, receipt_script=script(statuses))
    first = await (await running.send(WHATSAPP, wa_text(biz_opaque_callback_data="m-1"))).json()
    await running.send(WHATSAPP, wa_text(to="447700900002"))
    await running.sandbox.drain_receipts()

    assert len(receiver.received) == 2
    by_recipient = {}
    for received in receiver.received:
        assert received.url == f"{receiver.base_url}/webhooks/whatsapp/ws-1/wa-conn"
        assert received.headers["X-Hub-Signature-256"] == whatsapp_signature(WA_SECRET, received.body)
        payload = json.loads(received.body)
        assert payload["object"] == "whatsapp_business_account"
        [change] = payload["entry"][0]["changes"]
        assert change["field"] == "messages"
        value = change["value"]
        assert value["messaging_product"] == "whatsapp"
        assert value["metadata"]["phone_number_id"] == WA_PHONE_ID
        by_recipient[value["statuses"][0]["recipient_id"]] = value["statuses"]
    read = by_recipient["447700900001"]
    assert [s["status"] for s in read] == ["sent", "delivered", "read"]
    assert {s["id"] for s in read} == {first["messages"][0]["id"]}
    assert {s["biz_opaque_callback_data"] for s in read} == {"m-1"}
    assert all(s["timestamp"].isdigit() for s in read)
    [failed] = by_recipient["447700900002"]
    assert failed["status"] == "failed" and failed["errors"][0]["code"] == 131026
    assert "biz_opaque_callback_data" not in failed


async def test_gateway_posts_no_receipts_and_missing_url_skips(start, receiver) -> None:
    running = await start(receipt_script=script(["delivered"]))
    await running.send(CUSTOM, gateway(callback=f"{receiver.base_url}/dlr"))
    await running.send(SENDGRID)  # no receipts_url configured
    await running.sandbox.drain_receipts()
    assert receiver.received == []
    assert running.sandbox.stats.receipts_skipped == Counter({SENDGRID: 1})


async def test_failing_receiver_is_retried_then_counted(start, receiver) -> None:
    running = await start(receipts_url=receiver.base_url, receipt_script=script(["sent"]), receipt_attempts=3)
    receiver.failures = -1
    await running.send(WHATSAPP)
    await running.sandbox.drain_receipts()
    stats = running.sandbox.stats
    assert len(receiver.received) == 3
    assert (stats.receipts_failed[WHATSAPP], stats.receipt_retries[WHATSAPP], stats.receipts_posted[WHATSAPP]) == (
        1,
        2,
        0,
    )

    receiver.failures = 1  # a blip: the retry gets through
    await running.send(WHATSAPP)
    await running.sandbox.drain_receipts()
    assert (stats.receipts_failed[WHATSAPP], stats.receipts_posted[WHATSAPP]) == (1, 1)
    assert receiver.received[-1].body == receiver.received[-2].body


async def test_unreachable_receiver_is_counted_not_raised(start) -> None:
    running = await start(receipts_url="http://127.0.0.1:9", receipt_script=script(["processed"]), receipt_attempts=2)
    assert (await running.send(SENDGRID)).status == 202
    await running.sandbox.drain_receipts()
    assert running.sandbox.stats.receipts_failed[SENDGRID] == 1


async def test_reset_message_still_gets_receipts(start, receiver) -> None:
    running = await start(receipts_url=receiver.base_url, receipt_script=script(["delivered"]))
    running.sandbox.set_faults(SENDGRID, reset_count=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await running.send(SENDGRID)
    await running.sandbox.drain_receipts()
    assert [e["event"] for e in json.loads(receiver.received[0].body)] == ["delivered"]


async def test_close_cancels_pending_receipts(start, receiver) -> None:
    running = await start(receipts_url=receiver.base_url, receipt_script=script(["sent"]), receipt_delay_seconds=30)
    await running.send(WHATSAPP)
    assert running.sandbox.pending_receipts == 1
    await running.sandbox.close()
    assert running.sandbox.pending_receipts == 0
    assert receiver.received == []


def test_default_receipt_script_is_deterministic_with_the_documented_shares() -> None:
    total = 4000
    counts = {provider: Counter() for provider in (SENDGRID, TWILIO, WHATSAPP)}
    for n in range(total):
        message = OutboxMessage(SENDGRID, "x", "a@example.com", receipt_message_id=f"id-{n}")
        for provider, seen in counts.items():
            statuses = default_receipt_script(provider, message)
            assert statuses == default_receipt_script(provider, message)
            seen.update(statuses or ["nothing"])

    def share(provider: str, status: str, of: float = total) -> float:
        return counts[provider][status] / of

    email = counts[SENDGRID]
    assert abs(share(SENDGRID, "delivered") - 0.80) < 0.03
    assert abs(share(SENDGRID, "open", email["delivered"]) - 0.40) < 0.04
    assert abs(share(SENDGRID, "click", email["open"]) - 0.15) < 0.04
    assert abs(share(SENDGRID, "bounce") - 0.10) < 0.02
    assert abs(share(SENDGRID, "dropped") - 0.05) < 0.015
    assert abs(share(SENDGRID, "nothing") - 0.05) < 0.015
    assert email["processed"] == email["delivered"] + email["bounce"]
    assert abs(share(TWILIO, "delivered") - 0.80) < 0.03
    assert abs(share(TWILIO, "undelivered") - 0.10) < 0.02
    assert abs(share(TWILIO, "failed") - 0.05) < 0.015
    assert abs(share(WHATSAPP, "read", counts[WHATSAPP]["delivered"]) - 0.40) < 0.04
    assert abs(share(WHATSAPP, "failed") - 0.15) < 0.025
    assert default_receipt_script(CUSTOM, OutboxMessage(CUSTOM, "x", "447700900001")) == []


# -- specs and CLI ----------------------------------------------------------------------------------


@pytest.mark.skipif(not SPECS.is_dir(), reason="official specs not checked out beside the repository")
async def test_requests_missing_spec_required_fields_are_refused(start) -> None:
    running = await start()
    sendgrid_spec = json.loads((SPECS / "sendgrid_tsg_mail_v3.json").read_text())
    schema = sendgrid_spec["components"]["requestBodies"]["PostMailSend"]["content"]["application/json"]["schema"]
    for name in schema["required"]:
        body = mail()
        del body[name]
        assert (await running.send(SENDGRID, body)).status == 400, name
    for name in schema["properties"]["personalizations"]["items"]["required"]:
        body = mail()
        del body["personalizations"][0][name]
        assert (await running.send(SENDGRID, body)).status == 400, name
    assert schema["properties"]["personalizations"]["maxItems"] == 1000

    twilio_spec = json.loads((SPECS / "twilio_api_v2010_messages_only.json").read_text())
    operation = twilio_spec["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["post"]
    form_schema = operation["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    for name in form_schema["required"]:
        assert (await running.send(TWILIO, {k: v for k, v in sms().items() if k != name})).status == 400, name
    # x-twilio "conditional": one of each group is needed (ContentSid is not modelled by the sandbox).
    assert operation["x-twilio"]["conditional"] == [
        ["from", "messaging_service_sid"],
        ["body", "media_url", "content_sid"],
    ]
    assert (await running.send(TWILIO, {"To": "+447700900001", "Body": "x"})).status == 400
    assert (await running.send(TWILIO, {"To": "+447700900001", "From": "+15005550006"})).status == 400
    assert operation["parameters"][0]["schema"]["pattern"] == "^AC[0-9a-fA-F]{32}$"


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--receipts-url",
        "--sendgrid-key",
        "--twilio-auth-token",
        "--whatsapp-app-secret",
        "--custom-api-key",
    ):
        assert option in out


def test_accounts_are_checked() -> None:
    with pytest.raises(ValueError):
        ProviderAccount(TWILIO, "AC123", secret="t")
    with pytest.raises(ValueError):
        ProviderAccount(WHATSAPP, WA_PHONE_ID, secret=WA_SECRET)  # no access token
    with pytest.raises(ValueError):
        ProviderSandbox([*accounts(), ProviderAccount(SENDGRID, SG_KEY)])
