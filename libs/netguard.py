"""Guards customer-configured URLs (PII APIs, token endpoints, gateways).

A URL may not reach a private, loopback, link-local or otherwise reserved
address unless `TOKENSEND_ALLOW_PRIVATE_NETWORKS` is set. Host names are
checked when they are resolved (at connect time), so DNS rebinding does not
get around the check; IP literals, which aiohttp connects to without
resolving, on every request of a `customer_session`. The dispatcher's per-message client resolves through
`GuardedResolver` too and pins each host to the address checked
(services/dispatcher/connectors/message_client.py).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import SplitResult, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL


class BlockedAddress(aiohttp.ClientConnectionError):
    """The URL's host is or resolves to a non-public address."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IPv4-translated addresses (SIIT, RFC 2765): a translator maps ::ffff:0:a.b.c.d to a.b.c.d.
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
# IPv6 ranges Python's `is_global` (3.11) takes for global that lead into a network of its own: the
# local-use NAT64 prefix (RFC 8215, through a translator to IPv4 hosts there; known from 3.12.4),
# site-local (deprecated by RFC 3879, still routed inside networks that kept it), documentation
# (RFC 9637) and SRv6 segment identifiers (RFC 9602).
_NOT_GLOBAL_V6 = tuple(ipaddress.ip_network(net) for net in ("64:ff9b:1::/48", "fec0::/10", "3fff::/20", "5f00::/16"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, translated, 6to4, NAT64, IPv4-compatible), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or ip in _IPV4_TRANSLATED or (int(ip) >> 32 == 0 and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NOT_GLOBAL_V6):
            return False
        embedded = _embedded_ipv4(ip)
        if embedded is not None and not (embedded.is_global and not embedded.is_multicast):
            return False
    return ip.is_global and not ip.is_multicast


def split_url(url: str) -> SplitResult | None:
    """The URL's parts, or None when it has none (`https://[::1/x`, or a character that turns into a
    delimiter under NFKC, such as a fullwidth `#` in the host): urlsplit raises ValueError for those."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def port_of(parts: SplitResult) -> int | None | bool:
    """The URL's port; None when it gives none; False when it is not a port (`:99999`, `:abc`)."""
    try:
        return parts.port
    except ValueError:
        return False


def origin(url: str) -> tuple[str, str, int | None]:
    """Where a URL's requests go: scheme, host and port (the default port of the scheme as None)."""
    parts = split_url(url)
    if parts is None:
        return ("", "", None)
    port = port_of(parts)
    default = {"https": 443, "http": 80}.get(parts.scheme.lower())
    return (parts.scheme.lower(), (parts.hostname or "").rstrip(".").lower(), None if port in (None, default) else port)


def _host_as_connected(url: str) -> str:
    """The host the HTTP client connects to. yarl maps full-width digits and dots as IDNA does, so
    `１２７.0.0.1` is the literal 127.0.0.1 to aiohttp, which connects to a literal without resolving."""
    try:
        return URL(url).raw_host or ""
    except ValueError:  # a URL the client refuses to send to as well
        return ""


def check_literal_host(url: str, allow_private: bool) -> None:
    """Refuses an IP-literal host that is not public (names are checked on resolve), read both as the
    URL parser reads it and as the HTTP client does, numeric spellings as the system resolver does."""
    if allow_private:
        return
    parts = split_url(url)
    for host in {(parts.hostname if parts is not None else "") or "", _host_as_connected(url)}:
        _check_host(host.rstrip("."))


# What inet_aton reads as an IPv4 address: one to four numbers (decimal, octal with a leading 0, hex
# with 0x), the last filling the bytes left, so `127.1`, `2130706433` and `0x7f.1` are all 127.0.0.1.
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


def numeric_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address the system resolver connects to for a numeric `host` (`127.1`, `0x7f.1`),
    as it reads one (inet_aton); None for a name it would look up."""
    if not _NUMERIC_HOST.fullmatch(host):  # inet_aton ignores what follows a space; getaddrinfo does not
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host.lower() in {"localhost", "localhost.localdomain"} or host.lower().endswith(".localhost"):
            raise BlockedAddress("host is loopback") from None
        numeric = numeric_ipv4(host)
        if numeric is not None and not is_public(str(numeric)):
            raise BlockedAddress("host is not a public address") from None
        return
    if not is_public(host):
        raise BlockedAddress("host is not a public address")


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver and drops non-public answers."""

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        answers = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return answers
        public = [a for a in answers if is_public(a["host"])]
        if not public:
            raise BlockedAddress("host resolves only to non-public addresses")
        return public

    async def close(self) -> None:
        await self._inner.close()


async def _literal_host_guard(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: aiohttp connects to an IP literal without asking the resolver, so each request
    (each redirect hop too) is checked here, whatever was checked when its URL was saved. The URL is
    already the client's reading of it: its host is the one connected to."""
    _check_host((request.url.raw_host or "").rstrip("."))
    return await handler(request)


def customer_session(
    allow_private: bool, *, limit: int = 256, trace_configs: list[aiohttp.TraceConfig] | None = None
) -> aiohttp.ClientSession:
    """An HTTP session for customer URLs: guarded resolution and IP literals, pooled connections, no cookies."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private), limit=limit, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        trace_configs=trace_configs or None,
        middlewares=() if allow_private else (_literal_host_guard,),
    )
