"""CUSTOM_HTTP connector: any SMS/MMS/RCS/WhatsApp gateway, described by a request template.

Placeholders: `@to`, `@text`, `@message_id`, `@sender` and `@credentials.<name>`.
They are replaced in one pass (a value that itself contains `@sender` stays as
it is), escaped for where they land:

- URL: percent-encoded;
- header values: as they are (a value with a line break fails the message);
- body: JSON-string-escaped when the body looks like JSON, form-encoded otherwise;
  the Content-Type defaults accordingly.

A relative template URL (`/sms/json`) is joined to the connector's `base_url`.
The provider's message ID is read from the JSON reply with `message_id_path`
(JMESPath; none configured means none recorded).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.jsonpath import compile_getter
from services.dispatcher.connectors.base import MAX_ERROR_CODE_DIGITS, OutboundMessage, SendOutcome, SendStatus
from services.dispatcher.connectors.http_retry import (
    HttpReply,
    HttpRequest,
    HttpSender,
    RetryPolicy,
    Sleep,
    TransportFactory,
)
from services.dispatcher.connectors.provider_ids import safe_provider_id

PLACEHOLDER = re.compile(r"@credentials\.([A-Za-z_][A-Za-z0-9_]*)|@(message_id|sender|text|to)\b")
_GATEWAY_STATUS = re.compile(r"^[0-9A-Za-z_-]{1,16}\Z")


class TemplateError(ValueError):
    """The rendered request cannot be sent (a header value with a line break)."""


def looks_like_json(body: str) -> bool:
    return body.lstrip()[:1] in ("{", "[")


def referenced_credentials(template: str) -> set[str]:
    return {m.group(1) for m in PLACEHOLDER.finditer(template) if m.group(1)}


def substitute(
    template: str, values: Mapping[str, str], credentials: Mapping[str, str], escape: Callable[[str], str]
) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return escape(credentials.get(match.group(1), ""))
        return escape(values[match.group(2)])

    return PLACEHOLDER.sub(replace, template)


def _json_string_content(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def join_url(base_url: str, url: str) -> str:
    return base_url.rstrip("/") + url if url.startswith("/") else url


# urllib's quoting in C-speed tables for ASCII text (the usual case), urllib itself for the rest.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_URL_TABLE = {c: chr(c) if c in _UNRESERVED else f"%{c:02X}" for c in range(128)}
_FORM_TABLE = {**_URL_TABLE, ord(" "): "+"}


def _url_escape(value: str) -> str:
    """quote(value, safe="")"""
    return value.translate(_URL_TABLE) if value.isascii() else quote(value, safe="")


def _form_escape(value: str) -> str:
    """quote_plus(value)"""
    return value.translate(_FORM_TABLE) if value.isascii() else quote_plus(value)


def _as_is(value: str) -> str:
    return value


class _CompiledText:
    """A template string split once into text and per-message placeholders, as `substitute` would fill it.

    Credentials and the sender are the same for every message, so they are escaped into the text up
    front; what is left per message is joining strings (a connector sends thousands a second).
    """

    def __init__(
        self, template: str, sender: str, credentials: Mapping[str, str], escape: Callable[[str], str]
    ) -> None:
        self._escape = escape
        self._parts: list[tuple[str, str]] = []  # (text before, per-message value name)
        text: list[str] = []
        position = 0
        for match in PLACEHOLDER.finditer(template):
            text.append(template[position : match.start()])
            position = match.end()
            if match.group(1):
                text.append(escape(credentials.get(match.group(1), "")))
            elif match.group(2) == "sender":
                text.append(escape(sender))
            else:
                self._parts.append(("".join(text), match.group(2)))
                text = []
        text.append(template[position:])
        self._tail = "".join(text)

    def render(self, values: Mapping[str, str]) -> str:
        if not self._parts:
            return self._tail
        escape = self._escape
        out = []
        for text, name in self._parts:
            out.append(text)
            out.append(escape(values[name]))
        out.append(self._tail)
        return "".join(out)


class CompiledRequest:
    """A connector's request template, compiled once; `render` builds the request for one message."""

    def __init__(
        self, template: pb.CustomHttpTemplate, *, sender: str, credentials: Mapping[str, str], base_url: str = ""
    ) -> None:
        self.method = template.method.upper() or "POST"
        self._url = _CompiledText(join_url(base_url, template.url), sender, credentials, _url_escape)
        self._headers = [
            (name, _CompiledText(value, sender, credentials, _as_is)) for name, value in template.headers.items()
        ]
        self._body: _CompiledText | None = None
        self._content_type = ""
        if self.method != "GET" and template.body:
            is_json = looks_like_json(template.body)
            escape = _json_string_content if is_json else _form_escape
            self._body = _CompiledText(template.body, sender, credentials, escape)
            if not any(name.lower() == "content-type" for name in template.headers):
                self._content_type = "application/json" if is_json else "application/x-www-form-urlencoded"

    def render(self, message: OutboundMessage) -> HttpRequest:
        """The gateway request for one message. Holds the contact and the secrets: never log it."""
        values = {"to": message.to, "text": message.sms_body, "message_id": message.message_id}
        headers: dict[str, str] = {}
        for name, value in self._headers:
            rendered = value.render(values)
            if "\r" in rendered or "\n" in rendered:
                raise TemplateError(f"header {name} would contain a line break")
            headers[name] = rendered
        body = None
        if self._body is not None:
            body = self._body.render(values).encode()
            if self._content_type:
                headers["Content-Type"] = self._content_type
        return HttpRequest(self.method, self._url.render(values), headers, body)


