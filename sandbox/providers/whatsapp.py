"""WhatsApp Cloud API (`POST /{version}/{phone_number_id}/messages`) and its signed status webhooks.

Text and template messages only (the dispatcher sends nothing else); other types are refused
with ``(#100)``, as is a template's text parameter holding a new line, a tab or more than four
spaces in a row. ``type`` defaults to text, ``to`` may carry a leading ``+``. The access token is
checked first (401, code 190); a token that is valid but does not own the phone number ID gets
Graph's 400 code 100 subcode 33. ``reject_to`` refuses a recipient with 131026 (Message
undeliverable), which Meta more often reports later in a "failed" status; ``opted_out`` with 131050 (the
recipient stopped the business's marketing messages), likewise. ``template_errors``
refuses a template by name with Meta's code for it (132001 not found, 132015 paused ...); like
Meta's, the details of a parameter mismatch quote the first parameter's text.

Message IDs are built like Meta's: ``wamid.`` + base64 of a small record that holds the
recipient's number (``wamid.HBgLMTY1MDUwNzY1MjAV...`` decodes to ``...16505076520...``), so a
consumer that stores them as opaque tokens stores a phone number; the sandbox keeps that trap.

Status webhooks go to ``{receipts_url}/webhooks/whatsapp/{workspace_id}/{connector_id}``, one
POST per message holding all its statuses, signed ``X-Hub-Signature-256`` with the app secret.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from sandbox.providers.model import (
    WHATSAPP,
    OutboxMessage,
    ProviderAccount,
    ReceiptPost,
    SendContext,
    SendResult,
    random_hex,
    random_token,
)
from sandbox.signing import whatsapp_signature

PATH = r"/{version:v\d+\.\d+}/{phone_number_id}/messages"
MAX_TEXT_CHARS = 4096
MAX_CALLBACK_DATA_CHARS = 512
_DIGITS = re.compile(r"^\d{6,15}$")
_PARAM_TEXT_FORBIDDEN = re.compile(r"[\n\t]| {5}")
MSG_PARAM_TEXT = "Param text cannot have new-line/tab characters or more than 4 consecutive spaces"
_UNDELIVERABLE = {
    "code": 131026,
    "title": "Message undeliverable",
    "message": "Message undeliverable",
    "error_data": {"details": "Message Undeliverable."},
    "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
}


def new_wamid(wa_id: str) -> str:
    """A message ID shaped like Meta's, recipient digits included."""
    digits = wa_id.encode()
    record = b"\x1c\x18" + bytes([len(digits)]) + digits + b"\x15\x02\x00\x11\x18\x12"
    return "wamid." + base64.b64encode(record + random_hex(18, upper=True).encode() + b"\x00").decode()


def error_response(
    status: int,
    code: int,
    message: str,
    *,
    details: str | None = None,
    subcode: int | None = None,
    is_transient: bool | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code}
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    if subcode is not None:
        error["error_subcode"] = subcode
    if is_transient is not None:
        error["is_transient"] = is_transient
    error["fbtrace_id"] = random_token(23)
    return web.json_response({"error": error}, status=status, headers=headers)


def unauthorized() -> web.Response:
    return error_response(401, 190, "Invalid OAuth access token.")


def fault_response(status: int) -> web.Response:
    if status == 500:
        return error_response(500, 1, "An unknown error has occurred.", is_transient=True)
    if status == 503:
        return error_response(503, 2, "Service temporarily unavailable", is_transient=True)
    return error_response(status, 131000, "(#131000) Something went wrong", details="Something went wrong.")


def rate_limited(retry_after: int, now: float) -> web.Response:
    return error_response(
        429,
        130429,
        "(#130429) Rate limit hit",
        details="Cloud API message throughput has been reached.",
        headers={"Retry-After": str(retry_after)},
    )


