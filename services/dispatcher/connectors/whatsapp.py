"""WhatsApp Cloud API connector (`POST /{phone-number-id}/messages`).

Sends free text or a pre-approved template. Our message ID rides in
`biz_opaque_callback_data`, which Meta echoes in status webhooks. Meta signals
throttling with HTTP 400 and an error code as often as with 429, so those codes
are retried too.
"""

from __future__ import annotations

import asyncio
import random
import re
from urllib.parse import quote

import aiohttp

from libs.json_documents import dump
from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus, numeric_error_code
from services.dispatcher.connectors.http_retry import (
    HttpReply,
    HttpRequest,
    HttpSender,
    RetryAs,
    RetryPolicy,
    Sleep,
    TransportFactory,
    retry_after_header,
)
from services.dispatcher.connectors.provider_ids import safe_provider_id

DEFAULT_BASE_URL = "https://graph.facebook.com/v21.0"
# 130429 throughput reached, 131048 spam rate limit, 131056 pair rate limit (same recipient too often),
# 80007 the business account's rate limit, 4 the app's call limit (Graph API "API Too Many Calls").
RATE_LIMIT_CODES = frozenset({4, 80007, 130429, 131048, 131056})
# Meta's pair rate: one message every 6 seconds from a business number to the same user. Backoff's
# retries (under 1.5 s in all) all landed inside it, so the message failed though it could go.
PAIR_RATE_LIMIT = 131056
PAIR_RATE_SECONDS = 6.0


def _error_code(reply: HttpReply) -> int | None:
    document = reply.json()
    error = document.get("error") if isinstance(document, dict) else None
    return numeric_error_code(error.get("code")) if isinstance(error, dict) else None


def is_rate_limited(reply: HttpReply) -> bool:
    return _error_code(reply) in RATE_LIMIT_CODES


def retry_as(reply: HttpReply) -> RetryAs | None:
    """Meta's throttling codes, whatever the HTTP status, are tried again as a 429."""
    return "RATE_LIMITED" if is_rate_limited(reply) else None


def rate_limit_wait(reply: HttpReply) -> float | None:
    """Retry-After when Meta sends one; else, for the pair rate limit, the pair's interval."""
    waited = retry_after_header(reply)
    if waited is None and _error_code(reply) == PAIR_RATE_LIMIT:
        return PAIR_RATE_SECONDS
    return waited


def describe_error(reply: HttpReply) -> str:
    """Meta's numeric error code; `message` and `error_data` can quote the recipient, so never them."""
    code = _error_code(reply)
    return f"whatsapp error {code}" if code is not None else ""


# Meta refuses a template parameter holding a line break, a tab or more than four spaces in a row
# ("Param text cannot have new-line/tab characters or more than 4 consecutive spaces").
_PARAM_UNSENDABLE = re.compile(r"[\r\n\t]| {5,}")


def template_param(text: str) -> str:
    """`text` as Meta takes a template parameter: line breaks and tabs read as spaces, no run of more
    than four (an address on two lines, a name with a stray tab, as a CRM keeps them)."""
    if _PARAM_UNSENDABLE.search(text) is None:
        return text
    return re.sub(" {5,}", "    ", re.sub(r"\r\n|[\r\n\t]", " ", text))


def message_payload(message: OutboundMessage) -> dict[str, object]:
    """The Cloud API body for one message: a template when the campaign has one, else text."""
    payload: dict[str, object] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": message.to.lstrip("+"),
        "biz_opaque_callback_data": message.message_id,
    }
    template = message.whatsapp_template
    if template is not None:
        body: dict[str, object] = {"name": template.name, "language": {"code": template.language}}
        if template.params:
            body["components"] = [
                {"type": "body", "parameters": [{"type": "text", "text": template_param(p)} for p in template.params]}
            ]
        payload["type"] = "template"
        payload["template"] = body
    else:
        payload["type"] = "text"
        payload["text"] = {"body": message.sms_body, "preview_url": False}
    return payload


class WhatsAppCloudConnector:
    """Sends WhatsApp messages from one business phone number."""

    provider = "whatsapp"
    max_batch = 1

    def __init__(
        self,
        *,
        access_token: str,
        phone_number_id: str,
        http: aiohttp.ClientSession | TransportFactory,
        retry: RetryPolicy,
        base_url: str = "",
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        suppress_tracing: bool = True,  # for an aiohttp session: False when it carries no tracing hooks
    ) -> None:
        base = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url = f"{base}/{quote(phone_number_id, safe='')}/messages"
        self._access_token = access_token
        self._http = HttpSender(
            http,
            self.provider,
            retry,
            sleep=sleep,
            rng=rng,
            retry_as=retry_as,
            describe=describe_error,
            retry_after=rate_limit_wait,
            suppress_tracing=suppress_tracing,
        )

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        return [await self._send_one(message) for message in messages]

    async def close(self) -> None:
        """Nothing to release: the HTTP session is shared."""

    async def _send_one(self, message: OutboundMessage) -> SendOutcome:
        template = message.whatsapp_template
        empty = [i for i, p in enumerate(template.params, 1) if not p.strip()] if template is not None else []
        if empty:
            # Meta refuses the whole message for one empty parameter ("(#100) Invalid parameter"): a
            # recipient with no first name, say. Said here, naming the parameter, without a request.
            return SendOutcome(
                message.message_id,
                SendStatus.FAILED,
                error_code="INVALID_MESSAGE",
                error_message=f"template parameter {empty[0]} is empty, and WhatsApp refuses an empty parameter",
                attempts=0,
            )
        request = HttpRequest(
            "POST",
            self._url,
            {"Authorization": f"Bearer {self._access_token}", "Content-Type": "application/json"},
            dump(message_payload(message)),
        )
        exchange = await self._http.exchange(request)
        document = exchange.reply.json() if exchange.sent and exchange.reply is not None else None
        wamid = None
        if isinstance(document, dict) and isinstance(document.get("messages"), list) and document["messages"]:
            first = document["messages"][0]
            wamid = first.get("id") if isinstance(first, dict) else None
        return exchange.outcome(message.message_id, safe_provider_id(wamid, message.to))
