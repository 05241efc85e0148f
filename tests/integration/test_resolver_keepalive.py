"""The dispatcher's channel to the resolver kept alive by HTTP/2 pings: a resolver whose host vanished without
closing the connection is found in seconds, and the servers take those pings for no abuse; and an address that
answers nothing holds a connect attempt for seconds only."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from tokensend.common.v1 import common_pb2

from libs import keepalive
from services.dispatcher import resolver_client
from services.resolver.server import ResolverDeps
from services.resolver.server import build_server as build_resolver
from tests.conftest import bounded_teardown, resolver_settings
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel


@dataclasses.dataclass
class Link:
    """One connection through the proxy: its sockets (the caller's, and the server's unless it was taken
    while the proxy answered nothing), and whether what they carry still goes through."""

    sockets: tuple[asyncio.StreamWriter, ...]
    cut: bool = False


class BlackholingProxy:
    """A TCP proxy to a gRPC server that cuts the connections open through it as a lost network does:
    nothing they carry goes through any more, either way, and neither socket is closed. Later connections
    go through, as to a server back at the address, unless `answering` is False: they are then taken and
    answered nothing, as by a host that is gone, until it is True again (those taken meanwhile stay so)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.links: list[Link] = []
        self.answering = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for link in self.links:
            link.cut = True

    async def stop(self) -> None:
        self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for link in self.links:
            for writer in link.sockets:
                writer.close()
        await self._server.wait_closed()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.answering:
            link = Link((writer,), cut=True)
            self.links.append(link)
            self._start_pipe(reader, writer, link)  # read and dropped: the caller's sends never block
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        link = Link((writer, up_writer))
        self.links.append(link)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            self._start_pipe(source, sink, link)

    def _start_pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: Link) -> None:
        pipe = asyncio.create_task(self._pipe(source, sink, link))
        self._pipes.add(pipe)
        pipe.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: Link) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if not link.cut:  # once cut, read and dropped, as packets lost on the way
                    sink.write(data)
                    await sink.drain()
            if not link.cut:
                sink.close()


def pinging_every_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keepalive at the test's scale, for the servers and the dispatcher started after: the dispatcher pings
    after a second (a client of gRPC core pings no more often) and waits a second for the answer; the
    servers accept pings in the same proportion to it as in production."""
    monkeypatch.setattr(
        keepalive, "MIN_PING_INTERVAL_MS", 1000 * keepalive.MIN_PING_INTERVAL_MS // keepalive.KEEPALIVE_TIME_MS
    )
    monkeypatch.setattr(keepalive, "KEEPALIVE_TIME_MS", 1000)
    monkeypatch.setattr(keepalive, "KEEPALIVE_TIMEOUT_MS", 1000)


@pytest.fixture
async def proxied_resolver(redis_url, secret_key) -> AsyncIterator[Callable[[], Awaitable[BlackholingProxy]]]:
    """`await proxied_resolver()`: a resolver of the test's own (started once the test has set keepalive),
    reached through a BlackholingProxy."""
    started = []

    async def start() -> BlackholingProxy:
        settings = resolver_settings(redis_url, secret_key)
        service, port = await build_resolver(settings, ResolverDeps.from_settings(settings))
        proxy = BlackholingProxy(port)
        started.append((service, proxy))
        await proxy.start()
        return proxy

    yield start
    for service, proxy in started:
        await bounded_teardown(proxy.stop(), "proxy stop")
        await bounded_teardown(service.stop(0), "resolver stop")


async def test_a_call_on_the_connection_to_a_vanished_resolver_fails_in_seconds_not_at_its_deadline(
    start_suite, proxied_resolver, monkeypatch
):
    """The resolver's host lost (a partition, a blackholing load balancer) with a call on its connection,
    which stays open and carries nothing: the dispatcher's unanswered ping closes it, so the call fails
    UNAVAILABLE within seconds instead of at its 20 s deadline, and the next one goes through on a new one."""
    pinging_every_second(monkeypatch)
    proxy = await proxied_resolver()
    suite = await start_suite(resolver_addr=f"127.0.0.1:{proxy.port}", resolver_timeout_seconds=20)
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), "before")).summary.sent == 1

    proxy.cut()
    cut_at = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as lost:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1, start=2), "lost")
    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - cut_at < 5, "the call waited on the dead connection"

    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1, start=2), "lost")
    assert again.summary.sent == 1
    assert len(proxy.links) == 2


async def test_a_connection_lost_between_campaigns_is_replaced_before_the_next_call(
    start_suite, proxied_resolver, monkeypatch
):
    """The dispatcher pings its idle channel too, and not only twice (gRPC's default): a connection lost
    while no call was on it is closed before the next campaign, whose call goes through at once."""
    pinging_every_second(monkeypatch)
    proxy = await proxied_resolver()
    suite = await start_suite(resolver_addr=f"127.0.0.1:{proxy.port}", resolver_timeout_seconds=20)
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), "before")).summary.sent == 1
    await asyncio.sleep(3.5)  # three pings with no call in flight

    proxy.cut()
    await asyncio.sleep(2.5)  # the next ping unanswered
    reply = await asyncio.wait_for(dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1, start=2), "next"), 5)
    assert reply.summary.sent == 1
    assert len(proxy.links) == 2


async def test_the_resolver_takes_the_dispatchers_pings_idle_or_mid_call_for_no_abuse(
    start_suite, proxied_resolver, monkeypatch
):
    """The dispatcher's pings on its channel to the resolver, through 5 s with no call and through a call
    waiting 3 s on the PII API: the resolver answers them and keeps the connection, where gRPC's defaults
    count a ping within 5 minutes of the last, or with no call in flight, as a strike and close the
    connection at the third with GOAWAY "too_many_pings", failing the calls on it."""
    pinging_every_second(monkeypatch)
    proxy = await proxied_resolver()
    suite = await start_suite(resolver_addr=f"127.0.0.1:{proxy.port}")
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), "before")).summary.sent == 1
    await asyncio.sleep(5)  # five pings with no call in flight

    suite.pii_api.sandbox.faults.latency_ms = 3000
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1, start=2), "slow")).summary.sent == 1
    assert len(proxy.links) == 1, "the resolver closed the dispatcher's connection"


async def test_a_resolver_back_after_answering_nothing_is_reached_within_seconds_of_its_return(
    start_suite, proxied_resolver
):
    """The resolver's address answers nothing for a while (its host lost, then back, or its name moved to a
    live host): a connect attempt made meanwhile gives up after CONNECT_TIMEOUT_MS, not gRPC's 20 s, during
    which the calls waited and the resolver back at the address went unused, so campaigns go on within
    seconds of its return. Keepalive is left at its own scale: scaled down, its pings would end the attempt first."""
    proxy = await proxied_resolver()
    proxy.answering = False
    suite = await start_suite(resolver_addr=f"127.0.0.1:{proxy.port}")
    waiting = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), "away"))
    await asyncio.sleep(1)  # its connect attempt under way, answered nothing
    assert not waiting.done()

    proxy.answering = True
    returned_at = time.monotonic()
    bound = resolver_client.CONNECT_TIMEOUT_MS / 1000 + 3  # the attempt's end, a backoff and a connection
    while True:
        try:
            reply = await waiting
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - returned_at < bound, "the resolver was back, the dispatcher still not using it"
            await asyncio.sleep(0.1)
            waiting = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), "away"))
    assert time.monotonic() - returned_at < bound, "the resolver was back, the dispatcher still not using it"
    assert reply.summary.sent == 1