# Meta's titles for its template errors, which lead its `message`.
TEMPLATE_ERROR_TITLES = {
    132000: "Number of parameters does not match the expected number of params",
    132001: "Template does not exist",
    132012: "Parameter format does not match format in the created template",
    132015: "Template is Paused",
    132016: "Template is Disabled",
}


def template_refused(code: int, template: dict[str, Any]) -> web.Response:
    title = TEMPLATE_ERROR_TITLES.get(code, "Template error")
    params = _param_texts(template.get("components") or [])
    details = f"body: param {params[0]!r} does not match" if params and code in (132000, 132012) else title
    return error_response(400, code, f"(#{code}) {title}", details=details)


def _invalid(message: str, details: str | None = None) -> web.Response:
    return error_response(400, 100, message, details=details)


def _access_token(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query.get("access_token", "")  # Graph accepts it as a parameter too


def _param_texts(components: list[Any]) -> list[str]:
    """The ``text`` of every text parameter of a template's components."""
    return [
        parameter["text"]
        for component in components
        if isinstance(component, dict) and isinstance(component.get("parameters"), list)
        for parameter in component["parameters"]
        if isinstance(parameter, dict) and parameter.get("type") == "text" and isinstance(parameter.get("text"), str)
    ]


def _validate(body: Any) -> web.Response | None:
    """Graph's (#100) answer for the first problem in a message body, or None when it is acceptable."""
    if not isinstance(body, dict) or "messaging_product" not in body:
        return _invalid("(#100) The parameter messaging_product is required.")
    if body["messaging_product"] != "whatsapp":
        return _invalid("(#100) Invalid parameter", 'messaging_product must be "whatsapp"')
    to = body.get("to")
    if not isinstance(to, str) or not to:
        return _invalid("(#100) The parameter to is required.")
    if not _DIGITS.match(to.removeprefix("+")):
        return _invalid("(#100) Invalid parameter", "Invalid value for parameter to: a phone number in digits")
    kind = body.get("type", "text")
    if kind == "text":
        text = body.get("text")
        text_body = text.get("body") if isinstance(text, dict) else None
        if not isinstance(text_body, str) or not text_body:
            return _invalid("(#100) The parameter text['body'] is required.")
        if len(text_body) > MAX_TEXT_CHARS:
            return _invalid(f"(#100) Param text['body'] must be at most {MAX_TEXT_CHARS} characters long.")
    elif kind == "template":
        template = body.get("template")
        template = template if isinstance(template, dict) else {}
        if not isinstance(template.get("name"), str) or not template["name"]:
            return _invalid("(#100) The parameter template['name'] is required.")
        language = template.get("language")
        code = language.get("code") if isinstance(language, dict) else None
        if not isinstance(code, str) or not code:
            return _invalid("(#100) The parameter template['language']['code'] is required.")
        if "components" in template and not isinstance(template["components"], list):
            return _invalid("(#100) Invalid parameter", "template['components'] must be an array")
        if any(_PARAM_TEXT_FORBIDDEN.search(text) for text in _param_texts(template.get("components") or [])):
            return _invalid("(#100) Invalid parameter", MSG_PARAM_TEXT)
    else:
        return _invalid(
            "(#100) Invalid parameter", f"Unsupported message type {kind!r}: the sandbox takes text, template"
        )
    callback_data = body.get("biz_opaque_callback_data")
    if callback_data is not None and (
        not isinstance(callback_data, str) or len(callback_data) > MAX_CALLBACK_DATA_CHARS
    ):
        return _invalid(
            f"(#100) Param biz_opaque_callback_data must be a string of at most {MAX_CALLBACK_DATA_CHARS} characters."
        )
    return None


async def send(request: web.Request, ctx: SendContext) -> SendResult:
    token = _access_token(request)
    owned = [a for a in ctx.accounts.values() if token and a.access_token == token]
    if not owned:
        return SendResult(unauthorized())
    phone_number_id = request.match_info["phone_number_id"]
    account = next((a for a in owned if a.credential == phone_number_id), None)
    if account is None:
        message = (
            f"Unsupported post request. Object with ID '{phone_number_id}' does not exist, cannot be loaded due to "
            "missing permissions, or does not support this operation. Please read the Graph API documentation at "
            "https://developers.facebook.com/docs/graph-api"
        )
        return SendResult(error_response(400, 100, message, subcode=33))

    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return SendResult(_invalid("(#100) Invalid parameter", "The request body is not valid JSON"), account=account)
    refusal = _validate(body)
    if refusal is None and body.get("type") == "template":
        template_error = ctx.faults.template_errors.get(body["template"]["name"])
        if template_error is not None:
            refusal = template_refused(template_error, body["template"])
    if refusal is None and ctx.faults.rejects(body["to"]):
        refusal = error_response(400, 131026, "(#131026) Message Undeliverable.", details="Message Undeliverable.")
    if refusal is None and ctx.faults.has_opted_out(body["to"]):
        refusal = error_response(
            400,
            131050,
            "(#131050) Unable to deliver message.",
            details="This recipient has chosen to stop receiving marketing messages on WhatsApp from your business.",
        )
    if refusal is not None:
        return SendResult(refusal, account=account)

    to = body["to"]
    wamid = new_wamid(to.removeprefix("+"))
    kind = body.get("type", "text")
    sent: dict[str, Any] = {"id": wamid}
    if kind == "template":
        sent["message_status"] = "accepted"
    reply = {
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": to.removeprefix("+")}],
        "messages": [sent],
    }
    message = OutboxMessage(
        provider=WHATSAPP,
        provider_message_id=wamid,
        to=to,
        sender=phone_number_id,
        text=body["text"]["body"] if kind == "text" else "",
        template=body["template"] if kind == "template" else None,
        biz_opaque_callback_data=body.get("biz_opaque_callback_data") or "",
        workspace_id=account.workspace_id,
        connector_id=account.connector_id,
        receipt_message_id=wamid,
        received_at=ctx.now,
    )
    return SendResult(web.json_response(reply), [message], account)


def _status(message: OutboxMessage, status: str, timestamp: int, conversation_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": message.provider_message_id,
        "status": status,
        "timestamp": str(timestamp),
        "recipient_id": message.to.removeprefix("+"),
    }
    if status in ("sent", "delivered"):
        category = "marketing" if message.template is not None else "service"
        entry["conversation"] = {"id": conversation_id, "origin": {"type": category}}
        entry["pricing"] = {"billable": True, "pricing_model": "CBP", "category": category}
    if message.biz_opaque_callback_data:
        entry["biz_opaque_callback_data"] = message.biz_opaque_callback_data
    if status == "failed":
        entry["errors"] = [_UNDELIVERABLE]
    return entry


def receipt_posts(
    account: ProviderAccount,
    deliveries: Sequence[tuple[OutboxMessage, Sequence[str]]],
    *,
    receipts_url: str,
    now: float,
) -> list[list[ReceiptPost]]:
    """One signed webhook per message, its statuses together (receivers must not rely on their order)."""
    workspace, connector = (urllib.parse.quote(v, safe="") for v in (account.workspace_id, account.connector_id))
    url = f"{receipts_url.rstrip('/')}/webhooks/whatsapp/{workspace}/{connector}"
    secret = account.secret_text

    def sign(body: bytes) -> dict[str, str]:
        return {"X-Hub-Signature-256": whatsapp_signature(secret, body)}

    sequences = []
    for message, statuses in deliveries:
        if not statuses:
            continue
        conversation_id = random_hex(32)
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": account.display_phone_number, "phone_number_id": account.credential},
            "statuses": [_status(message, s, int(now) + i, conversation_id) for i, s in enumerate(statuses)],
        }
        payload = {
            "object": "whatsapp_business_account",
            "entry": [{"id": account.business_account_id, "changes": [{"field": "messages", "value": value}]}],
        }
        sequences.append([ReceiptPost(url, json.dumps(payload).encode(), sign, "application/json", len(statuses))])
    return sequences
