"""The WhatsApp Cloud connector against a local Graph API stand-in (Meta publishes no spec to mock from).

The stand-in checks what Meta documents: the path, the bearer token and the JSON
shape; it answers with Meta's reply and error formats.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.dispatcher.connectors.base import OutboundMessage, SendStatus, WhatsAppTemplateContent
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.message_client import MessageClient
from services.dispatcher.connectors.whatsapp import WhatsAppCloudConnector

pytestmark = pytest.mark.integration

TOKEN = "EAAG-canary-access-token"
PHONE_NUMBER_ID = "106540352242922"
PHONE = "+16505076520"
WAMID_WITH_NUMBER = "wamid.HBgLMTY1MDUwNzY1MjAVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"


@dataclass
class GraphApi:
    replies: list[Callable[[], web.Response]]
    requests: list[dict[str, Any]] = field(default_factory=list)


def accepted(wamid: str = "wamid.opaque-id-0001") -> Callable[[], web.Response]:
    return lambda: web.json_response(
        {
            "messaging_product": "whatsapp",
            "contacts": [{"input": PHONE, "wa_id": PHONE[1:]}],
            "messages": [{"id": wamid}],
        }
    )


def meta_error(status: int, code: int, **headers: str) -> Callable[[], web.Response]:
    body = {
        "error": {
            "message": f"(#{code}) Message undeliverable to {PHONE}",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": f"recipient {PHONE} is not on WhatsApp"},
            "fbtrace_id": "AbCdEf",
        }
    }
    return lambda: web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def graph() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(*replies: Callable[[], web.Response]) -> tuple[str, GraphApi]:
        api = GraphApi(list(replies) or [accepted()])

        async def messages(request: web.Request) -> web.Response:
            api.requests.append(
                {
                    "path": request.path,
                    "authorization": request.headers.get("Authorization"),
                    "content_type": request.content_type,
                    "json": await request.json(),
                }
            )
            return api.replies[min(len(api.requests), len(api.replies)) - 1]()

        app = web.Application()
        app.router.add_post("/v21.0/{phone_number_id}/messages", messages)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/v21.0")), api

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def http(provider_http: aiohttp.ClientSession | MessageClient) -> aiohttp.ClientSession | MessageClient:
    return provider_http


async def no_sleep(_: float) -> None:
    return None


def whatsapp(base_url: str, http: aiohttp.ClientSession | MessageClient) -> WhatsAppCloudConnector:
    return WhatsAppCloudConnector(
        access_token=TOKEN,
        phone_number_id=PHONE_NUMBER_ID,
        http=http,
        retry=RetryPolicy(),
        base_url=base_url,
        sleep=no_sleep,
    )


def message(**fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id="feedfacefeedfacefeedfacefeedface",
        anonymous_id="anon-1",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=PHONE,
        sms_body="Hi Ann, your order shipped",
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


async def test_text_message_shape(graph, http) -> None:
    base_url, api = await graph()
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert outcome.status is SendStatus.SENT
    assert outcome.provider_message_id == "wamid.opaque-id-0001"
    (request,) = api.requests
    assert request["path"] == f"/v21.0/{PHONE_NUMBER_ID}/messages"
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert request["content_type"] == "application/json"
    assert request["json"] == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "16505076520",
        "biz_opaque_callback_data": "feedfacefeedfacefeedfacefeedface",
        "type": "text",
        "text": {"body": "Hi Ann, your order shipped", "preview_url": False},
    }


async def test_template_message_shape(graph, http) -> None:
    base_url, api = await graph()
    template = WhatsAppTemplateContent("order_shipped", "en_US", ["Ann", "#A-1042"])
    (outcome,) = await whatsapp(base_url, http).send([message(whatsapp_template=template)])
    assert outcome.status is SendStatus.SENT
    assert api.requests[0]["json"] == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "16505076520",
        "biz_opaque_callback_data": "feedfacefeedfacefeedfacefeedface",
        "type": "template",
        "template": {
            "name": "order_shipped",
            "language": {"code": "en_US"},
            "components": [
                {"type": "body", "parameters": [{"type": "text", "text": "Ann"}, {"type": "text", "text": "#A-1042"}]}
            ],
        },
    }


async def test_a_template_with_an_empty_parameter_fails_naming_it_without_a_request(graph, http) -> None:
    """Meta refuses the whole message for one empty parameter (a recipient with no first name): said
    here, naming the parameter, rather than as Meta's "(#100) Invalid parameter" after a request."""
    base_url, api = await graph()
    template = WhatsAppTemplateContent("order_shipped", "en_US", ["Ann", " \t"])
    (outcome,) = await whatsapp(base_url, http).send([message(whatsapp_template=template)])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "INVALID_MESSAGE", 0)
    assert outcome.error_message == "template parameter 2 is empty, and WhatsApp refuses an empty parameter"
    assert api.requests == []


