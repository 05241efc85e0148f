"""Refusals of what every message of a batch shares, said by the provider in its own terms, stop the batch.

A WhatsApp phone-number ID Meta does not know (Graph's 100, subcode 33), a Vonage-style gateway's
"4" (bad credentials) in an HTTP 200, an SMTP relay's 5xx to MAIL FROM: each refuses the
connector, not the recipient. The rest of the batch fails with it unsent, released for a re-run,
instead of one request per recipient (and a PII fetch per batch) to meet the same refusal.
"""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.smtp import SmtpConnector
from tests.integration.peers import RecordingHandler, smtp_relay  # noqa: F401
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus

NOT_ATTEMPTED = "not attempted: an earlier message of the batch was refused for the connector's account"
CONCURRENCY = 3


def failures(reply: pb.DispatchResponse) -> list[tuple[str, str]]:
    return [(S.Name(r.status), r.error_code) for r in reply.results]


async def put_changed(suite, connector_id: str, sender: str = "", **credentials: str) -> pb.Connector:
    """The sandbox workspace's connector with its sender or credentials changed; returns the original."""
    original = suite.workspace.connectors()[connector_id]
    changed = pb.Connector()
    changed.CopyFrom(original)
    if sender:
        changed.sender = sender
    changed.credentials.update(credentials)
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=changed))
    return original


@pytest.mark.parametrize(
    ("channel", "connector_id", "provider", "change", "code", "remedy"),
    [
        (
            C.CHANNEL_WHATSAPP,
            "whatsapp",
            "whatsapp",
            {"sender": "999000111222333"},  # numeric, so saved; not the token's phone number
            "SENDER_REFUSED",
            "fix the connector's sender",
        ),
        (
            C.CHANNEL_SMS,
            "gateway",
            "custom",
            {"api_secret": "not-the-secret"},  # the sandbox gateway answers 200 with status "4"
            "PROVIDER_AUTH_FAILED",
            "check the connector's credentials",
        ),
    ],
    ids=["whatsapp-unknown-phone-number-id", "gateway-status-4"],
)
async def test_a_refusal_of_the_connector_in_the_provider_s_terms_stops_the_batch(
    start_suite, channel, connector_id, provider, change, code, remedy
):
    suite = await start_suite(send_concurrency=CONCURRENCY)
    original = await put_changed(suite, connector_id, **change)
    reply = await dispatch(suite, channel, connector_id, SMS, recipients(30))

    requests = suite.providers.stats.requests[provider]
    assert 1 <= requests <= CONCURRENCY  # the messages in flight when the first refusal came back, no more
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", code)] * 30
    assert len([r for r in reply.results if r.error_message.startswith(NOT_ATTEMPTED)]) >= 30 - requests
    assert all(remedy in r.error_message for r in reply.results)
    assert all("999000111222333" not in r.error_message for r in reply.results)

    # Released, every one of them: once the connector is fixed, the same instance sends them all.
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=original))
    again = await dispatch(suite, channel, connector_id, SMS, recipients(30))
    assert failures(again) == [("DISPATCH_STATUS_SENT", "")] * 30
    assert suite.providers.stats.requests[provider] == requests + 30


# -- SMTP: MAIL FROM names only the sender ---------------------------------------------------------


class RefusingMail(RecordingHandler):
    """A relay that answers MAIL FROM with `mail_reply`, counting the MAIL commands it gets."""

    def __init__(self, mail_reply: str) -> None:
        super().__init__()
        self.mail_reply = mail_reply
        self.mail_calls = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: ANN001, ANN201
        self.mail_calls += 1
        return self.mail_reply


async def no_sleep(_: float) -> None:
    return None


def batch(n: int) -> list[OutboundMessage]:
    return [
        OutboundMessage(
            message_id=f"{i:032x}",
            anonymous_id=f"anon-{i}",
            campaign_id="camp-1",
            campaign_instance_id="inst-1",
            to=f"customer{i}.canary@mail.example.org",
            subject="Spring sale",
            text_body="20% off",
        )
        for i in range(n)
    ]


