"""Twilio Programmable Messaging connector: SMS, MMS and RCS.

`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, HTTP
Basic. Our message ID rides in the StatusCallback URL, which Twilio calls with
every status change. RCS goes through a messaging service (an `MG…` sender),
on the same endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

from libs.suppressions import TWILIO_OPTED_OUT
from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus, numeric_error_code, send_each
from services.dispatcher.connectors.http_retry import (
    HttpReply,
    HttpRequest,
    HttpSender,
    Refusal,
    RetryAs,
    RetryPolicy,
    Sleep,
    TransportFactory,
    gateway_timeout,
)
from services.dispatcher.connectors.provider_ids import safe_provider_id

DEFAULT_BASE_URL = "https://api.twilio.com"
API_VERSION = "/2010-04-01"
# What Twilio takes as the sender. A messaging service goes as MessagingServiceSid, the others as From: a
# number in E.164, a short code, or an alphanumeric sender ID (up to 11 letters, digits, spaces and + - _ &,
# as Twilio's AlphaSender resource takes them, at least one letter; one-way, and SMS only: Twilio sends no
# MMS from one). "MGM Resorts" is a sender ID, not a service.
MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}\Z")
E164 = re.compile(r"^\+[1-9][0-9]{6,14}\Z")
SHORT_CODE = re.compile(r"^[0-9]{5,6}\Z")
ALPHANUMERIC_SENDER_ID = re.compile(
    r"^(?=[^A-Za-z]*[A-Za-z])[A-Za-z0-9+\-_&](?:[A-Za-z0-9 +\-_&]{0,9}[A-Za-z0-9+\-_&])?\Z"
)
# "This 'From' number has exceeded the maximum number of queued messages": nothing was created, and
# Twilio's remedy is to send slower while the sender's queue drains. Throttling, not a refusal.
QUEUE_FULL = 21611
# 20003 "Authenticate" (HTTP 401): a wrong account SID or auth token.
AUTHENTICATION_FAILED = 20003
# The account is not active, whatever the message: 10001 and 20005 (suspended for lack of funds or a
# policy violation, a trial never activated), 20403 (no access to the API: suspended or closed), 90010.
ACCOUNT_INACTIVE_CODES = frozenset({10001, 20005, 20403, 90010})
# Refusals of the connector's sender, whoever the recipient, with what each says. 21606 and 21659 are left
# out: they also say a short code cannot reach the recipient's country, which the batch's others may not share.
SENDER_REFUSALS = {
    21212: "the From value is not a valid phone number, short code or sender ID",
    21660: "the From number is not on the account",
    21661: "the From number cannot send SMS",
    21701: "the messaging service does not exist on the account",
    21704: "the messaging service holds no phone numbers",
    21705: "the messaging service SID is not valid",
}
# The longest Body Twilio takes (error 21617 "exceeds the 1600 character limit").
MAX_BODY_CHARS = 1600


def body_length(body: str) -> int:
    """`body`'s length as Twilio counts it: UTF-16 code units, so an emoji beyond the BMP counts two."""
    return len(body) if body.isascii() else len(body.encode("utf-16-le")) // 2


def why_unsendable(message: OutboundMessage) -> str:
    """Why Twilio would refuse the message after a round trip, said here with a length, never the text."""
    length = body_length(message.sms_body)
    if length > MAX_BODY_CHARS:  # 21617
        return f"the rendered sms_body is {length:,} characters; Twilio accepts at most {MAX_BODY_CHARS:,}"
    if not length and not message.media_urls:  # 21602 "Message body is required": every value it renders was empty
        return "the rendered sms_body is empty and there is no media; Twilio requires one or the other"
    return ""


def describe_error(reply: HttpReply) -> str:
    """Twilio's numeric error code; its `message` can quote the number, so it is never used."""
    document = reply.json()
    code = numeric_error_code(document.get("code")) if isinstance(document, dict) else None
    return f"twilio error {code}" if code is not None else ""


def refusal(reply: HttpReply) -> Refusal | None:
    """Twilio's refusals of the account rather than the message: it is not active, its credentials were
    refused (a 401, 20003), or its sender was (`SENDER_REFUSALS`). Each says what to fix, with Twilio's code."""
    if reply.status < 400:
        return None
    document = reply.json()
    code = numeric_error_code(document.get("code")) if isinstance(document, dict) else None
    if code in ACCOUNT_INACTIVE_CODES:
        return Refusal(
            "ACCOUNT_SUSPENDED",
            f"twilio says the account is not active (HTTP {reply.status}, twilio error {code}); "
            "not retried: reactivate it with Twilio (balance, suspension notice), then re-run the instance",
        )
    if reply.status == 401 or code == AUTHENTICATION_FAILED:
        detail = f", twilio error {code}" if code is not None else ""
        return Refusal(
            "PROVIDER_AUTH_FAILED",
            f"twilio refused the account SID or auth token (HTTP {reply.status}{detail}); "
            "not retried: check the connector's credentials",
        )
    if code is not None and (what := SENDER_REFUSALS.get(code)):
        return Refusal(
            "SENDER_REFUSED",
            f"twilio refused the connector's sender: {what} (HTTP {reply.status}, twilio error {code}); "
            "not retried: fix the connector's sender, then re-run the instance",
        )
    return None


