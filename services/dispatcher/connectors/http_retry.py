"""The retry loop every HTTP connector shares.

One request goes out; 429, 5xx and connections that never carried the request
(refused, DNS, connect timeout) are retried with full-jitter backoff or the
provider's Retry-After. Anything that may have reached the provider (a read
timeout, a dropped connection, a broken reply, a 5xx its connector says may
follow a send, `may_have_taken`) is never resent: it ends as OUTCOME_UNKNOWN,
because sending a campaign message twice is worse than reporting that we do
not know.

A provider that cannot be reached (refused, unresolvable, connect or TLS handshake
timed out) is tried as one message would be, whatever the requests waiting on it
(`ConnectCircuit`): the connector's requests share those retries, and once they are
spent the requests still waiting fail at once, unsent, with the same code. Replies
(a 5xx, a 429) say the provider is there: each request keeps its own retries for them.

Reply bodies can quote the recipient or the content, so nothing from a body
reaches an error message except what a connector's `describe` hook picks out
(a provider's numeric error code).

How a request travels is a transport's business (`HttpTransport`): an aiohttp
session, or the dispatcher's `MessageClient` for connectors that make one request
per message. Either one raises only the exceptions below, whose text never holds
the URL, a header or the body.

Given a traced aiohttp session, a connector that makes one request per message turns
the HTTP client's tracing hooks off per request (`suppress_tracing`): the
dispatcher's span per batch covers them, and the hooks cost a quarter of each
request even with their spans off.

Each attempt at a provider is timed into `tokensend.provider.duration` (`ProviderLatency`), by
provider and by how the attempt ended, when the batch sending it records metrics
(`timing_attempts`): the HTTP connectors here, SES and SMTP alike. Retries and replies that never
came are logged a line a minute per kind (`AttemptLogs`), saying how many more since: per message,
a provider throttling a large campaign would write a line for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
from opentelemetry import metrics
from opentelemetry.instrumentation.utils import suppress_http_instrumentation

from libs.backoff import full_jitter_delay, parse_retry_after
from libs.json_documents import parse
from libs.logs import LogThrottle
from libs.netguard import BlockedAddress
from libs.telemetry import REQUEST_SECONDS_BUCKETS
from services.dispatcher.connectors.base import SendOutcome, SendStatus
from services.dispatcher.connectors.circuit import ConnectCircuit, GivenUp, Outage

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# How a reply that is neither a 429 nor a 5xx is tried again, and the error code it ends with.
RetryAs = Literal["RATE_LIMITED", "SERVER_ERROR"]

MAX_REPLY_BYTES = 1024 * 1024

# How an attempt at a provider ended, as `tokensend.provider.duration` names it: accepted, refused (or
# given up on), may have reached the provider, or failed in a way that is tried again.
ATTEMPT_SENT = "sent"
ATTEMPT_FAILED = "failed"
ATTEMPT_UNKNOWN = "unknown"
ATTEMPT_RETRIED = "retried"

# A connector's line about its attempts, per kind (a retry's error code, a reply that never came).
ATTEMPT_LOG_SECONDS = 60.0


class AttemptLogs:
    """A connector's lines about its attempts, each kind once every `ATTEMPT_LOG_SECONDS`, saying how many
    more there were since: its messages each meet what one meets (a provider throttling, hanging up), and
    a line per message would be 200,000 for a campaign (`tokensend.provider.duration` counts them all)."""

    __slots__ = ("_log", "_provider", "_throttle")

    def __init__(
        self, provider: str, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._provider = provider
        self._log = logger
        self._throttle = LogThrottle(ATTEMPT_LOG_SECONDS, keys=64, clock=clock)

    def retrying(self, attempt: int, code: str, delay: float) -> None:
        held = self._throttle.due(code)
        if held is not None:
            since = f" ({held} more retries like it since the last line)" if held else ""
            self._log.info(
                "%s attempt %d failed (%s); retrying in %.2fs%s", self._provider, attempt, code, delay, since
            )

    def not_resent(self, cause: str, what: str = "request ended without a reply") -> None:
        """A message that may have reached the provider: `what` happened, for the reason `cause` names."""
        held = self._throttle.due((what, cause))
        if held is not None:
            since = f" ({held} more like it since the last line)" if held else ""
            self._log.warning("%s %s (%s); not resent%s", self._provider, what, cause, since)


@dataclass(frozen=True)
class Refusal:
    """A reply a provider's own error code marks final, whatever its HTTP status, and what it fails with."""

    error_code: str
    error_message: str


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a connector tries one message; the timeouts bound each attempt."""

    max_retries: int = 3
    base_seconds: float = 0.2
    cap_seconds: float = 5.0
    max_retry_after_seconds: float = 30.0
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 30.0  # for the reply, once connected

    def delay(self, retry: int, rng: random.Random) -> float:
        return full_jitter_delay(retry, self.base_seconds, self.cap_seconds, rng)


@dataclass(slots=True)  # not frozen, as OutboundMessage: one is built per provider call
class HttpRequest:
    """One provider call. The URL, headers and body hold contacts and secrets: never log them."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None = None


