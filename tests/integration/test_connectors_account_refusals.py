"""A refusal of the connector's account (an expired token, a used-up quota) stops the rest of its batch.

Every other message of the batch would meet the same refusal: they fail with its code without a
request and are released for a re-run; the later batches through the connector are held back a while
(test_dispatcher_refusal_hold.py), until the connector is saved again or a test send through it is not
refused (the operator fixed what was refused).
A refusal of one message (a number not on WhatsApp, an address SES rejects) stops nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.campaign_stats import read_counts
from tests.integration.test_dispatcher_campaigns import EMAIL, SMS, WHATSAPP_TEMPLATE, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus

NOT_ATTEMPTED = "not attempted: an earlier message of the batch was refused for the connector's account"
CONCURRENCY = 3


def failures(reply: pb.DispatchResponse) -> list[tuple[str, str]]:
    return [(S.Name(r.status), r.error_code) for r in reply.results]


async def checked_by_a_test_send(suite, channel: int, connector_id: str, content: pb.Content) -> None:
    """The operator's check after fixing what was refused outside the connector: it lifts the hold."""
    reply = await suite.dispatcher.stub.SendTest(
        pb.SendTestRequest(
            workspace_id=suite.workspace_id,
            campaign_id="spring",
            channel=channel,
            connector_id=connector_id,
            content=content,
            recipient=recipients(1)[0],
        )
    )
    assert (S.Name(reply.result.status), reply.result.error_code) == ("DISPATCH_STATUS_SENT", "")


async def put_connector(suite, connector_id: str, **credentials: str) -> pb.Connector:
    """The sandbox workspace's connector with `credentials` changed; returns the original."""
    original = suite.workspace.connectors()[connector_id]
    changed = pb.Connector()
    changed.CopyFrom(original)
    changed.credentials.update(credentials)
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=changed))
    return original


@pytest.mark.parametrize(
    ("channel", "connector_id", "provider", "credentials", "code"),
    [
        (C.CHANNEL_WHATSAPP, "whatsapp", "whatsapp", {"access_token": "EAAG-expired-token"}, "PROVIDER_AUTH_FAILED"),
        (C.CHANNEL_SMS, "twilio", "twilio", {"auth_token": "0" * 32}, "PROVIDER_AUTH_FAILED"),
    ],
    ids=["whatsapp", "twilio"],
)
async def test_a_refused_token_stops_the_batch_and_the_next_batch_tries_again(
    start_suite, redis, channel, connector_id, provider, credentials, code
):
    suite = await start_suite(send_concurrency=CONCURRENCY)
    original = await put_connector(suite, connector_id, **credentials)
    reply = await dispatch(suite, channel, connector_id, SMS, recipients(30))

    requests = suite.providers.stats.requests[provider]
    assert 1 <= requests <= CONCURRENCY  # the messages in flight when the first refusal came back, no more
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", code)] * 30
    unsent = [r for r in reply.results if r.error_message.startswith(NOT_ATTEMPTED)]
    assert len(unsent) >= 30 - requests
    assert all(r.message_id == "" for r in reply.results)  # nothing left us: nothing to map
    counts = await read_counts(redis, suite.workspace_id, "spring", "run-1")
    assert counts["send_failed"] == 30 and counts.get("sent", 0) == 0

    # Released, every one of them: once the token is fixed, the same instance sends them all.
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=original))
    again = await dispatch(suite, channel, connector_id, SMS, recipients(30))
    assert failures(again) == [("DISPATCH_STATUS_SENT", "")] * 30
    assert suite.providers.stats.requests[provider] == requests + 30


async def test_a_refused_recipient_does_not_stop_the_batch(start_suite, customers):
    """Meta refuses two numbers (131026, not on WhatsApp): only those fail, the rest are sent."""
    suite = await start_suite(send_concurrency=CONCURRENCY)
    people = recipients(12)
    suite.providers.set_faults("whatsapp", reject_to=[customers[p.anonymous_id].phone for p in people[:2]])
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people)
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", "HTTP_400")] * 2 + [("DISPATCH_STATUS_SENT", "")] * 10
    assert suite.providers.stats.requests["whatsapp"] == 12


NOT_ATTEMPTED_FOR_TEMPLATE = (
    "not attempted: an earlier message of the batch was refused for the campaign's whatsapp template"
)


