"""A custom HTTP SMS gateway shaped like Vonage's SMS API (`POST /sms/json`, `specs/vonage_sms.yml`).

Parameters come as a form, as JSON (Vonage takes both) or in the query string. Like Vonage, every
answer to a send is HTTP 200 and the outcome is the per-message ``status`` ("0" = accepted, else
``error-text``); only injected faults change the HTTP status (429 with status "1" Throttled, or the
fault's status with "5" Internal Error), since a generic custom connector can only judge HTTP.
One part per message (no concatenation into several message IDs). ``client-ref`` may hold up to
100 characters as the live API allows; the spec still says 40. No delivery receipts: custom
connectors have none, so ``callback`` is only recorded.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from sandbox.providers.model import CUSTOM, OutboxMessage, SendContext, SendResult, random_hex

PATH = "/sms/json"
MAX_CLIENT_REF_CHARS = 100
_TO = re.compile(r"^\d{7,15}$")


def status_response(
    status: str, error_text: str, http_status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"message-count": "1", "messages": [{"status": status, "error-text": error_text}]}
    return web.json_response(body, status=http_status, headers=headers)


def fault_response(status: int) -> web.Response:
    if status in (401, 403):
        return status_response("4", "Bad Credentials", status)
    return status_response("5", "Internal Error", status)


def rate_limited(retry_after: int, now: float) -> web.Response:
    return status_response("1", "Throttled", 429, {"Retry-After": str(retry_after)})


async def _params(request: web.Request) -> dict[str, str]:
    params = dict(request.query)
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict):
            params.update({k: str(v) for k, v in body.items() if isinstance(v, str | int | float)})
    else:
        form = await request.post()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


async def send(request: web.Request, ctx: SendContext) -> SendResult:
    params = await _params(request)
    for name in ("api_key", "api_secret"):
        if not params.get(name):
            return SendResult(status_response("2", f"Missing {name}"))
    account = ctx.accounts.get(params["api_key"])
    if account is None or account.secret != params["api_secret"]:
        return SendResult(status_response("4", "Bad Credentials"))

    def refuse(status: str, error_text: str) -> SendResult:
        return SendResult(status_response(status, error_text), account=account)

    for name in ("from", "to", "text"):
        if not params.get(name, "").strip():
            return refuse("2", f"Missing {name} param")
    to = params["to"].strip().removeprefix("+")
    if not _TO.match(to) or ctx.faults.rejects(to):
        return refuse("3", "Invalid to param")
    client_ref = params.get("client-ref", "")
    if len(client_ref) > MAX_CLIENT_REF_CHARS:
        return refuse("3", "Invalid client-ref param")

    message_id = random_hex(16, upper=True)
    sent: dict[str, Any] = {
        "to": to,
        "message-id": message_id,
        "status": "0",
        "remaining-balance": "10.0",
        "message-price": "0.03",
        "network": "23410",
    }
    if client_ref:
        sent["client-ref"] = client_ref
    message = OutboxMessage(
        provider=CUSTOM,
        provider_message_id=message_id,
        to=params["to"].strip(),
        sender=params["from"],
        text=params["text"],
        client_ref=client_ref,
        callback=params.get("callback", ""),
        workspace_id=account.workspace_id,
        connector_id=account.connector_id,
        receipt_message_id=message_id,
        received_at=ctx.now,
    )
    return SendResult(web.json_response({"message-count": "1", "messages": [sent]}), [message], account)