async def test_a_wamid_that_embeds_the_number_is_not_recorded(graph, http) -> None:
    base_url, _ = await graph(accepted(WAMID_WITH_NUMBER))
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert outcome.status is SendStatus.SENT
    assert outcome.provider_message_id == ""  # receipts map it by biz_opaque_callback_data instead


async def test_meta_error_reports_its_code_only(graph, http) -> None:
    base_url, api = await graph(meta_error(400, 131026))
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "HTTP_400", 1)
    assert outcome.error_message == "whatsapp refused the request (HTTP 400, whatsapp error 131026)"
    assert TOKEN not in outcome.error_message


@pytest.mark.parametrize("code", [4, 80007, 130429, 131056])
async def test_meta_rate_limit_codes_are_retried(graph, http, code: int) -> None:
    base_url, api = await graph(meta_error(400, code), accepted())
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert outcome.status is SendStatus.SENT and outcome.attempts == 2


async def test_http_429_is_retried_and_gives_up_as_rate_limited(graph, http) -> None:
    base_url, api = await graph(meta_error(429, 4))
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "RATE_LIMITED", 4)


@pytest.mark.parametrize("headers", [{}, {"Retry-After": "0"}], ids=["alone", "with-a-retry-after-of-no-wait"])
async def test_the_pair_rate_limit_is_waited_out_before_the_retry(graph, http, headers) -> None:
    """Meta allows one message every 6 seconds to the same user (131056): a retry sooner meets the limit
    again, so the retry waits the pair's interval rather than backoff's fraction of a second, whatever a
    Retry-After of no wait says."""
    base_url, api = await graph(meta_error(400, 131056, **headers), accepted())
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    connector = WhatsAppCloudConnector(
        access_token=TOKEN,
        phone_number_id=PHONE_NUMBER_ID,
        http=http,
        retry=RetryPolicy(),
        base_url=base_url,
        sleep=sleep,
    )
    (outcome,) = await connector.send([message()])
    assert outcome.status is SendStatus.SENT and outcome.attempts == 2
    assert sleeps == [6.0]


@pytest.mark.parametrize("status", [200, 201])
async def test_a_2xx_whose_body_is_meta_s_error_is_not_sent(graph, http, status) -> None:
    """A reply that is Meta's error object and names no message (a proxy, `suppress_http_code`) took
    nothing: the recipient fails with Meta's code, never counted sent."""
    base_url, api = await graph(meta_error(status, 131047), accepted())
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, f"HTTP_{status}", 1)
    assert outcome.error_message == f"whatsapp refused the request (HTTP {status}, whatsapp error 131047)"
    assert len(api.requests) == 1


async def test_a_2xx_whose_body_is_meta_s_throttling_error_is_retried(graph, http) -> None:
    base_url, api = await graph(meta_error(200, 130429), accepted())
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert outcome.status is SendStatus.SENT and outcome.attempts == 2


async def test_a_2xx_whose_body_is_meta_s_token_error_stops_the_batch(graph, http) -> None:
    base_url, api = await graph(meta_error(200, 190), accepted())
    outcomes = await whatsapp(base_url, http).send([message(), message(message_id="0" * 32)])
    assert [(o.error_code, o.attempts) for o in outcomes] == [("PROVIDER_AUTH_FAILED", 1), ("PROVIDER_AUTH_FAILED", 0)]
    assert outcomes[0].account_refused and len(api.requests) == 1


