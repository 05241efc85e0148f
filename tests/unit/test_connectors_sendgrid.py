"""Unit tests for SendGrid grouping and batching against an in-process Mail Send endpoint."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.sendgrid import SendGridConnector, content_groups

API_KEY = "SG.canary-key-0042"


def message(
    i: int, *, subject: str = "Spring sale", text: str = "Hello", html: str = "<p>Hello</p>"
) -> OutboundMessage:
    return OutboundMessage(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="spring/2025 launch",
        campaign_instance_id="inst-7",
        to=f"customer{i}@mail.example.org",
        subject=subject,
        text_body=text,
        html_body=html,
        headers={"List-Unsubscribe": "<https://brand.example.com/u>"},
    )


@dataclass
class MailSend:
    payloads: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    status: int = 202
    message_id: str | None = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"
    body: str = ""


@pytest.fixture
async def mail_send() -> AsyncIterator[tuple[str, MailSend]]:
    state = MailSend()

    async def handle(request: web.Request) -> web.Response:
        state.payloads.append(await request.json())
        state.authorizations.append(request.headers.get("Authorization", ""))
        headers = {"X-Message-Id": state.message_id} if state.message_id else {}
        return web.Response(status=state.status, text=state.body, headers=headers)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v3/mail/send", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), state
    await server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def no_sleep(_: float) -> None:
    return None


def connector(base_url: str, http: aiohttp.ClientSession) -> SendGridConnector:
    return SendGridConnector(
        api_key=API_KEY,
        sender="news@brand.example.com",
        http=http,
        retry=RetryPolicy(),
        base_url=base_url,
        sleep=no_sleep,
    )


async def test_2500_identical_messages_go_in_three_requests(mail_send, http) -> None:
    base_url, state = mail_send
    messages = [message(i) for i in range(2500)]
    outcomes = await connector(base_url, http).send(messages)
    assert sorted(len(p["personalizations"]) for p in state.payloads) == [500, 1000, 1000]
    assert [o.message_id for o in outcomes] == [m.message_id for m in messages]
    assert all(o.status is SendStatus.SENT for o in outcomes)
    sent_to = [p["to"][0]["email"] for payload in state.payloads for p in payload["personalizations"]]
    assert sorted(sent_to) == sorted(m.to for m in messages)


async def test_distinct_content_goes_in_separate_requests(mail_send, http) -> None:
    base_url, state = mail_send
    messages = [
        message(0, text="Hi Ann"),
        message(1, text="Hi Bob"),
        message(2, text="Hi Ann"),
        message(3, subject="B"),
    ]
    outcomes = await connector(base_url, http).send(messages)
    assert len(state.payloads) == 3
    by_text = {(p["subject"], p["content"][0]["value"]): p for p in state.payloads}
    assert len(by_text[("Spring sale", "Hi Ann")]["personalizations"]) == 2
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 4


def test_grouping_keeps_order_and_caps_groups() -> None:
    messages = [message(i, text="A" if i % 2 else "B") for i in range(2003)]
    groups = list(content_groups(messages))
    assert sorted(len(g) for g in groups) == [1, 2, 1000, 1000]
    assert sorted(i for g in groups for i in g) == list(range(2003))
    assert all(g == sorted(g) for g in groups)


async def test_request_shape(mail_send, http) -> None:
    base_url, state = mail_send
    await connector(base_url, http).send([message(1)])
    (payload,) = state.payloads
    assert payload == {
        "personalizations": [
            {
                "to": [{"email": "customer1@mail.example.org"}],
                "custom_args": {
                    "tokensend_message_id": f"{1:032x}",
                    "tokensend_campaign": "spring/2025 launch",
                    "tokensend_instance": "inst-7",
                },
                "headers": {"List-Unsubscribe": "<https://brand.example.com/u>"},
            }
        ],
        "from": {"email": "news@brand.example.com"},
        "subject": "Spring sale",
        "content": [{"type": "text/plain", "value": "Hello"}, {"type": "text/html", "value": "<p>Hello</p>"}],
    }
    assert state.authorizations == [f"Bearer {API_KEY}"]


async def test_reserved_headers_are_dropped(mail_send, http) -> None:
    base_url, state = mail_send
    m = message(1)
    m.headers.update({"Bcc": "spy@example.com", "Content-Type": "text/plain"})
    await connector(base_url, http).send([m])
    assert state.payloads[0]["personalizations"][0]["headers"] == {"List-Unsubscribe": "<https://brand.example.com/u>"}


async def test_html_only_and_text_only_content(mail_send, http) -> None:
    base_url, state = mail_send
    await connector(base_url, http).send([message(1, text=""), message(2, html="")])
    contents = sorted((p["content"] for p in state.payloads), key=lambda c: c[0]["type"])
    assert contents == [[{"type": "text/html", "value": "<p>Hello</p>"}], [{"type": "text/plain", "value": "Hello"}]]


async def test_a_message_without_body_fails_without_a_request(mail_send, http) -> None:
    base_url, state = mail_send
    (outcome,) = await connector(base_url, http).send([message(1, text="", html="")])
    assert outcome.status is SendStatus.FAILED and outcome.error_code == "INVALID_MESSAGE"
    assert state.payloads == []


async def test_x_message_id_only_for_a_single_personalization(mail_send, http) -> None:
    base_url, state = mail_send
    (single,) = await connector(base_url, http).send([message(1)])
    assert single.provider_message_id == state.message_id
    pair = await connector(base_url, http).send([message(2), message(3)])
    assert [o.provider_message_id for o in pair] == ["", ""]


async def test_missing_x_message_id_is_still_sent(mail_send, http) -> None:
    base_url, state = mail_send
    state.message_id = None
    (outcome,) = await connector(base_url, http).send([message(1)])
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == ""


async def test_errors_quote_neither_the_addresses_nor_the_body(mail_send, http) -> None:
    base_url, state = mail_send
    state.status = 400
    state.body = json.dumps({"errors": [{"message": "Invalid email customer1@mail.example.org", "field": "to"}]})
    outcomes = await connector(base_url, http).send([message(1), message(2)])
    for outcome in outcomes:
        assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "HTTP_400")
        assert "@" not in outcome.error_message and "Invalid email" not in outcome.error_message
        assert API_KEY not in outcome.error_message
