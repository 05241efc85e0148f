"""gRPC health follows Redis, which every call needs: NOT_SERVING while a real Redis server is
stopped, SERVING again once it answers."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status


async def until(port: int, status: int, service: str = "", seconds: float = 10) -> float:
    """How long it took the health of `service` to become `status`."""
    started = time.monotonic()
    while await health_of(port, service) != status:
        assert time.monotonic() - started < seconds, f"health did not become {status} in {seconds}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("service", ["resolver", "dispatcher"])
async def test_health_is_not_serving_while_redis_is_down(
    service, start_resolver, start_dispatcher, disposable_redis, caplog
) -> None:
    settings = {"redis_url": disposable_redis.url, "store_check_seconds": 0.2}
    if service == "resolver":
        running = await start_resolver(**settings)
        name = "tokensend.resolver.v1.ResolverService"
    else:
        running = await start_dispatcher(**settings)  # its resolver uses the test's own Redis
        name = "tokensend.dispatcher.v1.DispatcherService"
    assert await health_of(running.port) == SERVING and await health_of(running.port, name) == SERVING

    disposable_redis.stop()
    took = await until(running.port, NOT_SERVING)
    assert await health_of(running.port, name) == NOT_SERVING
    assert took >= 0.2  # two failed pings in a row, not one
    assert "Redis does not answer" in caplog.text

    disposable_redis.start()
    await until(running.port, SERVING)
    assert await health_of(running.port, name) == SERVING
    assert "Redis answers again: health SERVING" in caplog.text
