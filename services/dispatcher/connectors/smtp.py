"""SMTP relay connector (aiosmtplib).

`smtp://host:port` upgrades with STARTTLS when the server offers it;
`smtps://host:port` speaks TLS from the first byte. Certificates are verified
against the system store, or against `ca_cert_pem` for a private CA.
Credentials are only ever sent over TLS. The relay's host name is resolved
through the network guard, so a DNS answer cannot point it at a private address.

One connection carries a whole `send` batch (MAIL, RCPT, DATA per message).
Failures before DATA are safe to retry (a refused connection, a 4xx, a relay
that dropped an idle connection); a connection lost during DATA may have
delivered the message, so it is never resent. A 5xx to RCPT refuses its
recipient alone; one to MAIL FROM refuses the connector's sender, and the
batch's other messages are not tried against it.

A relay that cannot be reached is tried as one message would be, whatever the
batches waiting on it (`ConnectCircuit`): a batch's messages, and the connector's
other batches, share the connection retries, and once those are spent the
messages still waiting fail at once, unsent, with the same code.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import socket
import ssl
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException

from libs.netguard import BlockedAddress, GuardedResolver
from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus, send_each
from services.dispatcher.connectors.circuit import ConnectCircuit, GivenUp, Outage
from services.dispatcher.connectors.email_headers import ascii_domain, extra_headers
from services.dispatcher.connectors.http_retry import AttemptLogs, AttemptTimer, RetryPolicy, Sleep

log = logging.getLogger(__name__)
DATA_BROKEN_OFF = "session broke off during DATA"

MAX_BATCH = 50
# RFC 5322's limit on a line, CRLF not counted.
MAX_LINE = 998
# The email package writes a header longer than 78 characters as RFC 2047 encoded-words to fold it,
# ASCII or not; RFC 2047 (section 5) allows them only in text, comments and phrases, so a long
# List-Unsubscribe URL came out unreadable to mail clients. The campaign's ASCII headers are stored
# as given (`set_raw`), and these policies write stored values as they are.
SMTP_POLICY = policy.SMTP.clone(refold_source="none")
SMTPUTF8_POLICY = policy.SMTPUTF8.clone(refold_source="none")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but the colon
# RFC 4954's refusals of a login, whatever the command they answer: 530 authentication required (or
# STARTTLS first), 534 mechanism too weak (Gmail: an app password is needed), 535 credentials invalid,
# 538 encryption required for the mechanism. The connector's settings are at fault, not the message.
LOGIN_REFUSALS = frozenset({530, 534, 535, 538})
# A 5xx to MAIL FROM refuses what every message of the batch shares: the sender, or the login's standing
# with the relay (a sending quota used up, a sender it may not use); no recipient has been named yet. But
# 552 (the SIZE declared) and 555 (a parameter: BODY=8BITMIME, SMTPUTF8) answer what this message declared.
MESSAGE_MAIL_REFUSALS = frozenset({552, 555})
# Older relays (RFC 1869) answer a parameter they do not take with 501 or 504 instead of 555: when this
# message declared one, it is the message's refusal too.
PARAMETER_REFUSALS = frozenset({501, 504})


class InvalidMessage(ValueError):
    """The message cannot be written (a header with a line break, no body)."""


class _Refused(Exception):
    """A final failure that is not an SMTP reply (TLS required, TLS failed, blocked address)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _GivenUp(Exception):
    """A message's try found the relay given up on (`ConnectCircuit`), and ends with `outcome`."""

    def __init__(self, outcome: SendOutcome) -> None:
        super().__init__(outcome.error_code)
        self.outcome = outcome


