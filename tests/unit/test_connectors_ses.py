"""Unit tests for the SES connector against an in-process SESv2 endpoint: retries, timeouts, errors, logs.

moto (the integration peer) cannot throttle or stall, so those cases are played here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.ses import (
    THROTTLED_WAIT_SECONDS,
    SesConnector,
    email_tags,
    quiet_sdk_loggers,
    reply_fields,
    send_email_params,
)

ADDRESS = "ses.canary.4711@mail.example.org"
SENDER = "news@brand.example.com"
SECRET = "ses-secret-canary-0815"


def message(**fields: Any) -> OutboundMessage:
    values: dict[str, Any] = dict(
        message_id="5f0c1b2a3d4e5f60718293a4b5c6d7e8",
        anonymous_id="anon-1",
        campaign_id="spring sale/2025",
        campaign_instance_id="inst:7",
        to=ADDRESS,
        subject="Hello Ann",
        text_body="Hi Ann",
        html_body="<p>Hi Ann</p>",
    )
    values.update(fields)
    return OutboundMessage(**values)


@dataclass
class FakeSes:
    replies: list[Callable[[], web.Response]]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    stall_seconds: float = 0.0


@pytest.fixture
async def fake_ses() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(*replies: Callable[[], web.Response], stall_seconds: float = 0.0) -> tuple[str, FakeSes]:
        state = FakeSes(list(replies), stall_seconds=stall_seconds)

        async def handle(request: web.Request) -> web.Response:
            state.bodies.append(await request.json())
            if state.stall_seconds:
                await asyncio.sleep(state.stall_seconds)
            return state.replies[min(len(state.bodies), len(state.replies)) - 1]()

        app = web.Application()
        app.router.add_post("/v2/email/outbound-emails", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/"), state

    yield start
    for server in servers:
        await server.close()


def ok(message_id: str = "0102018f-ses-id") -> Callable[[], web.Response]:
    return lambda: web.json_response({"MessageId": message_id})


def aws_error(status: int, code: str, text: str) -> Callable[[], web.Response]:
    return lambda: web.json_response({"message": text}, status=status, headers={"x-amzn-ErrorType": f"{code}:"})


@dataclass
class Sleeps:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def connector(base_url: str, sleeps: Sleeps | None = None, **policy: float) -> SesConnector:
    return SesConnector(
        access_key_id="AKIDEXAMPLE",
        secret_access_key=SECRET,
        region="eu-west-1",
        sender=SENDER,
        retry=RetryPolicy(**{"read_timeout_seconds": 5.0, "connect_timeout_seconds": 2.0, **policy}),  # type: ignore[arg-type]
        configuration_set="marketing",
        base_url=base_url,
        allow_private=True,
        sleep=sleeps or Sleeps(),
    )


async def test_sent_with_tags_headers_and_configuration_set(fake_ses) -> None:
    base_url, state = await fake_ses(ok())
    ses = connector(base_url)
    try:
        (outcome,) = await ses.send([message(headers={"List-Unsubscribe": "<https://u.example>", "To": "x@y.z"})])
    finally:
        await ses.close()
    assert (outcome.status, outcome.provider_message_id, outcome.attempts) == (SendStatus.SENT, "0102018f-ses-id", 1)
    (body,) = state.bodies
    assert body["FromEmailAddress"] == "news@brand.example.com"
    assert body["Destination"] == {"ToAddresses": [ADDRESS]}
    assert body["ConfigurationSetName"] == "marketing"
    assert body["Content"]["Simple"]["Headers"] == [{"Name": "List-Unsubscribe", "Value": "<https://u.example>"}]
    assert body["Content"]["Simple"]["Body"]["Text"]["Data"] == "Hi Ann"
    assert body["EmailTags"] == [
        {"Name": "tokensend_message_id", "Value": "5f0c1b2a3d4e5f60718293a4b5c6d7e8"},
        {"Name": "tokensend_campaign", "Value": "spring_sale_2025"},
        {"Name": "tokensend_instance", "Value": "inst_7"},
    ]


async def test_throttling_is_retried(fake_ses) -> None:
    base_url, state = await fake_ses(aws_error(429, "TooManyRequestsException", "Maximum sending rate exceeded."), ok())
    sleeps = Sleeps()
    ses = connector(base_url, sleeps)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert outcome.status is SendStatus.SENT and outcome.attempts == 2
    assert len(state.bodies) == 2 and len(sleeps.delays) == 1
    assert sleeps.delays[0] >= THROTTLED_WAIT_SECONDS  # the quota is a second's: not retried within it


async def test_persistent_throttling_ends_rate_limited(fake_ses) -> None:
    base_url, state = await fake_ses(aws_error(400, "Throttling", "Rate exceeded"))
    sleeps = Sleeps()
    ses = connector(base_url, sleeps, max_retries=2)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "RATE_LIMITED", 3)
    assert len(sleeps.delays) == 2 and min(sleeps.delays) >= THROTTLED_WAIT_SECONDS


async def test_throttling_is_logged_a_line_a_minute_not_one_per_message(fake_ses, caplog) -> None:
    """Each message's retries would otherwise write a line each: 200,000 for a throttled campaign."""
    base_url, state = await fake_ses(aws_error(400, "Throttling", "Rate exceeded"))
    ses = connector(base_url, Sleeps(), max_retries=1)
    try:
        with caplog.at_level(logging.INFO, logger="services.dispatcher.connectors.ses"):
            outcomes = await ses.send([message() for _ in range(10)])
    finally:
        await ses.close()
    assert [o.error_code for o in outcomes] == ["RATE_LIMITED"] * 10 and len(state.bodies) == 20
    lines = [r.getMessage() for r in caplog.records if r.name == "services.dispatcher.connectors.ses"]
    assert len(lines) == 1 and lines[0].startswith("ses attempt 1 failed (RATE_LIMITED); retrying in ")