async def test_the_spam_rate_limit_fails_at_once_as_rate_limited(graph, http) -> None:
    """131048: Meta restricts how many messages this number may send, for hours or days: retrying within
    the batch only meets it again, so the recipient fails at once, to be sent by a later re-run."""
    base_url, api = await graph(meta_error(400, 131048), accepted())
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "RATE_LIMITED", 1)
    assert outcome.error_message == (
        "whatsapp's spam rate limit for this phone number was hit (whatsapp error 131048): Meta restricts "
        "how many messages the number may send; not retried, re-run the instance later"
    )
    assert len(api.requests) == 1


@pytest.mark.parametrize(("status", "code"), [(500, 3), (403, 10), (401, 190), (403, 200), (401, 0), (403, 131005)])
async def test_a_token_or_permission_refusal_fails_at_once_whatever_its_status(graph, http, status, code) -> None:
    """Meta's "API method" error (3, a capability or permission the app lacks) comes with HTTP 500 but no
    retry gets past it: it fails at once, as the expired token and the missing permissions do."""
    base_url, api = await graph(meta_error(status, code), accepted())
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1)
    assert outcome.error_message == (
        f"whatsapp refused the access token or its permissions (HTTP {status}, whatsapp error {code}); "
        "not retried: check the connector's access token and the app's permissions"
    )
    assert len(api.requests) == 1 and TOKEN not in outcome.error_message


@pytest.mark.parametrize(
    ("status", "code", "what"),
    [
        (403, 368, "it is temporarily blocked for policy violations"),
        (403, 131031, "it is locked"),
        (400, 131042, "it has a payment issue"),
    ],
)
async def test_a_restricted_business_account_fails_account_suspended(graph, http, status, code, what) -> None:
    """Meta blocked or locked the business account, or its payment failed: only its owner can lift it with
    Meta, so no retry, and no new token helps either."""
    base_url, api = await graph(meta_error(status, code), accepted())
    (outcome,) = await whatsapp(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "ACCOUNT_SUSPENDED", 1)
    assert outcome.error_message == (
        f"whatsapp refused the business account: {what} (HTTP {status}, whatsapp error {code}); "
        "not retried: resolve it with Meta in WhatsApp Manager, then re-run the instance"
    )
    assert outcome.account_refused and len(api.requests) == 1 and PHONE not in outcome.error_message


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (meta_error(401, 190), "PROVIDER_AUTH_FAILED"),
        (meta_error(400, 131048), "RATE_LIMITED"),
        (meta_error(403, 131031), "ACCOUNT_SUSPENDED"),
    ],
)
async def test_a_refusal_of_the_number_or_token_leaves_the_rest_of_the_batch_unsent(graph, http, refusal, code) -> None:
    """A number Meta does not serve (131026) and a sent message, then the token or the number refused: the
    messages after it would meet the same refusal, so they fail with it, with no request."""
    base_url, api = await graph(meta_error(400, 131026), accepted(), refusal)
    batch = [message(message_id=f"{i:032x}") for i in range(6)]
    outcomes = await whatsapp(base_url, http).send(batch)
    assert len(api.requests) == 3
    assert [(o.message_id, o.status, o.error_code, o.attempts) for o in outcomes] == [
        (batch[0].message_id, SendStatus.FAILED, "HTTP_400", 1),
        (batch[1].message_id, SendStatus.SENT, "", 1),
        (batch[2].message_id, SendStatus.FAILED, code, 1),
    ] + [(m.message_id, SendStatus.FAILED, code, 0) for m in batch[3:]]
    assert not outcomes[0].account_refused and outcomes[2].account_refused
    for unsent in outcomes[3:]:
        assert unsent.error_message == (
            "not attempted: an earlier message of the batch was refused for the connector's account "
            f"({outcomes[2].error_message})"
        )


