"""OAuth 2.0 client-credentials tokens for PII APIs.

Tokens live only in process memory, are reused until shortly before they
expire, and are refreshed once at a time per config: every caller that needs a
token meanwhile waits for that refresh instead of storming the token endpoint,
each only until its own deadline. A refresh the endpoint fails for a while (a
5xx, 429, 408, a timeout, a refused connection) is retried as the PII API's own
calls are: the config's max_retries, full jitter or Retry-After, no retry its
callers' deadlines leave no time for.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import quote_plus

import aiohttp
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.backoff import full_jitter_delay, parse_retry_after
from libs.http_bodies import read_at_most
from libs.json_documents import MAX_DEPTH, NestedTooDeeply, parse
from libs.netguard import BlockedAddress, check_literal_host
from libs.per_object import PerObject
from libs.settings import ResolverSettings
from libs.store import STORE_ERRORS
from libs.tasks import stop_task
from services.resolver.configs import OAuthConfigStore

log = logging.getLogger(__name__)
# Tokens kept, one per token endpoint, client and scope: a rotated secret leaves the old one behind.
TOKENS_KEPT = 1024
# Configs whose last status and short expires_in this process remembers, to log each once: past it the
# least recently noted are forgotten (at worst logged once more), as configs created and deleted come and go.
CONFIGS_NOTED = 1024

TOKEN_TIMEOUT_S = 10.0
# A token reply is a few hundred bytes; a larger one is not read into memory.
MAX_TOKEN_REPLY_BYTES = 64 * 1024
# Visible ASCII: every RFC 6750 b64token; a control character or line break cannot go into a header.
_HEADER_SAFE_TOKEN = re.compile(r"[\x21-\x7e]+")
# The least a retry of the token endpoint is given before the caller's deadline: below it, it would only time out.
MIN_TOKEN_ATTEMPT_SECONDS = 0.05
# The least a token is kept: an endpoint answering expires_in 0, negative or a few seconds would otherwise
# be asked on every PII API call (and the config's status written each time). A token the API refuses
# sooner is refreshed on its 401, as any is.
MIN_TOKEN_LIFETIME_SECONDS = 30.0

E = pb.ResolveErrorCode
V = TypeVar("V")


class TokenUnavailable(Exception):
    """The token endpoint did not issue a token; `reason` is safe to show, `code` is each ID's error.
    `late`: not the endpoint's last word, but the caller's deadline coming before it. `retryable`: the
    endpoint may answer the same request later (`retry_after`, seconds, when it said when)."""

    def __init__(
        self,
        reason: str,
        *,
        code: int = E.RESOLVE_ERROR_CODE_AUTH_FAILED,
        late: bool = False,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.late = late
        self.retryable = retryable
        self.retry_after = retry_after

    def noting(self, why: str) -> TokenUnavailable:
        """The same failure, final, its reason followed by `why` (how many attempts, why no other)."""
        return TokenUnavailable(self.reason + why, code=self.code, late=self.late)


def _refused_with(status: int, retry_after: str | None) -> TokenUnavailable:
    """A token endpoint's answer other than 200: only 400, 401 and 403 say the credentials (or the
    scope, the grant) are wrong; a 5xx, 429 or 408 is the endpoint unavailable for now."""
    reason = f"token endpoint answered HTTP {status}"
    if status in (400, 401, 403):
        return TokenUnavailable(reason, code=E.RESOLVE_ERROR_CODE_AUTH_FAILED)
    wait = parse_retry_after(retry_after)
    if status == 429:
        return TokenUnavailable(reason, code=E.RESOLVE_ERROR_CODE_RATE_LIMITED, retryable=True, retry_after=wait)
    if status == 408:
        return TokenUnavailable(reason, code=E.RESOLVE_ERROR_CODE_TIMEOUT, retryable=True, retry_after=wait)
    if status >= 500:
        return TokenUnavailable(reason, code=E.RESOLVE_ERROR_CODE_SERVER_ERROR, retryable=True, retry_after=wait)
    return TokenUnavailable(reason, code=E.RESOLVE_ERROR_CODE_HTTP_ERROR)  # a 404 or a redirect: check token_url


@dataclass(frozen=True)
class TokenBackoff:
    """How a failed token request is retried: as the PII API's calls are."""

    base_s: float = 0.5
    cap_s: float = 5.0
    max_retry_after_s: float = 30.0

    @classmethod
    def of(cls, settings: ResolverSettings) -> TokenBackoff:
        return cls(
            settings.pii_retry_base_ms / 1000, settings.pii_retry_max_ms / 1000, settings.pii_max_retry_after_seconds
        )