@pytest.mark.parametrize(
    ("status", "code"), [(400, "Throttling"), (429, "TooManyRequestsException"), (400, "LimitExceededException")]
)
async def test_a_used_up_daily_quota_fails_at_once(fake_ses, status: int, code: str) -> None:
    """SES answers a used-up daily quota as throttling; it is a rolling 24 hours', so a retry within the
    batch only meets it again. The recipient fails at once, for a re-run once the quota has room."""
    base_url, state = await fake_ses(aws_error(status, code, "Daily message quota exceeded."), ok())
    sleeps = Sleeps()
    ses = connector(base_url, sleeps)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "QUOTA_EXCEEDED", 1)
    assert outcome.error_message == (
        f"ses's daily sending quota is used up ({code}: Daily message quota exceeded); "
        "not retried: re-run the instance once the 24-hour quota has room"
    )
    assert len(state.bodies) == 1 and sleeps.delays == []


@pytest.mark.parametrize(
    "code", ["SendingPausedException", "AccountSendingPausedException", "ConfigurationSetSendingPausedException"]
)
async def test_paused_sending_fails_at_once_saying_so(fake_ses, code: str) -> None:
    base_url, state = await fake_ses(aws_error(400, code, f"Sending paused for this account ({ADDRESS})"), ok())
    sleeps = Sleeps()
    ses = connector(base_url, sleeps)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SENDING_PAUSED", 1)
    assert outcome.error_message == (
        f"ses sending is paused for the account or its configuration set ({code}, HTTP 400); "
        "not retried: resume sending in SES, then re-run the instance"
    )
    assert len(state.bodies) == 1 and sleeps.delays == []


@pytest.mark.parametrize(
    ("status", "code", "text", "error_code"),
    [
        (400, "LimitExceededException", "Daily message quota exceeded.", "QUOTA_EXCEEDED"),
        (400, "AccountSendingPausedException", "Sending paused", "SENDING_PAUSED"),
        (403, "UnrecognizedClientException", "The security token included in the request is invalid.", None),
        (400, "AccountSuspendedException", "Account suspended", "ACCOUNT_SUSPENDED"),
        (404, "NotFoundException", "Configuration set <marketing> does not exist.", "SENDER_REFUSED"),
    ],
)
async def test_a_refused_account_leaves_the_rest_of_the_batch_unsent(
    fake_ses, status: int, code: str, text: str, error_code: str | None
) -> None:
    """A rejected address and a sent message, then a refusal of the account: the messages after it would
    meet it too, so they fail with its code and no request."""
    error_code = error_code or "PROVIDER_AUTH_FAILED"
    base_url, state = await fake_ses(
        aws_error(400, "MessageRejected", "Email address is not verified."), ok(), aws_error(status, code, text)
    )
    ses = connector(base_url)
    batch = [message(message_id=f"{i:032x}") for i in range(6)]
    try:
        outcomes = await ses.send(batch)
    finally:
        await ses.close()
    assert len(state.bodies) == 3
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [
        (SendStatus.FAILED, "SES_MessageRejected", 1),
        (SendStatus.SENT, "", 1),
        (SendStatus.FAILED, error_code, 1),
    ] + [(SendStatus.FAILED, error_code, 0)] * 3
    assert [o.message_id for o in outcomes] == [m.message_id for m in batch]
    assert outcomes[3].error_message == (
        f"not attempted: an earlier message of the batch was refused for the connector's account "
        f"({outcomes[2].error_message})"
    )


