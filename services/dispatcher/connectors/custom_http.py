"""CUSTOM_HTTP connector: any SMS/MMS/RCS/WhatsApp gateway, described by a request template.

Placeholders: `@to` (the recipient's number in E.164, "+447700900000"), `@to_digits` (the same without
its "+", "447700900000", as Vonage and other gateways want it), `@text`, `@message_id`, `@sender` and
`@credentials.<name>`.
They are replaced in one pass (a value that itself contains `@sender` stays as
it is), escaped for where they land:

- URL: percent-encoded;
- header values: as they are. `@text` is refused there when the connector is saved (a message can
  be several lines, a header is one); the other values hold no line break. A connector saved before
  that rule fails each message whose text has one;
- body: escaped for the media type its `Content-Type` header declares (`body_kind`, `body_escape`):
  JSON-string-escaped for JSON (`application/json`, any `+json`), XML-escaped (`& < > " '`, CR, LF and
  tab as references; in a CDATA section, `]]>` and CR written outside it) for XML (`application/xml`,
  `text/xml`, any `+xml`), HTML-escaped for `text/html`, form-encoded for
  `application/x-www-form-urlencoded`, as it is for the other `text/*` types (`text/plain`). A
  connector is saved only with one of those (and no charset but UTF-8, the body's encoding). Without a
  Content-Type the body's first character decides: `{` or `[` JSON, `<` XML, anything else form; the
  Content-Type is then set accordingly.

A relative template URL (`/sms/json`) is joined to the connector's `base_url`.
The provider's message ID is read from the JSON reply with `message_id_path`
(JMESPath; none configured means none recorded).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.connector_store import TEMPLATE_PLACEHOLDER
from libs.http_bodies import (
    DEFAULT_CONTENT_TYPE,
    NotXml,
    as_is,
    body_escape,
    body_kind,
    content_type_header,
    guessed_body_kind,
)
from libs.jsonpath import compile_getter
from services.dispatcher.connectors.base import (
    MAX_ERROR_CODE_DIGITS,
    OutboundMessage,
    SendOutcome,
    SendStatus,
    send_each,
)
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

PLACEHOLDER = TEMPLATE_PLACEHOLDER  # the connector store masks by the same pattern
RECIPIENT_PLACEHOLDERS = frozenset({"to", "to_digits"})
_GATEWAY_STATUS = re.compile(r"^[0-9A-Za-z_-]{1,16}\Z")


class TemplateError(ValueError):
    """The rendered request cannot be sent (a header value with a line break, a character an XML body
    cannot carry); says which field and placeholder, never the value."""


SUPPORTED_CONTENT_TYPES = (
    "application/json (or any +json type), application/xml, text/xml (or any +xml type), text/html, "
    "application/x-www-form-urlencoded, text/plain (or any other text/ type)"
)


def content_type_charset(content_type: str) -> str:
    """The `charset` parameter of a Content-Type, lowercased ("" when it has none)."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').strip().lower()
    return ""


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


def _everywhere(escape: Callable[[str], str]) -> Callable[[int], Callable[[str], str]]:
    return lambda _position: escape


def _body_escape(kind: str, body: str) -> Callable[[int], Callable[[str], str]]:
    """How the value at each position of `body` is escaped (a form by the table above: the same bytes)."""
    if kind == "form":
        return _everywhere(_form_escape)
    return lambda position: body_escape(kind, body, position)


class _CompiledText:
    """A template string split once into text and per-message placeholders, as `substitute` would fill it.

    Credentials and the sender are the same for every message, so they are escaped into the text up
    front; what is left per message is joining strings (a connector sends thousands a second).
    """

    def __init__(
        self,
        template: str,
        sender: str,
        credentials: Mapping[str, str],
        escape_at: Callable[[int], Callable[[str], str]],
    ) -> None:
        """`escape_at(position)` writes a value placed at `position` of `template` (in an XML body, a
        value in a CDATA section is written differently)."""
        # (text before, per-message value name, its escape)
        self._parts: list[tuple[str, str, Callable[[str], str]]] = []
        text: list[str] = []
        position = 0
        for match in PLACEHOLDER.finditer(template):
            text.append(template[position : match.start()])
            position = match.end()
            escape_here = escape_at(match.start())
            if match.group(1):
                text.append(escape_here(credentials.get(match.group(1), "")))
            elif match.group(2) == "sender":
                text.append(escape_here(sender))
            else:
                self._parts.append(("".join(text), match.group(2), escape_here))
                text = []
        text.append(template[position:])
        self._tail = "".join(text)

    def render(self, values: Mapping[str, str]) -> str:
        """Raises TemplateError naming the placeholder whose value the escape cannot write."""
        if not self._parts:
            return self._tail
        out = []
        name = ""
        try:
            for text, name, escape in self._parts:
                out.append(text)
                out.append(escape(values[name]))
        except NotXml:
            raise TemplateError(
                f"custom_http.body is XML and the value of @{name} holds a character XML 1.0 cannot carry "
                "(a control character other than tab and line breaks, U+FFFE or U+FFFF)"
            ) from None
        out.append(self._tail)
        return "".join(out)