async def test_a_text_over_meta_s_limit_fails_without_a_request_and_the_rest_is_sent(graph, http) -> None:
    base_url, api = await graph()
    too_long = message(message_id="too-long", sms_body="Hi Ann " + "x" * 4090)
    at_limit = message(message_id="at-limit", sms_body="y" * 4096)
    outcomes = await whatsapp(base_url, http).send([too_long, at_limit])
    assert [(o.message_id, o.status) for o in outcomes] == [
        ("too-long", SendStatus.FAILED),
        ("at-limit", SendStatus.SENT),
    ]
    assert (outcomes[0].error_code, outcomes[0].attempts) == ("INVALID_MESSAGE", 0)
    assert outcomes[0].error_message == "the rendered sms_body is 4,097 characters; WhatsApp accepts at most 4,096"
    assert [r["json"]["text"]["body"] for r in api.requests] == ["y" * 4096]


async def test_a_template_parameter_over_meta_s_limit_fails_naming_it_without_a_request(graph, http) -> None:
    """A body parameter takes 32,768 characters when the body is the only component sent, counted as
    sent: a line break turned into a space, a run of spaces cut to four."""
    base_url, api = await graph()
    fits = "Ann" + "\n" * 10 + " " * 40 + "z" * 32761  # 32,768 once its breaks and spaces are tidied
    template = WhatsAppTemplateContent("order_shipped", "en_US", [fits, "#A-1042 " + "z" * 32761])
    (outcome,) = await whatsapp(base_url, http).send([message(whatsapp_template=template)])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "INVALID_MESSAGE", 0)
    assert outcome.error_message == (
        "the rendered template parameter 2 is 32,769 characters; WhatsApp accepts at most 32,768 in a body parameter"
    )
    assert "Ann" not in outcome.error_message and api.requests == []


@pytest.mark.parametrize(
    ("status", "code", "what"),
    [
        (400, 132001, "the template does not exist in this name and language"),
        (400, 132015, "the template is paused for its low quality"),
        (400, 132016, "the template is disabled"),
        (400, 132000, "the number of parameters does not match the template's"),
        (200, 132001, "the template does not exist in this name and language"),  # a 2xx that is Meta's error
    ],
)
async def test_a_refusal_of_the_template_leaves_the_rest_of_the_batch_unsent(graph, http, status, code, what) -> None:
    """The template and its parameters' count and format are the campaign's, the same for every recipient:
    after one refusal the rest fail with it, with no request, where each used to make its own."""
    base_url, api = await graph(meta_error(status, code), accepted())
    template = WhatsAppTemplateContent("order_shiped", "en_US", ["Ann", "#A-1042"])
    batch = [message(message_id=f"{i:032x}", whatsapp_template=template) for i in range(5)]
    outcomes = await whatsapp(base_url, http).send(batch)
    assert len(api.requests) == 1
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [(SendStatus.FAILED, "TEMPLATE_REFUSED", 1)] + [
        (SendStatus.FAILED, "TEMPLATE_REFUSED", 0)
    ] * 4
    refused = outcomes[0]
    assert refused.account_refused and refused.error_message == (
        f"whatsapp refused the campaign's template: {what} (HTTP {status}, whatsapp error {code}); not retried: "
        "fix the template in WhatsApp Manager or the campaign's whatsapp_template, then re-run the instance, "
        "which sends the recipients left unsent"
    )
    for unsent in outcomes[1:]:
        assert unsent.error_message == (
            f"not attempted: an earlier message of the batch was refused for the campaign's whatsapp template "
            f"({refused.error_message})"
        )
    # Meta's message and details may quote the recipient or a parameter's value: never repeated.
    assert not any(PHONE in o.error_message or "Ann" in o.error_message for o in outcomes)


async def test_a_refused_recipient_of_a_template_batch_does_not_stop_it(graph, http) -> None:
    """A template message refused for its recipient (131026: not on WhatsApp) stops nothing."""
    base_url, api = await graph(meta_error(400, 131026), accepted())
    template = WhatsAppTemplateContent("order_shipped", "en_US", ["Ann"])
    batch = [message(message_id=f"{i:032x}", whatsapp_template=template) for i in range(3)]
    outcomes = await whatsapp(base_url, http).send(batch)
    assert [(o.status, o.error_code) for o in outcomes] == [(SendStatus.FAILED, "HTTP_400")] + [
        (SendStatus.SENT, "")
    ] * 2
    assert len(api.requests) == 3