@dataclass(eq=False)
class _Refresh:
    """A token request with its retries, shared by every caller that needs the token meanwhile."""

    # The latest of its callers' deadlines, in loop time (None: one waits as long as it takes): a retry
    # that cannot answer before it is not made.
    until: float | None
    failure: TokenUnavailable | None = None  # the last attempt's, while a retry is to come
    attempts: int = 0
    task: asyncio.Task[str] = field(init=False)

    def wanted_until(self, until: float | None) -> None:
        self.until = None if until is None or self.until is None else max(self.until, until)


@dataclass
class _Token:
    value: str
    refresh_at: float


def _fingerprint(config: pb.OAuthConfig) -> str:
    parts = [config.token_url, config.client_id, config.client_secret, config.scope, config.audience]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


class OAuthTokens:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        store: OAuthConfigStore,
        allow_private: bool,
        clock: Callable[[], float] = time.monotonic,
        backoff: TokenBackoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._store = store
        self._allow_private = allow_private
        self._clock = clock
        self._backoff = backoff or TokenBackoff()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._tokens: OrderedDict[str, _Token] = OrderedDict()
        self._fingerprint = PerObject(_fingerprint)  # a hash per call was 3 µs of every lookup
        # Per token key, the refresh in flight: a task of its own, so a caller that stops waiting for it
        # does not cancel it for the others, and the token it gets serves the callers after them.
        self._refreshes: dict[str, _Refresh] = {}
        # Per (workspace, config): the status last noted here (a failure is logged once), and whether its
        # short expires_in was logged; at most CONFIGS_NOTED each, and a config deleted here is dropped.
        self._known_status: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._odd_lifetimes: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.requests = 0  # token endpoint calls made, for tests and metrics

    async def request_token(self, config: pb.OAuthConfig) -> tuple[str, float]:
        """One call to the token endpoint: (access token, lifetime in seconds)."""
        self.requests += 1
        credentials = f"{quote_plus(config.client_id)}:{quote_plus(config.client_secret)}"
        headers = {
            "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode(),
            "Accept": "application/json",
        }
        form = {"grant_type": "client_credentials"}
        if config.scope:
            form["scope"] = config.scope
        if config.audience:
            form["audience"] = config.audience
        try:
            check_literal_host(config.token_url, self._allow_private)
            async with self._session.post(
                config.token_url,
                data=form,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=TOKEN_TIMEOUT_S),
                allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise _refused_with(response.status, response.headers.get("Retry-After"))
                body = await read_at_most(response.content, MAX_TOKEN_REPLY_BYTES)
        except BlockedAddress:
            raise TokenUnavailable(
                "token endpoint is on a private network", code=E.RESOLVE_ERROR_CODE_BLOCKED_URL
            ) from None
        except TimeoutError:
            raise TokenUnavailable(
                "token endpoint timed out", code=E.RESOLVE_ERROR_CODE_TIMEOUT, retryable=True
            ) from None
        except (aiohttp.InvalidURL, UnicodeError):
            # A host the client cannot encode, in a config saved before such URLs were refused: asked again,
            # it is refused the same, and the endpoint was never reached.
            raise TokenUnavailable(
                "token endpoint URL names a host the HTTP client cannot use; save the OAuth config's token_url again",
                code=E.RESOLVE_ERROR_CODE_CONNECTION_FAILED,
            ) from None
        except aiohttp.ClientError as exc:
            raise TokenUnavailable(
                f"token endpoint unreachable ({type(exc).__name__})",
                code=E.RESOLVE_ERROR_CODE_CONNECTION_FAILED,
                retryable=True,
            ) from None
        if len(body) > MAX_TOKEN_REPLY_BYTES:
            raise TokenUnavailable(f"token endpoint reply is larger than {MAX_TOKEN_REPLY_BYTES} bytes")
        try:
            payload = parse(body)
        except NestedTooDeeply:
            raise TokenUnavailable(f"token endpoint reply is JSON nested deeper than {MAX_DEPTH:,} levels") from None
        except ValueError:
            raise TokenUnavailable("token endpoint reply is not JSON") from None
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token:
            raise TokenUnavailable("token endpoint reply has no access_token")
        if not _HEADER_SAFE_TOKEN.fullmatch(token):
            # A line break or control character cannot go into the Authorization header; cached, such a
            # token would fail every call until it expired.
            raise TokenUnavailable("token endpoint issued an access_token with characters a header cannot carry")
        token_type = payload.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenUnavailable("token endpoint issued a non-Bearer token")
        expires_in = payload.get("expires_in", 3600)
        try:
            lifetime = float(expires_in)
        except (TypeError, ValueError):
            lifetime = 3600.0
        if not math.isfinite(lifetime):  # NaN would never compare as due: a new token on every call
            lifetime = 3600.0
        if lifetime < MIN_TOKEN_LIFETIME_SECONDS:
            ident = (config.workspace_id, config.oauth_config_id)
            if ident not in self._odd_lifetimes:
                _noted(self._odd_lifetimes, ident, None)
                log.warning(
                    "OAuth config %s/%s: token endpoint gave expires_in %g; each token is kept %g s "
                    "(refreshed sooner on a 401)",
                    *ident,
                    lifetime,
                    MIN_TOKEN_LIFETIME_SECONDS,
                )
            lifetime = MIN_TOKEN_LIFETIME_SECONDS
        return token, lifetime

    def remember(self, config: pb.OAuthConfig, token: str, lifetime: float) -> None:
        # Refresh a little before expiry: 10% of the lifetime, at most a minute.
        margin = min(60.0, lifetime * 0.1)
        key = self._fingerprint(config)
        self._tokens[key] = _Token(token, self._clock() + lifetime - margin)
        self._tokens.move_to_end(key)
        while len(self._tokens) > TOKENS_KEPT:  # a rotated secret or scope leaves its old token behind
            self._tokens.popitem(last=False)

    def forget(self, workspace_id: str, oauth_config_id: str) -> None:
        """A deleted config: what was noted of it goes (one saved again under its ID starts afresh)."""
        ident = (workspace_id, oauth_config_id)
        self._known_status.pop(ident, None)
        self._odd_lifetimes.pop(ident, None)

    async def token(
        self, config: pb.OAuthConfig, rejected: str | None = None, wait: float | None = None, retries: int = 0
    ) -> str:
        """A valid token; `rejected` is one the PII API just refused (forces a refresh). A refresh is
        waited for at most `wait` seconds (the caller's time left; None: as long as it takes); one this
        call starts retries a failure the endpoint may get over at most `retries` times."""
        key = self._fingerprint(config)
        cached = self._tokens.get(key)
        if cached and cached.value != rejected and self._clock() < cached.refresh_at:
            return cached.value
        until = None if wait is None else asyncio.get_running_loop().time() + wait
        joined = key in self._refreshes
        token = await self._wait_for(self._refresh_for(key, config, until, retries), until)
        if joined and token == rejected:
            # A refresh that went out before the PII API refused this token fetched that token again.
            token = await self._wait_for(self._refresh_for(key, config, until, retries), until)
        return token

    async def close(self) -> None:
        """At shutdown, before the HTTP session and Redis close: the refreshes in flight stop, rather
        than failing on a closed session and writing a Failed status they did not earn."""
        for refresh in list(self._refreshes.values()):
            await stop_task(refresh.task, "an OAuth token refresh")

    def _refresh_for(self, key: str, config: pb.OAuthConfig, until: float | None, retries: int) -> _Refresh:
        """The refresh in flight for `key`, joined (its retries now wait for this caller's deadline too),
        or a new one: a task of its own, so a caller that stops waiting for it does not cancel it for
        the others, and the token it gets serves the callers after them."""
        refresh = self._refreshes.get(key)
        if refresh is not None:
            refresh.wanted_until(until)
            return refresh
        refresh = _Refresh(until)
        refresh.task = asyncio.create_task(self._fetch(key, config, refresh, retries))
        self._refreshes[key] = refresh

        def done(task: asyncio.Task[str]) -> None:
            if self._refreshes.get(key) is refresh:
                del self._refreshes[key]
            if not task.cancelled():
                task.exception()  # seen: every caller may have stopped waiting, and asyncio would log it

        refresh.task.add_done_callback(done)
        return refresh

    async def _fetch(self, key: str, config: pb.OAuthConfig, refresh: _Refresh, retries: int) -> str:
        """A token request with its retries, and what it leaves behind: the token kept and the config's
        status stored, once, at the end. Its failure is every waiting caller's answer: not one more
        request each to a failing endpoint."""
        while True:
            refresh.attempts += 1
            try:
                token, lifetime = await self.request_token(config)
            except TokenUnavailable as exc:
                delay, last = self._retry_delay(exc, refresh, retries)
                if last is not None:
                    self._tokens.pop(key, None)
                    await self._note_status(config, pb.TOKEN_STATUS_FAILED, last.reason)
                    raise last from None
                refresh.failure = exc
                await self._sleep(delay)
                continue
            self.remember(config, token, lifetime)
            await self._note_status(config, pb.TOKEN_STATUS_ACTIVE, "")
            return token

    def _retry_delay(
        self, failure: TokenUnavailable, refresh: _Refresh, retries: int
    ) -> tuple[float, TokenUnavailable | None]:
        """Seconds before the next attempt, as the PII API's own retries wait; or the refresh's failure,
        saying why no other attempt is made."""
        attempts = refresh.attempts
        made = f" after {attempts} attempts" if attempts > 1 else ""
        if not failure.retryable or attempts > retries:
            return 0.0, failure.noting(made)
        if failure.retry_after:  # one of no wait (0, a date past) would spend every retry at once: backoff then
            if failure.retry_after > self._backoff.max_retry_after_s:
                return 0.0, failure.noting(f"{made}; Retry-After {failure.retry_after:.0f}s is beyond the limit")
            delay = failure.retry_after
        else:
            delay = full_jitter_delay(attempts, self._backoff.base_s, self._backoff.cap_s, self._rng)
        until = refresh.until
        if until is not None and until - asyncio.get_running_loop().time() < delay + MIN_TOKEN_ATTEMPT_SECONDS:
            tried = f" after {attempts} attempt{'s' if attempts > 1 else ''}"
            return 0.0, failure.noting(f"{tried}; no time for another before the caller's deadline")
        return delay, None

    @staticmethod
    async def _wait_for(refresh: _Refresh, until: float | None) -> str:
        """The refresh's token or failure; a caller whose time runs out first (`until`, in loop time)
        stops waiting, and its deadline is its own: not the config's status, nor the other waiters'
        answer."""
        try:
            async with asyncio.timeout_at(until):
                return await asyncio.shield(refresh.task)
        except TimeoutError:
            if refresh.task.done():  # the refresh's own outcome, at the same moment
                return refresh.task.result()
            failure = refresh.failure
            if failure is not None:  # the endpoint failed, and is being asked again: it is its failure
                reason = f"{failure.reason}; a retry had not answered by the caller's deadline"
                raise TokenUnavailable(reason, code=failure.code, late=True) from None
            raise TokenUnavailable(
                "token endpoint did not answer before the caller's deadline",
                code=E.RESOLVE_ERROR_CODE_TIMEOUT,
                late=True,
            ) from None

    async def _note_status(self, config: pb.OAuthConfig, status: int, reason: str) -> None:
        # Written after every token request, not only when this process saw the status change: another
        # replica may have changed the stored status since. Not over a save or a deletion made while the
        # request was out, though: the config saved is no longer the one asked with. A request per token
        # lifetime (or per failed attempt) makes this write no load of its own.
        ident = (config.workspace_id, config.oauth_config_id)
        try:
            await self._store.set_status(config.workspace_id, config.oauth_config_id, status, reason, asked_with=config)
        except STORE_ERRORS as exc:
            # The status is what the config screen shows: a call goes on with the token it has.
            log.warning("OAuth config %s/%s: status not stored (%s)", *ident, type(exc).__name__)
        if self._known_status.get(ident) != status and status == pb.TOKEN_STATUS_FAILED:
            log.warning("OAuth config %s/%s failed: %s", *ident, reason)
        _noted(self._known_status, ident, status)


def _noted(noted: OrderedDict[tuple[str, str], V], ident: tuple[str, str], value: V) -> None:
    """`ident` noted (the most recent), the least recent forgotten past CONFIGS_NOTED."""
    noted[ident] = value
    noted.move_to_end(ident)
    while len(noted) > CONFIGS_NOTED:
        noted.popitem(last=False)
