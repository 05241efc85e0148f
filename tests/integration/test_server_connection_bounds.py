"""What one client connection may hold on a tokensend server: calls past TOKENSEND_GRPC_MAX_CONCURRENT_STREAMS
on one connection wait for one of its calls to end, while other connections are served."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokensend.receipts.v1 import receipts_service_pb2 as pb
from tokensend.receipts.v1.receipts_service_pb2_grpc import ReceiptsServiceStub

from services.receipts.server import ReceiptsDeps, build_server
from tests.conftest import bounded_teardown
from tests.integration.test_receipts_harness import WS, running_receipts

pytestmark = pytest.mark.integration

TAIL = pb.StreamDeliveryEventsRequest(workspace_id=WS, after_id="$")
CHECK = health_pb2.HealthCheckRequest()
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def test_calls_past_the_streams_a_connection_may_hold_wait_for_one_to_end(redis, redis_url):
    async with running_receipts(redis, redis_url, grpc_max_concurrent_streams=2) as receipts:
        service, port = await build_server(receipts.settings, ReceiptsDeps.from_settings(receipts.settings))
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as one,
                # A connection of its own: channels to one target otherwise share the process's connection.
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as other,
            ):
                health = health_pb2_grpc.HealthStub(one)
                await health.Check(CHECK, timeout=5)  # connected: the server's limit is known to the client
                tails = [ReceiptsServiceStub(one).StreamDeliveryEvents(TAIL) for _ in range(2)]
                reads = [asyncio.ensure_future(tail.read()) for tail in tails]
                for tail in tails:  # both taken by the server: each has its response headers
                    await asyncio.wait_for(tail.initial_metadata(), 5)

                third = asyncio.ensure_future(health.Check(CHECK, timeout=30))
                done, _ = await asyncio.wait([third], timeout=1.0)
                assert not done, "a third call on the connection was served while two were open"
                reply = await health_pb2_grpc.HealthStub(other).Check(CHECK, timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING  # another connection is served

                tails[0].cancel()
                reply = await asyncio.wait_for(third, 5)  # queued, not refused: served once a stream is free
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                tails[1].cancel()
                await asyncio.gather(*reads, return_exceptions=True)
        finally:
            await bounded_teardown(service.stop(0), "receipts stop")
