"""Unit tests for how the Twilio connector reads Twilio's errors, against an in-process Messages endpoint.

Prism (the integration peer) answers only what the spec declares, so Twilio's error codes are played here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.twilio import TwilioConnector

ACCOUNT_SID = "AC5ef8732a3c49700934481addd5ce1659"
PHONE = "+14155550163"
SID = "SM" + "0123456789abcdef" * 2


def twilio_error(code: int, status: int = 400) -> Callable[[], web.Response]:
    body = {"code": code, "message": f"about {PHONE}", "more_info": f"https://www.twilio.com/docs/errors/{code}"}
    return lambda: web.json_response({**body, "status": status}, status=status)


def created() -> Callable[[], web.Response]:
    return lambda: web.json_response({"sid": SID, "status": "queued"}, status=201)


@pytest.fixture
async def messages_api() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(*replies: Callable[[], web.Response]) -> tuple[str, list[dict[str, str]]]:
        forms: list[dict[str, str]] = []

        async def handle(request: web.Request) -> web.Response:
            forms.append(dict(await request.post()))  # type: ignore[arg-type]
            return replies[min(len(forms), len(replies)) - 1]()

        app = web.Application()
        app.router.add_post(f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json", handle)
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


async def no_sleep(_: float) -> None:
    return None


def connector(base_url: str, http: aiohttp.ClientSession) -> TwilioConnector:
    return TwilioConnector(
        account_sid=ACCOUNT_SID,
        auth_token="canary-token-9d1c",
        sender="+14155550100",
        workspace_id="ws-1",
        connector_id="twilio-1",
        public_webhook_url="https://hooks.example.com",
        http=http,
        retry=RetryPolicy(max_retries=2),
        base_url=base_url,
        sleep=no_sleep,
        suppress_tracing=False,
    )


def message(
    message_id: str = "9a8b7c6d5e4f30211203f4e5d6c7b8a9", sms_body: str = "Your code is 1234"
) -> OutboundMessage:
    return OutboundMessage(
        message_id=message_id,
        anonymous_id="anon-1",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=PHONE,
        sms_body=sms_body,
    )


async def test_a_full_sender_queue_is_retried_as_throttling(messages_api, http) -> None:
    """21611: the sender's queue is full and nothing was created; Twilio's remedy is to slow down."""
    base_url, forms = await messages_api(twilio_error(21611), created())
    (outcome,) = await connector(base_url, http).send([message()])
    assert (outcome.status, outcome.provider_message_id, outcome.attempts) == (SendStatus.SENT, SID, 2)
    assert len(forms) == 2


async def test_a_queue_that_stays_full_ends_rate_limited(messages_api, http) -> None:
    base_url, forms = await messages_api(twilio_error(21611))
    (outcome,) = await connector(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "RATE_LIMITED", 3)
    assert PHONE not in outcome.error_message


@pytest.mark.parametrize("code", [21211, 21614, 21408])
async def test_a_refusal_is_final(messages_api, http, code: int) -> None:
    base_url, forms = await messages_api(twilio_error(code))
    (outcome,) = await connector(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "HTTP_400", 1)
    assert outcome.error_message == f"twilio refused the request (HTTP 400, twilio error {code})"
    assert not outcome.opted_out


async def test_an_opted_out_recipient_is_flagged_for_suppression(messages_api, http) -> None:
    base_url, forms = await messages_api(twilio_error(21610))
    (outcome,) = await connector(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.opted_out) == (SendStatus.FAILED, "RECIPIENT_OPTED_OUT", True)
    assert len(forms) == 1 and PHONE not in outcome.error_message


async def test_a_body_over_twilio_s_limit_fails_without_a_request_and_the_rest_is_sent(messages_api, http) -> None:
    """Twilio refuses a Body over 1,600 characters (21617) after a round trip: said here, with the length."""
    base_url, forms = await messages_api(created())
    too_long = message("too-long", "Hi Ann, " + "x" * 1726)
    at_limit = message("at-limit", "y" * 1600)
    outcomes = await connector(base_url, http).send([too_long, at_limit])
    assert [(o.message_id, o.status) for o in outcomes] == [
        ("too-long", SendStatus.FAILED),
        ("at-limit", SendStatus.SENT),
    ]
    assert (outcomes[0].error_code, outcomes[0].attempts) == ("INVALID_MESSAGE", 0)
    assert outcomes[0].error_message == "the rendered sms_body is 1,734 characters; Twilio accepts at most 1,600"
    assert [form["Body"] for form in forms] == ["y" * 1600]


@pytest.mark.parametrize(("body", "length"), [("👍" * 801, 1602), ("é" * 1601, 1601)])
async def test_twilio_s_length_counts_an_emoji_as_two(messages_api, http, body: str, length: int) -> None:
    """Twilio counts UTF-16 code units: 801 emoji are 1,602 characters to it, though 801 to Python."""
    base_url, forms = await messages_api(created())
    (outcome,) = await connector(base_url, http).send([message(sms_body=body)])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "INVALID_MESSAGE")
    assert outcome.error_message == f"the rendered sms_body is {length:,} characters; Twilio accepts at most 1,600"
    assert forms == []


async def test_a_body_of_emoji_within_the_limit_is_sent(messages_api, http) -> None:
    base_url, forms = await messages_api(created())
    (outcome,) = await connector(base_url, http).send([message(sms_body="👍" * 800)])
    assert outcome.status is SendStatus.SENT and len(forms) == 1


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (twilio_error(20003, 401), "PROVIDER_AUTH_FAILED"),
        (twilio_error(20005, 403), "ACCOUNT_SUSPENDED"),
        (twilio_error(21660), "SENDER_REFUSED"),
    ],
)
async def test_a_refused_account_leaves_the_rest_of_the_batch_unsent(messages_api, http, refusal, code) -> None:
    """An invalid number (21211) and a sent message, then the account refused (a wrong auth token, an
    account not active, a From number not on it): the messages after it would meet the same refusal,
    so they fail unsent."""
    base_url, forms = await messages_api(twilio_error(21211), created(), refusal)
    batch = [message(f"{i:032x}") for i in range(6)]
    outcomes = await connector(base_url, http).send(batch)
    assert len(forms) == 3
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [
        (SendStatus.FAILED, "HTTP_400", 1),
        (SendStatus.SENT, "", 1),
        (SendStatus.FAILED, code, 1),
    ] + [(SendStatus.FAILED, code, 0)] * 3
    assert [o.message_id for o in outcomes] == [m.message_id for m in batch]
    assert all(o.error_message.startswith("not attempted: an earlier message") for o in outcomes[3:])
    assert "canary-token" not in outcomes[5].error_message


def unauthorized_without_a_code() -> web.Response:
    return web.Response(status=401, text="Unauthorized", headers={"WWW-Authenticate": 'Basic realm="Twilio API"'})


@pytest.mark.parametrize(
    ("refusal", "message_text"),
    [
        (twilio_error(20003, 401), "twilio refused the account SID or auth token (HTTP 401, twilio error 20003)"),
        (unauthorized_without_a_code, "twilio refused the account SID or auth token (HTTP 401)"),
    ],
)
async def test_refused_credentials_fail_provider_auth_failed(messages_api, http, refusal, message_text) -> None:
    """A wrong account SID or auth token: the connector's settings to fix, as any connector's refused credentials."""
    base_url, forms = await messages_api(refusal, created())
    (outcome,) = await connector(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1)
    assert outcome.error_message == f"{message_text}; not retried: check the connector's credentials"
    assert outcome.account_refused and len(forms) == 1
    assert "canary-token" not in outcome.error_message and PHONE not in outcome.error_message


@pytest.mark.parametrize(("code", "status"), [(10001, 403), (20005, 401), (20403, 403), (90010, 403)])
async def test_an_account_not_active_fails_account_suspended(messages_api, http, code: int, status: int) -> None:
    """Suspended for its balance or a policy, or closed: Twilio's to lift, not the connector's credentials, even
    when it comes with a 401."""
    base_url, forms = await messages_api(twilio_error(code, status), created())
    (outcome,) = await connector(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "ACCOUNT_SUSPENDED", 1)
    assert outcome.error_message == (
        f"twilio says the account is not active (HTTP {status}, twilio error {code}); "
        "not retried: reactivate it with Twilio (balance, suspension notice), then re-run the instance"
    )
    assert outcome.account_refused and len(forms) == 1


@pytest.mark.parametrize(
    ("code", "what"),
    [
        (21212, "the From value is not a valid phone number, short code or sender ID"),
        (21660, "the From number is not on the account"),
        (21661, "the From number cannot send SMS"),
        (21701, "the messaging service does not exist on the account"),
        (21704, "the messaging service holds no phone numbers"),
        (21705, "the messaging service SID is not valid"),
    ],
)
async def test_a_refused_sender_fails_sender_refused(messages_api, http, code: int, what: str) -> None:
    """Twilio refused the connector's From number or messaging service: every message of the batch would
    meet it, whoever the recipient, so it refuses the account's sending as a whole."""
    base_url, forms = await messages_api(twilio_error(code), created())
    (outcome,) = await connector(base_url, http).send([message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SENDER_REFUSED", 1)
    assert outcome.error_message == (
        f"twilio refused the connector's sender: {what} (HTTP 400, twilio error {code}); "
        "not retried: fix the connector's sender, then re-run the instance"
    )
    assert outcome.account_refused and len(forms) == 1
    assert PHONE not in outcome.error_message and "+14155550100" not in outcome.error_message


@pytest.mark.parametrize("code", [21606, 21659])
async def test_a_sender_refused_for_a_destination_stops_nothing(messages_api, http, code: int) -> None:
    """21606 and 21659 also say a short code cannot reach the recipient's country: the From number may
    reach the batch's other recipients, so they are still sent."""
    base_url, forms = await messages_api(twilio_error(code), created())
    outcomes = await connector(base_url, http).send([message(f"{i:032x}") for i in range(3)])
    assert [(o.status, o.error_code) for o in outcomes] == [(SendStatus.FAILED, "HTTP_400")] + [
        (SendStatus.SENT, "")
    ] * 2
    assert not outcomes[0].account_refused and len(forms) == 3


async def test_a_403_for_a_destination_stops_nothing(messages_api, http) -> None:
    """21408: the account may not send to that region, a refusal of the message: the rest are sent."""
    base_url, forms = await messages_api(twilio_error(21408, 403), created())
    outcomes = await connector(base_url, http).send([message(f"{i:032x}") for i in range(3)])
    assert [(o.status, o.error_code) for o in outcomes] == [(SendStatus.FAILED, "HTTP_403")] + [
        (SendStatus.SENT, "")
    ] * 2
    assert len(forms) == 3