_UNPARSED = object()


@dataclass
class HttpReply:
    """A provider's answer. `body` may quote the recipient: read fields from it, never copy it out."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    body_complete: bool = True
    _document: Any = field(default=_UNPARSED, repr=False, compare=False)

    def json(self) -> Any:
        """The parsed body, or None when it is not JSON; parsed once however many ask (throttling
        checks, the verdict, the provider's ID)."""
        if self._document is _UNPARSED:
            try:
                self._document = parse(self.body) if self.body else None
            except (ValueError, UnicodeDecodeError):
                self._document = None
        return self._document


class NotSent(Exception):
    """The request never left (refused, unresolvable, connect timeout): safe to send again."""


class UntrustedCertificate(Exception):
    """The provider's TLS certificate did not verify: retrying only delays the failure."""


class InvalidRequest(Exception):
    """The HTTP client refused to build the request; nothing was sent. `part` is "URL" or "request"."""

    def __init__(self, part: str) -> None:
        super().__init__(part)
        self.part = part


class MaybeSent(Exception):
    """The request may have reached the provider and no whole reply came back: never sent again.

    `cause` names the HTTP client's exception type, the only part of it that is safe to repeat.
    """

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class _Unreachable(Exception):
    """An attempt did not reach the provider. `outage`: the connector's retries at reaching it are spent
    (by this request or another); `tried`: this request made the attempt, rather than finding the
    provider given up on."""

    def __init__(self, outage: Outage | None, *, tried: bool = True) -> None:
        super().__init__(outage.code if outage is not None else "CONNECTION_FAILED")
        self.outage = outage
        self.tried = tried


class HttpTransport(Protocol):
    async def fetch(self, request: HttpRequest) -> HttpReply:
        """One attempt. Raises only BlockedAddress, NotSent, UntrustedCertificate, InvalidRequest or MaybeSent."""
        ...


class TransportFactory(Protocol):
    def transport(self, retry: RetryPolicy) -> HttpTransport:
        """A transport whose attempts are bounded by `retry`'s timeouts."""
        ...


@dataclass
class Exchange:
    """How one request ended after its retries."""

    status: SendStatus
    attempts: int
    reply: HttpReply | None = None  # the last reply, when one arrived
    error_code: str = ""
    error_message: str = ""
    account_refused: bool = False  # the reply refused the connector's account, not the message

    @property
    def sent(self) -> bool:
        return self.status is SendStatus.SENT

    def outcome(self, message_id: str, provider_message_id: str = "") -> SendOutcome:
        status = self.status  # read once: a batched request makes an outcome per message
        return SendOutcome(
            message_id=message_id,
            status=status,
            provider_message_id=provider_message_id if status is SendStatus.SENT else "",
            error_code=self.error_code,
            error_message=self.error_message,
            attempts=self.attempts,
            account_refused=self.account_refused,
        )


class ProviderLatency:
    """`tokensend.provider.duration`: seconds each attempt at a provider took (one HTTP request, one SES
    call, one SMTP transaction), by provider and by how the attempt ended. Per attempt rather than per
    message with its retries, so a provider's own latency shows, not our backoff between tries."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._histogram = meter.create_histogram(
            "tokensend.provider.duration",
            unit="s",
            description="Provider request attempts, by provider and outcome (sent, failed, unknown, retried)",
            explicit_bucket_boundaries_advisory=REQUEST_SECONDS_BUCKETS,
        )
        # One attributes dict per (provider, outcome), built once: both come from short fixed sets.
        self._attributes: dict[tuple[str, str], dict[str, str]] = {}

    def record(self, provider: str, outcome: str, seconds: float) -> None:
        attributes = self._attributes.get((provider, outcome))
        if attributes is None:
            attributes = self._attributes[provider, outcome] = {"provider": provider, "outcome": outcome}
        self._histogram.record(seconds, attributes)


# The batch's latency recorder: the connectors are built once per saved connector and shared by every
# batch, so the batch that sends through them says where their attempts are timed (tasks it starts share it).
_LATENCY: contextvars.ContextVar[ProviderLatency | None] = contextvars.ContextVar(
    "tokensend_provider_latency", default=None
)


@contextlib.contextmanager
def timing_attempts(latency: ProviderLatency | None) -> Iterator[None]:
    """Provider attempts made inside (and in tasks started inside) are timed into `latency`."""
    token = _LATENCY.set(latency)
    try:
        yield
    finally:
        _LATENCY.reset(token)


_ATTEMPT_OUTCOMES = {
    SendStatus.SENT: ATTEMPT_SENT,
    SendStatus.FAILED: ATTEMPT_FAILED,
    SendStatus.OUTCOME_UNKNOWN: ATTEMPT_UNKNOWN,
}
Ended = TypeVar("Ended", Exchange, SendOutcome)


class AttemptTimer:
    """Times the attempts of one request (a message's, or a SendGrid batch's) at a provider; does nothing
    unless the batch records metrics. `start` each attempt, then `ended(result)` for the last or
    `retried()` for one tried again."""

    __slots__ = ("_latency", "_provider", "_started")

    def __init__(self, provider: str) -> None:
        self._latency = _LATENCY.get()
        self._provider = provider
        self._started = 0.0

    def start(self) -> None:
        if self._latency is not None:
            self._started = time.perf_counter()

    def ended(self, result: Ended) -> Ended:
        """`result` (an `Exchange` or a `SendOutcome`), its attempt timed by its status."""
        if self._started:
            self._record(_ATTEMPT_OUTCOMES[result.status])
        return result

    def retried(self) -> None:
        if self._started:
            self._record(ATTEMPT_RETRIED)

    def _record(self, outcome: str) -> None:
        assert self._latency is not None
        self._latency.record(self._provider, outcome, time.perf_counter() - self._started)
        self._started = 0.0  # an attempt is timed once; one that never started is not timed


def _never(_: HttpReply) -> RetryAs | None:
    return None


def _nothing(_: HttpReply) -> str:
    return ""


def _not_final(_: HttpReply) -> Refusal | None:
    return None


def _not_account(_: HttpReply) -> bool:
    return False


def _never_taken(_: HttpReply) -> bool:
    return False


def gateway_timeout(reply: HttpReply) -> bool:
    """A 504: a gateway in front of the provider gave up waiting for it, after passing the request on
    (RFC 9110, 15.6.5). The provider may have taken it, as after a read timeout of our own."""
    return reply.status == 504


def retry_after_header(reply: HttpReply) -> float | None:
    """Seconds the provider asks to be left alone, from its Retry-After; None when it says nothing."""
    try:
        value = reply.headers.get("Retry-After")
    except ValueError:
        # pyreqwest will not give a value holding bytes outside visible ASCII as text: unreadable, as garbage is.
        return None
    return parse_retry_after(value)


class HttpSender:
    """Sends requests for one connector through the shared HTTP client, with retries.

    `http` is an aiohttp session or a `TransportFactory` (the dispatcher's `MessageClient`).
    `retry_as(reply)` lets a provider have a reply that is not a 429 or a 5xx tried again as
    one: "RATE_LIMITED" (WhatsApp answers 400 with code 130429) or "SERVER_ERROR" (a gateway's
    200 saying its platform failed before sending); `describe(reply)` returns a short,
    PII-free detail for error messages ("twilio error 21211"); `retry_after(reply)` reads
    how long the provider asks to be left alone (Retry-After, unless it says so otherwise);
    `refusal(reply)` names a reply that is final whatever its status, with the error code and
    message it fails with (Meta's "API method" error arrives as HTTP 500 and never passes);
    `account_refusal(reply)`, asked only of a reply that ends the message failed, says whether it refused
    the connector's account (its credentials, its standing) rather than the message, so the batch's
    other messages are not sent to meet it too; `may_have_taken(reply)`, asked of a 5xx that would be
    tried again, says the provider may have taken the request all the same (a gateway's 504, Twilio's
    500): it ends OUTCOME_UNKNOWN, never resent.
    """

    def __init__(
        self,
        http: aiohttp.ClientSession | TransportFactory,
        provider: str,
        retry: RetryPolicy,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        retry_as: Callable[[HttpReply], RetryAs | None] = _never,
        describe: Callable[[HttpReply], str] = _nothing,
        retry_after: Callable[[HttpReply], float | None] = retry_after_header,
        refusal: Callable[[HttpReply], Refusal | None] = _not_final,
        account_refusal: Callable[[HttpReply], bool] = _not_account,
        may_have_taken: Callable[[HttpReply], bool] = _never_taken,
        suppress_tracing: bool = False,
    ) -> None:
        self._transport: HttpTransport = (
            AiohttpTransport(http, retry, suppress_tracing)
            if isinstance(http, aiohttp.ClientSession)
            else http.transport(retry)
        )
        self.provider = provider
        self._retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._retry_as = retry_as
        self._describe = describe
        self._retry_after = retry_after
        self._refusal = refusal
        self._account_refusal = account_refusal
        self._may_have_taken = may_have_taken
        self._circuit = ConnectCircuit(retry, self._rng, provider, answering=True)
        self._logs = AttemptLogs(provider)

    async def exchange(self, request: HttpRequest) -> Exchange:
        timer = AttemptTimer(self.provider)
        return timer.ended(await self._attempts(request, timer))

    async def _attempts(self, request: HttpRequest, timer: AttemptTimer) -> Exchange:
        """Each attempt timed by `timer` (`start`, and `retried` for one tried again); the last is the caller's."""
        provider = self.provider
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            paced = False  # not reached: the connector's circuit paces the next attempt
            try:
                reply = await self._reach(request, timer)
            except _Unreachable as exc:
                if exc.outage is not None:
                    return self._given_up(exc.outage, attempt if exc.tried else attempt - 1)
                code, what, paced = "CONNECTION_FAILED", f"could not connect to {provider}", True
            except BlockedAddress:
                return Exchange(
                    SendStatus.FAILED,
                    attempt,
                    None,
                    "BLOCKED_ADDRESS",
                    f"{provider} URL reaches a non-public address",
                )
            except UntrustedCertificate:
                return Exchange(
                    SendStatus.FAILED, attempt, None, "CONNECTION_FAILED", f"{provider} TLS certificate not trusted"
                )
            except InvalidRequest as exc:
                what = f"{provider} {exc.part} is not valid"
                return Exchange(SendStatus.FAILED, attempt, None, "INVALID_REQUEST", what)
            except MaybeSent as exc:
                self._logs.not_resent(exc.cause)
                return Exchange(
                    SendStatus.OUTCOME_UNKNOWN,
                    attempt,
                    None,
                    "OUTCOME_UNKNOWN",
                    f"the request may have reached {provider} ({exc.cause}); not resent",
                )
            else:
                # Only a whole body is read for a provider's code: a cut one is judged by its status.
                refused = self._refusal(reply) if reply.body_complete else None
                if refused is not None:
                    return Exchange(
                        SendStatus.FAILED,
                        attempt,
                        reply,
                        refused.error_code,
                        refused.error_message,
                        self._account_refusal(reply),
                    )
                retry_as = self._retry_kind(reply)
                if retry_as == "SERVER_ERROR" and reply.status >= 500 and self._may_have_taken(reply):
                    self._logs.not_resent(
                        f"HTTP {reply.status}", "answered a server error it may give after taking the request"
                    )
                    return Exchange(
                        SendStatus.OUTCOME_UNKNOWN,
                        attempt,
                        reply,
                        "OUTCOME_UNKNOWN",
                        f"{provider} answered HTTP {reply.status}, which it may give after taking the request; "
                        "not resent",
                    )
                # A 429's status line says the request went unprocessed (RFC 6585): its body, broken off
                # or not, changes nothing. Any other reply that broke off is judged as it is.
                if retry_as is None or not (reply.body_complete or reply.status == 429):
                    return self._judge(reply, attempt, retryable=retry_as is not None)
                code = retry_as
                if code == "RATE_LIMITED":
                    what = f"rate limited by {provider}"
                elif reply.status >= 500:
                    what = f"{provider} answered HTTP {reply.status}"
                else:
                    what = f"{provider} reported a server error (HTTP {reply.status})"
                retry_after = self._retry_after(reply)
                limit = self._retry.max_retry_after_seconds
                if retry_after is not None and retry_after > limit:
                    return Exchange(
                        SendStatus.FAILED,
                        attempt,
                        reply,
                        code,
                        f"{what}; asked to wait {retry_after:.0f}s, longer than the {limit:.0f}s we wait",
                    )
            if attempt > self._retry.max_retries:
                return Exchange(SendStatus.FAILED, attempt, None, code, f"{what} after {attempt} attempts")
            timer.retried()
            if paced:
                continue
            # A Retry-After of no wait (0, a date already past) would spend every retry at once: backoff then.
            delay = retry_after if retry_after else self._retry.delay(attempt, self._rng)
            self._logs.retrying(attempt, code, delay)
            await self._sleep(delay)

    async def _reach(self, request: HttpRequest, timer: AttemptTimer) -> HttpReply:
        """One attempt, through the connector's circuit: raises _Unreachable when the provider was not
        reached (and once it is given up on, without trying)."""
        try:
            return await self._circuit.attempt(self._sleep, lambda beside: self._try(request, timer, beside))
        except GivenUp as given_up:
            raise _Unreachable(given_up.outage, tried=False) from None

    async def _try(self, request: HttpRequest, timer: AttemptTimer, side_by_side: bool) -> HttpReply:
        timer.start()  # the attempt starts now, not while it waited for its turn
        try:
            reply = await self._transport.fetch(request)
        except NotSent:
            what = f"could not connect to {self.provider}"
            raise _Unreachable(self._circuit.failed("CONNECTION_FAILED", what, side_by_side=side_by_side)) from None
        except (MaybeSent, UntrustedCertificate):
            self._circuit.opened()  # a connection was made: the provider is there
            raise
        self._circuit.opened()
        return reply

    def _given_up(self, outage: Outage, attempts: int) -> Exchange:
        """A request whose provider was given up on: failed with the outage's code, unsent, so released
        for a re-run."""
        if attempts:
            return Exchange(SendStatus.FAILED, attempts, None, outage.code, outage.text)
        return Exchange(
            SendStatus.FAILED,
            0,
            None,
            outage.code,
            f"not attempted: {self.provider} could not be reached through the connector ({outage.text}); "
            "not sent, a re-run sends it",
        )

    def _retry_kind(self, reply: HttpReply) -> RetryAs | None:
        """How a reply is tried again, or None when it is final. Asked once per reply."""
        if reply.status == 429:
            return "RATE_LIMITED"
        retry_as = self._retry_as(reply)
        if retry_as is None and reply.status >= 500:
            return "SERVER_ERROR"
        return retry_as

    def _judge(self, reply: HttpReply, attempt: int, *, retryable: bool) -> Exchange:
        """The final verdict on a reply that is not tried again: a final one, or a retryable one cut short."""
        status = reply.status
        refused = 300 <= status < 500 and not retryable
        if not reply.body_complete and not refused:
            # The reply broke off mid-body: a 2xx may still hold the verdict (gateways answer 200 with a
            # per-message status) and a 5xx may have been processed. Either way, do not resend.
            return Exchange(
                SendStatus.OUTCOME_UNKNOWN,
                attempt,
                reply,
                "OUTCOME_UNKNOWN",
                f"the reply from {self.provider} broke off (HTTP {status}); not resent",
            )
        if 200 <= status < 300:
            return Exchange(SendStatus.SENT, attempt, reply)
        detail = self._describe(reply) if reply.body_complete else ""
        suffix = f", {detail}" if detail else ""
        return Exchange(
            SendStatus.FAILED,
            attempt,
            reply,
            f"HTTP_{status}",
            f"{self.provider} refused the request (HTTP {status}{suffix})",
            refused and reply.body_complete and self._account_refusal(reply),
        )


class AiohttpTransport:
    """Attempts through an aiohttp session, its exceptions sorted into the ones `HttpSender` knows."""

    def __init__(self, http: aiohttp.ClientSession, retry: RetryPolicy, suppress_tracing: bool = False) -> None:
        self._http = http
        self._suppress_tracing = suppress_tracing
        # One timer per request bounds the whole exchange. A per-read timer (sock_read) is moved on
        # every chunk received: about a tenth of each small request's cost, measured.
        self._timeout = aiohttp.ClientTimeout(
            total=retry.connect_timeout_seconds + retry.read_timeout_seconds,
            connect=retry.connect_timeout_seconds,
        )

    async def fetch(self, request: HttpRequest) -> HttpReply:
        try:
            if not self._suppress_tracing:
                return await self._request(request)
            with suppress_http_instrumentation():
                return await self._request(request)
        except BlockedAddress:
            raise
        except aiohttp.ClientConnectorCertificateError:
            raise UntrustedCertificate from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            # Refused, unresolvable or never connected: the request did not leave.
            raise NotSent from None
        except aiohttp.InvalidURL:
            raise InvalidRequest("URL") from None
        except ValueError:
            # aiohttp checks headers and URL while building the request, before writing anything.
            raise InvalidRequest("request") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MaybeSent(type(exc).__name__) from None

    async def _request(self, request: HttpRequest) -> HttpReply:
        async with self._http.request(
            request.method,
            request.url,
            headers=request.headers,
            data=request.body,
            timeout=self._timeout,
            allow_redirects=False,
        ) as response:
            # A compressed body's Content-Length says nothing of what it inflates to: read those in
            # chunks, which aiohttp inflates a bounded piece at a time, counted against the cap.
            length = None if response.headers.get("Content-Encoding") else response.content_length
            body, complete = await read_capped(
                length,
                response.read,
                lambda: response.content.read(64 * 1024),
                (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError),
            )
            return HttpReply(response.status, response.headers, body, complete)


async def read_capped(
    length: int | None,
    read_whole: Callable[[], Awaitable[bytes]],
    read_chunk: Callable[[], Awaitable[bytes | None]],
    broken: tuple[type[BaseException], ...],
) -> tuple[bytes, bool]:
    """Up to MAX_REPLY_BYTES of a reply's body, whichever client reads it.

    `length` is the declared Content-Length; a small declared reply is read in one go (the client
    checks the length it gets), any other in chunks until the cap. `read_chunk` returns nothing at
    the end. `complete` is False when one of the `broken` errors cut the body short.
    """
    chunks: list[bytes] = []
    try:
        if length is not None and length <= MAX_REPLY_BYTES:
            return bytes(await read_whole()), True
        size = 0
        while size < MAX_REPLY_BYTES:
            chunk = await read_chunk()
            if not chunk:
                break
            chunks.append(bytes(chunk))
            size += len(chunk)
    except broken:
        return b"".join(chunks), False
    return b"".join(chunks)[:MAX_REPLY_BYTES], True
