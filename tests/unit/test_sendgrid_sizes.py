"""SendGrid requests kept under its size limit: split before sending, halved on a 413, one message too
large failing alone. Against an in-process Mail Send endpoint that answers 413 over a size it is given."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.json_documents import dump
from services.dispatcher.connectors import sendgrid
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.sendgrid import MAX_REQUEST_BYTES, MAX_SPLITS, SPLIT_SHARE, SendGridConnector
from services.dispatcher.rendering import ContentTemplates

API_KEY = "SG.canary-key-0413"
LIMIT = 6_000  # small enough that a few dozen personalizations are over it
SPLIT = int(LIMIT * SPLIT_SHARE)


def message(i: int, *, text: str = "Hello", html: str = "<p>Hello</p>") -> OutboundMessage:
    return OutboundMessage(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="spring-sale",
        campaign_instance_id="inst-7",
        to=f"customer{i}@mail.example.org",
        subject="Spring sale",
        text_body=text,
        html_body=html,
    )


@dataclass
class MailSend:
    """Answers 202, or 413 for a body of `limit` bytes or more, for more than `most` personalizations and for
    the next `forced` requests."""

    limit: int | None = None
    most: int | None = None
    forced: int = 0
    status: int = 202
    sizes: list[int] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def answer(self, body: bytes) -> int:
        if self.forced:
            self.forced -= 1
            return 413
        if self.limit is not None and len(body) >= self.limit:
            return 413
        if self.most is not None and len(json.loads(body)["personalizations"]) > self.most:
            return 413
        return self.status


@pytest.fixture
async def mail_send() -> AsyncIterator[tuple[str, MailSend]]:
    state = MailSend()

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        state.sizes.append(len(body))
        state.payloads.append(json.loads(body))
        status = state.answer(body)
        state.statuses.append(status)
        if status == 413:
            return web.json_response({"errors": [{"message": "content too large", "field": None}]}, status=413)
        if status == 401:
            return web.json_response({"errors": [{"message": "invalid key", "field": None}]}, status=401)
        return web.Response(status=status, headers={"X-Message-Id": "14c5d75ce93.dfd.64b469"})

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


def connector(base_url: str, http: aiohttp.ClientSession, max_request_bytes: int = LIMIT) -> SendGridConnector:
    return SendGridConnector(
        api_key=API_KEY,
        sender="news@brand.example.com",
        http=http,
        retry=RetryPolicy(max_retries=0),
        base_url=base_url,
        sleep=no_sleep,
        max_request_bytes=max_request_bytes,
    )


def sent_ids(state: MailSend) -> list[str]:
    """Message IDs of the accepted requests' personalizations, in the order sent."""
    return [
        p["custom_args"]["tokensend_message_id"]
        for payload, status in zip(state.payloads, state.statuses, strict=True)
        if status == 202
        for p in payload["personalizations"]
    ]


def test_the_default_limit_is_sendgrid_s_documented_30mb() -> None:
    assert MAX_REQUEST_BYTES == 30_000_000 and 0 < SPLIT_SHARE < 1


async def test_a_request_under_the_limit_is_serialized_once_and_sent_whole(mail_send, http, monkeypatch) -> None:
    base_url, state = mail_send
    dumps: list[int] = []

    def counted(value: Any) -> bytes:
        dumps.append(1)
        return dump(value)

    monkeypatch.setattr(sendgrid, "dump", counted)
    outcomes = await connector(base_url, http, MAX_REQUEST_BYTES).send([message(i) for i in range(1000)])
    assert {o.status for o in outcomes} == {SendStatus.SENT}
    assert len(state.payloads) == 1 and len(dumps) == 1


async def test_an_over_limit_group_goes_in_requests_under_the_split_size_in_order(mail_send, http) -> None:
    base_url, state = mail_send
    messages = [message(i) for i in range(120)]
    outcomes = await connector(base_url, http).send(messages)
    assert [o.message_id for o in outcomes] == [m.message_id for m in messages]
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 120
    assert len(state.payloads) > 1 and max(state.sizes) <= SPLIT
    assert sent_ids(state) == [m.message_id for m in messages]  # each once, in order
    # Content is the same in each part, and each part is as full as the split size allows.
    assert {json.dumps(p["content"]) for p in state.payloads} == {json.dumps(state.payloads[0]["content"])}
    for size, following in zip(state.sizes, state.payloads[1:], strict=False):
        assert size + 1 + len(dump(following["personalizations"][0])) > SPLIT


