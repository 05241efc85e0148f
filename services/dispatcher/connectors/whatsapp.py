"""WhatsApp Cloud API connector (`POST /{phone-number-id}/messages`).

Sends free text or a pre-approved template. Our message ID rides in
`biz_opaque_callback_data`, which Meta echoes in status webhooks. Meta signals
throttling with HTTP 400 and an error code as often as with 429, so those codes
are retried too. Meta's error code decides, not the HTTP status: a spam rate
limit, an account in maintenance mode, a missing permission or a locked account
is final whatever status it comes with, and a 2xx that is Meta's error object
(naming no message) is no send.
A refusal of the campaign's template (missing, paused, disabled, its parameters
not matching) is every recipient's: it stops the batch as a refused token does,
and so does a refusal of the connector's phone number (an ID Meta does not know,
a number deleted or not registered with the Cloud API).
"""

from __future__ import annotations

import asyncio
import random
import re
from urllib.parse import quote

import aiohttp

from libs.json_documents import dump
from services.dispatcher.connectors.base import (
    REFUSED_FOR_TEMPLATE,
    OutboundMessage,
    SendOutcome,
    SendStatus,
    numeric_error_code,
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
    retry_after_header,
)
from services.dispatcher.connectors.provider_ids import safe_provider_id

DEFAULT_BASE_URL = "https://graph.facebook.com/v21.0"
# 130429 throughput reached, 131056 pair rate limit (same recipient too often), 80007 the business
# account's rate limit, 4 the app's call limit (Graph API "API Too Many Calls"): each lifts within seconds.
RATE_LIMIT_CODES = frozenset({4, 80007, 130429, 131056})
# 131048 "spam rate limit hit": Meta restricts how many messages this number may send (too many were
# blocked or flagged as spam). It lifts in hours or days, never within a batch's retries.
SPAM_RATE_LIMIT = 131048
# 131057 "Business account is in maintenance mode", as during a throughput upgrade: Meta takes no message of
# the account until it ends, in minutes, not within a batch's retries. Every message of the batch would meet
# it, and a re-run later sends them.
MAINTENANCE_MODE = 131057
# 131050: the recipient stopped the business's marketing messages in WhatsApp. Meta reports it in a failed
# status, or refuses the send with it: either way an opt-out with WhatsApp, suppressed as Twilio's 21610 is.
MARKETING_OPTED_OUT = 131050
# Graph API's authorization codes: 0 AuthException, 3 "API method" (a capability or permission the app
# lacks; Meta sends it with HTTP 500), 10 permission denied, 190 access token expired, 200-299 API
# permission, and the Cloud API's 131005 access denied. Only a new token or a permission granted ends them.
AUTH_CODES = frozenset({0, 3, 10, 190, *range(200, 300), 131005})
# Meta's refusals of the business account itself, which only its owner can lift with Meta.
ACCOUNT_RESTRICTIONS = {
    368: "it is temporarily blocked for policy violations",
    131031: "it is locked",
    131042: "it has a payment issue",
}
# Meta's refusals of the connector's phone number itself, whoever the recipient: 33 (the business number was
# deleted), 133010 (it is not registered with the Cloud API), and Graph's "Unsupported post request. Object
# with ID ... does not exist" (code 100, subcode 33: the phone-number ID is mistyped, or not the token's to
# send from). Code 100 with any other subcode is an invalid parameter, a message's own.
SENDER_REFUSALS = {
    33: "the business phone number was deleted",
    133010: "the phone number is not registered with the Cloud API",
}
INVALID_PARAMETER = 100
UNKNOWN_OBJECT = 33  # its subcode
# Meta's refusals of the campaign's template or of what the campaign gave it, the same for every recipient
# of the batch: the template's name and language, its standing, the count of its parameters. Not 132012
# (a parameter's format), which a recipient's own value can cause: stopping the batch on it would stop
# every re-run at that recipient.
TEMPLATE_REFUSALS = {
    132000: "the number of parameters does not match the template's",
    132001: "the template does not exist in this name and language",
    132015: "the template is paused for its low quality",
    132016: "the template is disabled",
}
TEMPLATE_REFUSED = "TEMPLATE_REFUSED"
# Meta's limits on what is sent: a text message's body (4,096 characters), and a template's body
# parameter when the body is the only component sent (32,768; 1,024 only beside other components).
MAX_TEXT_BODY_CHARS = 4096
MAX_BODY_PARAM_CHARS = 32768
# Meta's pair rate: one message every 6 seconds from a business number to the same user. Backoff's
# retries (under 1.5 s in all) all landed inside it, so the message failed though it could go.
PAIR_RATE_LIMIT = 131056
PAIR_RATE_SECONDS = 6.0


