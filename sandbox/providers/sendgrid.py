"""SendGrid v3 Mail Send (`POST /v3/mail/send`) and its signed Event Webhook, as the sandbox plays them.

Validation follows the real API rather than only the official spec (`specs/sendgrid_tsg_mail_v3.json`).
Where they differ:

* the spec requires only ``personalizations`` and ``from``; the real API (and this sandbox) also
  needs at least one personalization, at least one ``to`` in each, a subject (top level or in
  every personalization) and ``content``, unless a ``template_id`` is given;
* the spec types top-level ``custom_args`` as a string; the real API takes an object of strings,
  like the per-personalization one, and so does the sandbox;
* the spec has no limit on the total of recipients; the real API allows 1,000 across to, cc and
  bcc of all personalizations, and so does the sandbox;
* the spec declares no ``X-Message-Id`` header on the 202; the real API sends one and so does the
  sandbox (22 url-safe characters);
* a body sent as anything but ``application/json`` gets the real API's 415;
* ``headers`` (top level or per personalization) may not set a reserved header (``Reply-To``,
  ``To``, ``Content-Type``, ``x-sg-id`` ...: the list in the spec's description), as the real
  API refuses them;
* a 429 says when to come back only in ``X-RateLimit-Reset`` (Unix seconds), with no ``Retry-After``;
* the spec declares a 413 ("content too large") but no size; the real API's documented limit is a total
  under 30MB, which the sandbox applies to the request body (`MAX_REQUEST_BYTES`, read at each
  request so a test can lower it) before the key or the body is looked at (the app takes bodies up to
  twice that).

A personalization's ``substitutions`` (strings, at most 10,000 bytes of tags and values, the spec's
limit) are put in place of their tags in the subject and content each recipient is recorded with,
in one pass, so a value is never read for tags.

Errors come back all at once, like SendGrid's: ``{"errors": [{"message", "field", "help"}]}``.
`reject_to` refuses a recipient as an invalid address; real SendGrid would accept and then drop it.
"""

from __future__ import annotations

import functools
import http
import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from sandbox.providers.model import (
    SENDGRID,
    OutboxMessage,
    ProviderAccount,
    ReceiptPost,
    SendContext,
    SendResult,
    looks_like_email,
    random_hex,
    random_token,
)
from sandbox.signing import SendGridSigner

PATH = "/v3/mail/send"
MAX_PERSONALIZATIONS = 1000
MAX_RECIPIENTS = 1000
MAX_CUSTOM_ARGS_BYTES = 10_000
# "The total size of your email, including attachments, must be less than 30MB" (the Mail Send limitations).
MAX_REQUEST_BYTES = 30_000_000
MAX_EVENTS_PER_POST = 1000  # SendGrid batches events; a send's worth goes in one POST up to this

_HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message."
INVALID_GRANT = "The provided authorization grant is invalid, expired, or revoked"
MSG_PERSONALIZATIONS = "The personalizations field is required and must have at least one personalization."
MSG_TOO_MANY_PERSONALIZATIONS = "The personalizations field must have between 1 and 1000 personalization objects."
MSG_TO = (
    "The to array is required for all personalization objects, and must have at least one email object "
    "with a valid email address."
)
MSG_ADDRESS = "Does not contain a valid address."
MSG_DUPLICATE = "Each email address in the personalization block should be unique between to, cc, and bcc."
MSG_RECIPIENTS = (
    "The total number of recipients must be 1000 or less. This includes all recipients defined within the to, "
    "cc, and bcc parameters, across each object that you include in the personalizations array."
)
MSG_FROM = (
    "The from object must be provided for every email send. It is an object that requires the email parameter, "
    'but may also contain a name parameter.  e.g. {"email" : "example@example.com"}  or '
    '{"email" : "example@example.com", "name" : "Example Recipient"}.'
)
MSG_FROM_ADDRESS = "The from email does not contain a valid address."
MSG_SUBJECT = (
    "The subject is required. You can get around this requirement if you use a template with a subject defined "
    "or if every personalization has a subject defined."
)
MSG_CONTENT = (
    "Unless a valid template_id is provided, the content parameter is required. There must be at least one "
    "defined content block. We typically suggest both text/plain and text/html blocks are included, but only "
    "one block is required."
)
MSG_CONTENT_TYPE = "The content type must be a string at least one character in length."
MSG_CONTENT_VALUE = "The content value must be a string at least one character in length."
MSG_CONTENT_ORDER = "If present, text/plain must be first, followed by text/html, followed by any other content."
MSG_CONTENT_ONCE = "If present, text/plain and text/html may only be provided once."
MSG_RESERVED_HEADER = "Header can not be one of the reserved keys. Refer to documentation link."
# The spec's list of headers "you may not override", compared case-insensitively.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "Content-Type",
        "Content-Transfer-Encoding",
        "To",
        "From",
        "Subject",
        "Reply-To",
        "CC",
        "BCC",
    )
)
MSG_CONTENT_TYPE_HEADER = "Content-Type should be application/json."
MSG_CUSTOM_ARGS_SIZE = "The custom_args total size must be less than 10000 bytes."
MSG_SUBSTITUTIONS_SIZE = "The substitutions total size must be 10000 bytes or less."  # the sandbox's wording
MAX_SUBSTITUTIONS_BYTES = 10_000