async def test_a_pattern_group_split_keeps_the_pattern_in_every_part(mail_send, http) -> None:
    base_url, state = mail_send
    templates = ContentTemplates(pb.Content(subject="{{ first_name }}, 20% off", text_body="Dear {{ first_name }}"))
    messages = []
    for i in range(80):
        rendered = templates.render({"first_name": f"Name{i}"}, {})
        sent = message(i, text=rendered.text_body, html="")
        sent.subject, sent.pattern, sent.substitutions = rendered.subject, rendered.pattern, rendered.substitutions
        messages.append(sent)
    outcomes = await connector(base_url, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 80
    assert len(state.payloads) > 1 and max(state.sizes) <= SPLIT
    assert {p["subject"] for p in state.payloads} == {templates.pattern.subject}
    assert all("substitutions" in p for payload in state.payloads for p in payload["personalizations"])
    assert sent_ids(state) == [m.message_id for m in messages]


async def test_a_message_too_large_alone_fails_alone_without_a_request(mail_send, http) -> None:
    base_url, state = mail_send
    secret = "Dear Jade Evans, " * 400  # over the limit on its own
    messages = [message(0), message(1, text=secret, html=""), message(2)]
    outcomes = await connector(base_url, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT, SendStatus.FAILED, SendStatus.SENT]
    failed = outcomes[1]
    assert (failed.error_code, failed.attempts) == ("INVALID_MESSAGE", 0)
    assert f"and sendgrid takes less than {LIMIT}; not sent" in failed.error_message
    assert "Jade" not in failed.error_message and messages[1].to not in failed.error_message
    assert len(state.payloads) == 1 and all(p["content"][0]["value"] == "Hello" for p in state.payloads)


async def test_content_too_large_for_any_request_fails_each_message_without_a_request(mail_send, http) -> None:
    base_url, state = mail_send
    messages = [message(i, html="<p>" + "x" * LIMIT + "</p>") for i in range(5)]
    outcomes = await connector(base_url, http).send(messages)
    assert {(o.status, o.error_code, o.attempts) for o in outcomes} == {(SendStatus.FAILED, "INVALID_MESSAGE", 0)}
    assert state.payloads == []


async def test_a_message_between_the_split_size_and_the_limit_goes_alone(mail_send, http) -> None:
    base_url, state = mail_send
    near = message(1, html="<p>" + "x" * (SPLIT - 300) + "</p>", text="")
    outcomes = await connector(base_url, http).send([near])
    assert outcomes[0].status is SendStatus.SENT
    assert SPLIT < state.sizes[0] < LIMIT


async def test_a_forced_413_is_sent_again_in_halves(mail_send, http) -> None:
    base_url, state = mail_send
    state.forced = 1
    messages = [message(i) for i in range(11)]
    outcomes = await connector(base_url, http, MAX_REQUEST_BYTES).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 11
    # One recipient alone first (is the shared content what is too large?), then the rest in halves.
    assert [len(p["personalizations"]) for p in state.payloads] == [11, 1, 5, 5]
    assert state.statuses == [413, 202, 202, 202]
    assert sent_ids(state) == [m.message_id for m in messages]


async def test_a_413_below_our_limit_is_halved_until_the_parts_fit(mail_send, http) -> None:
    """SendGrid's limit lower than ours: halves, then quarters ..., outcomes still one per message, in order."""
    base_url, state = mail_send
    state.limit = 2_000
    messages = [message(i) for i in range(40)]
    outcomes = await connector(base_url, http, MAX_REQUEST_BYTES).send(messages)
    assert [o.message_id for o in outcomes] == [m.message_id for m in messages]
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 40
    assert sent_ids(state) == [m.message_id for m in messages]
    assert all(size < 2_000 for size, status in zip(state.sizes, state.statuses, strict=True) if status == 202)


async def test_a_413_for_a_single_personalization_fails_that_message(mail_send, http) -> None:
    base_url, state = mail_send
    state.limit = 800
    messages = [message(0), message(1, text="y" * 900), message(2)]
    outcomes = await connector(base_url, http, MAX_REQUEST_BYTES).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT, SendStatus.FAILED, SendStatus.SENT]
    failed = outcomes[1]
    assert (failed.error_code, failed.attempts) == ("INVALID_MESSAGE", 1)
    assert "as too large (HTTP 413)" in failed.error_message and "y" * 10 not in failed.error_message


async def test_halving_is_bounded(mail_send, http, monkeypatch) -> None:
    """A peer that takes one personalization a request and no more: two halvings, then what is left fails
    as SendGrid answered."""
    base_url, state = mail_send
    state.most = 1
    monkeypatch.setattr(sendgrid, "MAX_SPLITS", 2)
    outcomes = await connector(base_url, http, MAX_REQUEST_BYTES).send([message(i) for i in range(8)])
    assert [len(p["personalizations"]) for p in state.payloads] == [8, 1, 4, 1, 2, 1, 3, 1, 1, 1]
    assert [o.error_code for o in outcomes] == ["", "", "HTTP_413", "HTTP_413", "", "", "", ""]
    assert MAX_SPLITS >= (1000 - 1).bit_length()  # the default reaches one personalization from 1,000


async def test_content_too_large_with_one_recipient_fails_the_rest_without_a_request(mail_send, http) -> None:
    """A proxy with a smaller limit, or HTML too large whoever it goes to: one request with one recipient
    tells, not 2n-1 requests halving down to one each."""
    base_url, state = mail_send
    state.limit = 0
    outcomes = await connector(base_url, http, MAX_REQUEST_BYTES).send([message(i) for i in range(64)])
    assert [len(p["personalizations"]) for p in state.payloads] == [64, 1]
    assert {o.error_code for o in outcomes} == {"INVALID_MESSAGE"}
    assert outcomes[0].attempts == 1 and "as too large (HTTP 413)" in outcomes[0].error_message
    assert {o.attempts for o in outcomes[1:]} == {0}
    assert all(o.error_message.startswith("not attempted: ") for o in outcomes[1:])


async def test_a_refused_account_in_one_part_leaves_the_later_parts_unsent(mail_send, http) -> None:
    base_url, state = mail_send
    state.status = 401
    outcomes = await connector(base_url, http).send([message(i) for i in range(120)])
    assert len(state.payloads) == 1
    assert {(o.status, o.error_code) for o in outcomes} == {(SendStatus.FAILED, "PROVIDER_AUTH_FAILED")}
    sent = len(state.payloads[0]["personalizations"])
    assert [o.attempts for o in outcomes] == [1] * sent + [0] * (120 - sent)
