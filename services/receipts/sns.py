"""SNS signing certificates and subscription confirmations (SES events arrive through SNS).

Certificates are fetched over https from an SNS host only (the URL is checked
before any request), trusted through the TLS connection (`sns_ca_file`, or the
system's CAs) and, when `sns_signing_ca_file` is set, also by their issuer.
Each is fetched once and kept in a small LRU cache until it expires.

Anyone who knows an SES connector's webhook path can name any `.pem` on an SNS host, so fetches must not
hold the intake: requests for one URL share its fetch, at most `MAX_FETCHES_IN_FLIGHT` URLs are fetched at
once (a request that would wait for one is answered 503 at once, and SNS sends again), and a URL whose
fetch failed is refused without fetching for `FAILED_FETCH_SECONDS`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.http_bodies import read_at_most
from libs.logs import LogThrottle
from libs.settings import ReceiptsSettings
from services.receipts.errors import SignatureInvalid, UpstreamUnavailable
from services.receipts.verification import check_sns_url

log = logging.getLogger(__name__)

MAX_CERTIFICATE_BYTES = 64 * 1024
# SNS signs with one certificate per region, renewed about yearly: a few fetches at once are plenty.
MAX_FETCHES_IN_FLIGHT = 4
# Under SNS's default delivery policy's 20 s between attempts, so a failure that passes is tried again
# on SNS's next attempt; the same made-up URL posted again meanwhile is not fetched again.
FAILED_FETCH_SECONDS = 10.0
FAILED_URLS_KEPT = 256
LOG_SECONDS = 60.0
# What verify_directly_issued_by raises: other issuer name, unsupported key, bad signature.
_NOT_ISSUED_BY = (ValueError, TypeError, InvalidSignature)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Trust for fetching SNS URLs: the given CA bundle, else certifi's when installed, else the system's."""
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def load_trusted_issuers(ca_file: str | None) -> list[x509.Certificate]:
    if not ca_file:
        return []
    with open(ca_file, "rb") as handle:  # read once at startup
        return x509.load_pem_x509_certificates(handle.read())


def _issued_by_trusted(chain: list[x509.Certificate], trusted: list[x509.Certificate]) -> bool:
    """Walks from the leaf through the PEM's own intermediates to a trusted issuer (a few hops at most)."""
    current, pool = chain[0], chain[1:]
    for _ in range(4):
        for issuer in trusted:
            try:
                current.verify_directly_issued_by(issuer)
                return True
            except _NOT_ISSUED_BY:
                continue
        for candidate in pool:
            try:
                current.verify_directly_issued_by(candidate)
            except _NOT_ISSUED_BY:
                continue
            pool = [c for c in pool if c is not candidate]
            current = candidate
            break
        else:
            return False
    return False


