"""`ProviderSandbox`: the four sandbox providers on one aiohttp app, with faults, outbox and receipts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from aiohttp import web

from sandbox.providers import gateway, sendgrid, twilio, whatsapp
from sandbox.providers.model import (
    CUSTOM,
    DEFAULT_OUTBOX_LIMIT,
    PROVIDERS,
    SENDGRID,
    TWILIO,
    WHATSAPP,
    Faults,
    Outbox,
    OutboxMessage,
    ProviderAccount,
    ReceiptScript,
    SendContext,
    Stats,
)
from sandbox.providers.receipts import ReceiptCourier, ReceiptSettings, default_receipt_script
from sandbox.signing import SendGridSigner

log = logging.getLogger(__name__)

# Each provider module offers send(request, ctx), fault_response(status) and rate_limited(retry_after, now).
_APIS: dict[str, ModuleType] = {SENDGRID: sendgrid, TWILIO: twilio, WHATSAPP: whatsapp, CUSTOM: gateway}
_PATHS = {SENDGRID: sendgrid.PATH, TWILIO: twilio.PATH, WHATSAPP: whatsapp.PATH, CUSTOM: gateway.PATH}
DEFAULT_ADMIN_OUTBOX_LIMIT = 100


def _admin_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class ProviderSandbox:
    """State and behaviour of the sandbox providers; tests poke ``faults``, ``outbox``, ``stats`` and ``receipts``.

    ``accounts`` are the credentials each provider accepts (anything else gets that provider's
    401) and where their receipts go. ``receipts_url`` is the receipts service's base URL for
    SendGrid and WhatsApp webhooks; Twilio posts to each message's ``StatusCallback``.
    ``receipt_script`` picks each message's receipt statuses (default `default_receipt_script`).
    """

    def __init__(
        self,
        accounts: Iterable[ProviderAccount] = (),
        *,
        receipts_url: str | None = None,
        receipt_script: ReceiptScript | None = None,
        receipt_delay_seconds: float = 0.05,
        receipt_attempts: int = 4,
        receipt_retry_base_seconds: float = 0.1,
        sendgrid_signer: SendGridSigner | None = None,
        outbox_limit: int = DEFAULT_OUTBOX_LIMIT,
        faults: Mapping[str, Faults] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._accounts: dict[str, dict[str, ProviderAccount]] = {p: {} for p in PROVIDERS}
        for account in accounts:
            self.add_account(account)
        self.sendgrid_signer = sendgrid_signer or SendGridSigner()
        self.outbox = Outbox(outbox_limit)
        self.faults: dict[str, Faults] = {p: Faults() for p in PROVIDERS}
        for provider, provider_faults in (faults or {}).items():
            self.set_faults(provider, provider_faults)
        self.stats = Stats()
        self._in_flight: Counter[str] = Counter()  # requests being served now (not reset with the stats)
        self.receipts = ReceiptSettings(
            url=receipts_url,
            script=receipt_script or default_receipt_script,
            delay_seconds=receipt_delay_seconds,
            attempts=receipt_attempts,
            retry_base_seconds=receipt_retry_base_seconds,
        )
        self.clock = clock
        self._courier = ReceiptCourier(self.receipts, self.stats)

    # -- configuration ----------------------------------------------------------------------------

    @property
    def accounts(self) -> list[ProviderAccount]:
        return [a for by_credential in self._accounts.values() for a in by_credential.values()]

    def add_account(self, account: ProviderAccount) -> None:
        if account.credential in self._accounts[account.provider]:
            raise ValueError(f"a {account.provider} account with that credential already exists")
        self._accounts[account.provider][account.credential] = account

    @property
    def sendgrid_public_key(self) -> str:
        """Base64 DER public key of the default signer: a SendGrid connector's ``webhook_secret``."""
        return self.sendgrid_signer.public_key_b64

    def set_faults(self, provider: str, faults: Faults | None = None, **values: Any) -> Faults:
        """Replace one provider's faults: ``set_faults("twilio", rate_limit_count=2)``."""
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
        if faults is not None and values:
            raise ValueError("pass a Faults or keyword values, not both")
        self.faults[provider] = faults if faults is not None else Faults(**values)
        return self.faults[provider]

    def clear_faults(self) -> None:
        for provider in PROVIDERS:
            self.faults[provider] = Faults()

    def outbox_for(self, provider: str) -> list[OutboxMessage]:
        return self.outbox.for_provider(provider)

    # -- receipts lifecycle -----------------------------------------------------------------------

    @property
    def pending_receipts(self) -> int:
        return self._courier.pending

    async def drain_receipts(self) -> None:
        """Wait until every scheduled receipt has been posted or given up on."""
        await self._courier.drain()

    async def close(self) -> None:
        """Cancel receipts still pending and close the HTTP client."""
        await self._courier.close()

    # -- the app ----------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        """The app serving all four providers and the admin endpoints; stopping it cancels pending receipts."""
        # Bodies up to twice SendGrid's limit reach its handler, which answers over the limit as SendGrid does
        # (aiohttp's own 1 MiB limit would answer first, in plain text).
        app = web.Application(client_max_size=2 * sendgrid.MAX_REQUEST_BYTES)
        for provider, path in _PATHS.items():
            app.router.add_post(path, self._endpoint(provider))
        app.router.add_get("/_admin/faults", self._get_faults)
        app.router.add_post("/_admin/faults/{provider}", self._set_faults)
        app.router.add_delete("/_admin/faults", self._clear_faults)
        app.router.add_get("/_admin/outbox", self._get_outbox)
        app.router.add_delete("/_admin/outbox", self._clear_outbox)
        app.router.add_get("/_admin/stats", self._get_stats)
        app.router.add_post("/_admin/stats/reset", self._reset_stats)
        app.router.add_post("/_admin/receipts/drain", self._drain)
        app.router.add_get("/_admin/sendgrid/public-key", self._public_key)

        async def on_cleanup(_app: web.Application) -> None:
            await self.close()

        app.on_cleanup.append(on_cleanup)
        return app

    def _endpoint(self, provider: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.stats.requests[provider] += 1
            in_flight = self._in_flight
            in_flight[provider] += 1
            peak = self.stats.peak_in_flight
            peak[provider] = max(peak[provider], in_flight[provider])
            try:
                response = await self._serve(provider, request)
            finally:
                in_flight[provider] -= 1
            if response is None:
                return web.Response(status=204)  # never sent: the connection is gone
            self.stats.statuses[f"{provider} {response.status}"] += 1
            return response

        return handle

    async def _serve(self, provider: str, request: web.Request) -> web.Response | None:
        api = _APIS[provider]
        faults = self.faults[provider]
        try:
            # Read first, as a real provider does: a client that gives up during the latency has still sent it.
            await request.read()
        except ConnectionError:
            return None
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.take("rate_limit_count"):
            self.stats.faults[f"{provider} rate_limit"] += 1
            log.debug("injecting %s rate limit, retry after %ss", provider, faults.retry_after_seconds)
            return api.rate_limited(faults.retry_after_seconds, self.clock())
        if faults.status is not None and faults.take("status_count"):
            self.stats.faults[f"{provider} status"] += 1
            log.debug("injecting %s status %s", provider, faults.status)
            return api.fault_response(faults.status)

        result = await api.send(request, SendContext(self._accounts[provider], faults, self.clock()))
        if result.accepted:
            for message in result.accepted:
                self.outbox.append(message)
            self.stats.accepted[provider] += len(result.accepted)
            if result.account is not None:
                self._schedule_receipts(provider, result.account, result.accepted)

        if faults.take("reset_count"):
            # After handling: whatever was accepted stays accepted, and the client cannot know.
            self.stats.faults[f"{provider} reset"] += 1
            self.stats.resets += 1
            log.debug("injecting %s connection reset after handling the request", provider)
            if request.transport is not None:
                request.transport.abort()
            return None
        return result.response

    def _schedule_receipts(self, provider: str, account: ProviderAccount, messages: list[OutboxMessage]) -> None:
        settings = self.receipts
        if provider == CUSTOM or not settings.enabled:
            return
        deliveries = []
        for message in messages:
            try:
                statuses = list(settings.script(provider, message))
            except Exception as exc:  # a broken test script must not fail the send
                log.warning("receipt script failed for %s: %s", provider, type(exc).__name__)
                continue
            if statuses:
                deliveries.append((message, statuses))
        if not deliveries:
            return
        now = self.clock()
        if provider == TWILIO:
            sequences = twilio.receipt_posts(account, deliveries)
            self.stats.receipts_skipped[provider] += len(deliveries) - len(sequences)
        elif not settings.url:
            self.stats.receipts_skipped[provider] += len(deliveries)
            return
        elif provider == SENDGRID:
            signer = account.secret if isinstance(account.secret, SendGridSigner) else self.sendgrid_signer
            sequences = sendgrid.receipt_posts(account, deliveries, receipts_url=settings.url, signer=signer, now=now)
        else:
            sequences = whatsapp.receipt_posts(account, deliveries, receipts_url=settings.url, now=now)
        self._courier.dispatch(provider, sequences)

    # -- admin ------------------------------------------------------------------------------------

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({p: f.to_json() for p, f in self.faults.items()})

    async def _set_faults(self, request: web.Request) -> web.StreamResponse:
        provider = request.match_info["provider"]
        if provider not in PROVIDERS:
            return _admin_error(404, "not_found", f"unknown provider; expected one of {', '.join(PROVIDERS)}")
        try:
            faults = self.set_faults(provider, Faults.from_json(await request.json()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _admin_error(400, "invalid_argument", "body is not valid JSON")
        except ValueError as exc:
            return _admin_error(400, "invalid_argument", str(exc))
        defaults = Faults().to_json()
        # Names only: reject_to holds recipients.
        log.info("%s faults set: %s", provider, sorted(k for k, v in faults.to_json().items() if v != defaults[k]))
        return web.json_response(faults.to_json())

    async def _clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.clear_faults()
        log.info("faults cleared")
        return await self._get_faults(request)

    async def _get_outbox(self, request: web.Request) -> web.StreamResponse:
        provider = request.query.get("provider", "")
        if provider and provider not in PROVIDERS:
            return _admin_error(400, "invalid_argument", f"provider must be one of {', '.join(PROVIDERS)}")
        try:
            limit = int(request.query.get("limit", DEFAULT_ADMIN_OUTBOX_LIMIT))
        except ValueError:
            limit = -1
        if limit < 0:
            return _admin_error(400, "invalid_argument", "limit must be a non-negative integer")
        messages = self.outbox_for(provider) if provider else list(self.outbox)
        newest = messages[len(messages) - limit :] if limit else []
        return web.json_response({"total": len(messages), "messages": [m.to_json() for m in newest]})

    async def _clear_outbox(self, request: web.Request) -> web.StreamResponse:
        self.outbox.clear()
        return web.json_response({"total": 0, "messages": []})

    def _stats_json(self) -> dict[str, Any]:
        return {**self.stats.to_json(), "outbox": len(self.outbox), "pending_receipts": self.pending_receipts}

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._stats_json())

    async def _reset_stats(self, request: web.Request) -> web.StreamResponse:
        self.stats.reset()
        return web.json_response(self._stats_json())

    async def _drain(self, request: web.Request) -> web.StreamResponse:
        await self.drain_receipts()
        return web.json_response(self._stats_json())

    async def _public_key(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"public_key": self.sendgrid_public_key})


async def start_providers(
    sandbox: ProviderSandbox, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve ``sandbox`` on ``host:port`` (0 picks a free port); returns the runner to clean up and the bound port."""
    runner = web.AppRunner(sandbox.build_app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    log.info("sandbox providers listening on %s:%s", host, bound_port)
    return runner, bound_port