@pytest.mark.parametrize(
    "code",
    [
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "InvalidSignatureException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
    ],
)
async def test_a_refused_access_key_fails_provider_auth_failed(fake_ses, code: str) -> None:
    """An unknown or expired key, or a wrong secret (the signature): the connector's credentials to fix."""
    base_url, state = await fake_ses(aws_error(403, code, f"The request signature for {ADDRESS} is wrong"), ok())
    sleeps = Sleeps()
    ses = connector(base_url, sleeps)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1)
    assert outcome.error_message == (
        f"ses refused the connector's access key ({code}, HTTP 403); "
        "not retried: check the connector's access key ID and secret access key"
    )
    assert outcome.account_refused and len(state.bodies) == 1 and sleeps.delays == []


async def test_a_suspended_account_fails_account_suspended(fake_ses) -> None:
    base_url, state = await fake_ses(aws_error(400, "AccountSuspendedException", "Account suspended"), ok())
    ses = connector(base_url)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "ACCOUNT_SUSPENDED", 1)
    assert outcome.error_message == (
        "ses suspended the account (AccountSuspendedException, HTTP 400); "
        "not retried: take it up with AWS, then re-run the instance"
    )
    assert outcome.account_refused and len(state.bodies) == 1


@pytest.mark.parametrize("code", ["AccessDeniedException", "AccessDenied"])
async def test_access_denied_fails_provider_auth_failed_but_stops_no_batch(fake_ses, code: str) -> None:
    """The key's IAM policy refused the send: its permissions to fix. A condition on ses:Recipients may
    refuse some recipients and allow the rest, so the batch's other messages are still sent."""
    denied = aws_error(403, code, f"User is not authorized to perform ses:SendEmail on {ADDRESS}")
    base_url, state = await fake_ses(denied, ok())
    ses = connector(base_url)
    batch = [message(message_id=f"{i:032x}") for i in range(3)]
    try:
        outcomes = await ses.send(batch)
    finally:
        await ses.close()
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [
        (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1),
        (SendStatus.SENT, "", 1),
        (SendStatus.SENT, "", 1),
    ]
    assert outcomes[0].error_message == (
        f"the access key's IAM policy refused the send ({code}, HTTP 403); not retried: "
        "check the policy's ses:SendEmail permission and its conditions on recipients and sender"
    )
    assert not outcomes[0].account_refused and len(state.bodies) == 3


UNVERIFIED = "Email address is not verified. The following identities failed the check in region EU-WEST-1:"
NOT_FOUND = (
    "ses refused the connector's configuration: its configuration set was not found (NotFoundException, HTTP 404); "
    "not retried: create it in SES or fix the connector's configuration set, then re-run the instance"
)
MAIL_FROM = (
    "ses refused the connector's sender: the custom MAIL FROM domain of its identity is not verified ({code}, "
    "HTTP 400); not retried: verify that domain in SES or fix the connector's sender, then re-run the instance"
)
SENDER_UNVERIFIED = (
    "ses refused the connector's sender: its identity is not verified in the connector's region (MessageRejected, "
    "HTTP 400); not retried: verify it in SES or fix the connector's sender, then re-run the instance"
)


@pytest.mark.parametrize(
    ("status", "code", "text", "expected"),
    [
        (404, "NotFoundException", "Configuration set <marketing> does not exist.", NOT_FOUND),
        (400, "MailFromDomainNotVerifiedException", f"MAIL FROM domain of {SENDER} not verified", MAIL_FROM),
        (400, "MailFromDomainNotVerified", f"MAIL FROM domain of {SENDER} not verified", MAIL_FROM),
        (400, "MessageRejected", f"{UNVERIFIED} {SENDER}", SENDER_UNVERIFIED),
        (400, "MessageRejected", f"{UNVERIFIED} {ADDRESS}, {SENDER.upper()}", SENDER_UNVERIFIED),
        (400, "MessageRejected", f"Email address not verified {SENDER}", SENDER_UNVERIFIED),  # moto's words
    ],
    ids=["configuration-set", "mail-from", "mail-from-v1", "sender", "sender-and-recipient", "moto"],
)
async def test_a_refused_sender_or_configuration_fails_sender_refused(
    fake_ses, status: int, code: str, text: str, expected: str
) -> None:
    """A missing configuration set, an unverified sender identity or MAIL FROM domain: every message of
    the batch would meet it, whoever the recipient. SES's text is read for the identities it names, never
    repeated."""
    base_url, state = await fake_ses(aws_error(status, code, text), ok())
    sleeps = Sleeps()
    ses = connector(base_url, sleeps)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SENDER_REFUSED", 1)
    assert outcome.error_message == expected.format(code=code)
    assert outcome.account_refused and len(state.bodies) == 1 and sleeps.delays == []
    assert SENDER not in outcome.error_message and ADDRESS not in outcome.error_message