class SnsCertificates:
    """Fetches, checks and caches SNS signing certificates by URL."""

    failures_kept = FAILED_URLS_KEPT

    def __init__(
        self,
        settings: ReceiptsSettings,
        http: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._clock = clock
        self._host_pattern = re.compile(settings.sns_cert_host_pattern)
        self._tls = tls_context(settings.sns_ca_file)
        self._issuers = load_trusted_issuers(settings.sns_signing_ca_file)
        self._timeout = aiohttp.ClientTimeout(total=settings.sns_fetch_timeout_seconds)
        self._capacity = settings.sns_cert_cache_size
        self._cache: OrderedDict[str, tuple[rsa.RSAPublicKey, datetime.datetime]] = OrderedDict()
        # URL -> the fetch in flight, shared by every request for that URL; a task, so that a requester
        # going away does not cancel the fetch the others wait for.
        self._fetching: dict[str, asyncio.Task[rsa.RSAPublicKey]] = {}
        # URL -> (until, the error to raise again): recent failures, oldest first.
        self._failed: OrderedDict[str, tuple[float, type[SignatureInvalid | UpstreamUnavailable], str]] = OrderedDict()
        # Anyone may name a certificate URL: its failures are logged a line a minute (per HTTP status).
        self._busy_logs = LogThrottle(LOG_SECONDS, clock=clock)
        self._fetch_logs = LogThrottle(LOG_SECONDS, clock=clock)

    @property
    def host_pattern(self) -> re.Pattern[str]:
        return self._host_pattern

    def _cached(self, url: str) -> rsa.RSAPublicKey | None:
        entry = self._cache.get(url)
        if entry is None:
            return None
        key, not_after = entry
        if not_after <= datetime.datetime.now(datetime.UTC):
            del self._cache[url]
            return None
        self._cache.move_to_end(url)
        return key

    def failures_remembered(self) -> int:
        return len(self._failed)

    def _refuse_if_failed_recently(self, url: str) -> None:
        entry = self._failed.get(url)
        if entry is None:
            return
        until, error, message = entry
        if until <= self._clock():
            del self._failed[url]
            return
        raise error(message)

    def _remember_failure(self, url: str, exc: SignatureInvalid | UpstreamUnavailable) -> None:
        self._failed.pop(url, None)
        self._failed[url] = (self._clock() + FAILED_FETCH_SECONDS, type(exc), exc.message)
        while len(self._failed) > self.failures_kept:
            self._failed.popitem(last=False)

    def _refuse_busy(self) -> UpstreamUnavailable:
        """All fetch slots taken (by certificates nobody has asked for before): answered at once, not queued."""
        held = self._busy_logs.due()
        if held is not None:
            log.warning(
                "SNS certificate fetches refused while %d are in flight (%d more since the last warning): "
                "SigningCertURLs not seen before are arriving faster than they can be fetched",
                len(self._fetching),
                held,
            )
        return UpstreamUnavailable("SNS signing certificates are being fetched; send the message again later")

    async def public_key(self, url: object) -> rsa.RSAPublicKey:
        checked = check_sns_url(url, self._host_pattern, certificate=True, field="SigningCertURL")
        key = self._cached(checked)
        if key is not None:
            return key
        fetch = self._fetching.get(checked)
        if fetch is None:
            self._refuse_if_failed_recently(checked)
            if len(self._fetching) >= MAX_FETCHES_IN_FLIGHT:
                raise self._refuse_busy()
            fetch = asyncio.get_running_loop().create_task(self._fetch_and_cache(checked))
            self._fetching[checked] = fetch
            fetch.add_done_callback(lambda done: self._fetch_done(checked, done))
        # Shielded: one requester cancelled (its client went away) leaves the fetch to the others.
        return await asyncio.shield(fetch)

    def _fetch_done(self, url: str, fetch: asyncio.Task[rsa.RSAPublicKey]) -> None:
        if self._fetching.get(url) is fetch:
            del self._fetching[url]
        if not fetch.cancelled():
            fetch.exception()  # retrieved here too: every requester may have gone away

    async def _fetch_and_cache(self, url: str) -> rsa.RSAPublicKey:
        try:
            pem = await self._fetch(url)
            key, not_after = self._check_certificate(pem)
        except (SignatureInvalid, UpstreamUnavailable) as exc:
            self._remember_failure(url, exc)
            raise
        self._failed.pop(url, None)
        self._cache[url] = (key, not_after)
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        log.info("SNS signing certificate fetched and cached (%d cached)", len(self._cache))
        return key

    async def _fetch(self, url: str) -> bytes:
        if self._http.closed:  # shutting down: 503, and the provider sends again to a process that is not stopping
            raise UpstreamUnavailable("SNS signing certificate could not be fetched")
        try:
            async with self._http.get(url, ssl=self._tls, timeout=self._timeout, allow_redirects=False) as reply:
                if reply.status != 200:
                    if (held := self._fetch_logs.due(reply.status)) is not None:
                        log.warning(
                            "SNS certificate fetch answered HTTP %d (%d more since the last line)", reply.status, held
                        )
                    raise UpstreamUnavailable("SNS signing certificate could not be fetched")
                data = await read_at_most(reply.content, MAX_CERTIFICATE_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if (held := self._fetch_logs.due(type(exc).__name__)) is not None:
                log.warning("SNS certificate fetch failed: %s (%d more since the last line)", type(exc).__name__, held)
            raise UpstreamUnavailable("SNS signing certificate could not be fetched") from None
        if len(data) > MAX_CERTIFICATE_BYTES:
            raise SignatureInvalid("SNS signing certificate is too large")
        return data

    def _check_certificate(self, pem: bytes) -> tuple[rsa.RSAPublicKey, datetime.datetime]:
        try:
            chain = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise SignatureInvalid("SNS signing certificate is not a PEM certificate") from None
        leaf = chain[0]
        now = datetime.datetime.now(datetime.UTC)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise SignatureInvalid("SNS signing certificate is not valid now")
        key = leaf.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SignatureInvalid("SNS signing certificate does not hold an RSA key")
        if self._issuers and not _issued_by_trusted(chain, self._issuers):
            raise SignatureInvalid("SNS signing certificate is not issued by a trusted CA")
        return key, leaf.not_valid_after_utc

    async def confirm_subscription(self, subscribe_url: object) -> None:
        """GETs SubscribeURL (same host rules as certificates, any path): SNS then starts delivering."""
        checked = check_sns_url(subscribe_url, self._host_pattern, certificate=False, field="SubscribeURL")
        if self._http.closed:
            raise UpstreamUnavailable("SNS subscription could not be confirmed")
        try:
            async with self._http.get(checked, ssl=self._tls, timeout=self._timeout, allow_redirects=False) as reply:
                await reply.content.read(MAX_CERTIFICATE_BYTES)
                status = reply.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("SNS subscription confirmation failed: %s", type(exc).__name__)
            raise UpstreamUnavailable("SNS subscription could not be confirmed") from None
        if status != 200:
            log.warning("SNS subscription confirmation answered HTTP %d", status)
            raise UpstreamUnavailable("SNS subscription could not be confirmed")