_FAULT_MESSAGES = {500: "internal server error", 503: "service unavailable", 413: "content too large"}


def _error(message: str, field: str | None = None, help_anchor: str | None = None) -> dict[str, Any]:
    return {"message": message, "field": field, "help": _HELP + help_anchor if help_anchor else None}


def error_response(status: int, errors: list[dict[str, Any]], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"errors": errors}, status=status, headers=headers)


def unauthorized() -> web.Response:
    return error_response(401, [_error(INVALID_GRANT)])


def fault_response(status: int) -> web.Response:
    message = _FAULT_MESSAGES.get(status) or http.HTTPStatus(status).phrase.lower()
    return error_response(status, [_error(message)])


def rate_limited(retry_after: int, now: float) -> web.Response:
    headers = {
        "X-RateLimit-Limit": "600",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(int(now) + retry_after),
    }
    return error_response(429, [{"field": None, "message": "too many requests"}], headers)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "integer" if isinstance(value, int) else "number"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "unknown")


def _strings_errors(value: Any, path: str, anchor: str) -> list[dict[str, Any]]:
    """An object of strings, as `custom_args` and `substitutions` must be: an error per wrong type."""
    if not isinstance(value, dict):
        return [_error(f"Invalid type. Expected: object, given: {_json_type(value)}.", path, anchor)]
    return [
        _error(f"Invalid type. Expected: string, given: {_json_type(item)}.", f"{path}.{key}", anchor)
        for key, item in value.items()
        if not isinstance(item, str)
    ]


def _custom_args_errors(custom_args: Any, path: str) -> list[dict[str, Any]]:
    if custom_args is None:
        return []
    errors = _strings_errors(custom_args, path, "custom_args")
    if isinstance(custom_args, dict) and len(json.dumps(custom_args).encode()) >= MAX_CUSTOM_ARGS_BYTES:
        errors.append(_error(MSG_CUSTOM_ARGS_SIZE, path, "custom_args"))
    return errors


def _substitutions_errors(substitutions: Any, path: str) -> list[dict[str, Any]]:
    if substitutions is None:
        return []
    errors = _strings_errors(substitutions, path, "substitutions")
    if isinstance(substitutions, dict):
        size = sum(len(str(key).encode()) + len(str(value).encode()) for key, value in substitutions.items())
        if size > MAX_SUBSTITUTIONS_BYTES:
            errors.append(_error(MSG_SUBSTITUTIONS_SIZE, path, "substitutions"))
    return errors


@functools.lru_cache(maxsize=256)
def _tags(tags: tuple[str, ...]) -> re.Pattern[str]:
    """One expression for a set of tags, longest first where two start alike."""
    return re.compile("|".join(re.escape(tag) for tag in sorted(tags, key=len, reverse=True)))


def substitute(text: str, substitutions: dict[str, str] | None) -> str:
    """`text` with each tag replaced by its value."""
    if not substitutions or not text:
        return text
    return _tags(tuple(substitutions)).sub(lambda match: substitutions[match.group(0)], text)


