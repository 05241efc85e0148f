"""The SMTP connector against aiosmtpd relays: plain, STARTTLS, implicit TLS, AUTH, refusals, lost replies."""

# Fixtures imported from peers by name are the tests' parameters, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from sandbox.processes import free_port
from services.dispatcher.connectors.base import OutboundMessage, SendStatus
from services.dispatcher.connectors.http_retry import RetryPolicy
from services.dispatcher.connectors.smtp import SmtpConnector
from tests.integration.peers import (  # noqa: F401
    RecordingHandler,
    SmtpRelay,
    TlsMaterial,
    make_tls_material,
    smtp_relay,
    tls_material,
)

pytestmark = pytest.mark.integration

SENDER = "news@brand.example.com"
ADDRESS = "smtp.canary.1414@mail.example.org"
PASSWORD = "relay-password-canary-5151"


@dataclass
class Sleeps:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def smtp(relay: SmtpRelay, *, scheme: str = "smtp", sleeps: Sleeps | None = None, **options: str) -> SmtpConnector:
    return SmtpConnector(
        host="127.0.0.1",
        port=relay.port,
        implicit_tls=scheme == "smtps",
        sender=SENDER,
        retry=RetryPolicy(max_retries=2, read_timeout_seconds=5.0, connect_timeout_seconds=2.0),
        allow_private=True,
        sleep=sleeps or Sleeps(),
        **options,
    )


def message(i: int = 1, **fields: object) -> OutboundMessage:
    values: dict[str, object] = dict(
        message_id=f"{i:032x}",
        anonymous_id=f"anon-{i}",
        campaign_id="camp-1",
        campaign_instance_id="inst-1",
        to=ADDRESS if i == 1 else f"customer{i}@mail.example.org",
        subject="Spring sale",
        text_body="Hi Ann\n.\n20% off",
        html_body="<p>Hi Ann</p>",
        headers={"List-Unsubscribe": "<https://brand.example.com/u>"},
    )
    values.update(fields)
    return OutboundMessage(**values)  # type: ignore[arg-type]


async def send(connector: SmtpConnector, messages: list[OutboundMessage]):  # noqa: ANN201
    try:
        return await connector.send(messages)
    finally:
        await connector.close()


def assert_is_our_message(relay: SmtpRelay, index: int = 0) -> None:
    mail = relay.handler.received[index]
    assert (mail.mail_from, mail.rcpt_tos) == (SENDER, [ADDRESS])
    email = mail.message
    assert email["Message-ID"] == f"<{1:032x}@tokensend>"
    assert (email["From"], email["To"], email["Subject"]) == (SENDER, ADDRESS, "Spring sale")
    assert email["List-Unsubscribe"] == "<https://brand.example.com/u>"
    parts = {p.get_content_type(): p.get_content().replace("\r\n", "\n") for p in email.iter_parts()}
    assert parts == {"text/plain": "Hi Ann\n.\n20% off\n", "text/html": "<p>Hi Ann</p>\n"}


