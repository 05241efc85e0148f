"""Unit tests for SendGrid grouping and batching against an in-process Mail Send endpoint."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from sandbox.providers.sendgrid import substitute
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import HttpReply, RetryPolicy
from services.dispatcher.connectors.sendgrid import (
    CONCURRENT_REQUESTS,
    MAX_SUBSTITUTION_BYTES,
    SendGridConnector,
    content_groups,
    rate_limit_wait,
    refused_personalizations,
)
from services.dispatcher.rendering import ContentTemplates

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
    groups = [indexes for indexes, pattern in content_groups(messages) if pattern is None]
    assert sorted(len(g) for g in groups) == [1, 2, 1000, 1000]
    assert sorted(i for g in groups for i in g) == list(range(2003))
    assert all(g == sorted(g) for g in groups)


GREETING = ContentTemplates(
    pb.Content(
        subject="{{ first_name }}, our spring sale",
        html_body="<p>Dear {{ first_name }} {{ last_name }},</p><p>{{ recipient.tier }} prices inside.</p>",
        text_body="Dear {{ first_name }} {{ last_name }}, {{ recipient.tier }} prices inside.",
    )
)


def named(i: int, first: str, last: str = "Evans", templates: ContentTemplates = GREETING) -> OutboundMessage:
    """A message rendered as the dispatcher renders it, with its pattern and substitutions."""
    rendered = templates.render({"first_name": first, "last_name": last}, {"tier": "gold"})
    base = message(i, subject=rendered.subject, text=rendered.text_body, html=rendered.html_body)
    base.pattern, base.substitutions = rendered.pattern, rendered.substitutions
    return base


async def test_personalised_messages_of_one_pattern_share_a_request(mail_send, http) -> None:
    base_url, state = mail_send
    names = ["Jade", "Ben", "Zoë", "A&B <x>", "Jade"]
    messages = [named(i, name) for i, name in enumerate(names)]
    outcomes = await connector(base_url, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 5
    (payload,) = state.payloads
    pattern = GREETING.pattern
    assert payload["subject"] == pattern.subject
    assert payload["content"] == [
        {"type": "text/plain", "value": pattern.text_body},
        {"type": "text/html", "value": pattern.html_body},
    ]
    # What SendGrid makes of each personalization is what the recipient's own render was.
    for personalization, sent in zip(payload["personalizations"], messages, strict=True):
        values = personalization["substitutions"]
        assert personalization["to"] == [{"email": sent.to}]
        assert substitute(payload["subject"], values) == sent.subject
        assert substitute(payload["content"][0]["value"], values) == sent.text_body
        assert substitute(payload["content"][1]["value"], values) == sent.html_body
    assert "A&amp;B &lt;x&gt;" in substitute(pattern.html_body, payload["personalizations"][3]["substitutions"])


async def test_one_content_goes_as_it_is_without_substitutions(mail_send, http) -> None:
    base_url, state = mail_send
    await connector(base_url, http).send([named(i, "Jade") for i in range(3)])
    (payload,) = state.payloads
    assert payload["subject"] == "Jade, our spring sale"
    assert all("substitutions" not in p for p in payload["personalizations"])


async def test_messages_that_cannot_substitute_get_requests_of_their_own(mail_send, http) -> None:
    base_url, state = mail_send
    too_long = named(2, "Kim", last="x" * MAX_SUBSTITUTION_BYTES)  # the subject holds only the first name
    messages = [named(0, "Jade"), named(1, "Ben"), too_long, named(3, "[ts:0]"), named(4, "Ann", last="")]
    assert messages[3].substitutions is None  # a value that looks like a tag: no pattern for it
    outcomes = await connector(base_url, http).send(messages)
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 5
    (shared,) = [p for p in state.payloads if len(p["personalizations"]) == 3]
    assert [p["substitutions"]["[ts:0]"] for p in shared["personalizations"]] == ["Jade", "Ben", "Ann"]
    alone = [p for p in state.payloads if len(p["personalizations"]) == 1]
    assert len(alone) == 2 and len(state.payloads) == 3
    assert {p["personalizations"][0]["to"][0]["email"] for p in alone} == {too_long.to, messages[3].to}
    assert all("substitutions" not in p["personalizations"][0] for p in alone)
    sent = {p["personalizations"][0]["to"][0]["email"]: p for p in alone}
    for m in (too_long, messages[3]):  # each with its own rendered content
        assert (sent[m.to]["subject"], sent[m.to]["content"][0]["value"]) == (m.subject, m.text_body)


async def test_a_part_that_renders_empty_is_not_sent_as_a_tag(mail_send, http) -> None:
    base_url, state = mail_send
    templates = ContentTemplates(pb.Content(subject="Sale", html_body="<p>Sale</p>", text_body="{{ first_name }}"))
    messages = [named(0, "Jade", templates=templates), named(1, "", templates=templates)]
    messages.append(named(2, "Ben", templates=templates))
    await connector(base_url, http).send(messages)
    by_size = sorted(state.payloads, key=lambda p: len(p["personalizations"]))
    assert [len(p["personalizations"]) for p in by_size] == [1, 2]
    assert by_size[0]["content"] == [{"type": "text/html", "value": "<p>Sale</p>"}]
    assert by_size[1]["content"][0] == {"type": "text/plain", "value": "[ts:0]"}


def test_a_pattern_group_is_capped_at_1000() -> None:
    messages = [named(i, f"Name{i}") for i in range(2300)]
    groups = list(content_groups(messages))
    assert [len(indexes) for indexes, _ in groups] == [1000, 1000, 300]
    assert all(pattern is GREETING.pattern for _, pattern in groups)


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


async def test_outputs_with_filters_are_substituted_too(mail_send, http) -> None:
    base_url, state = mail_send
    templates = ContentTemplates(
        pb.Content(
            subject="{{ first_name | default('Friend', true) | title }}, our sale",
            text_body="Hi {{ first_name | default('there', true) }}",
            html_body="<p>Hi {{ first_name | default('there', true) }} {{ 'VIP' if recipient.tier == 'gold' }}</p>",
        )
    )
    messages = [named(i, name, templates=templates) for i, name in enumerate(["jade", "", "A&B"])]
    await connector(base_url, http).send(messages)
    (payload,) = state.payloads
    for personalization, sent in zip(payload["personalizations"], messages, strict=True):
        values = personalization["substitutions"]
        assert substitute(payload["subject"], values) == sent.subject
        assert substitute(payload["content"][0]["value"], values) == sent.text_body
        assert substitute(payload["content"][1]["value"], values) == sent.html_body
    assert [m.subject for m in messages] == ["Jade, our sale", "Friend, our sale", "A&b, our sale"]  # `title`
    assert messages[2].html_body == "<p>Hi A&amp;B VIP</p>"


@pytest.mark.parametrize(
    ("errors", "named"),
    [
        ([{"field": "personalizations.3.to.0.email"}, {"field": "personalizations.7.to"}], {3: "to", 7: "to"}),
        (
            [{"field": "personalizations.2.headers"}, {"field": "personalizations.5.custom_args"}],
            {2: "headers", 5: "custom_args"},
        ),
        # An address field named beside another of the same personalization: the address decides.
        ([{"field": "personalizations.4.headers"}, {"field": "personalizations.4.to.0.email"}], {4: "to"}),
        # After the index, only a field's name is repeated; anything else reads as the address.
        ([{"field": "personalizations.1.jane@example.com"}], {1: ""}),
        ([{"field": "personalizations.3.to.0.email"}, {"field": "subject"}], None),  # the request as a whole
        ([{"field": None, "message": "Bad Request"}], None),
        ([], None),
    ],
)
def test_a_400_names_the_personalizations_it_refused_or_none(errors, named) -> None:
    reply = HttpReply(400, {}, json.dumps({"errors": errors}).encode())
    assert refused_personalizations(reply) == named
    assert refused_personalizations(HttpReply(413, {}, reply.body)) is None


@pytest.mark.parametrize("count", [1, 2])
async def test_a_request_whose_every_recipient_is_refused_fails_each_as_an_invalid_address(
    mail_send, http, count: int
) -> None:
    """A request of one recipient (a personalised message goes alone), or one whose every
    personalization SendGrid names, fails as a refused address does beside others: INVALID_ADDRESS,
    not a refusal of the request as a whole, and nothing is sent again."""
    base_url, state = mail_send
    state.status, state.message_id = 400, None
    errors = [
        {"message": "Does not contain a valid address.", "field": f"personalizations.{i}.to.0.email"}
        for i in range(count)
    ]
    state.body = json.dumps({"errors": errors})
    outcomes = await connector(base_url, http).send([message(i) for i in range(count)])
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [
        (SendStatus.FAILED, "INVALID_ADDRESS", 1)
    ] * count
    assert len(state.payloads) == 1
    assert all(o.error_message == "sendgrid refused this recipient's address (HTTP 400)" for o in outcomes)
    assert not any(o.account_refused for o in outcomes)


async def test_a_400_naming_another_field_of_a_personalization_says_which_and_sends_the_rest(
    http,
) -> None:
    """SendGrid names a personalization's headers (or its substitutions, its custom_args), not its
    address: that message fails naming the field, the request goes again without it, the rest are sent."""
    payloads: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        payloads.append(await request.json())
        if len(payloads) == 1:
            errors = [{"message": "Invalid type.", "field": "personalizations.1.headers"}]
            return web.json_response({"errors": errors}, status=400)
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/v3/mail/send", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        outcomes = await connector(str(server.make_url("")).rstrip("/"), http).send([message(i) for i in range(3)])
    finally:
        await server.close()
    assert [(o.status, o.error_code) for o in outcomes] == [
        (SendStatus.SENT, ""),
        (SendStatus.FAILED, "INVALID_MESSAGE"),
        (SendStatus.SENT, ""),
    ]
    assert outcomes[1].error_message == (
        "sendgrid refused this message's personalizations[].headers (HTTP 400); "
        "the request's other recipients were sent again without it"
    )
    assert [len(p["personalizations"]) for p in payloads] == [3, 2]


async def test_a_lone_message_whose_headers_sendgrid_refuses_fails_naming_them(mail_send, http) -> None:
    base_url, state = mail_send
    state.status, state.message_id = 400, None
    state.body = json.dumps({"errors": [{"message": "Invalid type.", "field": "personalizations.0.headers"}]})
    (outcome,) = await connector(base_url, http).send([message(0)])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "INVALID_MESSAGE", 1)
    assert outcome.error_message == "sendgrid refused this message's personalizations[].headers (HTTP 400)"


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (429, {"X-RateLimit-Reset": "1000007"}, 7.0),  # the Unix time the limit resets
        (429, {"X-RateLimit-Reset": "1000007", "Retry-After": "3"}, 3.0),  # Retry-After when given
        (429, {"X-RateLimit-Reset": "1000007", "Retry-After": "0"}, 7.0),  # a Retry-After of no wait says nothing
        (429, {"X-RateLimit-Reset": "999990"}, None),  # already past (clocks differ): backoff
        (429, {"X-RateLimit-Reset": "soon"}, None),
        (429, {}, None),
        (500, {"X-RateLimit-Reset": "1000007"}, None),  # on every reply: only a 429 means wait for it
    ],
)
def test_rate_limit_wait_reads_sendgrid_s_reset_time(status, headers, wait) -> None:
    assert rate_limit_wait(HttpReply(status, headers), clock=lambda: 1_000_000.0) == wait


async def test_a_429_waits_until_the_limit_resets(http) -> None:
    replies = [429, 202]
    sleeps: list[float] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        reset = str(int(time.time()) + 4)
        return web.Response(status=replies.pop(0), headers={"X-RateLimit-Reset": reset, "X-Message-Id": "m1"})

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    app = web.Application()
    app.router.add_post("/v3/mail/send", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        sendgrid = SendGridConnector(
            api_key=API_KEY,
            sender="news@brand.example.com",
            http=http,
            retry=RetryPolicy(),
            base_url=str(server.make_url("")).rstrip("/"),
            sleep=sleep,
        )
        [outcome] = await sendgrid.send([message(1)])
    finally:
        await server.close()
    assert outcome.status is SendStatus.SENT and outcome.attempts == 2
    assert len(sleeps) == 1 and 2.5 < sleeps[0] <= 4.0


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_account_leaves_the_requests_not_yet_started_unsent(mail_send, http, status: int) -> None:
    """Twelve contents, twelve requests, eight at a time: the first eight are all refused (a revoked
    key, a sender not verified), and the four that would have followed are not sent to meet it too."""
    base_url, state = mail_send
    state.status, state.message_id = status, None
    state.body = json.dumps({"errors": [{"message": "The provided authorization grant is invalid", "field": None}]})
    messages = [message(i, text=f"Hello {i}") for i in range(12)]
    outcomes = await connector(base_url, http).send(messages)
    assert len(state.payloads) == CONCURRENT_REQUESTS
    assert {(o.status, o.error_code) for o in outcomes} == {(SendStatus.FAILED, "PROVIDER_AUTH_FAILED")}
    unsent = [o for o in outcomes if o.attempts == 0]
    assert len(unsent) == 12 - CONCURRENT_REQUESTS
    assert all(o.error_message.startswith("not attempted: an earlier message") for o in unsent)


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (401, "sendgrid refused the API key (HTTP 401); not retried: check the connector's API key"),
        (
            403,
            "sendgrid refused the API key's permissions or the sender (HTTP 403); not retried: the key needs the "
            "Mail Send permission, and the connector's from address a verified sender identity",
        ),
    ],
)
async def test_a_refused_key_or_sender_fails_provider_auth_failed(mail_send, http, status: int, text: str) -> None:
    base_url, state = mail_send
    state.status, state.message_id = status, None
    state.body = json.dumps({"errors": [{"message": "access forbidden", "field": None, "help": None}]})
    (outcome,) = await connector(base_url, http).send([message(1)])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1)
    assert outcome.error_message == text and outcome.account_refused
    assert API_KEY not in outcome.error_message


async def test_a_sender_not_verified_fails_sender_refused_and_stops_the_batch(mail_send, http) -> None:
    """SendGrid's 403 naming the from field is about the connector's sender, not the key's permissions."""
    base_url, state = mail_send
    state.status, state.message_id = 403, None
    state.body = json.dumps(
        {
            "errors": [
                {
                    "message": "The from address does not match a verified Sender Identity. Mail cannot be sent "
                    "until this error is resolved.",
                    "field": "from",
                    "help": "https://sendgrid.com/docs/for-developers/sending-email/sender-identity/",
                }
            ]
        }
    )
    outcomes = await connector(base_url, http).send([message(i, text=f"Hello {i}") for i in range(12)])
    assert {(o.status, o.error_code) for o in outcomes} == {(SendStatus.FAILED, "SENDER_REFUSED")}
    assert outcomes[0].error_message == (
        "sendgrid refused the connector's sender: its from address is not a verified sender identity (HTTP 403); "
        "not retried: verify it in SendGrid or fix the connector's sender, then re-run the instance"
    )
    assert outcomes[0].account_refused and len(state.payloads) == CONCURRENT_REQUESTS