def _error(reply: HttpReply) -> dict | None:
    document = reply.json()
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, dict) else None


def _error_code(reply: HttpReply) -> int | None:
    error = _error(reply)
    return numeric_error_code(error.get("code")) if error is not None else None


def _sender_refusal(reply: HttpReply, code: int | None) -> tuple[str, str]:
    """What a refusal with Meta's `code` says of the connector's phone number, and the codes to quote;
    ("", "") when it is not one of `SENDER_REFUSALS` or the unknown phone-number ID."""
    if code == INVALID_PARAMETER:
        error = _error(reply)
        if error is not None and numeric_error_code(error.get("error_subcode")) == UNKNOWN_OBJECT:
            return (
                "no such phone-number ID, or the access token may not send from it",
                f"whatsapp error {code}, subcode {UNKNOWN_OBJECT}",
            )
        return "", ""
    what = SENDER_REFUSALS.get(code, "") if code is not None else ""
    return what, f"whatsapp error {code}"


def is_rate_limited(reply: HttpReply) -> bool:
    return _error_code(reply) in RATE_LIMIT_CODES


def _error_in_2xx(reply: HttpReply) -> bool:
    """A 2xx whose body is Meta's error object and names no message (a proxy, `suppress_http_code`):
    nothing was taken, whatever the status says."""
    if not 200 <= reply.status < 300:
        return False
    document = reply.json()
    return isinstance(document, dict) and isinstance(document.get("error"), dict) and not document.get("messages")


def _refused_code(reply: HttpReply) -> int | None:
    """Meta's error code of a reply that refused the request, whatever its HTTP status."""
    return _error_code(reply) if reply.status >= 400 or _error_in_2xx(reply) else None


def _account_refusal(reply: HttpReply) -> Refusal | None:
    """Meta's codes that no retry in the batch gets past, whatever the HTTP status they come with."""
    code = _refused_code(reply)
    if code == SPAM_RATE_LIMIT:
        return Refusal(
            "RATE_LIMITED",
            f"whatsapp's spam rate limit for this phone number was hit (whatsapp error {code}): Meta restricts "
            "how many messages the number may send; not retried, re-run the instance later",
        )
    if code == MAINTENANCE_MODE:
        return Refusal(
            "RATE_LIMITED",
            f"whatsapp's business account is in maintenance mode (HTTP {reply.status}, whatsapp error {code}), "
            "as during a throughput upgrade: Meta takes no message until it ends; not retried, re-run the "
            "instance in a few minutes",
        )
    if code in AUTH_CODES:
        return Refusal(
            "PROVIDER_AUTH_FAILED",
            f"whatsapp refused the access token or its permissions (HTTP {reply.status}, whatsapp error {code}); "
            "not retried: check the connector's access token and the app's permissions",
        )
    if code in ACCOUNT_RESTRICTIONS:
        return Refusal(
            "ACCOUNT_SUSPENDED",
            f"whatsapp refused the business account: {ACCOUNT_RESTRICTIONS[code]} (HTTP {reply.status}, "
            f"whatsapp error {code}); not retried: resolve it with Meta in WhatsApp Manager, then re-run the instance",
        )
    what, detail = _sender_refusal(reply, code)
    if what:
        return Refusal(
            "SENDER_REFUSED",
            f"whatsapp refused the connector's phone number: {what} (HTTP {reply.status}, {detail}); not "
            "retried: fix the connector's sender (its phone-number ID) or the number in WhatsApp Manager, "
            "then re-run the instance",
        )
    return None


def template_refusal(reply: HttpReply) -> Refusal | None:
    """Meta's refusals of the campaign's template (`TEMPLATE_REFUSALS`), whatever the HTTP status. Meta's
    `message` and `error_data.details` can quote a parameter's value: only its code is kept."""
    code = _refused_code(reply)
    if code not in TEMPLATE_REFUSALS:
        return None
    return Refusal(
        TEMPLATE_REFUSED,
        f"whatsapp refused the campaign's template: {TEMPLATE_REFUSALS[code]} (HTTP {reply.status}, "
        f"whatsapp error {code}); not retried: fix the template in WhatsApp Manager or the campaign's "
        "whatsapp_template, then re-run the instance, which sends the recipients left unsent",
    )