async def test_plain_relay(smtp_relay) -> None:
    relay = smtp_relay()
    (outcome,) = await send(smtp(relay), [message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert outcome.provider_message_id == f"<{1:032x}@tokensend>"
    assert_is_our_message(relay)
    assert relay.handler.received[0].tls is False


async def test_starttls_when_offered_with_a_private_ca(smtp_relay, tls_material: TlsMaterial) -> None:
    relay = smtp_relay(tls_context=tls_material.server_context())
    (outcome,) = await send(smtp(relay, ca_cert_pem=tls_material.ca_pem), [message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert_is_our_message(relay)
    assert relay.handler.received[0].tls is True


async def test_implicit_tls(smtp_relay, tls_material: TlsMaterial) -> None:
    relay = smtp_relay(ssl_context=tls_material.server_context())
    (outcome,) = await send(smtp(relay, scheme="smtps", ca_cert_pem=tls_material.ca_pem), [message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert_is_our_message(relay)
    assert relay.handler.received[0].tls is True


async def test_auth_over_starttls(smtp_relay, tls_material: TlsMaterial) -> None:
    relay = smtp_relay(
        tls_context=tls_material.server_context(),
        users={"brand": PASSWORD},
        auth_required=True,
        auth_require_tls=True,
    )
    connector = smtp(relay, ca_cert_pem=tls_material.ca_pem, username="brand", password=PASSWORD)
    (outcome,) = await send(connector, [message()])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    assert relay.handler.received[0].authenticated is True


async def test_a_wrong_password_fails_provider_auth_failed(smtp_relay, tls_material: TlsMaterial) -> None:
    relay = smtp_relay(tls_context=tls_material.server_context(), users={"brand": PASSWORD}, auth_required=True)
    connector = smtp(relay, ca_cert_pem=tls_material.ca_pem, username="brand", password="wrong")
    (outcome,) = await send(connector, [message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "PROVIDER_AUTH_FAILED")
    assert outcome.error_message == (
        "the relay refused the connector's login (535); not retried: check its username and password"
    )
    assert PASSWORD not in outcome.error_message
    # aiosmtplib tries each mechanism the relay offers (PLAIN, LOGIN) before giving up; never more rounds.
    assert relay.handler.received == [] and 1 <= relay.handler.auth_attempts <= 2


async def test_a_wrong_password_leaves_the_rest_of_the_batch_unsent(smtp_relay, tls_material: TlsMaterial) -> None:
    """The relay refuses the login: every message of the batch would meet it, on a session of its own.
    The first fails with the code, the rest with it too, unsent: one login, not one per message."""
    relay = smtp_relay(tls_context=tls_material.server_context(), users={"brand": PASSWORD}, auth_required=True)
    connector = smtp(relay, ca_cert_pem=tls_material.ca_pem, username="brand", password="wrong")
    outcomes = await send(connector, [message(i) for i in range(1, 6)])
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [
        (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1)
    ] + [(SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 0)] * 4
    assert all(o.error_message.startswith("not attempted: an earlier message") for o in outcomes[1:])
    assert 1 <= relay.handler.auth_attempts <= 2 and relay.handler.received == []


async def test_a_relay_that_wants_a_login_the_connector_lacks_stops_the_batch(
    smtp_relay, tls_material: TlsMaterial
) -> None:
    """No username set, and the relay answers MAIL with 530 (authentication required): every message would
    meet it, so the first fails with what to fix and the rest fail with it, unsent."""
    relay = smtp_relay(tls_context=tls_material.server_context(), users={"brand": PASSWORD}, auth_required=True)
    sleeps = Sleeps()
    outcomes = await send(
        smtp(relay, ca_cert_pem=tls_material.ca_pem, sleeps=sleeps), [message(i) for i in range(1, 4)]
    )
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [
        (SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 1)
    ] + [(SendStatus.FAILED, "PROVIDER_AUTH_FAILED", 0)] * 2
    assert outcomes[0].error_message == (
        "the relay requires a login (530); not retried: set the connector's username and password"
    )
    assert relay.handler.rcpt_calls == 0 and relay.handler.received == [] and sleeps.delays == []


async def test_a_login_refused_as_too_weak_fails_provider_auth_failed(smtp_relay, tls_material: TlsMaterial) -> None:
    """534 (Gmail: "Please log in with your web browser", an app password needed) is the connector's
    login to fix, as a 535 is."""

    def too_weak(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
        return AuthResult(success=False, handled=False, message="534 5.7.9 Application-specific password required")

    relay = smtp_relay(tls_context=tls_material.server_context(), authenticator=too_weak, auth_required=True)
    connector = smtp(relay, ca_cert_pem=tls_material.ca_pem, username="brand", password=PASSWORD)
    outcomes = await send(connector, [message(i) for i in range(1, 3)])
    assert [(o.error_code, o.attempts) for o in outcomes] == [("PROVIDER_AUTH_FAILED", 1), ("PROVIDER_AUTH_FAILED", 0)]
    assert outcomes[0].error_message == (
        "the relay refused the connector's login (534); not retried: check its username and password"
    )


async def test_a_relay_offering_no_login_fails_at_once(smtp_relay, tls_material: TlsMaterial) -> None:
    """A username set, and a relay whose EHLO offers no mechanism to log in with (an MX, not a submission
    port): no retry makes one appear, so it fails at once, and the batch with it."""
    relay = smtp_relay(
        tls_context=tls_material.server_context(), users={"brand": PASSWORD}, auth_exclude_mechanism=["PLAIN", "LOGIN"]
    )
    sleeps = Sleeps()
    connector = smtp(relay, ca_cert_pem=tls_material.ca_pem, username="brand", password=PASSWORD, sleeps=sleeps)
    outcomes = await send(connector, [message(i) for i in range(1, 3)])
    assert [(o.error_code, o.attempts) for o in outcomes] == [("PROVIDER_AUTH_FAILED", 1), ("PROVIDER_AUTH_FAILED", 0)]
    assert outcomes[0].error_message == (
        "the relay offers no login mechanism the connector can use; "
        "not retried: use the relay's submission port, or no username"
    )
    assert relay.handler.auth_attempts == 0 and relay.handler.received == [] and sleeps.delays == []


async def test_a_refused_recipient_does_not_stop_the_batch(smtp_relay) -> None:
    relay = smtp_relay(RecordingHandler(rcpt_reply="550 5.1.1 no such user"))
    outcomes = await send(smtp(relay), [message(i) for i in range(1, 4)])
    assert [(o.error_code, o.attempts) for o in outcomes] == [("SMTP_550", 1)] * 3
    assert relay.handler.rcpt_calls == 3


async def test_credentials_are_never_sent_without_tls(smtp_relay) -> None:
    relay = smtp_relay(users={"brand": PASSWORD}, auth_require_tls=False)
    connector = smtp(relay, username="brand", password=PASSWORD)
    (outcome,) = await send(connector, [message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "SMTP_TLS_REQUIRED")
    assert relay.handler.auth_attempts == 0 and relay.handler.received == []


async def test_an_untrusted_certificate_fails_without_retry(smtp_relay, tls_material: TlsMaterial, tmp_path) -> None:
    other_ca = make_tls_material(tmp_path, common_name="someone else's CA")
    relay = smtp_relay(tls_context=tls_material.server_context())
    sleeps = Sleeps()
    (outcome,) = await send(smtp(relay, ca_cert_pem=other_ca.ca_pem, sleeps=sleeps), [message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "CONNECTION_FAILED", 1)
    assert relay.handler.received == [] and sleeps.delays == []


async def test_550_fails_and_the_reply_text_is_not_quoted(smtp_relay) -> None:
    relay = smtp_relay(RecordingHandler(rcpt_reply=f"550 5.1.1 <{ADDRESS}>: Recipient address rejected"))
    (outcome,) = await send(smtp(relay), [message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SMTP_550", 1)
    assert ADDRESS not in outcome.error_message and "rejected" not in outcome.error_message


async def test_4xx_is_retried_then_fails(smtp_relay) -> None:
    relay = smtp_relay(RecordingHandler(rcpt_reply="451 4.7.1 Greylisted, try again"))
    sleeps = Sleeps()
    (outcome,) = await send(smtp(relay, sleeps=sleeps), [message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "SMTP_451", 3)
    assert relay.handler.rcpt_calls == 3 and len(sleeps.delays) == 2


async def test_greylisting_and_lost_sessions_are_logged_a_line_a_minute_not_one_per_message(smtp_relay, caplog) -> None:
    """A relay greylisting a campaign, or cutting each session after DATA, would otherwise write a line
    per message (200,000 for a large campaign): one line a kind, the metrics count the rest."""
    greylisting = smtp_relay(RecordingHandler(rcpt_reply="451 4.7.1 Greylisted, try again"))
    dropping = smtp_relay(RecordingHandler(drop_after_data=True))
    with caplog.at_level(logging.INFO, logger="services.dispatcher.connectors.smtp"):
        retried = await send(smtp(greylisting), [message(i) for i in range(1, 6)])
        unknown = await send(smtp(dropping), [message(i) for i in range(1, 6)])
    assert {o.error_code for o in retried} == {"SMTP_451"} and greylisting.handler.rcpt_calls == 15
    assert {o.error_code for o in unknown} == {"OUTCOME_UNKNOWN"} and len(dropping.handler.received) == 5
    lines = [r.getMessage() for r in caplog.records if r.name == "services.dispatcher.connectors.smtp"]
    assert len([line for line in lines if "retrying in" in line]) == 1
    assert len([line for line in lines if "not resent" in line]) == 1


async def test_a_refused_recipient_does_not_spoil_the_batch(smtp_relay) -> None:
    class RefuseFirst(RecordingHandler):
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001, ANN201
            if address == ADDRESS:
                self.rcpt_calls += 1
                return "550 5.1.1 unknown"
            return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    relay = smtp_relay(RefuseFirst())
    outcomes = await send(smtp(relay), [message(1), message(2), message(3)])
    assert [o.status for o in outcomes] == [SendStatus.FAILED, SendStatus.SENT, SendStatus.SENT]
    assert [m.rcpt_tos for m in relay.handler.received] == [
        ["customer2@mail.example.org"],
        ["customer3@mail.example.org"],
    ]


async def test_connection_lost_after_data_is_outcome_unknown_and_not_resent(smtp_relay) -> None:
    relay = smtp_relay(RecordingHandler(drop_after_data=True))
    sleeps = Sleeps()
    (outcome,) = await send(smtp(relay, sleeps=sleeps), [message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN")
    assert len(relay.handler.received) == 1  # the relay did get it: resending would deliver it twice
    assert sleeps.delays == []


@pytest.mark.parametrize("reply", ["queued, without a code", "250 " + "q" * 9000], ids=["no code", "too long"])
async def test_an_unreadable_reply_after_data_is_outcome_unknown_and_not_resent(smtp_relay, reply) -> None:
    relay = smtp_relay(RecordingHandler(data_reply=reply))
    sleeps = Sleeps()
    (outcome,) = await send(smtp(relay, sleeps=sleeps), [message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.OUTCOME_UNKNOWN, "OUTCOME_UNKNOWN")
    assert len(relay.handler.received) == 1 and sleeps.delays == []


async def test_connection_refused_is_retried(smtp_relay) -> None:
    relay = smtp_relay()
    relay.controller.stop()
    sleeps = Sleeps()
    (outcome,) = await send(smtp(relay, sleeps=sleeps), [message()])
    assert (outcome.status, outcome.error_code, outcome.attempts) == (SendStatus.FAILED, "CONNECTION_FAILED", 3)
    assert len(sleeps.delays) == 2


class SessionCounter:
    """A listening socket that counts the connections it accepts, and greets each with `greeting` then
    hangs up, or with nothing at all (a relay that accepts and never answers)."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.greeting:
            writer.write(self.greeting)
            await writer.drain()
        else:
            await reader.read()  # until the client gives up
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()


def connector_on(port: int, sleeps: Sleeps, **retry: float) -> SmtpConnector:
    return SmtpConnector(
        host="127.0.0.1",
        port=port,
        implicit_tls=False,
        sender=SENDER,
        retry=RetryPolicy(**{"max_retries": 2, "connect_timeout_seconds": 2.0, **retry}),  # type: ignore[arg-type]
        allow_private=True,
        sleep=sleeps,
    )


NOT_ATTEMPTED = "not attempted: the relay could not be reached for an earlier message through the connector"


async def test_a_refused_relay_gets_the_retries_of_one_message_not_of_each() -> None:
    """Nothing listens: the batch's first message spends the connection retries, and the rest fail at
    once with its code, unsent (released for a re-run), where each spent its own retries."""
    sleeps = Sleeps()
    outcomes = await send(connector_on(free_port(), sleeps), [message(i) for i in range(1, 6)])
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [(SendStatus.FAILED, "CONNECTION_FAILED", 3)] + [
        (SendStatus.FAILED, "CONNECTION_FAILED", 0)
    ] * 4
    assert outcomes[0].error_message == "could not talk to the relay after 3 attempts"
    assert all(
        o.error_message
        == f"{NOT_ATTEMPTED} (could not talk to the relay after 3 attempts); not sent, a re-run sends it"
        for o in outcomes[1:]
    )
    assert len(sleeps.delays) == 2
    assert not any(o.account_refused for o in outcomes)  # the relay's trouble, not the connector's account


async def test_a_relay_answering_421_on_connect_is_tried_three_times_for_the_batch() -> None:
    relay = SessionCounter(b"421 4.3.2 Service not available, closing transmission channel\r\n")
    port = await relay.start()
    try:
        outcomes = await send(connector_on(port, Sleeps()), [message(i) for i in range(1, 6)])
    finally:
        await relay.stop()
    assert relay.connections == 3
    assert [(o.status, o.error_code, o.attempts) for o in outcomes] == [(SendStatus.FAILED, "SMTP_421", 3)] + [
        (SendStatus.FAILED, "SMTP_421", 0)
    ] * 4
    assert outcomes[0].error_message == "relay deferred (421) after 3 attempts"
    assert all(o.error_message.startswith(NOT_ATTEMPTED) for o in outcomes[1:])


async def test_batches_sent_at_once_share_the_relay_retries() -> None:
    """Batches through one connector at the same time (a campaign's senders): the relay gets the retries
    of one message in all, and every message fails with the same code, none sent."""
    relay = SessionCounter(b"421 4.3.2 Try again later\r\n")
    port = await relay.start()
    sleeps = Sleeps()
    connector = connector_on(port, sleeps)
    try:
        batches = await asyncio.gather(
            *(connector.send([message(10 * b + i) for i in range(1, 4)]) for b in range(1, 4))
        )
    finally:
        await connector.close()
        await relay.stop()
    outcomes = [o for batch in batches for o in batch]
    assert relay.connections == 3 and len(sleeps.delays) == 2
    assert {(o.status, o.error_code) for o in outcomes} == {(SendStatus.FAILED, "SMTP_421")}
    assert sum(o.attempts for o in outcomes) == 3


async def test_a_relay_that_never_greets_costs_the_connect_timeout_not_the_read_timeout() -> None:
    """It accepts and says nothing (a hung server, a blackholing balancer): each try waits the connect
    timeout for the greeting, and the batch is given up on after the relay's three tries."""
    relay = SessionCounter()
    port = await relay.start()
    connector = connector_on(port, Sleeps(), connect_timeout_seconds=0.5, read_timeout_seconds=600.0)
    try:
        # Generous: three 0.5 s tries; waiting the read timeout for the greeting would take 10 minutes.
        async with asyncio.timeout(60):
            outcomes = await send(connector, [message(i) for i in range(1, 4)])
    finally:
        await relay.stop()
    assert relay.connections == 3
    assert [(o.error_code, o.attempts) for o in outcomes] == [("CONNECTION_FAILED", 3), ("CONNECTION_FAILED", 0)] + [
        ("CONNECTION_FAILED", 0)
    ]


async def test_a_relay_back_after_an_outage_gets_the_next_batch(smtp_relay) -> None:
    """The relay is given up on only briefly (a connect timeout and the longest backoff): a batch after
    that tries afresh, and sends."""
    relay = smtp_relay()
    relay.controller.stop()
    sleeps = Sleeps()
    connector = connector_on(relay.port, sleeps, connect_timeout_seconds=1.0, cap_seconds=0.1)
    back = Controller(relay.handler, hostname="127.0.0.1", port=relay.port)
    try:
        outcomes = await connector.send([message(i) for i in range(1, 4)])
        assert [o.attempts for o in outcomes] == [3, 0, 0] and len(sleeps.delays) == 2
        back.start()
        await asyncio.sleep(3.0)  # longer than the 1.1 s the relay is given up on
        outcomes = await connector.send([message(i) for i in range(1, 4)])
    finally:
        await connector.close()
        if back._thread is not None:
            back.stop()
    assert [(o.status, o.attempts) for o in outcomes] == [(SendStatus.SENT, 1)] * 3
    assert len(relay.handler.received) == 3


async def test_private_relay_is_blocked_unless_allowed(smtp_relay) -> None:
    relay = smtp_relay()
    connector = SmtpConnector(
        host="localhost", port=relay.port, implicit_tls=False, sender=SENDER, retry=RetryPolicy(), allow_private=False
    )
    (outcome,) = await send(connector, [message()])
    assert (outcome.status, outcome.error_code) == (SendStatus.FAILED, "BLOCKED_ADDRESS")
    assert relay.handler.received == []


async def test_one_connection_carries_the_batch(smtp_relay) -> None:
    relay = smtp_relay()
    outcomes = await send(smtp(relay), [message(i) for i in range(1, 6)])
    assert [o.status for o in outcomes] == [SendStatus.SENT] * 5
    assert len(relay.handler.received) == 5


@dataclass
class EightBitRelay(RecordingHandler):
    """A relay that offers 8BITMIME or not, and keeps each message's MAIL FROM parameters."""

    offers_8bitmime: bool = True
    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001, ANN201
        session.host_name = hostname
        return responses if self.offers_8bitmime else [r for r in responses if r != "250-8BITMIME"]

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        self.mail_options.append(list(envelope.mail_options))
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize("offers_8bitmime", [True, False], ids=["8BITMIME", "7-bit relay"])
async def test_non_ascii_content_is_declared_8bit_or_sent_7bit_clean(smtp_relay, offers_8bitmime) -> None:
    """RFC 6152: 8-bit content goes with BODY=8BITMIME to a relay that offers it, and never as 8-bit
    data to one that does not (quoted-printable or base64 instead)."""
    relay = smtp_relay(EightBitRelay(offers_8bitmime=offers_8bitmime))
    content = message(subject="Grüße", text_body="Hallo Jürgen, 20 % Rabatt", html_body="<p>Hallo Jürgen</p>")
    (outcome,) = await send(smtp(relay), [content])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    mail = relay.handler.received[0]
    if offers_8bitmime:
        assert relay.handler.mail_options == [["BODY=8BITMIME"]]
    else:
        assert relay.handler.mail_options == [[]] and mail.raw.isascii()
    parts = {p.get_content_type(): p.get_content().replace("\r\n", "\n") for p in mail.message.iter_parts()}
    assert parts == {"text/plain": "Hallo Jürgen, 20 % Rabatt\n", "text/html": "<p>Hallo Jürgen</p>\n"}
    assert mail.message["Subject"] == "Grüße"


@pytest.mark.parametrize("to", [ADDRESS, "jürgen@example.org"], ids=["ascii", "smtputf8"])
async def test_a_long_list_unsubscribe_url_reaches_the_relay_as_written(smtp_relay, to) -> None:
    """A URL longer than a folded line goes as one line, never as RFC 2047 encoded-words (which RFC 2047
    section 5 does not allow there, and which mail clients do not read as the unsubscribe URL)."""
    relay = smtp_relay()
    url = "<https://notifications.brand.example.com/tokensend/unsubscribe/" + "AbC-d_9" * 14 + ">"
    headers = {"List-Unsubscribe": url, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    (outcome,) = await send(smtp(relay), [message(to=to, headers=headers)])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    lines = relay.handler.received[0].raw.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert f"List-Unsubscribe: {url}".encode() in lines
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in lines


@pytest.mark.parametrize("smtputf8", [True, False], ids=["relay-with-smtputf8", "relay-without"])
async def test_a_domain_outside_ascii_goes_in_punycode_through_any_relay(smtp_relay, smtputf8) -> None:
    """`ann@exämple.org` needs no SMTPUTF8 once its domain is written in Punycode, as RFC 5890 allows
    everywhere: a relay without it takes the message (it refused it, SMTP_UTF8_UNSUPPORTED)."""
    relay = smtp_relay(enable_SMTPUTF8=smtputf8)
    (outcome,) = await send(smtp(relay), [message(to="ann@exämple.org")])
    assert outcome.status is SendStatus.SENT, outcome.error_message
    mail = relay.handler.received[0]
    assert mail.rcpt_tos == ["ann@xn--exmple-cua.org"] and mail.message["To"] == "ann@xn--exmple-cua.org"
