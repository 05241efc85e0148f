"""The resolver's HTTP session for brands' APIs, optionally through a fixed egress proxy.

Brands that allow-list fixed IP addresses on their PII API get them from
`TOKENSEND_EGRESS_PROXY`: PII API, token endpoint and content API calls all go
through it (plain CONNECT for https, absolute-form requests for http).

Through a proxy our connector resolves only the proxy's host (the operator's
own, often on a private network, so it is not guarded); the target is resolved
by the proxy. So the network guard checks each target host itself before the
request leaves, and the proxy should enforce its own egress policy too, since
a DNS answer may change between our check and its lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from libs.netguard import BlockedAddress, check_literal_host, customer_session, is_public
from libs.settings import ResolverSettings

CHECKED_HOST_SECONDS = 60.0


class TargetGuard:
    """Client middleware: refuses a request whose host is, or resolves to, a non-public address."""

    def __init__(self) -> None:
        self._checked: dict[str, float] = {}

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        host = request.url.host or ""
        check_literal_host(str(request.url), allow_private=False)  # raises BlockedAddress
        if not _is_literal(host) and self._checked.get(host, 0.0) < time.monotonic():
            try:
                answers = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise aiohttp.ClientConnectionError("target host does not resolve") from exc
            if not answers or not all(is_public(str(a[4][0])) for a in answers):
                raise BlockedAddress("target host resolves to a non-public address")
            if len(self._checked) > 4096:
                self._checked.clear()
            self._checked[host] = time.monotonic() + CHECKED_HOST_SECONDS
        return await handler(request)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def egress_session(settings: ResolverSettings, trace_configs: list | None = None) -> aiohttp.ClientSession:
    """The guarded customer session, or one that sends everything through the egress proxy."""
    limit = settings.pii_concurrency * 2
    proxy = settings.egress_proxy.get_secret_value() if settings.egress_proxy else ""
    if not proxy:
        return customer_session(settings.allow_private_networks, limit=limit, trace_configs=trace_configs)
    middlewares = () if settings.allow_private_networks else (TargetGuard(),)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=60),
        cookie_jar=aiohttp.DummyCookieJar(),
        proxy=proxy,
        middlewares=middlewares,
        trace_configs=trace_configs or None,
    )