class _Unreachable(Exception):
    """Opening a session failed in a way that may pass: refused, timed out, a 4xx or an unreadable greeting.
    `outage`: the relay's connection retries are spent (by this message or another of the connector's);
    `tried`: this message made the attempt, rather than finding the relay given up on."""

    def __init__(self, code: str, text: str, *, tried: bool, outage: Outage | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.tried = tried
        self.outage = outage


def _session_deferral(exc: BaseException) -> tuple[str, str] | None:
    """The code and text of a failure to open a session that may pass, or None for one that will not
    (TLS, a 5xx, a login refused, a blocked address) or is not a failure (a cancellation)."""
    if isinstance(exc, (_Refused, ssl.SSLError)) or _is_tls_failure(exc):
        return None
    if isinstance(exc, SMTPResponseException):
        if not 200 <= exc.code < 600:
            # No reply at all (aiosmtplib's -1: malformed, too long).
            return "CONNECTION_FAILED", "the relay's reply could not be read"
        if 400 <= exc.code < 500:
            return f"SMTP_{exc.code}", f"relay deferred ({exc.code})"
        return None
    if isinstance(exc, (SMTPException, OSError, TimeoutError)):
        return "CONNECTION_FAILED", "could not talk to the relay"
    return None


def message_id_header(message_id: str) -> str:
    return f"<{message_id}@tokensend>"


def needs_smtputf8(*addresses: str) -> bool:
    return not all(a.isascii() for a in addresses)


def build_email(message: OutboundMessage, sender: str, to: str = "") -> EmailMessage:
    """The RFC 5322 message: our Message-ID, the campaign's extra headers, text and/or HTML. `to`:
    the recipient's address as written (its domain in Punycode), else the message's."""
    if not (message.text_body or message.html_body):
        raise InvalidMessage("no body")
    email = EmailMessage(policy=SMTP_POLICY)
    try:
        email["From"] = sender
        email["To"] = to or message.to
        email["Subject"] = message.subject
        email["Message-ID"] = message_id_header(message.message_id)
        email["Date"] = format_datetime(datetime.now(UTC))
        for name, value in extra_headers(message.headers).items():
            if _FIELD_NAME.fullmatch(name) and value.isascii() and len(name) + 2 + len(value) <= MAX_LINE:
                email.set_raw(name, value)  # a URL header stays a URL however long (see SMTP_POLICY)
            else:
                email[name] = value
    except (ValueError, TypeError) as exc:
        # The email package's text quotes the offending value: keep only that it failed.
        raise InvalidMessage("a header cannot be written") from exc
    if message.text_body and message.html_body:
        email.set_content(message.text_body)
        email.add_alternative(message.html_body, subtype="html")
    elif message.text_body:
        email.set_content(message.text_body)
    else:
        email.set_content(message.html_body, subtype="html")
    return email


def tls_context(ca_cert_pem: str = "") -> ssl.SSLContext:
    """Verifying context: the system store, or only the given CA for a private relay."""
    if ca_cert_pem:
        return ssl.create_default_context(cadata=ca_cert_pem)
    return ssl.create_default_context()


def _is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError)


