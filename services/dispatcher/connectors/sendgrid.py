"""SendGrid v3 Mail Send connector (`POST /v3/mail/send`).

Content is per request in SendGrid, not per personalization, so messages are
grouped by their rendered subject, text and HTML: a campaign without
per-recipient personalisation goes out 1,000 recipients a request. Messages whose
content differs but comes from one `SubstitutionPattern` (`Dear {{ first_name }}`)
share requests too: the pattern is the content and each personalization carries
its values as `substitutions`, which SendGrid puts in place of the tags. Other
messages whose content differs get requests of their own. Every personalization
carries our IDs in `custom_args`, which SendGrid echoes as top-level keys of its
events. A request that would be over SendGrid's size limit goes as several under
it, and one SendGrid still answers 413 goes again with one recipient, then in halves.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from libs.json_documents import dump
from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus, not_attempted
from services.dispatcher.connectors.email_headers import ascii_domain, extra_headers
from services.dispatcher.connectors.http_retry import (
    HttpReply,
    HttpRequest,
    HttpSender,
    Refusal,
    RetryPolicy,
    Sleep,
    gateway_timeout,
    retry_after_header,
)
from services.dispatcher.connectors.provider_ids import safe_provider_id

if TYPE_CHECKING:
    from services.dispatcher.rendering import SubstitutionPattern

DEFAULT_BASE_URL = "https://api.sendgrid.com"
API_VERSION = "/v3"
MAX_PERSONALIZATIONS = 1000
MAX_SUBSTITUTION_BYTES = 10_000  # per personalization, tags and values (the official spec's limit)
CONCURRENT_REQUESTS = 8
# SendGrid's Mail Send limitations: "The total size of your email, including attachments, must be less
# than 30MB" (docs.sendgrid.com/api-reference/mail-send/limitations); a request over it gets the official
# spec's 413 (PostMailSend413, "content too large"), for all of its up to 1,000 personalizations. Taken
# as the request body's bytes, in decimal megabytes (the smaller reading): a body takes less than this.
MAX_REQUEST_BYTES = 30_000_000
# Requests are split to stay under 90% of it: SendGrid does not say how it counts (its own escaping,
# the headers it adds), and a request that only just fits would cost a 413 and a split.
SPLIT_SHARE = 0.9
# A request SendGrid still answers 413 goes again with one recipient, then the rest in halves, and they
# so on: 1,000 personalizations come down to one in 10 splits. A 413 with one recipient says the shared
# content is what is too large, and the rest fail without a request.
MAX_SPLITS = 10


def mail_send_url(base_url: str) -> str:
    """Mail Send under `base_url`: the API's host, or a proxy's path prefix, to which the API version is
    added; a base_url that already ends in it (as SendGrid's docs write the API's URL) keeps it."""
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return (base if urlsplit(base).path.endswith(API_VERSION) else base + API_VERSION) + "/mail/send"


def custom_args(message: OutboundMessage) -> dict[str, str]:
    """Our IDs, echoed back in events; opaque strings only (SendGrid does not treat them as PII)."""
    args = {}
    if message.message_id:
        args["tokensend_message_id"] = message.message_id
    if message.campaign_id:
        args["tokensend_campaign"] = message.campaign_id
    if message.campaign_instance_id:
        args["tokensend_instance"] = message.campaign_instance_id
    return args


def rate_limit_wait(reply: HttpReply, clock: Callable[[], float] = time.time) -> float | None:
    """Seconds until SendGrid takes requests again: Retry-After, else on a 429 its X-RateLimit-Reset
    (the Unix time the limit resets, sent on every reply); None when neither says (backoff then)."""
    waited = retry_after_header(reply)
    # A Retry-After of no wait (0, a date already past) says nothing: the reset time may.
    if waited or reply.status != 429:
        return waited
    reset = reply.headers.get("X-RateLimit-Reset", "").strip()
    if not reset.isdigit() or len(reset) > 12:
        return None
    wait = int(reset) - clock()
    return wait if wait > 0 else None


# What SendGrid's 401 says when the plan's credits are used up, rather than the key refused.
CREDITS_USED_UP = "maximum credits exceeded"


def _credits_used_up(reply: HttpReply) -> bool:
    document = reply.json()
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return False
    # Its errors are objects with a `message`, or (older replies) bare strings.
    texts = (e.get("message") if isinstance(e, dict) else e for e in errors)
    return any(isinstance(text, str) and CREDITS_USED_UP in text.lower() for text in texts)


def _refuses_sender(reply: HttpReply) -> bool:
    """A 403 about the from address ({"errors": [{"field": "from", "message": "The from address does not
    match a verified Sender Identity..."}]}) rather than the key's permissions."""
    document = reply.json()
    errors = document.get("errors") if isinstance(document, dict) else None
    return isinstance(errors, list) and any(isinstance(e, dict) and e.get("field") == "from" for e in errors)


def refusal(reply: HttpReply) -> Refusal | None:
    """401 (a wrong or revoked API key, or the plan's credits used up) and 403 (a key without the Mail
    Send permission, a sender not verified) refuse the whole account's sending, not a recipient."""
    if reply.status == 401 and _credits_used_up(reply):
        return Refusal(
            "QUOTA_EXCEEDED",
            "sendgrid's credits are used up (HTTP 401, Maximum credits exceeded); "
            "not retried: re-run the instance once the plan's credits renew, or raise the plan",
        )
    if reply.status == 401:
        return Refusal(
            "PROVIDER_AUTH_FAILED",
            "sendgrid refused the API key (HTTP 401); not retried: check the connector's API key",
        )
    if reply.status == 403 and _refuses_sender(reply):
        return Refusal(
            "SENDER_REFUSED",
            "sendgrid refused the connector's sender: its from address is not a verified sender identity "
            "(HTTP 403); not retried: verify it in SendGrid or fix the connector's sender, then re-run the instance",
        )
    if reply.status == 403:
        return Refusal(
            "PROVIDER_AUTH_FAILED",
            "sendgrid refused the API key's permissions or the sender (HTTP 403); not retried: the key needs "
            "the Mail Send permission, and the connector's from address a verified sender identity",
        )
    return None


def refuses_account(reply: HttpReply) -> bool:
    """Each of `refusal`'s: the other requests of the batch would meet it too."""
    return reply.status in (401, 403)


# After a refused personalization's index, the name of its field that SendGrid names (`to`, `headers`,
# `substitutions`, `custom_args` ...); only such a name is repeated, anything else reads as the address.
_PERSONALIZATION_FIELD = re.compile(r"^personalizations\.(\d+)\.(?:([a-z_]{1,32})(?=\.|\Z))?")
ADDRESS_FIELDS = frozenset({"", "to", "cc", "bcc"})


def refused_personalizations(reply: HttpReply | None) -> dict[int, str] | None:
    """The personalizations a 400 names, each with the field it names (`personalizations.3.to.0.email`:
    3, "to"), when every error it gives names one; None when any error is about the request as a whole.
    A personalization named for its address and for another field is refused for its address."""
    if reply is None or reply.status != 400:
        return None
    document = reply.json()
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list) or not errors:
        return None
    fields: dict[int, str] = {}
    for error in errors:
        field = error.get("field") if isinstance(error, dict) else None
        match = _PERSONALIZATION_FIELD.match(field) if isinstance(field, str) else None
        if match is None:
            return None
        index, name = int(match.group(1)), match.group(2) or ""
        if index not in fields or name in ADDRESS_FIELDS:
            fields[index] = name
    return fields


def _refused(message: OutboundMessage, field: str, attempts: int, *, others_resent: bool) -> SendOutcome:
    """A message whose personalization SendGrid refused for `field`: its address, or another field."""
    if field in ADDRESS_FIELDS:
        code, what = "INVALID_ADDRESS", "sendgrid refused this recipient's address"
    else:
        code, what = "INVALID_MESSAGE", f"sendgrid refused this message's personalizations[].{field}"
    text = f"{what} (HTTP 400)"
    if others_resent:
        text += "; the request's other recipients were sent again without it"
    return SendOutcome(message.message_id, SendStatus.FAILED, error_code=code, error_message=text, attempts=attempts)


def _too_large(message: OutboundMessage, size: int, limit: int) -> SendOutcome:
    """A message whose request would be over SendGrid's size limit even with no other recipient."""
    text = f"this message's sendgrid request would take {size} bytes, and sendgrid takes less than {limit}; not sent"
    return SendOutcome(
        message.message_id, SendStatus.FAILED, error_code="INVALID_MESSAGE", error_message=text, attempts=0
    )


_AS_TOO_LARGE = "as too large (HTTP 413)"


def _refused_as_too_large(message: OutboundMessage, size: int, attempts: int) -> SendOutcome:
    """A message SendGrid answered 413 for in a request of its own: smaller requests cannot help it."""
    text = f"sendgrid refused this message's request of {size} bytes {_AS_TOO_LARGE}"
    return SendOutcome(
        message.message_id, SendStatus.FAILED, error_code="INVALID_MESSAGE", error_message=text, attempts=attempts
    )


def _content_too_large(message: OutboundMessage) -> SendOutcome:
    """A message left unsent because its request's shared content went alone, with one recipient, and was
    still answered 413: no smaller request can carry it."""
    text = f"not attempted: sendgrid refused this message's content with one recipient {_AS_TOO_LARGE}"
    return SendOutcome(
        message.message_id, SendStatus.FAILED, error_code="INVALID_MESSAGE", error_message=text, attempts=0
    )


def why_unsendable(message: OutboundMessage) -> tuple[str, str] | None:
    """(error code, message) when SendGrid would refuse `message` whatever else its request holds, said
    without a request: one such message would fail the whole request of up to 1,000. Names no value."""
    if not ascii_domain(message.to).isascii():
        # Its schema's `email` format is ASCII only (no SMTPUTF8): a domain goes in Punycode, a local part cannot.
        return "INVALID_ADDRESS", "sendgrid takes only ASCII before the @ of an address, and this recipient's is not"
    if not message.subject:
        # "The subject is required" (HTTP 400, field `subject`): a subject whose fetched values were all empty.
        return "INVALID_MESSAGE", "the rendered subject is empty, and sendgrid requires one"
    return None


def substitutable(message: OutboundMessage) -> bool:
    """Whether the message can go as its pattern and substitutions, within SendGrid's size limit."""
    pattern, values = message.pattern, message.substitutions
    if pattern is None or values is None:
        return False
    # A part that renders empty is left out of a request of its own; a tag for it would not be.
    if (
        bool(message.subject) != bool(pattern.subject)
        or bool(message.text_body) != bool(pattern.text_body)
        or bool(message.html_body) != bool(pattern.html_body)
    ):
        return False
    chars = sum(len(tag) + len(value) for tag, value in values.items())
    if chars * 4 <= MAX_SUBSTITUTION_BYTES:  # UTF-8 takes at most 4 bytes a character
        return True
    return sum(len(tag.encode()) + len(value.encode()) for tag, value in values.items()) <= MAX_SUBSTITUTION_BYTES


def content_groups(messages: list[OutboundMessage]) -> Iterator[tuple[list[int], SubstitutionPattern | None]]:
    """Indexes of messages that can share one request, at most 1,000, and the pattern to send when
    their contents differ: the same subject, text and HTML, or (when they differ) the same pattern."""
    by_content: dict[tuple[str, str, str], list[int]] = {}
    for index, message in enumerate(messages):
        by_content.setdefault((message.subject, message.text_body, message.html_body), []).append(index)
    by_pattern: dict[int, list[list[int]]] = {}
    groups: list[tuple[list[int], SubstitutionPattern | None]] = []
    for indexes in by_content.values():
        pattern = messages[indexes[0]].pattern
        if pattern is None:
            groups.append((indexes, None))
        else:
            by_pattern.setdefault(id(pattern), []).append(indexes)
    for contents in by_pattern.values():
        if len(contents) == 1:
            # Sent as it is, with nothing to substitute: a campaign the same for all costs no check per message.
            groups.append((contents[0], None))
            continue
        shared = []
        for indexes in contents:  # of several contents, those that cannot substitute go as their own
            if all(substitutable(messages[i]) for i in indexes):
                shared.append(indexes)
            else:
                groups.append((indexes, None))
        if len(shared) == 1:
            groups.append((shared[0], None))
        elif shared:
            groups.append((sorted(i for indexes in shared for i in indexes), messages[shared[0][0]].pattern))
    for indexes, pattern in groups:
        for start in range(0, len(indexes), MAX_PERSONALIZATIONS):
            yield indexes[start : start + MAX_PERSONALIZATIONS], pattern


class SendGridConnector:
    """Sends email through one SendGrid account."""

    provider = "sendgrid"
    max_batch = MAX_PERSONALIZATIONS

    def __init__(
        self,
        *,
        api_key: str,
        sender: str,
        http: aiohttp.ClientSession,
        retry: RetryPolicy,
        base_url: str = "",
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self._api_key = api_key
        self._max_bytes = max_request_bytes
        self._split_bytes = int(max_request_bytes * SPLIT_SHARE)
        self._sender = ascii_domain(sender)  # the schema's `email` format: a domain in Punycode
        self._url = mail_send_url(base_url)
        self._http = HttpSender(
            http,
            self.provider,
            retry,
            sleep=sleep,
            rng=rng,
            retry_after=rate_limit_wait,
            refusal=refusal,
            account_refusal=refuses_account,
            may_have_taken=gateway_timeout,  # a 504 on a request of up to 1,000: resent, each could go twice
        )
        self._in_flight = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        outcomes: list[SendOutcome | None] = [None] * len(messages)
        refused: SendOutcome | None = None  # a refusal of the account met by a request: the rest are not sent

        async def send_group(indexes: list[int], pattern: SubstitutionPattern | None) -> None:
            nonlocal refused
            group = [messages[i] for i in indexes]
            async with self._in_flight:
                if refused is None:
                    results = await self._send_group(group, pattern)
                    if refused is None:  # another request in flight may have met it meanwhile
                        refused = next((o for o in results if o.account_refused), None)
                else:
                    results = [not_attempted(m, refused) for m in group]
            for index, outcome in zip(indexes, results, strict=True):
                outcomes[index] = outcome

        if all(m.subject and m.to.isascii() for m in messages):  # nearly every batch: nothing to set apart
            groups = content_groups(messages)
        else:
            sendable: list[int] = []
            for index, message in enumerate(messages):
                unsendable = why_unsendable(message)
                if unsendable is None:
                    sendable.append(index)
                else:
                    code, text = unsendable
                    outcomes[index] = SendOutcome(
                        message.message_id, SendStatus.FAILED, error_code=code, error_message=text, attempts=0
                    )
            groups = [
                ([sendable[i] for i in indexes], pattern)
                for indexes, pattern in content_groups([messages[i] for i in sendable])
            ]
        await asyncio.gather(*(send_group(indexes, pattern) for indexes, pattern in groups))
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(messages), "every message belongs to exactly one group"
        return done

    async def close(self) -> None:
        """Nothing to release: the HTTP session is shared."""

    async def _send_group(
        self,
        group: list[OutboundMessage],
        pattern: SubstitutionPattern | None,
        resend: bool = True,
        splits: int | None = None,  # halvings left after a 413 (MAX_SPLITS when None)
    ) -> list[SendOutcome]:
        first = group[0]
        subject, text, html = (
            (pattern.subject, pattern.text_body, pattern.html_body)
            if pattern is not None
            else (first.subject, first.text_body, first.html_body)
        )
        content = [
            {"type": kind, "value": value}
            # SendGrid requires text/plain before text/html; an empty value breaks its schema.
            for kind, value in (("text/plain", text), ("text/html", html))
            if value
        ]
        if not content:
            return [
                SendOutcome(m.message_id, SendStatus.FAILED, error_code="INVALID_MESSAGE", error_message="no body")
                for m in group
            ]
        personalizations = [self._personalization(m) for m in group]
        if pattern is not None:
            for personalization, message in zip(personalizations, group, strict=True):
                if message.substitutions:
                    personalization["substitutions"] = message.substitutions
        payload: dict[str, object] = {
            "personalizations": personalizations,
            "from": {"email": self._sender},
            "content": content,
        }
        if subject:
            payload["subject"] = subject
        body = dump(payload)
        if len(body) > self._split_bytes:  # measured on the body already made: the usual request costs no more
            if len(group) > 1:
                return await self._send_in_parts(group, pattern, personalizations, len(body), resend, splits)
            if len(body) >= self._max_bytes:
                return [_too_large(first, len(body), self._max_bytes)]
        request = HttpRequest(
            "POST",
            self._url,
            {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"},
            body,
        )
        exchange = await self._http.exchange(request)
        if exchange.status is SendStatus.FAILED and exchange.reply is not None and exchange.reply.status == 413:
            # SendGrid took none of it for its size, whatever we measured.
            if len(group) == 1:
                return [_refused_as_too_large(first, len(body), exchange.attempts)]
            splits = MAX_SPLITS if splits is None else splits
            if splits > 0:
                # One recipient first: when the shared content is what is too large (a proxy's smaller limit,
                # a huge HTML), halving down to one each would make 2n-1 refused requests of it.
                [alone] = await self._send_group([first], pattern, resend, 0)
                if alone.status is SendStatus.FAILED and alone.error_message.endswith(_AS_TOO_LARGE):
                    return [alone] + [_content_too_large(m) for m in group[1:]]
                half = len(group) // 2 + 1
                parts = [list(range(1, half)), list(range(half, len(group)))]
                outcomes: list[SendOutcome | None] = [alone] + [None] * (len(group) - 1)
                met = alone if alone.account_refused else None
                return await self._send_parts(
                    group, pattern, [p for p in parts if p], outcomes, resend, splits - 1, met
                )
        refused = refused_personalizations(exchange.reply) if exchange.status is SendStatus.FAILED else None
        if refused and len(refused) == len(group) and max(refused) < len(group):
            # Every recipient of the request named (one sent alone, say): each refused as it would be beside others.
            return [_refused(m, refused[i], exchange.attempts, others_resent=False) for i, m in enumerate(group)]
        if refused and resend and len(refused) < len(group):
            # SendGrid took nothing of a 400 and named the recipients it refused: they fail, the
            # others go again without them, once.
            kept = [m for i, m in enumerate(group) if i not in refused]
            outcomes = iter(await self._send_group(kept, pattern, resend=False))
            return [
                _refused(m, refused[i], exchange.attempts, others_resent=True) if i in refused else next(outcomes)
                for i, m in enumerate(group)
            ]
        provider_id = ""
        if exchange.sent and exchange.reply is not None and len(group) == 1:
            # X-Message-Id names the whole request; only a one-recipient request can claim it.
            provider_id = safe_provider_id(exchange.reply.headers.get("X-Message-Id", ""), first.to)
        return [exchange.outcome(m.message_id, provider_id) for m in group]

    async def _send_in_parts(
        self,
        group: list[OutboundMessage],
        pattern: SubstitutionPattern | None,
        personalizations: list[dict[str, object]],
        size: int,
        resend: bool,
        splits: int | None,
    ) -> list[SendOutcome]:
        """A request over the split size as several under it, its personalizations kept in order; one that
        would be over SendGrid's limit even alone (its content, say) fails without a request."""
        sizes = [len(dump(p)) for p in personalizations]
        shared = size - sum(sizes) - (len(sizes) - 1)  # all but the personalizations and the commas between
        outcomes: list[SendOutcome | None] = [None] * len(group)
        parts: list[list[int]] = []
        part: list[int] = []
        part_size = shared
        for index, personalization_size in enumerate(sizes):
            alone = shared + personalization_size
            if alone >= self._max_bytes:
                outcomes[index] = _too_large(group[index], alone, self._max_bytes)
                continue
            if part and part_size + 1 + personalization_size > self._split_bytes:
                parts.append(part)
                part, part_size = [], shared
            part_size += personalization_size + (1 if part else 0)
            part.append(index)
        if part:
            parts.append(part)
        return await self._send_parts(group, pattern, parts, outcomes, resend, splits)

    async def _send_parts(
        self,
        group: list[OutboundMessage],
        pattern: SubstitutionPattern | None,
        parts: list[list[int]],
        outcomes: list[SendOutcome | None],
        resend: bool,
        splits: int | None,
        refused: SendOutcome | None = None,
    ) -> list[SendOutcome]:
        """Each part of `group` (indexes) as a request of its own, one after another within the group's turn
        at the connector's concurrency; once one meets a refusal of the account (`refused`, already met) the
        rest are not sent."""
        for part in parts:
            messages = [group[i] for i in part]
            if refused is None:
                results = await self._send_group(messages, pattern, resend, splits)
                refused = next((o for o in results if o.account_refused), None)
            else:
                results = [not_attempted(m, refused) for m in messages]
            for index, outcome in zip(part, results, strict=True):
                outcomes[index] = outcome
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(group), "every message of a split request has an outcome"
        return done

    @staticmethod
    def _personalization(message: OutboundMessage) -> dict[str, object]:
        address = message.to
        to = [{"email": address if address.isascii() else ascii_domain(address)}]  # no SMTPUTF8: domain in Punycode
        personalization: dict[str, object] = {"to": to, "custom_args": custom_args(message)}
        headers = extra_headers(message.headers)
        if headers:
            personalization["headers"] = headers
        return personalization
