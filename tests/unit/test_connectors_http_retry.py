"""Unit tests for the shared HTTP retry loop: what is retried, what is never resent, what errors say."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.dispatcher.connectors.base import SendStatus
from services.dispatcher.connectors.http_retry import (
    ATTEMPT_LOG_SECONDS,
    MAX_REPLY_BYTES,
    AttemptLogs,
    HttpRequest,
    HttpSender,
    Refusal,
    RetryPolicy,
)
from services.dispatcher.connectors.message_client import MessageClient

PHONE = "+447700900123"
REQUEST_BODY = f"To={PHONE}&Body=hello".encode()


@dataclass
class Sleeps:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def http(provider_http: aiohttp.ClientSession | MessageClient) -> aiohttp.ClientSession | MessageClient:
    """Every rule holds for both HTTP clients a connector can send through."""
    return provider_http


def sender(http: aiohttp.ClientSession | MessageClient, sleeps: Sleeps, **policy: float) -> HttpSender:
    retry = RetryPolicy(**{"read_timeout_seconds": 2.0, "connect_timeout_seconds": 2.0, **policy})  # type: ignore[arg-type]
    return HttpSender(http, "acme", retry, sleep=sleeps, rng=random.Random(7))


def post(url: str) -> HttpRequest:
    return HttpRequest("POST", url, {"Content-Type": "application/x-www-form-urlencoded"}, REQUEST_BODY)


@dataclass
class Script:
    """An aiohttp server answering each request with the next canned response."""

    responses: list[Callable[[], web.StreamResponse]]
    requests: int = 0


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[tuple[str, Script]]]]:
    servers: list[TestServer] = []

    async def start(*responses: Callable[[], web.StreamResponse]) -> tuple[str, Script]:
        script = Script(list(responses))

        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            index = min(script.requests, len(script.responses) - 1)
            script.requests += 1
            return script.responses[index]()

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/send")), script

    yield start
    for server in servers:
        await server.close()


@dataclass
class RawPeer:
    """A TCP server that reads a request and then misbehaves (`behaviour(writer)`)."""

    port: int
    requests: int = 0


@pytest.fixture
async def raw_peer() -> AsyncIterator[Callable[..., Awaitable[RawPeer]]]:
    servers: list[asyncio.Server] = []

    async def start(behaviour: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> RawPeer:
        peer = RawPeer(0)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                peer.requests += 1
                await behaviour(writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        peer.port = server.sockets[0].getsockname()[1]
        return peer

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


class SilentPeer:
    """A listener that accepts connections and never answers (a blackholing balancer), counting them."""

    def __init__(self) -> None:
        self.connections = 0

    async def _say_nothing(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.read()  # until the client gives up
        writer.close()

    async def __aenter__(self) -> SilentPeer:
        self._server = await asyncio.start_server(self._say_nothing, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def json_reply(status: int, body: str = "{}", **headers: str) -> Callable[[], web.StreamResponse]:
    return lambda: web.Response(status=status, text=body, content_type="application/json", headers=headers)


# -- success and retries ----------------------------------------------------------


async def test_2xx_is_sent_first_time(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(201, '{"sid": "SM1"}'))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.status is SendStatus.SENT
    assert exchange.attempts == 1 and script.requests == 1
    assert exchange.reply is not None and exchange.reply.json() == {"sid": "SM1"}


async def test_503_then_202_is_sent_on_the_second_attempt(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(503), json_reply(202))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.status is SendStatus.SENT
    assert exchange.attempts == 2 and script.requests == 2
    assert len(sleeps.delays) == 1 and 0 <= sleeps.delays[0] <= 0.2  # full jitter under the first ceiling


async def test_429_honours_retry_after(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(429, **{"Retry-After": "7"}), json_reply(202))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.status is SendStatus.SENT and exchange.attempts == 2
    assert sleeps.delays == [7.0]


@pytest.mark.parametrize("value", ["0", "Wed, 21 Oct 2015 07:28:00 GMT"], ids=["zero", "a-date-past"])
async def test_a_retry_after_of_no_wait_backs_off_rather_than_retrying_at_once(http, sleeps, scripted, value) -> None:
    """Retry-After 0, or a date already past (the provider's clock behind ours), asks for no wait: every
    retry at once would be spent within milliseconds on a provider that is throttling."""
    throttled = json_reply(429, **{"Retry-After": value})
    url, script = await scripted(throttled, throttled, throttled, json_reply(202))
    exchange = await sender(http, sleeps, base_seconds=1.0, cap_seconds=8.0).exchange(post(url))
    assert exchange.status is SendStatus.SENT and exchange.attempts == 4
    backoff = RetryPolicy(base_seconds=1.0, cap_seconds=8.0)
    rng = random.Random(7)
    assert sleeps.delays == [backoff.delay(retry, rng) for retry in (1, 2, 3)]
    assert sum(sleeps.delays) > 1.0


async def test_retry_after_longer_than_the_limit_fails_at_once_as_rate_limited(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(429, **{"Retry-After": "120"}), json_reply(202))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.status is SendStatus.FAILED
    assert exchange.error_code == "RATE_LIMITED"
    assert script.requests == 1 and sleeps.delays == []
    assert "120s" in exchange.error_message


async def test_persistent_429_ends_rate_limited_after_all_retries(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(429))
    exchange = await sender(http, sleeps, max_retries=3).exchange(post(url))
    assert exchange.status is SendStatus.FAILED and exchange.error_code == "RATE_LIMITED"
    assert exchange.attempts == 4 and script.requests == 4
    assert len(sleeps.delays) == 3


async def test_persistent_5xx_ends_as_server_error(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(500))
    exchange = await sender(http, sleeps, max_retries=2).exchange(post(url))
    assert (exchange.status, exchange.error_code, exchange.attempts) == (SendStatus.FAILED, "SERVER_ERROR", 3)


async def test_backoff_grows_with_full_jitter_up_to_the_cap(http, sleeps, scripted) -> None:
    url, _ = await scripted(json_reply(503))
    await sender(http, sleeps, max_retries=5, base_seconds=1.0, cap_seconds=3.0).exchange(post(url))
    ceilings = [1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(0 <= d <= c for d, c in zip(sleeps.delays, ceilings, strict=True))


async def test_4xx_fails_without_retry_and_without_the_body(http, sleeps, scripted) -> None:
    body = f'{{"code": 21211, "message": "The \'To\' number {PHONE} is not a valid phone number."}}'
    url, script = await scripted(json_reply(400, body))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert (exchange.status, exchange.error_code, exchange.attempts) == (SendStatus.FAILED, "HTTP_400", 1)
    assert script.requests == 1
    assert PHONE not in exchange.error_message and "valid phone" not in exchange.error_message


async def test_redirects_are_not_followed(http, sleeps, scripted) -> None:
    url, script = await scripted(lambda: web.Response(status=307, headers={"Location": "http://127.0.0.1:1/x"}))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.error_code == "HTTP_307" and script.requests == 1


# -- connections ------------------------------------------------------------------------------


async def test_connection_refused_is_retried_then_fails(http, sleeps) -> None:
    exchange = await sender(http, sleeps, max_retries=3).exchange(post(f"http://127.0.0.1:{closed_port()}/send"))
    assert exchange.status is SendStatus.FAILED
    assert exchange.error_code == "CONNECTION_FAILED"
    assert exchange.attempts == 4 and len(sleeps.delays) == 3


async def test_connection_refused_then_up_is_sent(http) -> None:
    port = closed_port()
    requests: list[bytes] = []
    servers: list[TestServer] = []

    async def handle(request: web.Request) -> web.Response:
        requests.append(await request.read())
        return web.Response(status=202)

    async def bring_the_peer_up(delay: float) -> None:
        if not servers:
            app = web.Application()
            app.router.add_post("/send", handle)
            servers.append(TestServer(app, host="127.0.0.1", port=port))
            await servers[0].start_server()

    try:
        retrying = HttpSender(http, "acme", RetryPolicy(), sleep=bring_the_peer_up)
        exchange = await retrying.exchange(post(f"http://127.0.0.1:{port}/send"))
    finally:
        for server in servers:
            await server.close()
    assert exchange.status is SendStatus.SENT and exchange.attempts == 2
    assert requests == [REQUEST_BODY]


NOT_ATTEMPTED = (
    "not attempted: acme could not be reached through the connector (could not connect to acme after 4 attempts)"
)


async def test_a_refused_provider_gets_the_retries_of_one_request_not_of_each(http, sleeps) -> None:
    """Nothing listens: twenty requests at once (a campaign's senders) fail together, which is one try;
    the tries after it are the connector's, one at a time, and once they are spent the requests still
    waiting fail at once, unsent, released for a re-run."""
    port = closed_port()
    # Given up on for 2 s: long enough for the twenty to find it so on a busy machine (the backoffs are not slept).
    acme = sender(http, sleeps, max_retries=3, connect_timeout_seconds=0.2, cap_seconds=1.8)
    exchanges = await asyncio.gather(*(acme.exchange(post(f"http://127.0.0.1:{port}/send")) for _ in range(20)))
    assert {(e.status, e.error_code, e.account_refused) for e in exchanges} == {
        (SendStatus.FAILED, "CONNECTION_FAILED", False)
    }
    # At most the twenty side by side and three more (each request used to make four): 80 before. Which
    # requests make the three depends on when each one's first try failed (pyreqwest's thread answers them
    # one by one): a request whose try failed first may take the lock again before the others reach it.
    assert sum(e.attempts for e in exchanges) <= 20 + 3
    assert len(sleeps.delays) == 3
    assert {e.error_message for e in exchanges if e.attempts == 0} <= {f"{NOT_ATTEMPTED}; not sent, a re-run sends it"}
    assert {e.error_message for e in exchanges if e.attempts} == {"could not connect to acme after 4 attempts"}

    # Given up on only for a connect timeout and the longest backoff (2 s here): then tried afresh.
    async def accept(_: web.Request) -> web.Response:
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/send", accept)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        await asyncio.sleep(2.5)
        exchange = await acme.exchange(post(f"http://127.0.0.1:{port}/send"))
    finally:
        await server.close()
    assert (exchange.status, exchange.attempts) == (SendStatus.SENT, 1)


async def test_a_provider_that_never_answers_the_handshake_is_tried_as_one_request(http, sleeps) -> None:
    """It accepts the connection and never answers TLS (a blackholing balancer): each try costs the
    connect timeout, and twenty requests at once cost the twenty tries side by side and three more, not
    four tries each."""
    acme = sender(http, sleeps, max_retries=3, connect_timeout_seconds=0.3, read_timeout_seconds=600.0)
    # Generous: four 0.3 s tries; a reply waited for as one would take 10 minutes.
    async with SilentPeer() as peer, asyncio.timeout(60):
        exchanges = await asyncio.gather(
            *(acme.exchange(post(f"https://127.0.0.1:{peer.port}/send")) for _ in range(20))
        )
    assert {(e.status, e.error_code) for e in exchanges} == {(SendStatus.FAILED, "CONNECTION_FAILED")}
    assert sum(e.attempts for e in exchanges) <= 20 + 3  # which requests make the three: as above
    assert peer.connections <= 20 + 3


async def test_server_disconnect_is_outcome_unknown_and_never_resent(http, sleeps, raw_peer) -> None:
    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    peer = await raw_peer(hang_up)
    exchange = await sender(http, sleeps).exchange(post(f"http://127.0.0.1:{peer.port}/send"))
    assert exchange.status is SendStatus.OUTCOME_UNKNOWN
    assert exchange.error_code == "OUTCOME_UNKNOWN"
    assert peer.requests == 1 and exchange.attempts == 1 and sleeps.delays == []


async def test_read_timeout_after_sending_is_outcome_unknown(http, sleeps, raw_peer) -> None:
    async def never_answer(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    peer = await raw_peer(never_answer)
    exchange = await sender(http, sleeps, read_timeout_seconds=0.3, connect_timeout_seconds=0.2).exchange(
        post(f"http://127.0.0.1:{peer.port}/x")
    )
    assert exchange.status is SendStatus.OUTCOME_UNKNOWN
    assert peer.requests == 1 and exchange.attempts == 1


async def test_reply_broken_mid_body_is_outcome_unknown(http, sleeps, raw_peer) -> None:
    async def half_a_reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"messages"')
        await writer.drain()
        writer.transport.abort()

    peer = await raw_peer(half_a_reply)
    exchange = await sender(http, sleeps).exchange(post(f"http://127.0.0.1:{peer.port}/x"))
    assert exchange.status is SendStatus.OUTCOME_UNKNOWN
    assert peer.requests == 1


async def test_5xx_broken_mid_body_is_not_resent(http, sleeps, raw_peer) -> None:
    async def half_a_503(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 50\r\n\r\n{")
        await writer.drain()
        writer.transport.abort()

    peer = await raw_peer(half_a_503)
    exchange = await sender(http, sleeps).exchange(post(f"http://127.0.0.1:{peer.port}/x"))
    assert exchange.status is SendStatus.OUTCOME_UNKNOWN and peer.requests == 1


async def test_a_429_broken_mid_body_is_tried_again(http, sleeps, raw_peer) -> None:
    """Its status line said the request was refused unprocessed (RFC 6585): the body is not needed
    to know that nothing was sent, unlike a 2xx's or a 5xx's."""
    answers = [
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 50\r\n\r\n{",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    ]

    async def throttled_then_ok(writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0))
        await writer.drain()
        writer.transport.abort()

    peer = await raw_peer(throttled_then_ok)
    exchange = await sender(http, sleeps).exchange(post(f"http://127.0.0.1:{peer.port}/x"))
    if isinstance(http, MessageClient):
        # pyreqwest reads a short body before it gives the status: all it says is that the reply broke.
        assert exchange.status is SendStatus.OUTCOME_UNKNOWN and peer.requests == 1
        return
    assert exchange.status is SendStatus.SENT and peer.requests == 2 and len(sleeps.delays) == 1


@pytest.mark.parametrize("value", [b"5\xe9", "\uff15".encode()], ids=["latin-1", "utf-8"])
async def test_a_retry_after_that_is_not_ascii_is_unreadable_and_backoff_decides(http, sleeps, raw_peer, value) -> None:
    """A Retry-After no client can read as text (pyreqwest refuses to give it as a str) is garbage,
    as any other unreadable value: backoff decides, and the reply never fails the whole batch."""
    answers = [
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: "
        + value
        + b"\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    ]

    async def throttled_then_ok(writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0))
        await writer.drain()

    peer = await raw_peer(throttled_then_ok)
    exchange = await sender(http, sleeps).exchange(post(f"http://127.0.0.1:{peer.port}/x"))
    assert exchange.status is SendStatus.SENT and peer.requests == 2
    assert len(sleeps.delays) == 1 and sleeps.delays[0] <= RetryPolicy().base_seconds


async def test_garbage_reply_is_outcome_unknown(http, sleeps, raw_peer) -> None:
    async def garbage(writer: asyncio.StreamWriter) -> None:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    peer = await raw_peer(garbage)
    exchange = await sender(http, sleeps).exchange(post(f"http://127.0.0.1:{peer.port}/x"))
    assert exchange.status is SendStatus.OUTCOME_UNKNOWN and peer.requests == 1


async def test_a_reply_over_the_limit_is_cut_at_the_limit(http, sleeps, scripted) -> None:
    url, _ = await scripted(lambda: web.Response(body=b"x" * (MAX_REPLY_BYTES + 4096)))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.status is SendStatus.SENT and len(exchange.reply.body) == MAX_REPLY_BYTES


async def test_a_compressed_reply_is_capped_at_what_it_inflates_to(http, sleeps, scripted) -> None:
    # 64 MiB of zeros gzip to about 64 KiB: a Content-Length well under the cap.
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(packer.compress(bytes(1024 * 1024)) for _ in range(64)) + packer.flush()
    url, _ = await scripted(lambda: web.Response(body=bomb, headers={"Content-Encoding": "gzip"}))
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.status is SendStatus.SENT and len(exchange.reply.body) <= MAX_REPLY_BYTES


async def test_a_chunked_reply_over_the_limit_is_cut_at_the_limit(http, sleeps, scripted) -> None:
    def chunked() -> web.StreamResponse:
        response = web.Response(body=b"y" * (MAX_REPLY_BYTES * 2))
        response.enable_chunked_encoding()
        return response

    url, _ = await scripted(chunked)
    exchange = await sender(http, sleeps).exchange(post(url))
    assert exchange.status is SendStatus.SENT and exchange.reply.body == b"y" * MAX_REPLY_BYTES


async def test_a_reply_that_never_ends_is_read_only_up_to_the_limit(http, sleeps, raw_peer) -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"z" * 65536
        for _ in range(MAX_REPLY_BYTES // len(chunk) + 4):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
        await asyncio.sleep(10)  # and never the last chunk

    peer = await raw_peer(endless)
    exchange = await sender(http, sleeps, read_timeout_seconds=5.0).exchange(post(f"http://127.0.0.1:{peer.port}/x"))
    assert exchange.status is SendStatus.SENT and exchange.reply.body == b"z" * MAX_REPLY_BYTES


# -- provider hooks --------------------------------------------------------------------------------


async def test_a_provider_can_flag_a_4xx_as_throttling(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(400, '{"error": {"code": 130429}}'), json_reply(200))
    throttled = HttpSender(
        http,
        "acme",
        RetryPolicy(),
        sleep=sleeps,
        retry_as=lambda reply: "RATE_LIMITED" if (reply.json() or {}).get("error", {}).get("code") == 130429 else None,
    )
    exchange = await throttled.exchange(post(url))
    assert exchange.status is SendStatus.SENT and exchange.attempts == 2


async def test_a_provider_can_have_a_2xx_retried_as_a_server_error(http, sleeps, scripted) -> None:
    """A gateway's 200 saying its platform failed, nothing sent: backed off as a 5xx, and ends as one."""
    url, script = await scripted(json_reply(200, '{"failed": true}'))
    failing = HttpSender(
        http,
        "acme",
        RetryPolicy(max_retries=2),
        sleep=sleeps,
        rng=random.Random(7),
        retry_as=lambda reply: "SERVER_ERROR" if (reply.json() or {}).get("failed") else None,
    )
    exchange = await failing.exchange(post(url))
    assert (exchange.status, exchange.error_code, exchange.attempts) == (SendStatus.FAILED, "SERVER_ERROR", 3)
    assert exchange.error_message == "acme reported a server error (HTTP 200) after 3 attempts"
    assert script.requests == 3 and len(sleeps.delays) == 2


@pytest.mark.parametrize("status", [429, 500])
async def test_a_provider_can_make_a_429_or_a_5xx_final(http, sleeps, scripted, status: int) -> None:
    """A provider's code that no retry gets past (Meta's "API method" error, sent as HTTP 500) fails at once."""
    url, script = await scripted(json_reply(status, '{"error": {"code": 3}}'), json_reply(200))
    final = HttpSender(
        http,
        "acme",
        RetryPolicy(),
        sleep=sleeps,
        refusal=lambda reply: Refusal("NOT_ALLOWED", "acme says no") if reply.json()["error"]["code"] == 3 else None,
    )
    exchange = await final.exchange(post(url))
    assert (exchange.status, exchange.error_code, exchange.attempts) == (SendStatus.FAILED, "NOT_ALLOWED", 1)
    assert exchange.error_message == "acme says no"
    assert script.requests == 1 and sleeps.delays == []


async def test_describe_adds_only_what_the_provider_hook_picks(http, sleeps, scripted) -> None:
    url, _ = await scripted(json_reply(404, f'{{"code": 20404, "message": "{PHONE} not found"}}'))
    described = HttpSender(
        http, "acme", RetryPolicy(), sleep=sleeps, describe=lambda reply: f"acme error {reply.json()['code']}"
    )
    exchange = await described.exchange(post(url))
    assert exchange.error_message == "acme refused the request (HTTP 404, acme error 20404)"


async def test_outcome_carries_attempts_and_drops_the_provider_id_unless_sent(http, sleeps, scripted) -> None:
    url, _ = await scripted(json_reply(503), json_reply(400))
    exchange = await sender(http, sleeps).exchange(post(url))
    outcome = exchange.outcome("m-1", "SM123")
    assert (outcome.status, outcome.attempts, outcome.provider_message_id) == (SendStatus.FAILED, 2, "")


async def test_a_request_the_client_refuses_to_build_fails_without_being_sent(http, sleeps, scripted) -> None:
    url, script = await scripted(json_reply(202))
    bad = HttpRequest("POST", url, {"X-Text": "line\nX-Evil: 1"}, b"{}")
    exchange = await sender(http, sleeps).exchange(bad)
    assert (exchange.status, exchange.error_code) == (SendStatus.FAILED, "INVALID_REQUEST")
    assert script.requests == 0 and "X-Evil" not in exchange.error_message


# -- log volume -------------------------------------------------------------------


def attempt_lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


async def test_a_throttling_provider_gets_a_retry_line_a_minute_not_one_per_message(
    http, sleeps, scripted, caplog
) -> None:
    """A provider answering 429 to a 200,000-recipient campaign would otherwise write a line per retry of
    every message: the metrics count the retries, the log says that they happen."""
    url, script = await scripted(json_reply(429))
    retrying = sender(http, sleeps, max_retries=2)
    with caplog.at_level(logging.INFO, logger="services.dispatcher.connectors.http_retry"):
        for _ in range(20):
            assert (await retrying.exchange(post(url))).error_code == "RATE_LIMITED"
    assert script.requests == 60
    assert attempt_lines(caplog, "retrying in") == [AnyLine("acme attempt 1 failed (RATE_LIMITED); retrying in")]


async def test_replies_that_never_came_are_logged_a_line_a_minute_not_one_per_message(
    http, sleeps, raw_peer, caplog
) -> None:
    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    peer = await raw_peer(hang_up)
    hanging_up = sender(http, sleeps)
    with caplog.at_level(logging.INFO, logger="services.dispatcher.connectors.http_retry"):
        for _ in range(10):
            exchange = await hanging_up.exchange(post(f"http://127.0.0.1:{peer.port}/send"))
            assert exchange.status is SendStatus.OUTCOME_UNKNOWN
    assert len(attempt_lines(caplog, "not resent")) == 1


def test_attempt_lines_say_how_many_were_held_back_since_the_last() -> None:
    now = [0.0]
    logs = AttemptLogs("acme", clock=lambda: now[0])
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("services.dispatcher.connectors.http_retry")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for _ in range(5):
            logs.retrying(1, "RATE_LIMITED", 0.5)
        logs.retrying(2, "SERVER_ERROR", 0.5)  # another code: a line of its own
        now[0] = ATTEMPT_LOG_SECONDS
        logs.retrying(3, "RATE_LIMITED", 2.0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records] == [
        "acme attempt 1 failed (RATE_LIMITED); retrying in 0.50s",
        "acme attempt 2 failed (SERVER_ERROR); retrying in 0.50s",
        "acme attempt 3 failed (RATE_LIMITED); retrying in 2.00s (4 more retries like it since the last line)",
    ]


@dataclass(frozen=True)
class AnyLine:
    """Equal to any line that starts with `start`."""

    start: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith(self.start)