@pytest.mark.parametrize(
    "text",
    [
        f"{UNVERIFIED} {ADDRESS}",  # SES's sandbox refuses recipients not verified: one at a time
        f"{UNVERIFIED} x{SENDER}",  # a recipient's address that ends with the sender's is not it
        "Email address is not verified.",
    ],
    ids=["recipient", "lookalike", "no-identity"],
)
async def test_an_unverified_recipient_stops_nothing(fake_ses, text: str) -> None:
    base_url, state = await fake_ses(aws_error(400, "MessageRejected", text), ok())
    ses = connector(base_url)
    try:
        outcomes = await ses.send([message(message_id=f"{i:032x}") for i in range(3)])
    finally:
        await ses.close()
    assert [(o.status, o.error_code) for o in outcomes] == [(SendStatus.FAILED, "SES_MessageRejected")] + [
        (SendStatus.SENT, "")
    ] * 2
    assert not outcomes[0].account_refused and len(state.bodies) == 3


async def test_server_errors_are_retried(fake_ses) -> None:
    base_url, state = await fake_ses(aws_error(500, "InternalFailure", "oops"), ok())
    ses = connector(base_url)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert outcome.status is SendStatus.SENT and len(state.bodies) == 2


async def test_rejection_reports_the_code_only(fake_ses) -> None:
    base_url, state = await fake_ses(aws_error(400, "MessageRejected", f"Email address is not verified: {ADDRESS}"))
    ses = connector(base_url)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SES_MessageRejected", 1)
    assert ADDRESS not in outcome.error_message and "verified" not in outcome.error_message
    assert len(state.bodies) == 1


async def test_read_timeout_is_outcome_unknown_and_not_resent_by_botocore_either(fake_ses) -> None:
    base_url, state = await fake_ses(ok(), stall_seconds=3.0)
    ses = connector(base_url, read_timeout_seconds=0.3)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code) == (SendStatus.OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN")
    assert len(state.bodies) == 1


async def test_connection_refused_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    ses = connector(f"http://127.0.0.1:{port}", sleeps, max_retries=2)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "CONNECTION_FAILED", 3)
    assert len(sleeps.delays) == 2


async def test_one_client_is_reused_and_closed(fake_ses) -> None:
    base_url, state = await fake_ses(ok())
    ses = connector(base_url)
    await ses.send([message()])
    client = ses._client
    await ses.send([message(message_id="another")])
    assert ses._client is client and len(state.bodies) == 2
    await ses.close()
    assert ses._client is None


async def test_sdk_debug_logs_never_carry_the_message(fake_ses, captured_logs) -> None:
    base_url, _ = await fake_ses(aws_error(400, "MessageRejected", f"not verified: {ADDRESS}"))
    ses = connector(base_url)
    try:
        await ses.send([message()])
    finally:
        await ses.close()
    text = captured_logs.text + json.dumps([r.args for r in captured_logs.records], default=str)
    for canary in (ADDRESS, "Hi Ann", SECRET):
        assert canary not in text


def test_quiet_sdk_loggers_keeps_a_stricter_level() -> None:
    logging.getLogger("botocore").setLevel(logging.ERROR)
    quiet_sdk_loggers()
    assert logging.getLogger("botocore").level == logging.ERROR
    logging.getLogger("botocore").setLevel(logging.WARNING)


def test_tags_allow_only_safe_characters() -> None:
    tags = email_tags(message(campaign_id="Black Friday ✓ 2025!", campaign_instance_id=""))
    assert tags == [
        {"Name": "tokensend_message_id", "Value": "5f0c1b2a3d4e5f60718293a4b5c6d7e8"},
        {"Name": "tokensend_campaign", "Value": "Black_Friday___2025_"},
    ]