def refuses_account(reply: HttpReply) -> bool:
    """Each of `refusal`'s: the batch's other messages would meet it too."""
    return refusal(reply) is not None


def retry_as(reply: HttpReply) -> RetryAs | None:
    """A full sender queue (400, code 21611) is tried again as a 429."""
    if reply.status != 400:
        return None
    document = reply.json()
    return "RATE_LIMITED" if isinstance(document, dict) and document.get("code") == QUEUE_FULL else None


def may_have_taken(reply: HttpReply) -> bool:
    """Twilio's 500 (20500) "generally indicates an error in the server handling logic or a timeout in the
    API", and creating a message is not idempotent: Twilio warns that retrying one may send it twice. Like a
    gateway's 504, it ends OUTCOME_UNKNOWN. A 503 says Twilio did not take it, and is tried again."""
    return reply.status == 500 or gateway_timeout(reply)


def api_root(base_url: str) -> str:
    """The 2010-04-01 API's root under `base_url`: its host, or a proxy's path prefix, to which the API
    version is added; a base_url that already ends in it (as Twilio's docs write the API's URL) keeps it."""
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return base if urlsplit(base).path.endswith(API_VERSION) else base + API_VERSION


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class TwilioConnector:
    """Sends SMS, MMS and RCS through one Twilio account."""

    provider = "twilio"
    max_batch = 1

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        sender: str,
        workspace_id: str,
        connector_id: str,
        public_webhook_url: str,
        http: aiohttp.ClientSession | TransportFactory,
        retry: RetryPolicy,
        base_url: str = "",
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        suppress_tracing: bool = True,  # for an aiohttp session: False when it carries no tracing hooks
    ) -> None:
        self._url = f"{api_root(base_url)}/Accounts/{quote(account_sid, safe='')}/Messages.json"
        self._authorization = basic_authorization(account_sid, auth_token)
        self._sender_field = "MessagingServiceSid" if MESSAGING_SERVICE_SID.match(sender) else "From"
        self._sender = sender
        path = f"/webhooks/twilio/{quote(workspace_id, safe='')}/{quote(connector_id, safe='')}"
        self._callback = public_webhook_url.rstrip("/") + path
        self._http = HttpSender(
            http,
            self.provider,
            retry,
            sleep=sleep,
            rng=rng,
            retry_as=retry_as,
            describe=describe_error,
            refusal=refusal,
            account_refusal=refuses_account,
            may_have_taken=may_have_taken,
            suppress_tracing=suppress_tracing,
        )

    def status_callback(self, message_id: str) -> str:
        return f"{self._callback}?{urlencode({'message_id': message_id})}"

    def form(self, message: OutboundMessage) -> list[tuple[str, str]]:
        fields = [("To", message.to), (self._sender_field, self._sender)]
        if message.sms_body:
            fields.append(("Body", message.sms_body))
        # Twilio takes one MediaUrl parameter per attachment.
        fields.extend(("MediaUrl", url) for url in message.media_urls)
        fields.append(("StatusCallback", self.status_callback(message.message_id)))
        return fields

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        return await send_each(messages, self._send_one)

    async def close(self) -> None:
        """Nothing to release: the HTTP session is shared."""

    async def _send_one(self, message: OutboundMessage) -> SendOutcome:
        why = why_unsendable(message)
        if why:
            return SendOutcome(
                message.message_id, SendStatus.FAILED, error_code="INVALID_MESSAGE", error_message=why, attempts=0
            )
        request = HttpRequest(
            "POST",
            self._url,
            {"Authorization": self._authorization, "Content-Type": "application/x-www-form-urlencoded"},
            urlencode(self.form(message)).encode(),
        )
        exchange = await self._http.exchange(request)
        document = exchange.reply.json() if exchange.reply is not None else None
        opted_out = isinstance(document, dict) and document.get("code") == TWILIO_OPTED_OUT
        if exchange.status is SendStatus.FAILED and opted_out:
            return SendOutcome(
                message.message_id,
                SendStatus.FAILED,
                error_code="RECIPIENT_OPTED_OUT",
                error_message=f"the recipient opted out with Twilio (error {TWILIO_OPTED_OUT}): suppressed",
                attempts=exchange.attempts,
                opted_out=True,
            )
        sid = document.get("sid") if exchange.sent and isinstance(document, dict) else None
        return exchange.outcome(message.message_id, safe_provider_id(sid, message.to))
