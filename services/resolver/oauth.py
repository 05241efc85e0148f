"""OAuth 2.0 client-credentials tokens for PII APIs.

Tokens live only in process memory, are reused until shortly before they
expire, and are refreshed once at a time per config: every caller that needs a
token meanwhile waits for that refresh instead of storming the token endpoint,
each only until its own deadline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote_plus

import aiohttp
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.http_bodies import read_at_most
from libs.json_documents import parse
from libs.netguard import BlockedAddress, check_literal_host
from libs.per_object import PerObject
from libs.store import STORE_ERRORS
from libs.tasks import stop_task
from services.resolver.configs import OAuthConfigStore

log = logging.getLogger(__name__)
# Tokens kept, one per token endpoint, client and scope: a rotated secret leaves the old one behind.
TOKENS_KEPT = 1024

TOKEN_TIMEOUT_S = 10.0
# A token reply is a few hundred bytes; a larger one is not read into memory.
MAX_TOKEN_REPLY_BYTES = 64 * 1024
# Visible ASCII: every RFC 6750 b64token; a control character or line break cannot go into a header.
_HEADER_SAFE_TOKEN = re.compile(r"[\x21-\x7e]+")


class TokenUnavailable(Exception):
    """The token endpoint did not issue a token; `reason` is safe to show. `late`: not a failure of the
    endpoint's, but the caller's deadline coming before its answer."""

    def __init__(self, reason: str, *, late: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.late = late


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
    ) -> None:
        self._session = session
        self._store = store
        self._allow_private = allow_private
        self._clock = clock
        self._tokens: OrderedDict[str, _Token] = OrderedDict()
        self._fingerprint = PerObject(_fingerprint)  # a hash per call was 3 µs of every lookup
        # Per token key, the refresh in flight: a task of its own, so a caller that stops waiting for it
        # does not cancel it for the others, and the token it gets serves the callers after them.
        self._refreshes: dict[str, asyncio.Task[str]] = {}
        self._known_status: dict[tuple[str, str], int] = {}  # last noted here: a failure is logged once
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
                    raise TokenUnavailable(f"token endpoint answered HTTP {response.status}")
                body = await read_at_most(response.content, MAX_TOKEN_REPLY_BYTES)
        except BlockedAddress:
            raise TokenUnavailable("token endpoint is on a private network") from None
        except TimeoutError:
            raise TokenUnavailable("token endpoint timed out") from None
        except aiohttp.ClientError as exc:
            raise TokenUnavailable(f"token endpoint unreachable ({type(exc).__name__})") from None
        if len(body) > MAX_TOKEN_REPLY_BYTES:
            raise TokenUnavailable(f"token endpoint reply is larger than {MAX_TOKEN_REPLY_BYTES} bytes")
        try:
            payload = parse(body)
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
            lifetime = max(float(expires_in), 0.0)
        except (TypeError, ValueError):
            lifetime = 3600.0
        if not math.isfinite(lifetime):  # NaN would never compare as due: a new token on every call
            lifetime = 3600.0
        return token, lifetime

    def remember(self, config: pb.OAuthConfig, token: str, lifetime: float) -> None:
        # Refresh a little before expiry: 10% of the lifetime, at most a minute.
        margin = min(60.0, lifetime * 0.1)
        key = self._fingerprint(config)
        self._tokens[key] = _Token(token, self._clock() + lifetime - margin)
        self._tokens.move_to_end(key)
        while len(self._tokens) > TOKENS_KEPT:  # a rotated secret or scope leaves its old token behind
            self._tokens.popitem(last=False)

    async def token(self, config: pb.OAuthConfig, rejected: str | None = None, wait: float | None = None) -> str:
        """A valid token; `rejected` is one the PII API just refused (forces a refresh). A refresh is
        waited for at most `wait` seconds (the caller's time left; None: as long as it takes)."""
        key = self._fingerprint(config)
        cached = self._tokens.get(key)
        if cached and cached.value != rejected and self._clock() < cached.refresh_at:
            return cached.value
        until = None if wait is None else asyncio.get_running_loop().time() + wait
        joined = self._refreshes.get(key)
        token = await self._wait_for(joined or self._refresh(key, config), until)
        if joined is not None and token == rejected:
            # A refresh that went out before the PII API refused this token fetched that token again.
            token = await self._wait_for(self._refreshes.get(key) or self._refresh(key, config), until)
        return token

    async def close(self) -> None:
        """At shutdown, before the HTTP session and Redis close: the refreshes in flight stop, rather
        than failing on a closed session and writing a Failed status they did not earn."""
        for refresh in list(self._refreshes.values()):
            await stop_task(refresh, "an OAuth token refresh")

    def _refresh(self, key: str, config: pb.OAuthConfig) -> asyncio.Task[str]:
        refresh = asyncio.create_task(self._fetch(key, config))
        self._refreshes[key] = refresh

        def done(task: asyncio.Task[str]) -> None:
            if self._refreshes.get(key) is task:
                del self._refreshes[key]
            if not task.cancelled():
                task.exception()  # seen: every caller may have stopped waiting, and asyncio would log it

        refresh.add_done_callback(done)
        return refresh

    async def _fetch(self, key: str, config: pb.OAuthConfig) -> str:
        """One token request and what it leaves behind: the token kept and the config's status stored.
        Its failure is every waiting caller's answer: not one more request each to a failing endpoint."""
        try:
            token, lifetime = await self.request_token(config)
        except TokenUnavailable as exc:
            self._tokens.pop(key, None)
            await self._note_status(config, pb.TOKEN_STATUS_FAILED, exc.reason)
            raise
        self.remember(config, token, lifetime)
        await self._note_status(config, pb.TOKEN_STATUS_ACTIVE, "")
        return token

    @staticmethod
    async def _wait_for(refresh: asyncio.Task[str], until: float | None) -> str:
        """The refresh's token or failure; a caller whose time runs out first (`until`, in loop time)
        stops waiting, and its deadline is its own: not the config's status, nor the other waiters'
        answer."""
        try:
            async with asyncio.timeout_at(until):
                return await asyncio.shield(refresh)
        except TimeoutError:
            if refresh.done():  # the refresh's own outcome, at the same moment
                return refresh.result()
            raise TokenUnavailable("token endpoint did not answer before the caller's deadline", late=True) from None

    async def _note_status(self, config: pb.OAuthConfig, status: int, reason: str) -> None:
        # Written after every token request, not only when this process saw the status change: a save
        # of the config, or another replica, may have changed the stored status since. A request per
        # token lifetime (or per failed attempt) makes this write no load of its own.
        ident = (config.workspace_id, config.oauth_config_id)
        try:
            await self._store.set_status(config.workspace_id, config.oauth_config_id, status, reason)
        except STORE_ERRORS as exc:
            # The status is what the config screen shows: a call goes on with the token it has.
            log.warning("OAuth config %s/%s: status not stored (%s)", *ident, type(exc).__name__)
        if self._known_status.get(ident) != status and status == pb.TOKEN_STATUS_FAILED:
            log.warning("OAuth config %s/%s failed: %s", *ident, reason)
        self._known_status[ident] = status
