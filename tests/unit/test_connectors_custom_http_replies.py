"""CUSTOM_HTTP: how a gateway's reply is read, against scripted replies (no network)."""

from __future__ import annotations

import json
import random

import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus
from services.dispatcher.connectors.custom_http import CustomHttpConnector
from services.dispatcher.connectors.http_retry import HttpReply, HttpRequest, RetryPolicy

PHONE = "+447700900123"


class Script:
    """A TransportFactory whose transport answers each request with the next reply."""

    def __init__(self, *replies: HttpReply) -> None:
        self.replies = list(replies)
        self.requests: list[HttpRequest] = []

    def transport(self, retry: RetryPolicy) -> Script:
        return self

    async def fetch(self, request: HttpRequest) -> HttpReply:
        self.requests.append(request)
        return self.replies.pop(0)


def reply(status: int = 200, body: object = b"", **headers: str) -> HttpReply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpReply(status, headers, raw)


async def send(script: Script, message_id_path: str = "") -> SendOutcome:
    async def no_sleep(_: float) -> None:
        pass

    connector = CustomHttpConnector(
        template=pb.CustomHttpTemplate(
            method="POST", url="https://gw.example.com/sms", body="to=@to&text=@text", message_id_path=message_id_path
        ),
        sender="Brand",
        credentials={},
        http=script,
        retry=RetryPolicy(max_retries=2),
        sleep=no_sleep,
        rng=random.Random(1),
    )
    message = OutboundMessage("m-1", "anon-1", "camp-1", "inst-1", to=PHONE, sms_body="Hi")
    [outcome] = await connector.send([message])
    return outcome


def refused_part(status: str) -> dict[str, object]:
    """One Vonage part refused; its error text quotes the number."""
    return {"messages": [{"to": PHONE[1:], "status": status, "error-text": f"Bad number {PHONE}"}]}


@pytest.mark.parametrize("path", ["messages[0]", "messages", 'messages[0]."error-text"', "messages[0].missing"])
async def test_a_path_selecting_no_id_does_not_turn_a_refusal_into_a_send(path: str) -> None:
    """Only an ID says the gateway took the message: an object, a list or a text the refused part
    carries (its error) is no ID."""
    outcome = await send(Script(reply(200, refused_part("6"))), path)
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "GATEWAY_REJECTED")
    assert outcome.provider_message_id == "" and PHONE[1:] not in outcome.error_message


async def test_a_throttled_refusal_is_tried_again_whatever_a_path_selecting_no_id_gives() -> None:
    script = Script(reply(200, refused_part("1")), reply(200, {"messages": [{"status": "0", "message-id": "0A1"}]}))
    outcome = await send(script, 'messages[0]."message-id" || messages[0]')
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == "0A1" and len(script.requests) == 2


async def test_an_id_the_reply_names_still_says_the_gateway_took_the_message() -> None:
    document = {"messages": [{"status": "4", "message-id": "0A00000000000001"}]}
    outcome = await send(Script(reply(200, document)), 'messages[0]."message-id"')
    assert outcome.status is SendStatus.SENT and outcome.provider_message_id == "0A00000000000001"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_says_it_was_not_followed_without_quoting_where_to(status: int) -> None:
    script = Script(reply(status, b"", Location=f"https://gw2.example.com/sms?to={PHONE}"))
    outcome = await send(script)
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, f"HTTP_{status}")
    assert "redirect" in outcome.error_message and "url" in outcome.error_message
    assert "gw2" not in outcome.error_message and PHONE[1:] not in outcome.error_message
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Error: number +447700900123 is invalid</body></html>",
        b"OK 0A00000000000001",
        b"\xff\xfe not text",
        b"",
        b"[1, 2",
    ],
)
async def test_a_reply_that_is_not_json_is_a_send_without_an_id(body: bytes) -> None:
    outcome = await send(Script(reply(200, body)), "id")
    assert (outcome.status, outcome.provider_message_id, outcome.error_message) == (SendStatus.SENT, "", "")


@pytest.mark.parametrize(
    ("selected", "recorded"),
    [
        ("0A00000000000001", "0A00000000000001"),
        (12345, "12345"),
        (PHONE, ""),  # the number: never recorded
        (PHONE[1:], ""),
        (1.5, ""),
        (True, ""),
        ("x" * 300, ""),
        ("id with spaces", ""),
    ],
)
async def test_only_an_opaque_token_is_recorded_as_the_provider_id(selected: object, recorded: str) -> None:
    outcome = await send(Script(reply(200, {"id": selected})), "id")
    assert (outcome.status, outcome.provider_message_id) == (SendStatus.SENT, recorded)


@pytest.mark.parametrize("body", [{"error": f"invalid number {PHONE}"}, f"Refused {PHONE}"])
async def test_a_refusal_never_quotes_the_reply(body: object) -> None:
    outcome = await send(Script(reply(400, body)))
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "HTTP_400")
    assert PHONE[1:] not in outcome.error_message and "invalid" not in outcome.error_message


@pytest.mark.parametrize(
    ("retry_after", "attempts", "status"),
    [
        ("0", 3, SendStatus.FAILED),
        ("-5", 3, SendStatus.FAILED),  # unreadable: backed off as without one
        ("Wed, 21 Oct 2015 07:28:00 GMT", 3, SendStatus.FAILED),  # already past: no wait
        ("99999999999999999999", 1, SendStatus.FAILED),  # longer than we wait: given up at once
        ("Fri, 31 Dec 9999 23:59:59 GMT", 1, SendStatus.FAILED),
    ],
)
async def test_retry_after_forms(retry_after: str, attempts: int, status: SendStatus) -> None:
    script = Script(*[reply(429, b"", **{"Retry-After": retry_after})] * 3)
    outcome = await send(script)
    assert (outcome.status, outcome.error_code, outcome.attempts) == (status, "RATE_LIMITED", attempts)
    assert len(script.requests) == attempts