def refusal(reply: HttpReply) -> Refusal | None:
    """`_account_refusal`'s, `template_refusal`'s, and a 2xx that is Meta's error: refused as a 4xx with
    its code would be (its throttling codes are tried again, `retry_as`)."""
    refused = _account_refusal(reply) or template_refusal(reply)
    if refused is None and _error_in_2xx(reply) and not is_rate_limited(reply):
        detail = describe_error(reply)
        suffix = f", {detail}" if detail else ""
        return Refusal(f"HTTP_{reply.status}", f"whatsapp refused the request (HTTP {reply.status}{suffix})")
    return refused


def refuses_batch(reply: HttpReply) -> bool:
    """Meta's refusals of the phone number, the token, the business account or the campaign's template
    rather than the message (each of `_account_refusal`'s and `template_refusal`'s): the batch's other
    messages would meet them too."""
    return _account_refusal(reply) is not None or template_refusal(reply) is not None


def retry_as(reply: HttpReply) -> RetryAs | None:
    """Meta's throttling codes, whatever the HTTP status, are tried again as a 429."""
    return "RATE_LIMITED" if is_rate_limited(reply) else None


def rate_limit_wait(reply: HttpReply) -> float | None:
    """Retry-After when Meta asks for a wait; else, for the pair rate limit, the pair's interval."""
    waited = retry_after_header(reply)
    if not waited and _error_code(reply) == PAIR_RATE_LIMIT:
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


def why_unsendable(message: OutboundMessage) -> str:
    """Why Meta would refuse the message as it is, naming the part and never its text; "" when it would not.

    Said here, without a request: Meta refuses it after a round trip with an error that names nothing.
    Lengths are counted in code points; Meta documents characters, not how it counts them, and this is
    the lower count, so no message Meta would take is refused here.
    """
    template = message.whatsapp_template
    if template is None:
        length = len(message.sms_body)
        if not length:
            # "(#100) The parameter text['body'] is required": every value the text renders was empty.
            return "the rendered sms_body is empty, and WhatsApp refuses a text message without a body"
        if length > MAX_TEXT_BODY_CHARS:
            return f"the rendered sms_body is {length:,} characters; WhatsApp accepts at most {MAX_TEXT_BODY_CHARS:,}"
        return ""
    for number, param in enumerate(template.params, 1):
        if not param.strip():
            # "(#100) Invalid parameter" for the whole message: a recipient with no first name, say.
            return f"template parameter {number} is empty, and WhatsApp refuses an empty parameter"
        length = len(template_param(param))
        if length > MAX_BODY_PARAM_CHARS:
            return (
                f"the rendered template parameter {number} is {length:,} characters; "
                f"WhatsApp accepts at most {MAX_BODY_PARAM_CHARS:,} in a body parameter"
            )
    return ""


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
            refusal=refusal,
            account_refusal=refuses_batch,
            may_have_taken=gateway_timeout,
            suppress_tracing=suppress_tracing,
        )

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
            {"Authorization": f"Bearer {self._access_token}", "Content-Type": "application/json"},
            dump(message_payload(message)),
        )
        exchange = await self._http.exchange(request)
        document = exchange.reply.json() if exchange.sent and exchange.reply is not None else None
        wamid = None
        if isinstance(document, dict) and isinstance(document.get("messages"), list) and document["messages"]:
            first = document["messages"][0]
            wamid = first.get("id") if isinstance(first, dict) else None
        if exchange.status is SendStatus.FAILED and exchange.reply is not None:
            if _refused_code(exchange.reply) == MARKETING_OPTED_OUT:
                return SendOutcome(
                    message.message_id,
                    SendStatus.FAILED,
                    error_code="RECIPIENT_OPTED_OUT",
                    error_message=(
                        f"the recipient stopped the business's marketing messages in WhatsApp (whatsapp error "
                        f"{MARKETING_OPTED_OUT}): suppressed"
                    ),
                    attempts=exchange.attempts,
                    opted_out=True,
                )
        outcome = exchange.outcome(message.message_id, safe_provider_id(wamid, message.to))
        if outcome.account_refused and outcome.error_code == TEMPLATE_REFUSED:
            outcome.refused_for = REFUSED_FOR_TEMPLATE
        return outcome
