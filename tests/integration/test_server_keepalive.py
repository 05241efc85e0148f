"""Every tokensend server pings its callers: a caller whose host vanished without closing the connection is
found in seconds and its calls end, and a caller that is only quiet keeps its long calls."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.dispatcher.v1.dispatcher_service_pb2_grpc import DispatcherServiceStub
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1.receipts_service_pb2_grpc import ReceiptsServiceStub

from libs import keepalive
from libs.campaign_stats import read_counts
from sandbox.pii_api import generate_customers
from services.receipts.server import ReceiptsDeps, build_server
from tests.conftest import bounded_teardown
from tests.integration.test_dispatcher_campaigns import recipients, stream_requests
from tests.integration.test_receipts_harness import WS, Pii, put_messages, running_receipts, twilio_params
from tests.integration.test_resolver_keepalive import BlackholingProxy

pytestmark = pytest.mark.integration

TAIL = pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="$")


def servers_pinging_every_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server keepalive at the test's scale, for the servers started after: a ping after a second without a
    frame from the caller, the connection closed when its answer has not come a second later."""
    monkeypatch.setattr(keepalive, "SERVER_KEEPALIVE_TIME_MS", 1000)
    monkeypatch.setattr(keepalive, "SERVER_KEEPALIVE_TIMEOUT_MS", 1000)


async def tail_opens(stub: ReceiptsServiceStub) -> bool:
    """Whether a new tail of WS is taken (still open a moment later) rather than refused RESOURCE_EXHAUSTED."""
    tail = stub.StreamDeliveryEvents(TAIL)
    reading = asyncio.ensure_future(tail.read())
    done, _ = await asyncio.wait([reading], timeout=0.3)
    if not done:
        tail.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        return True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        reading.result()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    return False


async def test_a_tail_whose_caller_vanished_ends_in_seconds_and_gives_its_place_back(redis, redis_url, monkeypatch):
    """The campaign engine's host lost (a partition, a blackholing load balancer) with a tail open and quiet
    for several pings: its connection stays open and carries nothing, so only the server's unanswered ping
    ends the call, and the workspace's place it held (one here) is taken by the next tail within seconds,
    not once the kernel gives up on the connection many minutes later."""
    servers_pinging_every_second(monkeypatch)
    async with running_receipts(redis, redis_url, events_max_streams_per_workspace=1) as receipts:
        # A process of the test's own, reached through the proxy, and directly for the next tails.
        service, port = await build_server(receipts.settings, ReceiptsDeps.from_settings(receipts.settings))
        proxy = BlackholingProxy(port)
        await proxy.start()
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as vanishing,
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as direct,
            ):
                tail = ReceiptsServiceStub(vanishing).StreamDeliveryEvents(TAIL)
                reading = asyncio.ensure_future(tail.read())
                await asyncio.sleep(3.5)  # tailing, nothing sent either way but the server's pings and answers
                assert not reading.done()

                proxy.cut()
                cut_at = time.monotonic()
                assert not await tail_opens(ReceiptsServiceStub(direct)), "the tail did not hold the workspace's place"
                while not await tail_opens(ReceiptsServiceStub(direct)):
                    assert time.monotonic() - cut_at < 6, "the server kept the vanished caller's tail"
                tail.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        finally:
            await bounded_teardown(proxy.stop(), "proxy stop")
            await bounded_teardown(service.stop(0), "receipts stop")


async def test_a_quiet_caller_that_sends_no_pings_keeps_its_tail(redis, redis_url, monkeypatch):
    """A tail idle between events, from a client with no keepalive of its own: the server's pings are
    answered (every HTTP/2 client does), so the call stays open and the next event reaches it."""
    servers_pinging_every_second(monkeypatch)
    [record] = await put_messages(redis, "twilio", 1)
    async with running_receipts(redis, redis_url) as receipts:
        tail = receipts.stub.StreamDeliveryEvents(TAIL)
        reading = asyncio.ensure_future(tail.read())
        await asyncio.sleep(4.5)  # four pings, and the tail's reads of Redis, with nothing to send
        assert not reading.done()
        await receipts.post_twilio(twilio_params("delivered", Pii.new()), record.message_id)
        event = await asyncio.wait_for(reading, 5)
        assert event.message_id == record.message_id
        tail.cancel()


async def sent_until_still(suite, quiet_for: float, within: float) -> int | None:
    """The messages the gateway has taken once none more came for `quiet_for` seconds, or None if they kept
    coming for `within` seconds."""
    deadline = time.monotonic() + within
    count, since = len(suite.providers.outbox_for("custom")), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = len(suite.providers.outbox_for("custom"))
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            return count
    return None


async def test_a_dispatch_stream_whose_caller_vanished_stops_in_seconds_counted_and_its_claims_settled(
    start_suite, redis, monkeypatch
):
    """The campaign engine's host lost mid-DispatchStream, with most of the recipients it sent still to
    go: the connection stays open and carries nothing, so only the server's unanswered ping ends the call.
    Its batches then stop (no more recipients taken), those cut off settle and are counted as for a
    cancelled stream, and their claims are settled or given back, so a re-run of the instance sends the
    rest, each once, rather than finding them held."""
    servers_pinging_every_second(monkeypatch)
    suite = await start_suite(batch_size=10)
    suite.pii_api.sandbox.customers.update(generate_customers(600))
    suite.providers.set_faults("custom", latency_ms=500)  # two batches of 10 in flight: 15 s at least
    people = recipients(600)
    proxy = BlackholingProxy(suite.dispatcher.port)
    await proxy.start()
    try:
        # A client with no keepalive of its own: the server's pings are all that watch the connection.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as vanishing:
            call = DispatcherServiceStub(vanishing).DispatchStream(stream_requests(suite, "lost-1", [people]))
            first = await call.read()
            assert len(first.results) == 10

            proxy.cut()
            sent = await sent_until_still(suite, quiet_for=1.5, within=10)
            assert sent is not None, "the server went on with the vanished caller's stream"
            assert sent < len(people)
            call.cancel()
    finally:
        await bounded_teardown(proxy.stop(), "proxy stop")

    counts = await read_counts(redis, suite.workspace_id, "spring", "lost-1")
    assert counts.get("sent", 0) + counts.get("send_failed", 0) == sent, (counts, sent)

    suite.providers.set_faults("custom", latency_ms=0)
    rerun = dpb.DispatchStreamResponse()
    async for reply in suite.dispatcher.stub.DispatchStream(stream_requests(suite, "lost-1", [people])):
        rerun.results.extend(reply.results)
    codes = Counter(r.error_code for r in rerun.results if r.status == dpb.DISPATCH_STATUS_DUPLICATE)
    assert "IN_FLIGHT" not in codes, codes  # a claim of the lost stream still held
    assert sum(codes.values()) == sent
    assert len(suite.providers.outbox_for("custom")) == len(people)