class CompiledRequest:
    """A connector's request template, compiled once; `render` builds the request for one message."""

    def __init__(
        self, template: pb.CustomHttpTemplate, *, sender: str, credentials: Mapping[str, str], base_url: str = ""
    ) -> None:
        self.method = template.method.upper() or "POST"
        self._url = _CompiledText(join_url(base_url, template.url), sender, credentials, _everywhere(_url_escape))
        self._headers = [
            (name, _CompiledText(value, sender, credentials, _everywhere(as_is)))
            for name, value in template.headers.items()
        ]
        self._body: _CompiledText | None = None
        self._content_type = ""
        self._unwritable = ""  # why no message can be sent: the sender or a credential an XML body cannot carry
        if self.method != "GET" and template.body:
            declared = content_type_header(template.headers)
            # A type whose escaping is not known is refused when saved; one saved before that rule is
            # escaped as a body without a Content-Type is.
            kind = (body_kind(declared[1]) if declared else None) or guessed_body_kind(template.body)
            try:
                self._body = _CompiledText(template.body, sender, credentials, _body_escape(kind, template.body))
            except NotXml:
                self._unwritable = (
                    "custom_http.body is XML and the connector's sender or a credential it uses holds a "
                    "character XML 1.0 cannot carry: save the connector without it"
                )
            if declared is None:
                self._content_type = DEFAULT_CONTENT_TYPE[kind]

    def render(self, message: OutboundMessage) -> HttpRequest:
        """The gateway request for one message. Holds the contact and the secrets: never log it."""
        if self._unwritable:
            raise TemplateError(self._unwritable)
        to = message.to
        values = {
            "to": to,
            "to_digits": to[1:] if to[:1] == "+" else to,
            "text": message.sms_body,
            "message_id": message.message_id,
        }
        headers: dict[str, str] = {}
        for name, value in self._headers:
            rendered = value.render(values)
            if "\r" in rendered or "\n" in rendered:
                raise TemplateError(
                    f"custom_http.headers[{name!r}] would contain a line break (a header is one line): "
                    "move @text to the connector's body or url"
                )
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


def _names_message(selected: object) -> bool:
    """Whether what `message_id_path` selected is an ID, which says the gateway took the message: a token
    (recorded, or dropped for holding the number), not an object, a list or a text (a path selecting a
    refused part, or its error text, would have every refusal read as a send)."""
    return safe_provider_id(selected, "") != ""


ACCEPTED = "0"  # Vonage's per-part status for "this part went out"
THROTTLED = "1"  # Vonage's per-part status for "sending faster than the account's limit"
INTERNAL_ERROR = "5"  # Vonage's "an error has occurred in the platform whilst processing this message"
# A refusal of every part that is worth another attempt, and the error code it ends with.
_RETRIED: dict[str, RetryAs] = {THROTTLED: "RATE_LIMITED", INTERNAL_ERROR: "SERVER_ERROR"}
# Vonage's refusals of the connector's account rather than the message, which every message would meet
# (HTTP 200 all the same): the error code each fails with, and what it says to fix.
ACCOUNT_STATUSES: dict[str, tuple[str, str]] = {
    "4": (
        "PROVIDER_AUTH_FAILED",
        "refused the connector's credentials (status 4); not retried: check the connector's credentials",
    ),
    "8": (
        "ACCOUNT_SUSPENDED",
        "says the connector's account is barred (status 8); not retried: take it up with the gateway, "
        "then re-run the instance",
    ),
    "9": (
        "QUOTA_EXCEEDED",
        "says the connector's account has no credit left (status 9); not retried: top it up, then re-run the instance",
    ),
}