def build_request(
    template: pb.CustomHttpTemplate,
    message: OutboundMessage,
    *,
    sender: str,
    credentials: Mapping[str, str],
    base_url: str = "",
) -> HttpRequest:
    """The gateway request for one message. Holds the contact and the secrets: never log it."""
    return CompiledRequest(template, sender=sender, credentials=credentials, base_url=base_url).render(message)


_NO_ID = (None, "", [], {})  # what `message_id_path` selects when the reply names no message
THROTTLED = "1"  # Vonage's per-message status for "sending faster than the account's limit"


def gateway_rejection(document: Any) -> str | None:
    """The per-message status of a Vonage-style reply when it is not "0" (accepted), else None."""
    if not isinstance(document, dict):
        return None
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
        return None
    status = messages[0].get("status")
    # Vonage's status is a code. An object there is another gateway's convention (Infobip answers 200
    # with {"groupName": "PENDING", ...} for a message it accepted), not a refusal.
    if isinstance(status, bool) or not isinstance(status, str | int):
        return None
    text = str(status)
    if text == "0":
        return None
    # A code, not a value: never more digits than a code has (a number echoed there stays out).
    return text if _GATEWAY_STATUS.match(text) and sum(c.isdigit() for c in text) <= MAX_ERROR_CODE_DIGITS else "?"


class CustomHttpConnector:
    """Sends through a brand's own HTTP gateway.

    Any 2xx reply means sent, with one convention for gateways that always
    answer 200 and report per message (Vonage and its imitators): when
    `message_id_path` selects nothing and the reply has `messages[0].status`
    (a string or a number) other than "0", the message failed with
    `GATEWAY_REJECTED` (the status code is quoted; the gateway's error text is
    not, since it can quote the number).
    Status "1" (throttled) is tried again as a 429 would be, and fails
    `RATE_LIMITED` after the last attempt.
    """

    provider = "custom"
    max_batch = 1

    def __init__(
        self,
        *,
        template: pb.CustomHttpTemplate,
        sender: str,
        credentials: Mapping[str, str],
        http: aiohttp.ClientSession | TransportFactory,
        retry: RetryPolicy,
        base_url: str = "",
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        suppress_tracing: bool = True,  # for an aiohttp session: False when it carries no tracing hooks
    ) -> None:
        self._request = CompiledRequest(template, sender=sender, credentials=dict(credentials), base_url=base_url)
        self._message_id_path = compile_getter(template.message_id_path) if template.message_id_path else None
        self._http = HttpSender(
            http,
            self.provider,
            retry,
            sleep=sleep,
            rng=rng,
            rate_limited=self._throttled,
            suppress_tracing=suppress_tracing,
        )

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        return [await self._send_one(message) for message in messages]

    async def close(self) -> None:
        """Nothing to release: the HTTP session is shared."""

    def _throttled(self, reply: HttpReply) -> bool:
        """A 2xx whose per-message status is Vonage's "1" (throttled: over the account's rate, not
        sent), and that names no message ID: tried again like a 429."""
        if not 200 <= reply.status < 300 or b"status" not in reply.body:
            return False
        document = reply.json()
        if gateway_rejection(document) != THROTTLED:
            return False
        return self._message_id_path is None or self._message_id_path(document) in _NO_ID

    async def _send_one(self, message: OutboundMessage) -> SendOutcome:
        try:
            request = self._request.render(message)
        except TemplateError:
            return SendOutcome(
                message.message_id,
                SendStatus.FAILED,
                error_code="INVALID_MESSAGE",
                error_message="a header value would contain a line break",
                attempts=0,
            )
        exchange = await self._http.exchange(request)
        if not exchange.sent or exchange.reply is None:
            return exchange.outcome(message.message_id)
        document = exchange.reply.json()
        selected = None
        if self._message_id_path is not None and document is not None:
            selected = self._message_id_path(document)
        if selected in _NO_ID:
            rejection = gateway_rejection(document)
            if rejection is not None:
                return SendOutcome(
                    message.message_id,
                    SendStatus.FAILED,
                    error_code="GATEWAY_REJECTED",
                    error_message=f"gateway refused the message (status {rejection})",
                    attempts=exchange.attempts,
                )
        return exchange.outcome(message.message_id, safe_provider_id(selected, message.to))
