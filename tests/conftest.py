"""Fixtures shared by every kind of test: Redis, the sample PII API, the resolver on port 0."""

from __future__ import annotations

import base64
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from tokensend.resolver.v1 import resolver_service_pb2_grpc as resolver_grpc

from libs.settings import ResolverSettings
from sandbox.pii_api import Customer, PiiApiSandbox, generate_customers, start_pii_api
from services.resolver.server import ResolverDeps, build_server

TEST_REDIS_URL = os.environ.get("TOKENSEND_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_secret_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@pytest.fixture
def redis_url() -> str:
    return TEST_REDIS_URL


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A clean test database; every key in it was written by the test."""
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def customers() -> dict[str, Customer]:
    return generate_customers(60)


@dataclass
class RunningPiiApi:
    sandbox: PiiApiSandbox
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def start_pii_api_server(customers) -> AsyncIterator[Callable[..., Awaitable[RunningPiiApi]]]:
    """Starts sample PII APIs on ephemeral ports: `await start(oauth=..., encryption_key=...)`."""
    runners = []

    async def start(customers_override: dict[str, Customer] | None = None, **kwargs: Any) -> RunningPiiApi:
        sandbox = PiiApiSandbox(customers_override or customers, **kwargs)
        runner, port = await start_pii_api(sandbox)
        runners.append(runner)
        return RunningPiiApi(sandbox, port)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def pii_api(start_pii_api_server) -> RunningPiiApi:
    return await start_pii_api_server()


@dataclass
class RunningResolver:
    stub: resolver_grpc.ResolverServiceStub
    channel: grpc.aio.Channel
    port: int
    settings: ResolverSettings
    deps: ResolverDeps


def resolver_settings(redis_url: str, **overrides: Any) -> ResolverSettings:
    values = dict(
        redis_url=redis_url,
        secret_key=new_secret_key(),
        grpc_host="127.0.0.1",
        grpc_port=0,
        allow_private_networks=True,
        pii_retry_base_ms=10,
        pii_retry_max_ms=40,
        circuit_open_seconds=0.5,
        grace_seconds=1,
    )
    values.update(overrides)
    return ResolverSettings(**values)


@pytest.fixture
async def start_resolver(redis, redis_url) -> AsyncIterator[Callable[..., Awaitable[RunningResolver]]]:
    """Starts resolvers on port 0 against the test Redis: `await start(circuit_failure_threshold=3)`."""
    running: list[tuple[Any, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> RunningResolver:
        settings = resolver_settings(overrides.pop("redis_url", redis_url), **overrides)
        deps = ResolverDeps.from_settings(settings)
        service, port = await build_server(settings, deps)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        running.append((service, channel))
        return RunningResolver(resolver_grpc.ResolverServiceStub(channel), channel, port, settings, deps)

    yield start
    for service, channel in running:
        await channel.close()
        await service.stop(0.5)


@pytest.fixture
async def resolver(start_resolver) -> RunningResolver:
    return await start_resolver()


@pytest.fixture
def captured_logs(caplog) -> pytest.LogCaptureFixture:
    """Every log record of every logger, at every level, for PII scans."""
    caplog.set_level(logging.DEBUG)
    return caplog