@pytest.mark.parametrize(
    "errors", [[{"message": "Maximum credits exceeded", "field": None, "help": None}], ["Maximum credits exceeded"]]
)
async def test_used_up_credits_fail_quota_exceeded(mail_send, http, errors: list[object]) -> None:
    """SendGrid answers a plan's used-up credits with a 401 too; no new API key helps, only the credits'
    renewal or a larger plan. The requests not yet started are not sent to meet it."""
    base_url, state = mail_send
    state.status, state.message_id = 401, None
    state.body = json.dumps({"errors": errors})
    outcomes = await connector(base_url, http).send([message(i, text=f"Hello {i}") for i in range(12)])
    assert {(o.status, o.error_code) for o in outcomes} == {(SendStatus.FAILED, "QUOTA_EXCEEDED")}
    assert outcomes[0].error_message == (
        "sendgrid's credits are used up (HTTP 401, Maximum credits exceeded); "
        "not retried: re-run the instance once the plan's credits renew, or raise the plan"
    )
    assert len(state.payloads) == CONCURRENT_REQUESTS


@pytest.mark.parametrize(
    ("status", "requests", "expected"), [(504, 1, SendStatus.OUTCOME_UNKNOWN), (503, 4, SendStatus.FAILED)]
)
async def test_a_gateway_timeout_is_never_resent_while_a_503_is_tried_again(
    mail_send, http, status, requests, expected
):
    """A 504 comes from a gateway that passed the request on: SendGrid may have taken the 1,000 messages."""
    base_url, state = mail_send
    state.status = status
    outcomes = await connector(base_url, http).send([message(i) for i in range(3)])
    assert len(state.payloads) == requests
    assert {o.status for o in outcomes} == {expected}
