"""The providers' webhooks (aiohttp): `POST /webhooks/{provider}/{workspace_id}/{connector_id}`.

Also the WhatsApp subscription handshake (`GET` with hub.mode/verify_token/
challenge), the one-click unsubscribe endpoint (`unsubscribe_page`), `GET /healthz`
(liveness: the process answers) and `GET /readyz` (readiness: Redis answers and
shutdown has not begun). Bodies are read with a bounded reader (the declared
Content-Length is checked first, against the provider's own limit) under a
timeout, within a bound on the bytes all requests' bodies hold at once
(`BodyBudget`), then handed to the shared intake. Replies are short JSON
without anything from the request (TwiML for Twilio's incoming messages);
there is no access log, since it would record addresses and user agents.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from libs.errors import DomainError
from libs.http_bodies import read_at_most
from libs.logs import LogThrottle
from libs.server import CannotListen
from libs.settings import ReceiptsSettings
from libs.store import STORE_ERRORS
from services.receipts.errors import ReceiptTooLarge, http_status_of
from services.receipts.intake import (
    BODY_INCOMPLETE,
    BODY_TIMEOUT,
    BODY_UNDECODABLE,
    DEPENDENCY_TIMEOUT,
    RawReceipt,
    ReceiptIntake,
    refusal_reason,
)
from services.receipts.unsubscribe_page import UNSUBSCRIBE_PATH, add_routes
from services.receipts.verification import verify_token_matches

log = logging.getLogger(__name__)

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
_CHALLENGE = re.compile(r"^[A-Za-z0-9_.-]{1,256}\Z")

INTAKE: web.AppKey[ReceiptIntake] = web.AppKey("intake", ReceiptIntake)
SETTINGS: web.AppKey[ReceiptsSettings] = web.AppKey("settings", ReceiptsSettings)


class BodyBudget:
    """Bytes of webhook bodies held at once, whatever each provider's limit: a request takes what its body
    may hold (its Content-Length, else its provider's whole limit) before reading it, and gives it back
    once answered. Single-threaded (the event loop), so no lock."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total

    def take(self, size: int) -> bool:
        if size > self.free:
            return False
        self.free -= size
        return True

    def give_back(self, size: int) -> None:
        self.free += size


BODY_BUDGET: web.AppKey[BodyBudget] = web.AppKey("body_budget", BodyBudget)

# Why the webhooks answered 503 before reading a body, as `tokensend.receipts.refused` names it (`code`),
# beside the intake's `REFUSAL_REASONS`: too many requests at once, too many body bytes held at once, and
# shutdown begun.
BUSY = "busy"
BODY_BUDGET_FULL = "body_budget_full"
SHUTTING_DOWN = "shutting_down"


# When a provider that reads Retry-After should send again after a dependency timed out or the store did not
# answer: long enough for a slow or restarting store, or a certificate host, not to be asked again at once.
DEPENDENCY_RETRY_AFTER_SECONDS = 5

# After the grace period, requests still in flight are cancelled; this long for them to end.
CANCELLED_SECONDS = 1.0

# Anyone can post a body too large, too slow or that does not decode, or post anything while the store is
# away: such a line once a minute per provider and kind, saying how many more came since
# (`tokensend.receipts.refused` counts them all).
REPEATED_LOG_SECONDS = 60.0
REPEATED_LOGS: web.AppKey[LogThrottle] = web.AppKey("repeated_logs", LogThrottle)


def log_repeated(request: web.Request, key: tuple[str, ...], level: int, message: str, *args: object) -> None:
    request.app[REPEATED_LOGS].log(key, log, level, message, *args)


class Readiness:
    """What `GET /readyz` answers a load balancer: ready while Redis answers, by the same watch that sets
    gRPC health (two failed pings in a row), and until shutdown begins. Once it has begun (`drain`), new
    requests are answered 503 with Retry-After while those in flight (kept here) finish."""

    def __init__(self, store_answers: Callable[[], bool] = lambda: True) -> None:
        self.store_answers = store_answers
        self.draining = False
        self.in_flight: set[asyncio.Task[Any]] = set()

    def drain(self) -> None:
        self.draining = True

    async def finish_in_flight(self, grace: float) -> None:
        """Waits up to `grace` for the requests in flight, then cancels those left (their provider sends
        them again). aiohttp's own shutdown would wait `grace`, cancel the body's reader, and then wait
        `grace` again for a handler held elsewhere (a slow SNS host)."""
        if self.in_flight:
            await asyncio.wait(set(self.in_flight), timeout=grace)
        left = set(self.in_flight)
        if left:
            log.warning("%d webhook requests still in flight after %.1fs: cancelled", len(left), grace)
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=CANCELLED_SECONDS)

    def not_ready_because(self) -> str:
        """Empty when ready, else why not (for the reply: no detail of Redis or the host)."""
        if self.draining:
            return "shutting down"
        return "" if self.store_answers() else "storage unavailable"