def test_params_without_extra_headers_or_configuration_set() -> None:
    params = send_email_params(message(html_body=""), "news@brand.example.com")
    assert "ConfigurationSetName" not in params
    assert params["Content"]["Simple"] == {
        "Subject": {"Data": "Hello Ann", "Charset": "UTF-8"},
        "Body": {"Text": {"Data": "Hi Ann", "Charset": "UTF-8"}},
    }


async def test_a_name_resolving_to_a_private_address_is_refused(fake_ses) -> None:
    base_url, state = await fake_ses(ok())
    ses = connector(base_url.replace("127.0.0.1", "localhost"))
    ses._allow_private = False  # as a deployment without TOKENSEND_ALLOW_PRIVATE_NETWORKS
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "BLOCKED_ADDRESS")
    assert state.bodies == []


@pytest.fixture
async def raw_ses() -> AsyncIterator[Callable[..., Any]]:
    """An endpoint that answers with whatever `reply` streams, for replies aiohttp's helpers cannot make."""
    servers: list[TestServer] = []

    async def start(reply: Callable[[web.Request], Any]) -> str:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            return await reply(request)

        app = web.Application()
        app.router.add_post("/v2/email/outbound-emails", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def test_a_reply_dripping_forever_ends_within_the_attempts_time(raw_ses) -> None:
    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while True:  # a byte every 0.1 s: each read is quick, the whole never ends
            await response.write(b" ")
            await asyncio.sleep(0.1)

    base_url = await raw_ses(drip)
    ses = connector(base_url, connect_timeout_seconds=0.5, read_timeout_seconds=0.5)
    try:
        started = asyncio.get_running_loop().time()
        (outcome,) = await ses.send([message()])
        took = asyncio.get_running_loop().time() - started
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code) == (SendStatus.OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN")
    assert took < 3.0


async def test_an_endless_reply_is_read_to_the_cap_only(raw_ses) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b'{"MessageId": "' + b"x" * 65536
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(chunk)

    base_url = await raw_ses(endless)
    ses = connector(base_url)
    try:
        (outcome,) = await asyncio.wait_for(ses.send([message()]), 10)
    finally:
        await ses.close()
    # Accepted (2xx) with a reply that cannot be read: sent, without a provider ID.
    assert (outcome.status, outcome.provider_message_id) == (SendStatus.SENT, "")


@pytest.mark.parametrize(("status", "expected"), [(200, SendStatus.SENT), (400, SendStatus.FAILED)])
async def test_a_reply_nested_deeper_than_a_parser_recurses_is_not_parsed(raw_ses, status, expected) -> None:
    async def deep(request: web.Request) -> web.Response:
        return web.Response(status=status, body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")

    base_url = await raw_ses(deep)
    ses = connector(base_url)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert outcome.status is expected
    if expected is SendStatus.FAILED:
        assert outcome.error_code == "SES_Unknown"


async def test_an_error_code_that_is_not_an_aws_code_is_not_repeated(fake_ses) -> None:
    base_url, _ = await fake_ses(aws_error(400, ADDRESS, "x"))
    ses = connector(base_url)
    try:
        (outcome,) = await ses.send([message()])
    finally:
        await ses.close()
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "SES_Unknown")
    assert "canary" not in outcome.error_code + outcome.error_message


def test_reply_fields_keeps_only_the_text_fields_botocore_reads() -> None:
    assert reply_fields(b'{"MessageId": "m-1", "Extra": {"to": "a@b.c"}, "message": 5}') == b'{"MessageId":"m-1"}'
    assert reply_fields(b"<xml/>") == b"{}"
    assert reply_fields(b"[1]") == b"{}"
    assert reply_fields(b"") == b"{}"


async def test_an_international_domain_is_sent_in_punycode(fake_ses) -> None:
    """SES has no SMTPUTF8: a domain outside ASCII must reach it in Punycode (botocore's Destination)."""
    base_url, state = await fake_ses(ok())
    ses = SesConnector(
        access_key_id="AKIDEXAMPLE",
        secret_access_key=SECRET,
        region="eu-west-1",
        sender="news@bücher.example",
        retry=RetryPolicy(),
        base_url=base_url,
        allow_private=True,
    )
    try:
        (outcome,) = await ses.send([message(to="ann@müller.example")])
    finally:
        await ses.close()
    assert outcome.status is SendStatus.SENT
    (body,) = state.bodies
    assert body["FromEmailAddress"] == "news@xn--bcher-kva.example"
    assert body["Destination"] == {"ToAddresses": ["ann@xn--mller-kva.example"]}
