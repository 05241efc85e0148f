"""Twilio Programmable Messaging (`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`) and its status callbacks.

Checked against the official spec (`specs/twilio_api_v2010_messages_only.json`): ``To`` is
required, one of ``From``/``MessagingServiceSid`` and one of ``Body``/``MediaUrl`` (``ContentSid``
too in the spec; the sandbox does not model Content templates, so it does not count it),
``AccountSid`` matches ``^AC[0-9a-fA-F]{32}$`` and ``MessagingServiceSid`` ``^MG[0-9a-fA-F]{32}$``,
at most ten ``MediaUrl`` (21623), and a ``StatusCallback`` of at most 4,000 characters whose
hostname has no underscore (21609);
the spec leaves phone-number formats to the server, where Twilio (and the sandbox) wants E.164 for
``To`` and E.164, a short code or an alphanumeric sender ID for ``From`` (``whatsapp:`` prefixes
allowed). HTTP Basic must be the account's own SID and auth token; API keys (``SK...``) are not
modelled. Errors use Twilio's codes and messages, which quote the number as the real ones do.

Status callbacks are form POSTs to the message's ``StatusCallback``, one per status, signed with
``X-Twilio-Signature`` over that exact URL and carrying a fixed ``I-Twilio-Idempotency-Token``
across retries. Without a ``StatusCallback`` there is nowhere to post, as with a real account
whose messaging service has none.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import http
import math
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from sandbox.providers.model import (
    TWILIO,
    OutboxMessage,
    ProviderAccount,
    ReceiptPost,
    SendContext,
    SendResult,
    is_e164,
    random_hex,
    random_token,
)
from sandbox.signing import twilio_signature

API_VERSION = "2010-04-01"
PATH = f"/{API_VERSION}/Accounts/{{AccountSid}}/Messages.json"
MAX_BODY_CHARS = 1600
MAX_MEDIA_URLS = 10
MAX_CALLBACK_URL_CHARS = 4000
SERVICE_SENDER = "+15017122661"  # the number a messaging service picks, in Twilio's own examples

ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")
_SHORT_CODE = re.compile(r"^\d{3,8}$")
_ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_CHANNEL_PREFIX = "whatsapp:"

# ErrorCode in callbacks: 30003 unreachable destination handset, 30008 unknown error.
CALLBACK_ERROR_CODES = {"undelivered": "30003", "failed": "30008"}


def error_response(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(body, status=status, headers=headers)


def unauthorized() -> web.Response:
    return error_response(401, 20003, "Authenticate", {"WWW-Authenticate": 'Basic realm="Twilio API"'})


def fault_response(status: int) -> web.Response:
    # Twilio's generic HTTP errors are 20000 + status: 20500, 20503, 20404 ...
    return error_response(status, 20000 + status, http.HTTPStatus(status).phrase)


def rate_limited(retry_after: int, now: float) -> web.Response:
    return error_response(429, 20429, "Too Many Requests", {"Retry-After": str(retry_after)})


def _basic_credentials(authorization: str) -> tuple[str, str] | None:
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        username, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return username, password


def _rfc2822(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")


def _segments(body: str) -> int:
    # GSM-7 fits 160 (153 per part when split); anything else is UCS-2, 70 (67).
    single, part = (160, 153) if body.isascii() else (70, 67)
    return 1 if len(body) <= single else math.ceil(len(body) / part)


def _is_sender(value: str) -> bool:
    value = value.removeprefix(_CHANNEL_PREFIX)
    return is_e164(value) or bool(_SHORT_CODE.match(value) or _ALPHANUMERIC_SENDER.match(value))


def _is_http_url(value: str) -> bool:
    parsed = urllib.parse.urlsplit(value)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _is_status_callback(value: str) -> bool:
    if len(value) > MAX_CALLBACK_URL_CHARS or not _is_http_url(value):
        return False
    hostname = urllib.parse.urlsplit(value).hostname or ""
    return bool(hostname) and "_" not in hostname


def _form_value(form: Any, name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


async def send(request: web.Request, ctx: SendContext) -> SendResult:
    account_sid = request.match_info["AccountSid"]
    if not ACCOUNT_SID.match(account_sid):
        return SendResult(error_response(404, 20404, f"The requested resource {request.path} was not found"))
    account = ctx.accounts.get(account_sid)
    credentials = _basic_credentials(request.headers.get("Authorization", ""))
    if account is None or credentials != (account.credential, account.secret):
        return SendResult(unauthorized())

    form = await request.post()
    to = _form_value(form, "To")
    sender = _form_value(form, "From")
    service_sid = _form_value(form, "MessagingServiceSid")
    text = form.get("Body", "") if isinstance(form.get("Body", ""), str) else ""
    media_urls = [url for url in form.getall("MediaUrl", []) if isinstance(url, str)]
    status_callback = _form_value(form, "StatusCallback")

    def refuse(code: int, message: str) -> SendResult:
        return SendResult(error_response(400, code, message), account=account)

    if not to:
        return refuse(21604, "A 'To' phone number is required.")
    if not is_e164(to.removeprefix(_CHANNEL_PREFIX)):
        return refuse(21211, f"The 'To' number {to} is not a valid phone number.")
    if not sender and not service_sid:
        return refuse(21603, "A 'From' phone number is required.")
    if sender and not _is_sender(sender):
        return refuse(
            21212, f"The 'From' number {sender} is not a valid phone number, shortcode, or alphanumeric sender ID."
        )
    if service_sid and not MESSAGING_SERVICE_SID.match(service_sid):
        return refuse(21701, f"The Messaging Service Sid {service_sid} is invalid.")
    if not text and not media_urls:
        return refuse(21602, "Message body is required.")
    if len(text) > MAX_BODY_CHARS:
        return refuse(21617, "The concatenated message body exceeds the 1600 character limit.")
    if len(media_urls) > MAX_MEDIA_URLS:
        return refuse(21623, "Number of media files exceeds allowed limit")
    if not all(_is_http_url(url) for url in media_urls):
        return refuse(21620, "Invalid media URL(s).")
    if status_callback and not _is_status_callback(status_callback):
        return refuse(21609, f"The StatusCallback URL {status_callback} is not a valid URL.")
    if ctx.faults.rejects(to):
        return refuse(21211, f"The 'To' number {to} is not a valid phone number.")
    if ctx.faults.has_opted_out(to):
        return refuse(21610, "Attempt to send to unsubscribed recipient")

    sid = "SM" + random_hex(32)
    created = _rfc2822(ctx.now)
    reply = {
        "account_sid": account_sid,
        "api_version": API_VERSION,
        "body": text,
        "date_created": created,
        "date_sent": None,
        "date_updated": created,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": sender or None,  # a messaging service picks the sender later
        "messaging_service_sid": service_sid or None,
        "num_media": str(len(media_urls)),
        "num_segments": str(_segments(text)),
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": "accepted" if service_sid else "queued",
        "subresource_uris": {"media": f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}/Media.json"},
        "to": to,
        "uri": f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}.json",
    }
    message = OutboxMessage(
        provider=TWILIO,
        provider_message_id=sid,
        to=to,
        sender=sender or service_sid,
        text=text,
        media_urls=tuple(media_urls),
        status_callback=status_callback,
        workspace_id=account.workspace_id,
        connector_id=account.connector_id,
        receipt_message_id=sid,
        received_at=ctx.now,
    )
    return SendResult(web.json_response(reply, status=201), [message], account)


def callback_params(account: ProviderAccount, message: OutboxMessage, status: str) -> dict[str, str]:
    """The form a status callback carries for `message` reaching `status`."""
    via_service = bool(MESSAGING_SERVICE_SID.match(message.sender))
    params = {
        "MessageSid": message.provider_message_id,
        "MessageStatus": status,
        "AccountSid": account.credential,
        "From": SERVICE_SENDER if via_service else message.sender,
        "To": message.to,
        "ApiVersion": API_VERSION,
        "SmsSid": message.provider_message_id,
        "SmsStatus": status,
    }
    if via_service:
        params["MessagingServiceSid"] = message.sender
    if status in CALLBACK_ERROR_CODES:
        params["ErrorCode"] = CALLBACK_ERROR_CODES[status]
    return params


def receipt_posts(
    account: ProviderAccount, deliveries: Sequence[tuple[OutboxMessage, Sequence[str]]]
) -> list[list[ReceiptPost]]:
    """Per message, one signed form POST per status, in order, to its StatusCallback."""
    sequences = []
    for message, statuses in deliveries:
        if not message.status_callback:
            continue
        posts = []
        for status in statuses:
            params = callback_params(account, message, status)
            headers = {
                "X-Twilio-Signature": twilio_signature(account.secret_text, message.status_callback, params),
                "I-Twilio-Idempotency-Token": random_token(32),
            }
            posts.append(
                ReceiptPost(
                    message.status_callback,
                    urllib.parse.urlencode(params).encode(),
                    lambda _body, headers=headers: headers,
                    "application/x-www-form-urlencoded",
                    1,
                )
            )
        sequences.append(posts)
    return sequences
