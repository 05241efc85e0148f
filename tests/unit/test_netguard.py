"""Unit tests for libs/netguard.py: customer URLs may not reach private networks."""

from __future__ import annotations

import asyncio

import pytest

from libs.netguard import BlockedAddress, GuardedResolver, check_literal_host, customer_session, is_public

NON_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "10.255.255.254",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata, link-local
    "0.0.0.0",
    "100.64.0.1",  # carrier-grade NAT
    "224.0.0.1",  # multicast
    "::1",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",  # unique local
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64 (RFC 8215): a translator maps it to 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 (RFC 6052) of 127.0.0.1
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT, RFC 2765): a translator maps it to 127.0.0.1
    "::ffff:0:a9fe:a9fe",
    "fec0::1",  # site-local (RFC 3879 deprecated it; networks that still route it keep it inside)
    "feff::1",
    "3fff::1",  # documentation (RFC 9637)
    "5f00::1",  # SRv6 segment identifiers (RFC 9602), inside an operator's domain
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "172.32.0.1",
    "172.15.255.254",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of a public address: the translator's way to it
    "::ffff:0:808:808",
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert is_public(address) is False


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert is_public(address) is True


BLOCKED_URLS = [
    "https://127.0.0.1/v1/customers",
    "https://127.0.0.1:8443/v1/customers",
    "http://10.0.0.1/",
    "https://10.20.30.40/x",
    "https://172.16.5.4/",
    "https://192.168.0.10/",
    "http://169.254.169.254/latest/meta-data/",
    "https://[::1]/",
    "https://[::1]:8443/x",
    "https://[fe80::1]/",
    "https://[::ffff:127.0.0.1]/",
    "https://[::ffff:0:7f00:1]/",
    "https://[fec0::1]:8443/",
    "https://localhost/",
    "https://LOCALHOST:8443/x",
    "https://localhost.localdomain/",
    "https://api.localhost/",
    # Hosts the HTTP client reads as a private IP literal: yarl maps full-width digits and dots as
    # IDNA does, and aiohttp connects to an IP literal without asking the resolver.
    "https://\uff11\uff12\uff17.0.0.1/v1/customers",  # full-width digits
    "https://127\u30020\u30020\u30021/",  # ideographic full stops
    "https://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/latest/meta-data/",
    "https://10\uff0e0\uff0e0\uff0e1:8443/x",  # full-width full stops
    "smtp://\uff11\uff12\uff17.0.0.1:25",
    "https://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",
    # Numeric spellings the resolver (inet_aton) reads as an IPv4 address: one to four parts, each
    # decimal, octal (leading 0) or hex (0x), the last filling the bytes left.
    "https://127.1/",
    "https://127.0.1:8443/x",
    "https://2130706433/",
    "https://0x7f.1/",
    "https://0X7F.0.0.1/",
    "https://0x7f000001/",
    "https://0177.0.0.1/",
    "https://017700000001/",
    "https://10.1/",
    "https://0/",
    "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/",
    "http://2852039166/latest/meta-data/",  # 169.254.169.254
    "https://0x7f.1./",  # a trailing dot
    "https://\uff11\uff12\uff17.\uff11/",  # full-width 127.1
    "smtp://127.1:25",
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
def test_literal_private_hosts_are_blocked(url: str) -> None:
    with pytest.raises(BlockedAddress):
        check_literal_host(url, allow_private=False)


@pytest.mark.parametrize("url", BLOCKED_URLS)
def test_everything_is_allowed_with_allow_private(url: str) -> None:
    check_literal_host(url, allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "https://8.8.8.8/v1",
        "https://[2606:4700:4700::1111]/v1",
        "https://pii.example.com/v1/customers/@anonymous_id",
        "https://localhost-api.example.com/",  # a name that merely starts with "localhost"
        "https://api.example.com:8443/x?y=1",
        # Names, not numbers, to the resolver: looked up, and checked then.
        "https://0x7f.example.com/",
        "https://1e100.net/",
        "https://127.1.example.com/",
        "https://08.1/",  # no octal digit 8: no number either
        "https://0x.1/",
        "https://134744072/",  # 8.8.8.8, public however it is spelt
    ],
)
def test_public_ips_and_names_are_allowed(url: str) -> None:
    check_literal_host(url, allow_private=False)


def test_blocked_address_is_a_client_connection_error() -> None:
    import aiohttp

    assert issubclass(BlockedAddress, aiohttp.ClientConnectionError)


async def test_resolver_blocks_localhost_when_private_is_not_allowed() -> None:
    resolver = GuardedResolver(allow_private=False)
    try:
        with pytest.raises(BlockedAddress):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


async def test_resolver_returns_localhost_answers_when_private_is_allowed() -> None:
    resolver = GuardedResolver(allow_private=True)
    try:
        answers = await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    assert answers
    assert all(not is_public(a["host"]) for a in answers)
    assert all(a["port"] == 80 for a in answers)


async def _peer() -> tuple[asyncio.Server, list[bool]]:
    """A loopback HTTP peer that answers 200 and notes each connection made to it."""
    connections: list[bool] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(True)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0), connections


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]"])
async def test_a_customer_session_refuses_a_private_ip_literal_when_it_connects(host: str) -> None:
    """aiohttp connects to an IP literal without asking the resolver, so a URL checked only when it was
    saved (under an older rule, or while private networks were allowed) went out to it."""
    server, connections = await _peer()
    port = server.sockets[0].getsockname()[1]
    try:
        async with customer_session(allow_private=False) as http:
            with pytest.raises(BlockedAddress):
                await http.get(f"http://{host}:{port}/latest/meta-data/", allow_redirects=False)
        async with customer_session(allow_private=True) as http:
            async with http.get(f"http://127.0.0.1:{port}/") as reply:
                assert reply.status == 200
    finally:
        server.close()
        await server.wait_closed()
    assert connections == [True]  # the allowed session's only