READINESS: web.AppKey[Readiness] = web.AppKey("readiness", Readiness)


def error_reply(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def declared_size(request: web.Request, limit: int, variable: str) -> int:
    """What the body may hold: its Content-Length, refused when over `limit`; `limit` when none is declared,
    or when the body is compressed (read decoded, so its Content-Length does not bound what it holds)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ReceiptTooLarge(limit, variable)
    if declared is None or request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() != "identity":
        return limit
    return declared


async def read_body(request: web.Request, limit: int, variable: str) -> bytes:
    """The raw body, refusing more than `limit` bytes (set by `variable`) whatever Content-Length claims."""
    declared_size(request, limit, variable)
    body = await read_at_most(request.content, limit)
    if len(body) > limit:
        raise ReceiptTooLarge(limit, variable)
    return body


def refusal_reply(exc: DomainError) -> web.Response:
    """A refusal's status and message, with Retry-After when the provider should send again later."""
    reply = error_reply(http_status_of(exc), exc.message)
    retry_after = getattr(exc, "retry_after_seconds", 0)
    if retry_after:
        reply.headers["Retry-After"] = str(retry_after)
    return reply


def dependency_reply(message: str) -> web.Response:
    """503 for a dependency (the store, a certificate host) that timed out or did not answer."""
    reply = error_reply(503, message)
    reply.headers["Retry-After"] = str(DEPENDENCY_RETRY_AFTER_SECONDS)
    return reply


def busy_reply(message: str) -> web.Response:
    response = error_reply(503, message)
    response.headers["Retry-After"] = "1"
    return response


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))


