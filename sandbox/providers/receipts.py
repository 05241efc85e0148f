"""Delivery receipts: which statuses a message gets, and posting them back like the providers do.

The default `ReceiptScript` is deterministic: it hashes the ID the receipts carry
(`OutboxMessage.receipt_message_id`, SendGrid's ``sg_message_id``, otherwise the provider message
ID) with SHA-256 and reads three independent percentages from the digest:

=========  ===========================================  ===================  ===================
band       SendGrid                                     Twilio               WhatsApp
=========  ===========================================  ===================  ===================
0-79 %     processed, delivered (+ open 40 %,            sent, delivered      sent, delivered
           + click for 15 % of the opened)                                    (+ read 40 %)
80-89 %    processed, bounce                            sent, undelivered    sent, failed
90-94 %    dropped                                      failed               failed
95-99 %    nothing                                      nothing              nothing
=========  ===========================================  ===================  ===================

The custom gateway posts no receipts. Tests pass their own script for exact outcomes.

`ReceiptCourier` posts in background tasks, each after ``delay_seconds``, retrying a failed POST
(connection error or non-2xx) ``attempts`` times in all with exponential backoff, then counting it
in `Stats.receipts_failed`; it never raises into the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from sandbox.providers.model import CUSTOM, SENDGRID, TWILIO, WHATSAPP, OutboxMessage, ReceiptPost, ReceiptScript, Stats

log = logging.getLogger(__name__)

DELIVERED_PERCENT = 80
BOUNCED_PERCENT = 10
FAILED_PERCENT = 5
OPENED_PERCENT = 40  # of delivered; WhatsApp "read" too
CLICKED_PERCENT = 15  # of opened


def _percentages(receipt_id: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(receipt_id.encode()).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "big") % 100 for i in (0, 4, 8))  # type: ignore[return-value]


def default_receipt_script(provider: str, message: OutboxMessage) -> list[str]:
    """The statuses `message` gets, in order; see the module docstring for the table."""
    if provider == CUSTOM:
        return []
    band, engaged, clicked = _percentages(message.receipt_message_id or message.provider_message_id)
    opened = engaged < OPENED_PERCENT
    if band < DELIVERED_PERCENT:
        if provider == SENDGRID:
            events = ["processed", "delivered"]
            if opened:
                events.append("open")
                if clicked < CLICKED_PERCENT:
                    events.append("click")
            return events
        if provider == WHATSAPP:
            return ["sent", "delivered", "read"] if opened else ["sent", "delivered"]
        return ["sent", "delivered"]
    if band < DELIVERED_PERCENT + BOUNCED_PERCENT:
        return {SENDGRID: ["processed", "bounce"], TWILIO: ["sent", "undelivered"]}.get(provider, ["sent", "failed"])
    if band < DELIVERED_PERCENT + BOUNCED_PERCENT + FAILED_PERCENT:
        return ["dropped"] if provider == SENDGRID else ["failed"]
    return []


@dataclass
class ReceiptSettings:
    """Where and how receipts are posted; change the fields at any time, they are read per receipt.

    ``url`` is the receipts service's base URL (``http://127.0.0.1:8080``), used by SendGrid and
    WhatsApp; Twilio posts to each message's own ``StatusCallback``. ``enabled=False`` stops all.
    """

    url: str | None = None
    script: ReceiptScript = default_receipt_script
    delay_seconds: float = 0.05
    attempts: int = 4
    retry_base_seconds: float = 0.1
    timeout_seconds: float = 10.0
    enabled: bool = True


class ReceiptCourier:
    """Posts receipts in tracked background tasks: `drain` waits for them, `close` cancels the rest."""

    def __init__(self, settings: ReceiptSettings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def dispatch(self, provider: str, sequences: Sequence[Sequence[ReceiptPost]]) -> None:
        """Start one task per sequence; the posts of one sequence go in order (Twilio: one per status)."""
        loop = asyncio.get_running_loop()
        for posts in sequences:
            if not posts:
                continue
            task = loop.create_task(self._deliver(provider, list(posts)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        # Loop, because a receipt may be scheduled while others are being awaited.
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = self.settings.timeout_seconds
            # No total timeout: under a benchmark's backlog, waiting for a pooled connection is not a failure.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
            )
        return self._session

    async def _deliver(self, provider: str, posts: list[ReceiptPost]) -> None:
        for post in posts:
            if self.settings.delay_seconds > 0:
                await asyncio.sleep(self.settings.delay_seconds)
            try:
                await self._post(provider, post)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a receipt must never take the sandbox down
                log.warning("%s receipt could not be built or sent: %s", provider, type(exc).__name__)
                self.stats.receipts_failed[provider] += 1

    async def _post(self, provider: str, post: ReceiptPost) -> None:
        attempts = max(1, self.settings.attempts)
        for attempt in range(1, attempts + 1):
            headers = {"Content-Type": post.content_type, **post.sign(post.body)}
            try:
                async with self._client().post(post.url, data=post.body, headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        self.stats.receipts_posted[provider] += 1
                        self.stats.receipt_events[provider] += post.events
                        return
                    outcome = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            if attempt < attempts:
                self.stats.receipt_retries[provider] += 1
                log.debug("%s receipt attempt %s failed (%s); retrying", provider, attempt, outcome)
                await asyncio.sleep(self.settings.retry_base_seconds * 2 ** (attempt - 1))
        self.stats.receipts_failed[provider] += 1
        log.warning("%s receipt given up after %s attempts (%s)", provider, attempts, outcome)