class SmtpConnector:
    """Sends email through one SMTP relay."""

    provider = "smtp"
    max_batch = MAX_BATCH

    def __init__(
        self,
        *,
        host: str,
        port: int,
        implicit_tls: bool,
        sender: str,
        retry: RetryPolicy,
        allow_private: bool,
        username: str = "",
        password: str = "",
        ca_cert_pem: str = "",
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._implicit_tls = implicit_tls
        self._sender = ascii_domain(sender)
        self._retry = retry
        self._allow_private = allow_private
        self._username = username
        self._password = password
        self._tls = tls_context(ca_cert_pem)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._logs = AttemptLogs("smtp", log)
        self._resolver: GuardedResolver | None = None
        self._circuit = ConnectCircuit(retry, self._rng, "smtp relay")

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        relay = _Relay(self)
        try:
            return await send_each(messages, functools.partial(self._send_one, relay))
        finally:
            await relay.quit()

    async def close(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def _send_one(self, relay: _Relay, message: OutboundMessage) -> SendOutcome:
        # A domain in Punycode goes through any relay; only a local part outside ASCII needs SMTPUTF8.
        to = ascii_domain(message.to)
        try:
            email = build_email(message, self._sender, to)
            utf8 = needs_smtputf8(self._sender, to)
            written = SMTPUTF8_POLICY if utf8 else SMTP_POLICY
            payload = email.as_bytes(policy=written)
        except InvalidMessage as exc:
            return _outcome(message, SendStatus.FAILED, "INVALID_MESSAGE", str(exc), 0)
        # Each attempt: a MAIL, RCPT, DATA transaction, and opening the connection when it needs one.
        timer = AttemptTimer(self.provider)
        try:
            return timer.ended(await self._attempts(relay, message, to, email, utf8, written, payload, timer))
        except _GivenUp as given_up:
            return given_up.outcome  # its last try found the relay given up on and reached nothing: not timed

    async def _attempts(
        self,
        relay: _Relay,
        message: OutboundMessage,
        to: str,
        email: EmailMessage,
        utf8: bool,
        written: policy.Policy,
        payload: bytes,
        timer: AttemptTimer,
    ) -> SendOutcome:
        # RFC 6152: 8-bit content is declared BODY=8BITMIME, and a relay that does not offer 8BITMIME
        # gets it as quoted-printable or base64 (written on demand: most relays offer it).
        eight_bit = not payload.isascii()
        seven_bit: bytes | None = None
        attempt = 0
        while True:
            attempt += 1
            stage = "connect"
            paced = False  # a failure to open a session: the relay's circuit paces the next attempt
            timer.start()
            try:
                smtp = await relay.connection(timer)
                stage = "envelope"
                options, encoding = (["SMTPUTF8"], "utf-8") if utf8 else ([], "ascii")
                if utf8 and not smtp.supports_extension("smtputf8"):
                    raise _Refused("SMTP_UTF8_UNSUPPORTED", "relay cannot take non-ASCII addresses")
                data = payload
                if eight_bit and smtp.supports_extension("8bitmime"):
                    options = [*options, "BODY=8BITMIME"]
                elif eight_bit:
                    if seven_bit is None:
                        seven_bit = email.as_bytes(policy=written.clone(cte_type="7bit"))
                    data = seven_bit
                stage = "sender"
                await smtp.mail(self._sender, options=options, encoding=encoding)
                stage = "envelope"
                await smtp.rcpt(to, encoding=encoding)
                stage = "data"
                await smtp.data(data)
                return _outcome(message, SendStatus.SENT, "", "", attempt, message_id_header(message.message_id))
            except _Unreachable as exc:
                if exc.outage is not None:
                    outcome = _given_up(message, exc.outage, attempt if exc.tried else attempt - 1)
                    if not exc.tried:
                        raise _GivenUp(outcome) from None
                    return outcome
                kind, what, paced = exc.code, exc.text, True
            except _Refused as exc:
                await relay.drop()
                return _outcome(message, SendStatus.FAILED, exc.code, exc.text, attempt, session=stage == "connect")
            except SMTPResponseException as exc:
                # SMTP reply texts can quote the addresses: only the code leaves this function.
                code = exc.code
                if not 200 <= code < 600:
                    # No reply at all (aiosmtplib's -1: malformed, too long): the session is in an unknown
                    # state, and after DATA the relay may well hold the message.
                    await relay.drop()
                    if stage == "data":
                        self._logs.not_resent("unreadable reply", DATA_BROKEN_OFF)
                        return _unknown(message, "unreadable reply", attempt)
                    kind, what = "CONNECTION_FAILED", "the relay's reply could not be read"
                else:
                    if stage != "connect":
                        await relay.reset()
                    else:
                        await relay.drop()
                    if code in LOGIN_REFUSALS:
                        # At AUTH, or at MAIL from a relay that wants a login: no message gets further.
                        return _outcome(
                            message,
                            SendStatus.FAILED,
                            "PROVIDER_AUTH_FAILED",
                            self._login_refused(code),
                            attempt,
                            session=True,
                        )
                    if (
                        stage == "sender"
                        and code >= 500
                        and code not in MESSAGE_MAIL_REFUSALS
                        and not (options and code in PARAMETER_REFUSALS)
                    ):
                        return _outcome(
                            message,
                            SendStatus.FAILED,
                            "SENDER_REFUSED",
                            f"the relay refused the connector's sender at MAIL FROM ({code}); not retried: check "
                            "the connector's sender and its standing with the relay (a sender the login may use, "
                            "its sending quota), then re-run the instance",
                            attempt,
                            session=True,
                        )
                    if not 400 <= code < 500:
                        # Refused while opening the session (the greeting, STARTTLS): no message of the
                        # batch gets further.
                        return _outcome(
                            message,
                            SendStatus.FAILED,
                            f"SMTP_{code}",
                            f"relay refused ({code})",
                            attempt,
                            session=stage == "connect",
                        )
                    kind, what = f"SMTP_{code}", f"relay deferred ({code})"
            except ssl.SSLError:
                # Before ValueError: a certificate failure is both. It will not heal by retrying.
                await relay.drop()
                return _tls_failed(message, attempt, stage)
            except ValueError:
                # aiosmtplib could not write an address into a command; nothing of it was sent.
                await relay.reset()
                return _outcome(message, SendStatus.FAILED, "INVALID_MESSAGE", "an address cannot be sent", attempt)
            except (SMTPException, OSError, TimeoutError) as exc:
                await relay.drop()
                if _is_tls_failure(exc):
                    return _tls_failed(message, attempt, stage)
                if stage == "data":
                    self._logs.not_resent(type(exc).__name__, DATA_BROKEN_OFF)
                    return _unknown(message, type(exc).__name__, attempt)
                kind, what = "CONNECTION_FAILED", "could not talk to the relay"
            if attempt > self._retry.max_retries:
                return _outcome(message, SendStatus.FAILED, kind, f"{what} after {attempt} attempts", attempt)
            timer.retried()
            if paced:
                continue
            delay = self._retry.delay(attempt, self._rng)
            self._logs.retrying(attempt, kind, delay)
            await self._sleep(delay)

    def _login_refused(self, code: int) -> str:
        if self._username:
            return f"the relay refused the connector's login ({code}); not retried: check its username and password"
        return f"the relay requires a login ({code}); not retried: set the connector's username and password"

    async def _session(self, timer: AttemptTimer) -> aiosmtplib.SMTP:
        """A new session for a batch, through the relay's circuit: raises _Unreachable for a failure
        that may pass (and once the relay is given up on, without trying)."""
        try:
            return await self._circuit.attempt(self._sleep, lambda _beside: self._try_session(timer))
        except GivenUp as given_up:
            outage = given_up.outage
            raise _Unreachable(outage.code, outage.text, tried=False, outage=outage) from None

    async def _try_session(self, timer: AttemptTimer) -> aiosmtplib.SMTP:
        timer.start()  # the attempt starts now, not while it waited for its turn
        try:
            smtp = await self._open()
        except BaseException as exc:
            deferral = _session_deferral(exc)
            if deferral is None:
                raise
            code, text = deferral
            raise _Unreachable(code, text, tried=True, outage=self._circuit.failed(code, text)) from exc
        self._circuit.opened()
        return smtp

    async def _open(self) -> aiosmtplib.SMTP:
        sock = await self._connect_socket()
        smtp = aiosmtplib.SMTP(
            hostname=self._host,  # for certificate checks; the socket is already connected
            sock=sock,
            use_tls=self._implicit_tls,
            start_tls=False if self._implicit_tls else None,  # None: STARTTLS when the relay offers it
            tls_context=self._tls,
            timeout=self._retry.read_timeout_seconds,
        )
        try:
            # The greeting is part of connecting: a relay that accepts and never greets (a full or hung
            # server, a blackholing load balancer) costs a connect timeout, not a read timeout.
            await smtp.connect(timeout=self._retry.connect_timeout_seconds)
        except BaseException:
            sock.close()
            raise
        if self._username:
            if smtp.get_transport_info("sslcontext") is None:
                smtp.close()
                raise _Refused("SMTP_TLS_REQUIRED", "relay offers no TLS; credentials are not sent in clear")
            try:
                if smtp.is_ehlo_or_helo_needed:
                    await smtp.ehlo()  # after TLS the relay names its extensions anew
                if not smtp.supported_auth_methods:
                    # A relay that takes no login we can give (an MX on port 25, not a submission port):
                    # retrying only delays the failure.
                    raise _Refused(
                        "PROVIDER_AUTH_FAILED",
                        "the relay offers no login mechanism the connector can use; "
                        "not retried: use the relay's submission port, or no username",
                    )
                await smtp.login(self._username, self._password)
            except BaseException:
                smtp.close()
                raise
        return smtp

    async def _connect_socket(self) -> socket.socket:
        """A connected socket to a guarded address of the relay; raises OSError when none answers."""
        if self._resolver is None:
            self._resolver = GuardedResolver(self._allow_private)
        try:
            answers = await self._resolver.resolve(self._host, self._port, socket.AF_UNSPEC)
        except BlockedAddress as exc:
            raise _Refused("BLOCKED_ADDRESS", "relay host is not a public address") from exc
        loop = asyncio.get_running_loop()
        last_error: OSError = ConnectionError("relay host has no address")
        for answer in answers:
            sock = socket.socket(answer["family"], socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                # asyncio.timeout, not wait_for, which on Python 3.11 can drop the caller's cancellation.
                async with asyncio.timeout(self._retry.connect_timeout_seconds):
                    await loop.sock_connect(sock, (answer["host"], answer["port"]))
                return sock
            except (OSError, TimeoutError) as exc:
                sock.close()
                last_error = exc if isinstance(exc, OSError) else ConnectionError("connect timed out")
        raise last_error


class _Relay:
    """The connection one `send` batch shares; reopened when the relay drops it."""

    def __init__(self, connector: SmtpConnector) -> None:
        self._connector = connector
        self._smtp: aiosmtplib.SMTP | None = None

    async def connection(self, timer: AttemptTimer) -> aiosmtplib.SMTP:
        if self._smtp is None or not self._smtp.is_connected:
            self._smtp = await self._connector._session(timer)
        return self._smtp

    async def reset(self) -> None:
        """Clears a half-done transaction so the next message starts clean; drops the connection if that fails."""
        if self._smtp is None or not self._smtp.is_connected:
            self._smtp = None
            return
        try:
            await self._smtp.rset()
        except (SMTPException, OSError, TimeoutError):
            await self.drop()

    async def drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    async def quit(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.quit()
            except (SMTPException, OSError, TimeoutError):
                pass
        await self.drop()


def _tls_failed(message: OutboundMessage, attempts: int, stage: str) -> SendOutcome:
    """TLS with the relay failed: it will not heal by retrying, and while opening the session it ends
    the batch's tries against the relay."""
    return _outcome(
        message,
        SendStatus.FAILED,
        "CONNECTION_FAILED",
        "TLS with the relay failed",
        attempts,
        session=stage == "connect",
    )


def _outcome(
    message: OutboundMessage,
    status: SendStatus,
    code: str,
    text: str,
    attempts: int,
    provider_id: str = "",
    *,
    session: bool = False,
) -> SendOutcome:
    """`session`: a final failure to open the session (connect, TLS, AUTH), which is the relay's or the
    connector's, not the message's: the batch's other messages are not tried against it."""
    return SendOutcome(
        message_id=message.message_id,
        status=status,
        provider_message_id=provider_id,
        error_code=code,
        error_message=text,
        attempts=attempts,
        account_refused=session,
    )


def _given_up(message: OutboundMessage, outage: Outage, attempts: int) -> SendOutcome:
    """The outcome of a message whose relay was given up on: failed with the outage's code, unsent, so
    released for a re-run."""
    if attempts:
        return _outcome(message, SendStatus.FAILED, outage.code, outage.text, attempts)
    return _outcome(
        message,
        SendStatus.FAILED,
        outage.code,
        f"not attempted: the relay could not be reached for an earlier message through the connector "
        f"({outage.text}); not sent, a re-run sends it",
        0,
    )


def _unknown(message: OutboundMessage, reason: str, attempts: int) -> SendOutcome:
    return _outcome(
        message,
        SendStatus.OUTCOME_UNKNOWN,
        "OUTCOME_UNKNOWN",
        f"the relay may have taken the message ({reason}); not resent",
        attempts,
    )
