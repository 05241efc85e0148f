"""The HTTP client for providers called once per message (custom gateways, Twilio, WhatsApp).

A campaign of SMS is one provider request per message, so the client's own cost per request
bounds the dispatcher. pyreqwest (Rust's reqwest and hyper) writes each request and parses
its reply on a thread of its own, outside the GIL: measured on the SMS benchmark, the
dispatcher spends about a fifth less CPU per message than through aiohttp, and the event
loop's thread about a third of what aiohttp costs it per request (docs/performance-history.md).
Batched providers (SendGrid, the PII API) keep aiohttp and its tracing.

Name resolution stays ours, so the address guard of every customer URL holds here too: a
host is resolved through `GuardedResolver` (no private address unless allowed) and its
client is pinned to the address checked, so the connection goes where the check looked
even if the name's answer changes in between. The pin is renewed after `dns_ttl_seconds`.
Hosts are read as reqwest reads them (`pyreqwest.http.Url`), so spellings such as
`0x7f.1` or an upper-case or Unicode name are checked as what they connect to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from aiohttp.abc import AbstractResolver
from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import PoolTimeoutError, PyreqwestError
from pyreqwest.http import Url

from libs.netguard import BlockedAddress, GuardedResolver, is_public
from services.dispatcher.connectors.http_retry import (
    HttpReply,
    HttpRequest,
    InvalidRequest,
    MaybeSent,
    NotSent,
    RetryPolicy,
    UntrustedCertificate,
    read_capped,
)

USER_AGENT = "tokensend"
DNS_TTL_SECONDS = 60.0
MAX_HOSTS = 256


_Key = tuple[str, str | None, int | None, tuple[float, float]]  # scheme, host, port, (connect, total) timeouts


@dataclass
class _Pin:
    client: Client
    address: str
    renew_at: float


class MessageClient:
    """Pooled connections to the providers' hosts, one pinned pyreqwest client per host."""

    def __init__(
        self,
        allow_private: bool,
        *,
        max_connections: int = 256,
        resolver: AbstractResolver | None = None,
        dns_ttl_seconds: float = DNS_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allow_private = allow_private
        self._max_connections = max_connections
        self._resolver = resolver or GuardedResolver(allow_private)
        self._dns_ttl = dns_ttl_seconds
        self._clock = clock
        self._pins: OrderedDict[_Key, _Pin] = OrderedDict()
        self._lookups: dict[tuple[str, int], asyncio.Future[list[dict]]] = {}

    def transport(self, retry: RetryPolicy) -> _Transport:
        return _Transport(self, retry)

    async def client_for(self, url: Url, timeouts: tuple[float, float]) -> Client:
        """The client that may carry a request to `url`, bounded by (connect, total) `timeouts`.

        Raises BlockedAddress, NotSent or InvalidRequest.
        """
        key = (url.scheme, url.host_str, url.port_or_known_default, timeouts)
        pin = self._pins.get(key)
        if pin is not None and self._clock() < pin.renew_at:
            return pin.client
        return await self._pin(key)

    async def _pin(self, key: _Key) -> Client:
        scheme, host, port, timeouts = key
        if not host or port is None or scheme not in ("http", "https"):
            raise InvalidRequest("URL")
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            if not self._allow_private and not is_public(str(literal)):
                raise BlockedAddress("host is not a public address")
            pin = _Pin(self._build(timeouts), host, math.inf)  # nothing to resolve, nothing to renew
        else:
            now = self._clock()
            addresses = await self._resolve(host, port)
            pin = self._pins.get(key)  # another request may have renewed it meanwhile
            if pin is not None and pin.address in addresses:
                # Still an answer (round-robin DNS reorders them): keep the pool and its connections.
                pin.renew_at = now + self._dns_ttl
            else:
                # A replaced client is dropped, not closed: requests in flight keep it until they end.
                client = self._build(timeouts, (host, addresses[0], port))
                pin = _Pin(client, addresses[0], now + self._dns_ttl)
        self._pins[key] = pin
        self._pins.move_to_end(key)
        while len(self._pins) > MAX_HOSTS:
            self._pins.popitem(last=False)
        return pin.client

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The addresses the guard lets through; one lookup at a time per host."""
        lookup = self._lookups.get((host, port))
        if lookup is None:
            lookup = asyncio.ensure_future(self._resolver.resolve(host, port, socket.AF_UNSPEC))
            self._lookups[(host, port)] = lookup
            lookup.add_done_callback(lambda done: self._forget_lookup(host, port, done))
        try:
            answers = await asyncio.shield(lookup)  # one caller cancelled does not cancel the others' lookup
        except BlockedAddress:
            raise
        except OSError:
            raise NotSent from None
        if not answers:
            raise NotSent
        return [str(answer["host"]) for answer in answers]

    def _forget_lookup(self, host: str, port: int, done: asyncio.Future[list[dict]]) -> None:
        self._lookups.pop((host, port), None)
        if not done.cancelled():
            done.exception()  # retrieved here, so a lookup whose callers all left is not reported as lost

    def _build(self, timeouts: tuple[float, float], pin: tuple[str, str, int] | None = None) -> Client:
        connect, total = timeouts
        builder = (
            ClientBuilder()
            .max_connections(self._max_connections)
            .connect_timeout(timedelta(seconds=connect))
            .timeout(timedelta(seconds=total))
            .follow_redirects(False)
            .no_proxy()  # as aiohttp: proxy variables in the environment are not obeyed
            .user_agent(USER_AGENT)
            # Replies arrive as sent, so the size limit counts what the provider sends.
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
        )
        if pin is not None:
            builder = builder.resolve(*pin)
        return builder.build()

    async def close(self) -> None:
        clients = [pin.client for pin in self._pins.values()]
        self._pins.clear()
        for client in clients:
            await client.close()


class _Transport:
    """`MessageClient` attempts bounded by one connector's timeouts."""

    def __init__(self, client: MessageClient, retry: RetryPolicy) -> None:
        self._client = client
        self._timeouts = (retry.connect_timeout_seconds, retry.connect_timeout_seconds + retry.read_timeout_seconds)

    async def fetch(self, request: HttpRequest) -> HttpReply:
        try:
            url = Url(request.url)
        except ValueError:
            raise InvalidRequest("URL") from None
        client = await self._client.client_for(url, self._timeouts)
        try:
            builder = client.request(request.method, url)
            if request.headers:
                builder = builder.headers(request.headers)
            if request.body is not None:
                builder = builder.body_bytes(request.body)
            streamed = builder.build_streamed()
        except ValueError:
            # A method or header the client will not put on the wire: nothing was sent.
            raise InvalidRequest("request") from None
        try:
            async with streamed as response:
                length = response.headers.get("Content-Length")
                body, complete = await read_capped(
                    int(length) if length is not None and length.isdigit() else None,
                    response.bytes,
                    lambda: response.body_reader.read_chunk(),
                    (PyreqwestError,),
                )
                return HttpReply(response.status, response.headers, body, complete)
        except PyreqwestError as exc:
            raise _sorted(exc) from None


def _sorted(error: PyreqwestError) -> Exception:
    """What `HttpSender` should make of a pyreqwest error.

    pyreqwest's classes do not say whether the request went out: a connection closed after it did
    is a `ConnectError`, the whole-request timeout a `ConnectTimeoutError`. hyper's own chain of
    causes does: only its "Connect" stage means nothing was sent. Unsure means it may have been.
    """
    if isinstance(error, PoolTimeoutError):
        return NotSent()  # never got a connection
    details = getattr(error, "details", None) or {}
    # The first cause quotes the URL; the ones after it are hyper's and the TLS library's.
    causes = [str(cause.get("message", "")) for cause in (details.get("causes") or [])[1:]]
    if "client error (Connect)" not in causes:
        return MaybeSent(type(error).__name__)
    if any("certificate" in cause.lower() for cause in causes):
        return UntrustedCertificate()
    return NotSent()