@dataclass(frozen=True, slots=True)
class GatewayRefusal:
    """The parts of a Vonage-style reply the gateway refused.

    `status` is the first refused part's code ("?" when it is not one we may quote), `part` that
    part's place among the reply's `parts` (from 1), `refused` how many parts were refused.
    """

    status: str
    part: int
    parts: int
    refused: int

    @property
    def partial(self) -> bool:
        """Some parts went out: sending the message again would send them twice."""
        return self.refused < self.parts

    @property
    def error_message(self) -> str:
        """Codes and counts only: the gateway's `error-text` can quote the number."""
        if not self.partial:
            return f"gateway refused the message (status {self.status})"
        others = "the other part went out" if self.parts - self.refused == 1 else "the other parts went out"
        if self.refused == 1:
            return f"gateway refused part {self.part} of {self.parts} (status {self.status}); {others}"
        return (
            f"gateway refused {self.refused} of {self.parts} parts (part {self.part}: status {self.status}); {others}"
        )


def _part_status(part: Any) -> str | None:
    """A part's status as text, or None when it is not a code."""
    status = part.get("status") if isinstance(part, dict) else None
    # Vonage's status is a code. An object there is another gateway's convention (Infobip answers 200
    # with {"groupName": "PENDING", ...} for a message it accepted), not a refusal.
    if isinstance(status, bool) or not isinstance(status, str | int):
        return None
    return str(status)


def _quotable(status: str) -> str:
    # A code, not a value: never more digits than a code has (a number echoed there stays out).
    if _GATEWAY_STATUS.match(status) and sum(c.isdigit() for c in status) <= MAX_ERROR_CODE_DIGITS:
        return status
    return "?"


def gateway_refusal(document: Any) -> GatewayRefusal | None:
    """What a Vonage-style reply refused (`messages`: one entry per part of the SMS, each with a
    `status`, "0" when that part went out), or None when no part was refused.

    A part whose status is not a code (an object, nothing) is not a refusal: it counts as gone out.
    """
    if not isinstance(document, dict):
        return None
    messages = document.get("messages")
    if not isinstance(messages, list):
        return None
    first: str | None = None
    part = refused = 0
    for place, entry in enumerate(messages, 1):
        status = _part_status(entry)
        if status is None or status == ACCEPTED:
            continue
        refused += 1
        if first is None:
            first, part = status, place
    if first is None:
        return None
    return GatewayRefusal(_quotable(first), part, len(messages), refused)


def account_refusal(document: Any) -> tuple[str, str] | None:
    """(error code, message) when a Vonage-style reply refuses the connector's account (`ACCOUNT_STATUSES`):
    every part with the same one of those statuses, since such a refusal stops the batch and holds the
    call's next batches back. A reply whose parts disagree is judged as a message's refusal."""
    messages = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(messages, list) or not messages:
        return None
    statuses = {_part_status(entry) for entry in messages}
    if len(statuses) != 1:
        return None
    code, what = ACCOUNT_STATUSES.get(statuses.pop() or "", ("", ""))
    return (code, f"the gateway {what}") if code else None


def refuses_credentials(reply: HttpReply) -> bool:
    """A 401 says the gateway refused the connector's credentials: every message would meet it. A 403
    is not taken as one: gateways answer it for a destination they will not serve, a message's refusal."""
    return reply.status == 401


def credentials_refusal(reply: HttpReply) -> Refusal | None:
    """A 401 fails as every connector's refused credentials do, saying what to fix."""
    if not refuses_credentials(reply):
        return None
    return Refusal(
        "PROVIDER_AUTH_FAILED",
        "the gateway refused the connector's credentials (HTTP 401); not retried: check the connector's credentials",
    )


def redirect_detail(reply: HttpReply) -> str:
    """A redirect is not followed (it would take the recipient and the credentials wherever a reply
    points): says what to fix, never where it pointed."""
    if 300 <= reply.status < 400:
        return "a redirect, not followed: set the connector's url to the gateway's current address"
    return ""