def _reserved_header_errors(headers: Any, path: str, anchor: str) -> list[dict[str, Any]]:
    if not isinstance(headers, dict):
        return []
    return [
        _error(MSG_RESERVED_HEADER, f"{path}.{name}", anchor)
        for name in headers
        if str(name).strip().lower() in RESERVED_HEADERS
    ]


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def validate(body: Any) -> list[dict[str, Any]]:
    """Every error SendGrid would report for this Mail Send body; empty when it would be accepted."""
    if not isinstance(body, dict):
        return [_error("Bad Request")]
    errors: list[dict[str, Any]] = []
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        errors.append(_error(MSG_PERSONALIZATIONS, "personalizations", "personalizations"))
        personalizations = []
    elif len(personalizations) > MAX_PERSONALIZATIONS:
        errors.append(_error(MSG_TOO_MANY_PERSONALIZATIONS, "personalizations", "personalizations"))
    recipients = 0
    every_personalization_has_subject = bool(personalizations)
    for i, personalization in enumerate(personalizations):
        if not isinstance(personalization, dict):
            errors.append(_error(MSG_TO, f"personalizations.{i}.to", "personalizations.to"))
            every_personalization_has_subject = False
            continue
        to = personalization.get("to")
        if not isinstance(to, list) or not to:
            errors.append(_error(MSG_TO, f"personalizations.{i}.to", "personalizations.to"))
        seen: set[str] = set()
        duplicate = False
        for kind in ("to", "cc", "bcc"):
            addresses = personalization.get(kind)
            if addresses is None or (kind == "to" and not isinstance(addresses, list)):
                continue
            if not isinstance(addresses, list):
                errors.append(_error(MSG_ADDRESS, f"personalizations.{i}.{kind}", f"personalizations.{kind}"))
                continue
            for j, address in enumerate(addresses):
                email = address.get("email") if isinstance(address, dict) else None
                if not isinstance(email, str) or not looks_like_email(email):
                    field = f"personalizations.{i}.{kind}.{j}.email"
                    errors.append(_error(MSG_ADDRESS, field, f"personalizations.{kind}"))
                    continue
                recipients += 1
                duplicate = duplicate or email.lower() in seen
                seen.add(email.lower())
        if duplicate:
            errors.append(_error(MSG_DUPLICATE, f"personalizations.{i}", "personalizations"))
        if not _nonempty_str(personalization.get("subject")):
            every_personalization_has_subject = False
        errors.extend(_custom_args_errors(personalization.get("custom_args"), f"personalizations.{i}.custom_args"))
        errors.extend(
            _substitutions_errors(personalization.get("substitutions"), f"personalizations.{i}.substitutions")
        )
        errors.extend(
            _reserved_header_errors(
                personalization.get("headers"), f"personalizations.{i}.headers", "personalizations.headers"
            )
        )
    if recipients > MAX_RECIPIENTS:
        errors.append(_error(MSG_RECIPIENTS, "personalizations", "personalizations"))

    sender = body.get("from")
    sender_email = sender.get("email") if isinstance(sender, dict) else None
    if not _nonempty_str(sender_email):
        errors.append(_error(MSG_FROM, "from.email", "from"))
    elif not looks_like_email(sender_email):
        errors.append(_error(MSG_FROM_ADDRESS, "from.email", "from"))

    has_template = _nonempty_str(body.get("template_id"))
    if not has_template and not _nonempty_str(body.get("subject")) and not every_personalization_has_subject:
        errors.append(_error(MSG_SUBJECT, "subject", "subject"))
    content = body.get("content")
    if not (content is None and has_template):
        errors.extend(_content_errors(content))
    errors.extend(_custom_args_errors(body.get("custom_args"), "custom_args"))
    errors.extend(_reserved_header_errors(body.get("headers"), "headers", "headers"))
    return errors


def _content_errors(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, list) or not content:
        return [_error(MSG_CONTENT, "content", "content")]
    errors = []
    types: list[Any] = []
    for i, block in enumerate(content):
        block = block if isinstance(block, dict) else {}
        types.append(block.get("type"))
        if not _nonempty_str(block.get("type")):
            errors.append(_error(MSG_CONTENT_TYPE, f"content.{i}.type", "content.type"))
        if not _nonempty_str(block.get("value")):
            errors.append(_error(MSG_CONTENT_VALUE, f"content.{i}.value", "content.value"))
    if types.count("text/plain") > 1 or types.count("text/html") > 1:
        errors.append(_error(MSG_CONTENT_ONCE, "content", "content"))
    else:
        expected = [t for t in ("text/plain", "text/html") if t in types]
        if types[: len(expected)] != expected:
            errors.append(_error(MSG_CONTENT_ORDER, "content", "content"))
    return errors


def _account(request: web.Request, ctx: SendContext) -> ProviderAccount | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return ctx.accounts.get(key.strip())


def _content_value(content: Any, content_type: str) -> str:
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == content_type:
            return str(block.get("value", ""))
    return ""


