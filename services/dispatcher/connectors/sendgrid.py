"""SendGrid v3 Mail Send connector (`POST /v3/mail/send`).

Content is per request in SendGrid, not per personalization, so messages are
grouped by their rendered subject, text and HTML: a campaign without
per-recipient personalisation goes out 1,000 recipients a request; messages
whose content differs get requests of their own. Every personalization carries
our IDs in `custom_args`, which SendGrid echoes as top-level keys of its events.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import aiohttp

from libs.json_documents import dump
from services.dispatcher.connectors.base import OutboundMessage, SendOutcome, SendStatus
from services.dispatcher.connectors.email_headers import extra_headers
from services.dispatcher.connectors.http_retry import HttpRequest, HttpSender, RetryPolicy, Sleep
from services.dispatcher.connectors.provider_ids import safe_provider_id

DEFAULT_BASE_URL = "https://api.sendgrid.com"
MAX_PERSONALIZATIONS = 1000
CONCURRENT_REQUESTS = 8


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


def content_groups(messages: list[OutboundMessage]) -> Iterator[list[int]]:
    """Indexes of messages that can share one request: same subject, text and HTML, at most 1,000."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for index, message in enumerate(messages):
        groups.setdefault((message.subject, message.text_body, message.html_body), []).append(index)
    for indexes in groups.values():
        for start in range(0, len(indexes), MAX_PERSONALIZATIONS):
            yield indexes[start : start + MAX_PERSONALIZATIONS]


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
    ) -> None:
        self._api_key = api_key
        self._sender = sender
        self._url = (base_url or DEFAULT_BASE_URL).rstrip("/") + "/v3/mail/send"
        self._http = HttpSender(http, self.provider, retry, sleep=sleep, rng=rng)
        self._in_flight = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        outcomes: list[SendOutcome | None] = [None] * len(messages)

        async def send_group(indexes: list[int]) -> None:
            group = [messages[i] for i in indexes]
            async with self._in_flight:
                results = await self._send_group(group)
            for index, outcome in zip(indexes, results, strict=True):
                outcomes[index] = outcome

        await asyncio.gather(*(send_group(indexes) for indexes in content_groups(messages)))
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(messages), "every message belongs to exactly one group"
        return done

    async def close(self) -> None:
        """Nothing to release: the HTTP session is shared."""

    async def _send_group(self, group: list[OutboundMessage]) -> list[SendOutcome]:
        first = group[0]
        content = [
            {"type": kind, "value": value}
            # SendGrid requires text/plain before text/html; an empty value breaks its schema.
            for kind, value in (("text/plain", first.text_body), ("text/html", first.html_body))
            if value
        ]
        if not content:
            return [
                SendOutcome(m.message_id, SendStatus.FAILED, error_code="INVALID_MESSAGE", error_message="no body")
                for m in group
            ]
        payload: dict[str, object] = {
            "personalizations": [self._personalization(m) for m in group],
            "from": {"email": self._sender},
            "content": content,
        }
        if first.subject:
            payload["subject"] = first.subject
        request = HttpRequest(
            "POST",
            self._url,
            {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"},
            dump(payload),
        )
        exchange = await self._http.exchange(request)
        provider_id = ""
        if exchange.sent and exchange.reply is not None and len(group) == 1:
            # X-Message-Id names the whole request; only a one-recipient request can claim it.
            provider_id = safe_provider_id(exchange.reply.headers.get("X-Message-Id", ""), first.to)
        return [exchange.outcome(m.message_id, provider_id) for m in group]

    @staticmethod
    def _personalization(message: OutboundMessage) -> dict[str, object]:
        personalization: dict[str, object] = {"to": [{"email": message.to}], "custom_args": custom_args(message)}
        headers = extra_headers(message.headers)
        if headers:
            personalization["headers"] = headers
        return personalization
