"""Unit tests for the per-message HTTP client: the address guard, pinned resolution, limits and defaults.

What every HTTP client must do for the retry loop (retries, never resending, error texts) is tested
for this client and aiohttp alike in test_connectors_http_retry.py.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestServer
from pyreqwest.http import Url

from libs.netguard import GuardedResolver
from services.dispatcher.connectors.base import SendStatus
from services.dispatcher.connectors.http_retry import HttpRequest, HttpSender, RetryPolicy
from services.dispatcher.connectors.message_client import USER_AGENT, MessageClient

PHONE = "+447700900123"
BODY = f"to={PHONE}&text=hello".encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDns(AbstractResolver):
    """Answers names from a table that a test can change; counts lookups."""

    def __init__(self, table: dict[str, list[str]], delay: float = 0.0) -> None:
        self.table = table
        self.delay = delay
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        self.lookups.append(host)
        await asyncio.sleep(self.delay)
        if host not in self.table:
            raise OSError(f"cannot resolve {host}")
        return [
            {"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


class Gateway:
    """A local HTTP server that records what reaches it."""

    def __init__(self) -> None:
        self.requests: list[web.Request] = []
        self.bodies: list[bytes] = []
        self.reply: Callable[[], web.StreamResponse] = lambda: web.json_response({"id": "m-1"})
        self.port = 0


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    state = Gateway()

    async def handle(request: web.Request) -> web.StreamResponse:
        state.bodies.append(await request.read())
        state.requests.append(request)
        return state.reply()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.port = server.port or 0
    yield state
    await server.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., MessageClient]]:
    made: list[MessageClient] = []

    def make(allow_private: bool = True, **options: Any) -> MessageClient:
        made.append(MessageClient(allow_private, **options))
        return made[-1]

    yield make
    for client in made:
        await client.close()


def sender(client: MessageClient, **policy: float) -> HttpSender:
    async def no_sleep(_: float) -> None:
        pass

    return HttpSender(client, "acme", RetryPolicy(**policy), sleep=no_sleep, rng=random.Random(3))  # type: ignore[arg-type]


def post(url: str) -> HttpRequest:
    return HttpRequest("POST", url, {"Content-Type": "application/x-www-form-urlencoded"}, BODY)


async def send(client: MessageClient, url: str, **policy: float) -> Any:
    return await sender(client, **policy).exchange(post(url))


# -- the address guard --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "0x7f.1", "2130706433", "[::1]", "169.254.169.254", "10.1.2.3"])
async def test_a_private_address_is_refused_in_any_spelling_before_anything_is_sent(
    clients, gateway: Gateway, host: str
) -> None:
    exchange = await send(clients(allow_private=False), f"http://{host}:{gateway.port}/sms")
    assert (exchange.status, exchange.error_code) == (SendStatus.FAILED, "BLOCKED_ADDRESS")
    assert exchange.attempts == 1 and gateway.requests == []


async def test_a_name_that_resolves_to_loopback_is_refused(clients, gateway: Gateway) -> None:
    exchange = await send(clients(allow_private=False), f"http://localhost:{gateway.port}/sms")
    assert exchange.error_code == "BLOCKED_ADDRESS" and gateway.requests == []


async def test_a_name_whose_answer_turns_private_is_refused_at_the_next_lookup(clients, gateway: Gateway) -> None:
    clock = Clock()
    dns = FakeDns({"gw.example": ["93.184.216.34"]})
    client = clients(allow_private=False, resolver=GuardedResolver(False, inner=dns), clock=clock)
    first = await client.client_for(Url(f"http://gw.example:{gateway.port}/sms"), (1.0, 2.0))
    assert first is not None
    dns.table["gw.example"] = ["127.0.0.1"]
    clock.now += 61
    exchange = await send(client, f"http://gw.example:{gateway.port}/sms")
    assert exchange.error_code == "BLOCKED_ADDRESS" and gateway.requests == []


async def test_requests_go_to_the_address_the_guard_checked(clients, gateway: Gateway) -> None:
    # gw.test has no DNS of its own: reaching the gateway proves the connection used the checked answer.
    dns = FakeDns({"gw.test": ["127.0.0.1"]})
    exchange = await send(clients(resolver=dns), f"http://gw.test:{gateway.port}/sms")
    assert exchange.status is SendStatus.SENT
    assert gateway.bodies == [BODY] and gateway.requests[0].host == f"gw.test:{gateway.port}"


# -- pinned resolution --------------------------------------------------------------------------


async def test_a_name_is_looked_up_once_per_ttl_and_once_for_concurrent_first_requests(clients, gateway) -> None:
    clock = Clock()
    dns = FakeDns({"gw.test": ["127.0.0.1"]}, delay=0.05)
    client = clients(resolver=dns, clock=clock, dns_ttl_seconds=60)
    url = f"http://gw.test:{gateway.port}/sms"
    exchanges = await asyncio.gather(*(send(client, url) for _ in range(20)))
    assert all(e.status is SendStatus.SENT for e in exchanges) and dns.lookups == ["gw.test"]
    clock.now += 59
    await send(client, url)
    assert dns.lookups == ["gw.test"]
    clock.now += 2
    await send(client, url)
    assert dns.lookups == ["gw.test", "gw.test"]


async def test_a_reordered_answer_keeps_the_pool_and_a_changed_one_replaces_it(clients, gateway) -> None:
    clock = Clock()
    dns = FakeDns({"gw.test": ["127.0.0.1", "127.0.0.2"]})
    client = clients(resolver=dns, clock=clock)
    url = f"http://gw.test:{gateway.port}/sms"
    first = await client.client_for(Url(url), (10.0, 40.0))
    dns.table["gw.test"] = ["127.0.0.2", "127.0.0.1"]  # round-robin DNS
    clock.now += 61
    assert await client.client_for(Url(url), (10.0, 40.0)) is first
    dns.table["gw.test"] = ["127.0.0.3"]
    clock.now += 61
    replaced = await client.client_for(Url(url), (10.0, 40.0))
    assert replaced is not first
    dns.table["gw.test"] = ["127.0.0.1"]
    clock.now += 61
    exchange = await send(client, url)
    assert exchange.status is SendStatus.SENT  # the new pin carries requests


async def test_a_name_that_does_not_resolve_is_retried_as_never_sent(clients) -> None:
    dns = FakeDns({})
    exchange = await send(clients(resolver=dns), "http://nowhere.test/sms", max_retries=2)
    assert (exchange.status, exchange.error_code, exchange.attempts) == (SendStatus.FAILED, "CONNECTION_FAILED", 3)
    assert dns.lookups == ["nowhere.test"] * 3
    assert "nowhere" not in exchange.error_message


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http://", "not a url", "http://127.0.0.1:99999/x"])
async def test_a_url_the_client_cannot_use_fails_without_retry(clients, url: str) -> None:
    exchange = await send(clients(), url)
    assert (exchange.status, exchange.error_code, exchange.attempts) == (SendStatus.FAILED, "INVALID_REQUEST", 1)
    assert exchange.error_message == "acme URL is not valid"


# -- replies, headers, environment ------------------------------------------------------------


async def test_requests_name_the_product_ask_for_no_compression_and_ignore_proxy_variables(
    clients, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    exchange = await send(clients(), f"http://127.0.0.1:{gateway.port}/sms")
    assert exchange.status is SendStatus.SENT
    headers = gateway.requests[0].headers
    assert headers["User-Agent"] == USER_AGENT
    assert "Accept-Encoding" not in headers or headers["Accept-Encoding"] == "identity"


async def test_a_broken_reply_says_nothing_of_the_request(clients) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        exchange = await send(clients(), f"http://127.0.0.1:{port}/sms?to={PHONE}")
    finally:
        server.close()
        await server.wait_closed()
    assert exchange.status is SendStatus.OUTCOME_UNKNOWN and exchange.attempts == 1
    assert PHONE not in exchange.error_message and "127.0.0.1" not in exchange.error_message


async def test_close_ends_every_pool(clients) -> None:
    """Each host's pool keeps its connection open between sends; closing the client closes them all."""
    opened: list[asyncio.Event] = []

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        closed = asyncio.Event()
        opened.append(closed)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                writer.write(
                    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"id":"m-1"}'
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            closed.set()  # the client hung up

    server = await asyncio.start_server(keep_alive, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = clients(resolver=FakeDns({"gw.test": ["127.0.0.1"]}))
        for url in (f"http://gw.test:{port}/sms", f"http://127.0.0.1:{port}/sms", f"http://gw.test:{port}/sms"):
            assert (await send(client, url)).status is SendStatus.SENT
        assert len(opened) == 2  # one pooled connection per host, the first kept for the third send
        await asyncio.sleep(0.1)
        assert not any(closed.is_set() for closed in opened)
        await client.close()
        await asyncio.wait_for(asyncio.gather(*(closed.wait() for closed in opened)), 5)
        await client.close()  # twice is harmless
        exchange = await send(client, f"http://127.0.0.1:{port}/sms")  # a closed client builds anew
        assert exchange.status is SendStatus.SENT and len(opened) == 3
    finally:
        server.close()
        await server.wait_closed()


async def test_a_cancelled_request_gives_up_its_connection(clients) -> None:
    """A campaign stream cancelled mid-batch leaves no request behind it."""
    closed = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await reader.read(1)  # returns when the client goes away
        finally:
            closed.set()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sending = asyncio.create_task(send(clients(), f"http://127.0.0.1:{port}/sms"))
        await asyncio.sleep(0.2)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()