async def send_through(relay_port: int, messages: list[OutboundMessage]):  # noqa: ANN201
    connector = SmtpConnector(
        host="127.0.0.1",
        port=relay_port,
        implicit_tls=False,
        sender="news@brand.example.com",
        retry=RetryPolicy(max_retries=2),
        allow_private=True,
        sleep=no_sleep,
    )
    try:
        return await connector.send(messages)
    finally:
        await connector.close()


@pytest.mark.parametrize(
    "mail_reply",
    [
        "550 5.7.1 <news@brand.example.com>: sender rejected",
        "553 5.7.1 Sender address rejected: not owned by user customer1.canary@mail.example.org",
        "554 5.7.0 Daily sending quota exceeded",
    ],
)
async def test_a_relay_refusing_the_sender_at_mail_from_stops_the_batch(smtp_relay, mail_reply) -> None:
    relay = smtp_relay(RefusingMail(mail_reply))
    outcomes = await send_through(relay.port, batch(4))

    assert relay.handler.mail_calls == 1
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [(SendStatus.FAILED, "SENDER_REFUSED", 1)] + [
        (SendStatus.FAILED, "SENDER_REFUSED", 0)
    ] * 3
    assert outcomes[0].account_refused
    assert "check the connector's sender" in outcomes[0].error_message
    assert all(o.error_message.startswith(NOT_ATTEMPTED) for o in outcomes[1:])
    for outcome in outcomes:  # the relay's text, which can quote an address, is never repeated
        assert "canary" not in outcome.error_message and "news@" not in outcome.error_message


@pytest.mark.parametrize("mail_reply", ["555 5.5.4 BODY parameter not recognized", "552 5.3.4 Message size exceeds"])
async def test_a_refusal_of_what_the_message_declared_at_mail_from_fails_that_message_alone(
    smtp_relay, mail_reply
) -> None:
    """555 (a parameter such as BODY=8BITMIME) and 552 (a declared size) answer the message, not the sender."""
    relay = smtp_relay(RefusingMail(mail_reply))
    outcomes = await send_through(relay.port, batch(3))

    assert relay.handler.mail_calls == 3
    code = f"SMTP_{mail_reply[:3]}"
    assert [(o.status, o.error_code, o.attempts, o.account_refused) for o in outcomes] == [
        (SendStatus.FAILED, code, 1, False)
    ] * 3


@pytest.mark.parametrize("mail_reply", ["501 5.5.4 Syntax error in parameters", "504 5.5.4 Parameter not implemented"])
async def test_an_older_relay_s_501_or_504_to_a_parameter_the_message_declared_fails_that_message_alone(
    smtp_relay, mail_reply
) -> None:
    """RFC 1869 relays answer a MAIL parameter they do not take (BODY=8BITMIME, for a body that is not ASCII)
    with 501 or 504: the message's refusal; the same reply to a MAIL FROM with no parameter is the sender's."""
    relay = smtp_relay(RefusingMail(mail_reply))
    messages = batch(3)
    for message in messages:
        message.text_body = "Grüße: 20% off"
    outcomes = await send_through(relay.port, messages)
    assert relay.handler.mail_calls == 3
    assert {(o.status, o.error_code, o.account_refused) for o in outcomes} == {
        (SendStatus.FAILED, f"SMTP_{mail_reply[:3]}", False)
    }
    relay = smtp_relay(RefusingMail(mail_reply))
    outcomes = await send_through(relay.port, batch(3))
    assert relay.handler.mail_calls == 1
    assert {o.error_code for o in outcomes} == {"SENDER_REFUSED"}


async def test_a_deferral_at_mail_from_is_still_tried_again(smtp_relay) -> None:
    relay = smtp_relay(RefusingMail("451 4.7.1 Try again later"))
    (outcome,) = await send_through(relay.port, batch(1))
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SMTP_451", 3)
    assert relay.handler.mail_calls == 3 and not outcome.account_refused