async def receive_receipt(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    intake = request.app[INTAKE]
    budget = request.app[BODY_BUDGET]
    provider = request.match_info["provider"]
    workspace_id, connector_id = request.match_info["workspace_id"], request.match_info["connector_id"]
    limit, variable = settings.receipt_limit(provider)
    body: bytes | None = None
    held = 0  # bytes taken from the budget, given back however the request ends
    # Counted in `tokensend.receipts.refused` here until the body is read; the intake counts its own after.
    try:
        # The connector first, from the path (kept in memory): a request to a made-up path is answered
        # before its body, so slow bodies sent there cannot hold the slots real receipts need.
        await intake.find_connector(provider, workspace_id, connector_id)
        size = declared_size(request, limit, variable)
        if not budget.take(size):
            # Sent again later, as for a 5xx: memory stays bounded whichever provider's bodies come at once.
            intake.count_refused(provider, BODY_BUDGET_FULL)
            reply = busy_reply("too many large requests at once; send again later")
            reply.force_close()
            return reply
        held = size
        try:
            async with asyncio.timeout(settings.receipt_read_timeout_seconds):
                body = await read_body(request, limit, variable)
        except TimeoutError:  # the sender's: any later timeout is a dependency's (below)
            log_repeated(
                request,
                (provider, BODY_TIMEOUT),
                logging.INFO,
                "%s webhook: body not received within %.1fs",
                provider,
                settings.receipt_read_timeout_seconds,
            )
            intake.count_refused(provider, BODY_TIMEOUT)
            reply = error_reply(408, "request body took too long")
            reply.force_close()
            return reply
        except ConnectionError:  # reading the body touches no store: the client hung up
            log.debug("%s webhook: client went away before sending its whole body", provider)
            intake.count_refused(provider, BODY_INCOMPLETE)
            return error_reply(400, "request body incomplete")
        except web.RequestPayloadError:
            # Its Content-Encoding does not decode (or its framing is broken): the sender's fault, not ours,
            # and the connection's stream is unusable after it.
            log_repeated(
                request, (provider, BODY_UNDECODABLE), logging.INFO, "%s webhook: body could not be decoded", provider
            )
            intake.count_refused(provider, BODY_UNDECODABLE)
            request.content.feed_eof()  # nothing more to read: else aiohttp reads on and logs the error
            reply = error_reply(400, "request body could not be decoded; check its Content-Encoding")
            reply.force_close()
            return reply
        outcome = await intake.ingest(
            RawReceipt(
                provider=provider,
                workspace_id=workspace_id,
                connector_id=connector_id,
                # Twilio signs the URL it called: our public base plus the path and query as sent.
                url=settings.public_webhook_url.rstrip("/") + request.raw_path,
                headers=request.headers,
                body=body,
            )
        )
    except ReceiptTooLarge as exc:
        # Grouped digits: the log scrubbing takes a run of seven digits for a phone number.
        log_repeated(
            request,
            (provider, refusal_reason(exc)),
            logging.INFO,
            "%s webhook: body over the limit (%s, %s bytes)",
            provider,
            exc.variable,
            f"{exc.limit:,}",
        )
        if body is None:
            intake.count_refused(provider, refusal_reason(exc))
        reply = error_reply(413, exc.message)
        reply.force_close()  # the rest of the body is not worth reading
        return reply
    except DomainError as exc:
        reply = refusal_reply(exc)
        if body is None:
            intake.count_refused(provider, refusal_reason(exc))
            reply.force_close()  # refused before its body was read: not worth reading now
        return reply
    except TimeoutError as exc:
        # Not the body (answered above): the store, or a host the receipt is checked against, was too slow.
        # An OSError, so before the store's errors; its text may quote the receipt: type and place only.
        log_repeated(
            request,
            (provider, DEPENDENCY_TIMEOUT),  # not by place: one line names where the first came from
            logging.WARNING,
            "%s webhook: a dependency timed out (%s at %s)",
            provider,
            type(exc).__name__,
            _where(exc),
        )
        if body is None:
            intake.count_refused(provider, DEPENDENCY_TIMEOUT)
        return dependency_reply("a dependency timed out; send again later")
    except STORE_ERRORS as exc:
        log_repeated(
            request,
            (provider, refusal_reason(exc), type(exc).__name__),
            logging.WARNING,
            "%s webhook: store unavailable (%s)",
            provider,
            type(exc).__name__,
        )
        if body is None:
            intake.count_refused(provider, refusal_reason(exc))
        return dependency_reply("storage unavailable, retry later")
    except Exception as exc:  # the text of an exception may quote the receipt: type and place only
        if body is None:
            intake.count_refused(provider, refusal_reason(exc))
        ref = uuid.uuid4().hex[:12]
        log.error("%s webhook: unhandled %s (ref %s) at %s", provider, type(exc).__name__, ref, _where(exc))
        return error_reply(500, f"internal error (ref {ref})")
    finally:
        budget.give_back(held)
    reply = {
        "events": outcome.events,
        "mapped": outcome.mapped,
        "unmapped": outcome.unmapped,
        "duplicates": outcome.duplicates,
    }
    if outcome.note:
        reply["note"] = outcome.note
    if outcome.unusable:
        # Left out, not to be sent again: named by place so that whoever reads the reply can find them.
        reply["unusable"] = outcome.unusable
        reply["unusable_entries"] = outcome.named_unusable
    if provider == "twilio" and outcome.inbound:
        # Twilio reads the reply to an incoming message as TwiML: an empty one sends nothing back.
        return web.Response(text=EMPTY_TWIML, content_type="text/xml")
    return web.json_response(reply)


async def whatsapp_handshake(request: web.Request) -> web.Response:
    """Meta's subscription check: echo hub.challenge when hub.verify_token is the connector's."""
    query = request.query
    try:
        connector = await request.app[INTAKE].find_connector(
            "whatsapp", request.match_info["workspace_id"], request.match_info["connector_id"]
        )
    except DomainError as exc:
        return refusal_reply(exc)
    except STORE_ERRORS as exc:
        log_repeated(
            request,
            ("whatsapp handshake", type(exc).__name__),
            logging.WARNING,
            "whatsapp handshake: store unavailable (%s)",
            type(exc).__name__,
        )
        return dependency_reply("storage unavailable, retry later")
    challenge = query.get("hub.challenge", "")
    if (
        query.get("hub.mode") != "subscribe"
        or not verify_token_matches(connector.credentials.get("verify_token", ""), query.get("hub.verify_token", ""))
        or not _CHALLENGE.match(challenge)
    ):
        return error_reply(403, "verification failed")
    log.info("WhatsApp webhook verified for workspace %s", request.match_info["workspace_id"])
    return web.Response(text=challenge, content_type="text/plain")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers, whatever Redis does (a restart would not bring Redis back)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 while webhooks could only be answered 503 (Redis away) or shutdown has begun."""
    reason = request.app[READINESS].not_ready_because()
    if reason:
        return web.json_response({"status": "not ready", "reason": reason}, status=503)
    return web.json_response({"status": "ready"})


# Probes are answered whatever the load: a busy service is not an unhealthy one.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


# Requests worked on at once. Past it a provider is answered 503 and sends again later, as every provider
# does for a 5xx. Their bodies together hold at most `body_budget` bytes.
MAX_CONCURRENT_REQUESTS = 256
# One-click unsubscribes have slots of their own: a flood of webhooks must not keep anyone from leaving.
MAX_CONCURRENT_UNSUBSCRIBES = 64
# How long an idle keep-alive connection is kept (aiohttp's own default is an hour).
KEEPALIVE_SECONDS = 75.0


def concurrency_limit(limit: int, unsubscribe_limit: int = MAX_CONCURRENT_UNSUBSCRIBES) -> Any:
    """A middleware that answers 503 rather than take on more than `limit` requests at once, or more
    than `unsubscribe_limit` one-click unsubscribes (counted apart), or any once shutdown has begun; a
    receipt refused so is counted in `tokensend.receipts.refused`."""
    webhook_slots = asyncio.Semaphore(limit)
    unsubscribe_slots = asyncio.Semaphore(unsubscribe_limit)

    @web.middleware
    async def limited(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in PROBE_PATHS:
            return await handler(request)
        readiness = request.app.get(READINESS)
        if readiness is not None and readiness.draining:
            count_refused(request, SHUTTING_DOWN)
            reply = busy_reply("shutting down; send again later")
            reply.force_close()  # sent again on a new connection, to a process that is not stopping
            return reply
        slots = unsubscribe_slots if request.path.startswith(UNSUBSCRIBE_PATH) else webhook_slots
        if slots.locked():
            count_refused(request, BUSY)
            return busy_reply("too many requests at once; send again later")
        task = asyncio.current_task()
        if readiness is not None and task is not None:
            readiness.in_flight.add(task)
        try:
            async with slots:
                return await handler(request)
        finally:
            if readiness is not None and task is not None:
                readiness.in_flight.discard(task)

    return limited


def count_refused(request: web.Request, reason: str) -> None:
    """Counts a receipt refused before its handler ran; other requests (handshakes, unsubscribes) are none."""
    intake = request.app.get(INTAKE)
    provider = request.match_info.get("provider")
    if intake is not None and provider is not None and request.method == "POST":
        intake.count_refused(provider, reason)


def body_budget(settings: ReceiptsSettings, max_concurrent: int = MAX_CONCURRENT_REQUESTS) -> int:
    """Bytes all webhook bodies may hold at once: as many `max_receipt_bytes` bodies as requests at once (256
    MiB by default, the bound before WhatsApp's larger limit), never less than the largest body accepted."""
    return max(max_concurrent * settings.max_receipt_bytes, settings.max_whatsapp_receipt_bytes)


def build_webhook_app(
    settings: ReceiptsSettings,
    intake: ReceiptIntake,
    max_concurrent: int = MAX_CONCURRENT_REQUESTS,
    readiness: Readiness | None = None,
) -> web.Application:
    # Bodies are read by `read_body`; this caps any other reader at the largest provider's limit.
    largest = max(settings.max_receipt_bytes, settings.max_whatsapp_receipt_bytes)
    app = web.Application(client_max_size=largest, middlewares=[concurrency_limit(max_concurrent)])
    app[SETTINGS] = settings
    app[INTAKE] = intake
    app[BODY_BUDGET] = BodyBudget(body_budget(settings, max_concurrent))
    app[READINESS] = readiness if readiness is not None else Readiness()
    app[REPEATED_LOGS] = LogThrottle(REPEATED_LOG_SECONDS)
    app.router.add_post(
        r"/webhooks/{provider:sendgrid|ses|twilio|whatsapp}/{workspace_id}/{connector_id}", receive_receipt
    )
    app.router.add_get("/webhooks/whatsapp/{workspace_id}/{connector_id}", whatsapp_handshake)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if intake.opt_outs is not None:
        add_routes(app, intake.opt_outs)
    return app


class _QuietServerLog(logging.Filter):
    """aiohttp's own error logs may carry a request line or header: keep the message, drop the details.

    A request that is not valid HTTP (refused 400 before any handler) is the sender's doing, and anyone can
    send them to the public port at will: an INFO line a minute per kind, saying how many more came since,
    where aiohttp logged each at ERROR."""

    def __init__(self) -> None:
        super().__init__()
        self._malformed = LogThrottle(REPEATED_LOG_SECONDS)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        record.exc_info = record.exc_text = None
        if isinstance(exc, HttpProcessingError) and record.levelno >= logging.INFO:
            kind = type(exc).__name__
            held = self._malformed.due(kind)
            if held is None:
                return False
            since = f" ({held} more since the last line)" if held else ""
            record.msg, record.args = (
                f"webhook port: a request that is not valid HTTP refused 400 ({kind}){since}",
                None,
            )
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            return True
        # The format string only: its arguments are peer addresses and request details.
        message = str(record.msg).replace("%s", "?").replace("%r", "?")
        if exc is not None:
            message = f"{message} ({type(exc).__name__})"
        record.msg, record.args = message, None
        return True


def server_logger() -> logging.Logger:
    logger = logging.getLogger("services.receipts.http")
    if not any(isinstance(f, _QuietServerLog) for f in logger.filters):
        logger.addFilter(_QuietServerLog())
    return logger


async def start_webhook_app(
    app: web.Application, host: str, port: int, grace: float, tls: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Starts the app, over HTTPS when given a TLS context; port 0 binds a free one. Returns the runner
    (for cleanup) and the bound port."""
    runner = web.AppRunner(
        app, access_log=None, logger=server_logger(), shutdown_timeout=grace, keepalive_timeout=KEEPALIVE_SECONDS
    )
    await runner.setup()
    site = web.TCPSite(runner, host or None, port, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CannotListen(
            f"cannot listen for webhooks on {host or '*'}:{port} (TOKENSEND_HTTP_HOST, TOKENSEND_HTTP_PORT): "
            f"{exc.strerror or type(exc).__name__}"
        ) from None
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = address[1]
            break
    log.info("receipt webhooks listening on port %d (%s)", bound, "https" if tls is not None else "http")
    return runner, bound


async def stop_webhook_app(runner: web.AppRunner, grace: float) -> None:
    """Shutdown: no new connections, new requests on open ones answered 503 (Retry-After), those in flight
    finish within `grace` (bodies still arriving included: aiohttp's own shutdown stops reading them), then
    the connections close."""
    readiness = runner.app[READINESS]
    readiness.drain()
    for site in list(runner.sites):
        await site.stop()
    await readiness.finish_in_flight(grace)
    await runner.cleanup()