@pytest.mark.parametrize(("code", "what"), [(132001, "does not exist"), (132015, "is paused")])
async def test_a_refused_whatsapp_template_stops_the_batch_and_the_fixed_template_sends(start_suite, redis, code, what):
    """A misspelled or paused template is every recipient's: one request meets the refusal, the rest of
    the batch fail with it unsent, and once the template is fixed the same instance sends them all."""
    suite = await start_suite(send_concurrency=1)
    name = WHATSAPP_TEMPLATE.whatsapp_template.name
    suite.providers.set_faults("whatsapp", template_errors={name: code})
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE, recipients(30))

    assert suite.providers.stats.requests["whatsapp"] == 1
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", "TEMPLATE_REFUSED")] * 30
    refused, unsent = reply.results[0], reply.results[1:]
    assert f"whatsapp refused the campaign's template: the template {what}" in refused.error_message
    assert f"(HTTP 400, whatsapp error {code})" in refused.error_message
    assert all(r.error_message == f"{NOT_ATTEMPTED_FOR_TEMPLATE} ({refused.error_message})" for r in unsent)
    assert all(r.message_id == "" for r in reply.results)
    counts = await read_counts(redis, suite.workspace_id, "spring", "run-1")
    assert counts["send_failed"] == 30 and counts.get("sent", 0) == 0
    assert suite.providers.outbox_for("whatsapp") == []

    # Released, every one of them: once the template is fixed and a test send says so, the same instance
    # sends them all.
    suite.providers.clear_faults()
    held = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE, recipients(30))
    assert failures(held) == [("DISPATCH_STATUS_SEND_FAILED", "TEMPLATE_REFUSED")] * 30
    assert suite.providers.stats.requests["whatsapp"] == 1  # not asked: the hold is on
    await checked_by_a_test_send(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE)
    again = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE, recipients(30))
    assert failures(again) == [("DISPATCH_STATUS_SENT", "")] * 30
    assert suite.providers.stats.requests["whatsapp"] == 1 + 1 + 30


async def test_a_whatsapp_parameter_mismatch_never_quotes_the_parameter(start_suite, customers):
    """Meta's details of a parameter mismatch may quote a parameter's value (a first name): the results
    keep only Meta's code."""
    suite = await start_suite(send_concurrency=1)
    suite.providers.set_faults("whatsapp", template_errors={WHATSAPP_TEMPLATE.whatsapp_template.name: 132000})
    people = recipients(5)
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE, people)
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", "TEMPLATE_REFUSED")] * 5
    assert "whatsapp error 132000" in reply.results[0].error_message
    first_names = {customers[p.anonymous_id].first_name for p in people}
    assert not any(name in r.error_message for r in reply.results for name in first_names)
    assert suite.providers.stats.requests["whatsapp"] == 1


async def test_a_whatsapp_parameter_format_refusal_fails_its_message_alone(start_suite, customers):
    """132012 can come of one recipient's own value: every message is tried, none quotes a parameter."""
    suite = await start_suite(send_concurrency=1)
    suite.providers.set_faults("whatsapp", template_errors={WHATSAPP_TEMPLATE.whatsapp_template.name: 132012})
    people = recipients(5)
    reply = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP_TEMPLATE, people)
    assert suite.providers.stats.requests["whatsapp"] == 5
    assert all(r.status == S.DISPATCH_STATUS_SEND_FAILED and r.error_code != "TEMPLATE_REFUSED" for r in reply.results)
    first_names = {customers[p.anonymous_id].first_name for p in people}
    assert not any(name in r.error_message for r in reply.results for name in first_names)


# -- A refused sender, through a Twilio stand-in (the sandbox takes any well-formed From number) ------


@pytest.fixture
async def twilio_refusing_the_sender() -> AsyncIterator[tuple[str, list[str]]]:
    """Twilio's Messages endpoint answering 21660 (the From number is not on the account) to everything."""
    senders: list[str] = []

    async def create_message(request: web.Request) -> web.Response:
        senders.append(str((await request.post())["From"]))
        body = {"code": 21660, "message": "Mismatch between the 'From' number and the account", "status": 400}
        return web.json_response(body, status=400)

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{account_sid}/Messages.json", create_message)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), senders
    await server.close()


async def test_a_refused_sender_stops_the_batch_and_the_fixed_connector_sends(start_suite, twilio_refusing_the_sender):
    """A From number not on the account (Twilio 21660): every recipient would meet it. The batch stops
    with the connector's remedy, and once the connector is fixed the same instance sends them all."""
    suite = await start_suite(send_concurrency=CONCURRENCY)
    base_url, senders = twilio_refusing_the_sender
    original = suite.workspace.connectors()["twilio"]
    wrong = pb.Connector()
    wrong.CopyFrom(original)
    wrong.base_url = base_url
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=wrong))

    reply = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(30))
    assert 1 <= len(senders) <= CONCURRENCY
    assert set(senders) == {original.sender}
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", "SENDER_REFUSED")] * 30
    assert len([r for r in reply.results if r.error_message.startswith(NOT_ATTEMPTED)]) >= 30 - len(senders)
    assert all("fix the connector's sender" in r.error_message for r in reply.results)

    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=original))
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(30))
    assert failures(again) == [("DISPATCH_STATUS_SENT", "")] * 30
    assert suite.providers.stats.requests["twilio"] == 30


# -- SES, through an SESv2 stand-in (the sandbox has none; moto cannot refuse a quota) ----------------


@dataclass
class SesStandIn:
    replies: list[Callable[[], web.Response]]
    requests: int = 0
    recipients: list[str] = field(default_factory=list)


def ses_ok() -> web.Response:
    return web.json_response({"MessageId": "0102018f-ses-id"})