async def send(request: web.Request, ctx: SendContext) -> SendResult:
    raw = await request.read()
    if len(raw) >= MAX_REQUEST_BYTES:
        return SendResult(fault_response(413))
    account = _account(request, ctx)
    if account is None:
        return SendResult(unauthorized())
    if request.content_type != "application/json":
        return SendResult(error_response(415, [_error(MSG_CONTENT_TYPE_HEADER)]), account=account)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return SendResult(error_response(400, [_error("Bad Request")]))
    errors = validate(body)
    if not errors:
        errors = [
            _error(MSG_ADDRESS, f"personalizations.{i}.{kind}.{j}.email", f"personalizations.{kind}")
            for i, p in enumerate(body["personalizations"])
            for kind in ("to", "cc", "bcc")
            for j, address in enumerate(p.get(kind) or [])
            if ctx.faults.rejects(address["email"])
        ]
    if errors:
        return SendResult(error_response(400, errors), account=account)

    message_id = random_token(22)
    # sg_message_id suffix: "filterdrecv-<pod>-<n>-<hex time>-<index>.0", as SendGrid's look today.
    pod = f"filterdrecv-{random_hex(10)}-{random_hex(5)}-1-{int(ctx.now):X}"
    template = None
    if _nonempty_str(body.get("template_id")):
        template = {"template_id": body["template_id"]}
    top_args = body.get("custom_args") or {}
    accepted = []
    text = _content_value(body.get("content"), "text/plain")
    html = _content_value(body.get("content"), "text/html")
    for p in body["personalizations"]:
        values = p.get("substitutions")
        subject = substitute(p.get("subject") or body.get("subject") or "", values)
        p_text, p_html = substitute(text, values), substitute(html, values)
        for address in p["to"]:
            p_template = dict(template, dynamic_template_data=p.get("dynamic_template_data")) if template else None
            accepted.append(
                OutboxMessage(
                    provider=SENDGRID,
                    provider_message_id=message_id,
                    to=address["email"],
                    sender=body["from"]["email"],
                    subject=subject,
                    text=p_text,
                    html=p_html,
                    template=p_template,
                    custom_args={**top_args, **(p.get("custom_args") or {})},
                    headers={**(body.get("headers") or {}), **(p.get("headers") or {})},
                    workspace_id=account.workspace_id,
                    connector_id=account.connector_id,
                    receipt_message_id=f"{message_id}.{pod}-{len(accepted)}.0",
                    received_at=ctx.now,
                )
            )
    return SendResult(web.Response(status=202, headers={"X-Message-Id": message_id}), accepted, account)


# -- Event Webhook ----------------------------------------------------------------------------------

_HREF = re.compile(r"""href=["'](https?://[^"']+)["']""", re.IGNORECASE)
_USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"


def _event(message: OutboxMessage, status: str, timestamp: int) -> dict[str, Any]:
    event: dict[str, Any] = {
        "email": message.to,
        "timestamp": timestamp,
        "event": "bounce" if status == "blocked" else status,
        "sg_event_id": random_token(22),
        "sg_message_id": message.receipt_message_id,
        "smtp-id": f"<{message.provider_message_id}@geopod-ismtpd-1>",
    }
    if status == "delivered":
        event.update(response="250 2.0.0 OK", tls=1, ip="167.89.0.1")
    elif status in ("open", "click"):
        event.update(useragent=_USER_AGENT, ip="203.0.113.7", sg_machine_open=False)
        if status == "click":
            link = _HREF.search(message.html)
            event.update(url=link.group(1) if link else "https://example.com/", url_offset={"index": 0, "type": "html"})
    elif status == "bounce":
        # Real bounce reasons quote the address: receivers must scrub free text.
        reason = f"550 5.1.1 <{message.to}>: Recipient address rejected: User unknown"
        event.update(type="bounce", status="5.1.1", reason=reason, bounce_classification="Invalid Address")
    elif status == "blocked":
        reason = "550 5.7.1 Message rejected due to local policy"
        event.update(type="blocked", status="5.7.1", reason=reason, bounce_classification="Content")
    elif status == "dropped":
        event.update(reason="Bounced Address", status="5.0.0")
    elif status == "deferred":
        event.update(response="451 4.7.1 Try again later", attempt="1")
    # custom_args come back as top-level keys; they never replace the event's own fields.
    for key, value in message.custom_args.items():
        event.setdefault(key, value)
    return event


def receipt_posts(
    account: ProviderAccount,
    deliveries: Sequence[tuple[OutboxMessage, Sequence[str]]],
    *,
    receipts_url: str,
    signer: SendGridSigner,
    now: float,
) -> list[list[ReceiptPost]]:
    """One signed JSON array of events per send request (split above 1,000 events)."""
    events = [
        _event(message, status, int(now) + offset)
        for message, statuses in deliveries
        for offset, status in enumerate(statuses)
    ]
    if not events:
        return []
    workspace, connector = (urllib.parse.quote(v, safe="") for v in (account.workspace_id, account.connector_id))
    url = f"{receipts_url.rstrip('/')}/webhooks/sendgrid/{workspace}/{connector}"
    chunks = [events[i : i + MAX_EVENTS_PER_POST] for i in range(0, len(events), MAX_EVENTS_PER_POST)]
    return [
        [
            ReceiptPost(url, json.dumps(chunk).encode(), signer.headers, "application/json", len(chunk))
            for chunk in chunks
        ]
    ]
