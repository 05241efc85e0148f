"""Refusals of the connector's account or sender in providers' own codes, read from scripted replies.

WhatsApp: the phone-number ID unknown (100 with subcode 33), the number deleted (33) or not registered
(133010) refuse the connector's sender; 100 with another subcode is a message's invalid parameter. A
Vonage-style gateway's "4", "8" and "9" refuse its account when every part says the same.
"""

from __future__ import annotations

import json
import random

import orjson
import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors import whatsapp
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.custom_http import CustomHttpConnector, account_refusal
from services.dispatcher.connectors.http_retry import HttpReply, HttpRequest, RetryPolicy

PHONE = "+447700900123"


def meta_error(code: int, status: int = 400, **fields: object) -> HttpReply:
    error = {"message": f"(#{code}) about {PHONE}", "type": "OAuthException", "code": code, **fields}
    return HttpReply(status, {}, orjson.dumps({"error": error}))


@pytest.mark.parametrize(
    ("reply", "what", "detail"),
    [
        (meta_error(100, error_subcode=33), "no such phone-number ID", "whatsapp error 100, subcode 33"),
        (meta_error(33), "the business phone number was deleted", "whatsapp error 33"),
        (meta_error(133010), "not registered with the Cloud API", "whatsapp error 133010"),
        (meta_error(133010, status=200), "not registered with the Cloud API", "whatsapp error 133010"),
    ],
)
def test_whatsapp_refusals_of_the_phone_number_stop_the_batch(reply: HttpReply, what: str, detail: str) -> None:
    refused = whatsapp.refusal(reply)
    assert refused is not None and refused.error_code == "SENDER_REFUSED"
    assert what in refused.error_message and detail in refused.error_message
    assert "fix the connector's sender" in refused.error_message
    assert PHONE not in refused.error_message and PHONE[1:] not in refused.error_message
    assert whatsapp.refuses_batch(reply)


@pytest.mark.parametrize(
    "reply",
    [
        meta_error(100),
        meta_error(100, error_subcode=2494010),
        meta_error(100, error_subcode="33"),  # not a code: read as none
        meta_error(131026),
    ],
)
def test_other_invalid_parameters_fail_their_message_alone(reply: HttpReply) -> None:
    assert whatsapp.refusal(reply) is None
    assert not whatsapp.refuses_batch(reply)


def vonage(*statuses: str) -> dict[str, object]:
    return {"message-count": str(len(statuses)), "messages": [{"status": s, "error-text": PHONE} for s in statuses]}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (vonage("4"), "PROVIDER_AUTH_FAILED"),
        (vonage("8"), "ACCOUNT_SUSPENDED"),
        (vonage("9"), "QUOTA_EXCEEDED"),
        (vonage("9", "9"), "QUOTA_EXCEEDED"),
        ({"messages": [{"status": 9}]}, "QUOTA_EXCEEDED"),  # a number for a code, as some imitators write it
        (vonage("9", "4", "9"), None),  # the parts disagree: a message's refusal
        (vonage("0", "9"), None),  # a part went out
        (vonage("6"), None),
        (vonage("1"), None),
        ({"messages": []}, None),
        ({"messages": [{"status": {"groupName": "REJECTED"}}]}, None),
        ([{"status": "4"}], None),
    ],
)
def test_a_gateway_refuses_its_account_only_when_every_part_says_so(document: object, expected: str | None) -> None:
    refused = account_refusal(document)
    assert (refused[0] if refused else None) == expected
    if refused:
        assert refused[1].startswith("the gateway ") and "not retried" in refused[1] and PHONE[1:] not in refused[1]


class Script:
    """A TransportFactory whose transport answers every request with `reply`."""

    def __init__(self, reply: HttpReply) -> None:
        self.reply = reply
        self.requests: list[HttpRequest] = []

    def transport(self, retry: RetryPolicy) -> Script:
        return self

    async def fetch(self, request: HttpRequest) -> HttpReply:
        self.requests.append(request)
        return self.reply


async def no_sleep(_: float) -> None:
    return None


@pytest.mark.parametrize(("status", "code"), [("4", "PROVIDER_AUTH_FAILED"), ("8", "ACCOUNT_SUSPENDED")])
async def test_a_gateway_account_refusal_in_a_200_leaves_the_rest_of_the_batch_unsent(status: str, code: str) -> None:
    script = Script(HttpReply(200, {}, json.dumps(vonage(status)).encode()))
    connector = CustomHttpConnector(
        template=pb.CustomHttpTemplate(method="POST", url="https://gw.example.com/sms", body="to=@to&text=@text"),
        sender="Brand",
        credentials={},
        http=script,
        retry=RetryPolicy(max_retries=2),
        sleep=no_sleep,
        rng=random.Random(1),
    )
    batch = [OutboundMessage(f"m-{i}", f"anon-{i}", "camp-1", "inst-1", to=PHONE, sms_body="Hi") for i in range(3)]
    outcomes = await connector.send(batch)
    assert len(script.requests) == 1
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [(SendStatus.FAILED, code, 1)] + [
        (SendStatus.FAILED, code, 0)
    ] * 2
    assert outcomes[0].account_refused
    assert all(PHONE[1:] not in o.error_message for o in outcomes)