def ses_error(status: int, code: str, text: str) -> Callable[[], web.Response]:
    return lambda: web.json_response({"message": text}, status=status, headers={"x-amzn-ErrorType": f"{code}:"})


DAILY_QUOTA = ses_error(400, "LimitExceededException", "Daily message quota exceeded.")
REJECTED = ses_error(400, "MessageRejected", "Email address is not verified.")


@pytest.fixture
async def ses_stand_in() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(*replies: Callable[[], web.Response]) -> tuple[str, SesStandIn]:
        state = SesStandIn(list(replies))

        async def send_email(request: web.Request) -> web.Response:
            state.requests += 1
            state.recipients.append((await request.json())["Destination"]["ToAddresses"][0])
            return state.replies[min(state.requests, len(state.replies)) - 1]()

        app = web.Application()
        app.router.add_post("/v2/email/outbound-emails", send_email)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), state

    yield start
    for server in servers:
        await server.close()


async def put_ses_connector(suite, base_url: str) -> None:
    connector = pb.Connector(
        workspace_id=suite.workspace_id,
        connector_id="ses",
        kind=pb.CONNECTOR_KIND_SES,
        channel=C.CHANNEL_EMAIL,
        base_url=base_url,
        credentials={"access_key_id": "AKIDEXAMPLE", "secret_access_key": "ses-secret", "region": "eu-west-1"},
        sender="news@brand.example",
    )
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=connector))


async def test_a_used_up_ses_quota_stops_the_batch(start_suite, ses_stand_in):
    suite = await start_suite(send_concurrency=CONCURRENCY)
    base_url, ses = await ses_stand_in(DAILY_QUOTA)
    await put_ses_connector(suite, base_url)
    reply = await dispatch(suite, C.CHANNEL_EMAIL, "ses", EMAIL, recipients(30))
    assert 1 <= ses.requests <= CONCURRENCY
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", "QUOTA_EXCEEDED")] * 30
    assert len([r for r in reply.results if r.error_message.startswith(NOT_ATTEMPTED)]) >= 30 - ses.requests

    ses.replies = [ses_ok]  # the quota has room again: once a test send says so, the same instance sends them all
    await checked_by_a_test_send(suite, C.CHANNEL_EMAIL, "ses", EMAIL)
    again = await dispatch(suite, C.CHANNEL_EMAIL, "ses", EMAIL, recipients(30))
    assert failures(again) == [("DISPATCH_STATUS_SENT", "")] * 30


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (ses_error(403, "UnrecognizedClientException", "The security token is invalid."), "PROVIDER_AUTH_FAILED"),
        (ses_error(400, "AccountSuspendedException", "Account suspended."), "ACCOUNT_SUSPENDED"),
        (ses_error(400, "SendingPausedException", "Sending paused for this account."), "SENDING_PAUSED"),
        (ses_error(404, "NotFoundException", "Configuration set <marketing> does not exist."), "SENDER_REFUSED"),
    ],
    ids=["credentials", "suspended", "paused", "configuration-set"],
)
async def test_an_ses_refusal_of_the_account_reaches_the_client_as_its_remedy(start_suite, ses_stand_in, refusal, code):
    """The campaign engine reads the code to decide what to do: one code per remedy, whichever provider."""
    suite = await start_suite(send_concurrency=CONCURRENCY)
    base_url, ses = await ses_stand_in(refusal)
    await put_ses_connector(suite, base_url)
    reply = await dispatch(suite, C.CHANNEL_EMAIL, "ses", EMAIL, recipients(10))
    assert 1 <= ses.requests <= CONCURRENCY
    assert failures(reply) == [("DISPATCH_STATUS_SEND_FAILED", code)] * 10


async def test_ses_refusing_recipients_goes_on_until_the_quota_refuses(start_suite, ses_stand_in, customers):
    """One request at a time, so the order is the batch's: a rejected address and a sent message, then
    the quota. Only the messages after the quota's refusal are left unsent."""
    suite = await start_suite(send_concurrency=1)
    base_url, ses = await ses_stand_in(REJECTED, ses_ok, REJECTED, ses_ok, DAILY_QUOTA)
    await put_ses_connector(suite, base_url)
    people = recipients(8)
    reply = await dispatch(suite, C.CHANNEL_EMAIL, "ses", EMAIL, people)
    assert (
        failures(reply)
        == [
            ("DISPATCH_STATUS_SEND_FAILED", "SES_MessageRejected"),
            ("DISPATCH_STATUS_SENT", ""),
            ("DISPATCH_STATUS_SEND_FAILED", "SES_MessageRejected"),
            ("DISPATCH_STATUS_SENT", ""),
        ]
        + [("DISPATCH_STATUS_SEND_FAILED", "QUOTA_EXCEEDED")] * 4
    )
    assert ses.recipients == [customers[p.anonymous_id].email for p in people[:5]]
    assert [r.error_message.startswith(NOT_ATTEMPTED) for r in reply.results] == [False] * 5 + [True] * 3