class CustomHttpConnector:
    """Sends through a brand's own HTTP gateway.

    Any 2xx reply means sent, with one convention for gateways that always
    answer 200 and report per message (Vonage and its imitators): the reply's
    `messages` has an entry per part of the SMS, each with a `status`, "0" when
    that part went out. A status that is not a string or a number (an object:
    Infobip's convention) is not a refusal.

    - Every part refused: nothing went out, and the message fails
      `GATEWAY_REJECTED` with the first part's code. When that code is "1"
      (throttled) it is tried again as a 429 would be, failing `RATE_LIMITED`
      after the last attempt; when it is "5" (the gateway's internal error), as
      a 5xx would be, failing `SERVER_ERROR`.
    - Some parts refused, others accepted: the recipient has part of the
      message. It ends `OUTCOME_UNKNOWN` (a send that may have reached them:
      its claim is kept, so neither a retry nor a re-run sends the accepted
      parts twice) with error code `GATEWAY_REJECTED` naming the first
      refused part and its code.
    - An ID that `message_id_path` selects says the gateway took the message:
      the reply is then never read as "nothing went out" (neither failed nor
      tried again); a refusal of some of its parts is still partial.

    Only codes are quoted, of at most MAX_ERROR_CODE_DIGITS digits ("?" for
    any other), never the gateway's error text, which can quote the number.

    A 401 fails `PROVIDER_AUTH_FAILED` (the connector's credentials), and the
    batch's messages after it fail with it unsent; so do Vonage's refusals of
    the account in a 200, every part saying the same: "4" (credentials,
    `PROVIDER_AUTH_FAILED`), "8" (account barred, `ACCOUNT_SUSPENDED`), "9"
    (no credit left, `QUOTA_EXCEEDED`). Any other refusal fails
    `HTTP_<status>`, a redirect (not followed) saying so.
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
            retry_as=self._retry_as,
            describe=redirect_detail,
            refusal=credentials_refusal,
            account_refusal=refuses_credentials,
            may_have_taken=gateway_timeout,
            suppress_tracing=suppress_tracing,
        )

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        return await send_each(messages, self._send_one)

    async def close(self) -> None:
        """Nothing to release: the HTTP session is shared."""

    def _retry_as(self, reply: HttpReply) -> RetryAs | None:
        """A 2xx that refused every part, the first with Vonage's "1" (throttled) or "5" (internal
        error), and names no message ID: nothing went out, so tried again like a 429 or a 5xx."""
        if not 200 <= reply.status < 300 or b"status" not in reply.body:
            return None
        document = reply.json()
        refusal = gateway_refusal(document)
        if refusal is None or refusal.partial or refusal.status not in _RETRIED:
            return None
        if self._message_id_path is not None and _names_message(self._message_id_path(document)):
            return None
        return _RETRIED[refusal.status]

    async def _send_one(self, message: OutboundMessage) -> SendOutcome:
        try:
            request = self._request.render(message)
        except TemplateError as exc:
            return SendOutcome(
                message.message_id,
                SendStatus.FAILED,
                error_code="INVALID_MESSAGE",
                error_message=str(exc),  # the header's name, never its value
                attempts=0,
            )
        exchange = await self._http.exchange(request)
        if not exchange.sent or exchange.reply is None:
            return exchange.outcome(message.message_id)
        document = exchange.reply.json()
        selected = None
        if self._message_id_path is not None and document is not None:
            selected = self._message_id_path(document)
        refusal = gateway_refusal(document)
        if refusal is not None and refusal.partial:
            # Part of the message reached the recipient: kept as a send that may have been (its claim
            # held, so no re-run sends those parts again), never as one that could be sent afresh.
            return SendOutcome(
                message.message_id,
                SendStatus.OUTCOME_UNKNOWN,
                provider_message_id=safe_provider_id(selected, message.to),
                error_code="GATEWAY_REJECTED",
                error_message=refusal.error_message,
                attempts=exchange.attempts,
            )
        if refusal is not None and not _names_message(selected):
            of_account = account_refusal(document)
            code, text = of_account or ("GATEWAY_REJECTED", refusal.error_message)
            return SendOutcome(
                message.message_id,
                SendStatus.FAILED,
                error_code=code,
                error_message=text,
                attempts=exchange.attempts,
                account_refused=of_account is not None,
            )
        return exchange.outcome(message.message_id, safe_provider_id(selected, message.to))
