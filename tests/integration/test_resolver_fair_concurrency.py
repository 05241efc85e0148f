"""A brand whose PII API hangs holds its workspace's share of a resolver's concurrent PII API calls, not
all of them: another brand's calls still answer at once, and calls waiting for a place are shown by
workspace on `tokensend.pii_api.waiting`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2_grpc as pb_grpc

from libs.telemetry import setup_telemetry
from services.resolver.server import ResolverDeps, build_server
from tests.conftest import resolver_settings
from tests.fairness import until, waiting_by_workspace
from tests.pii_configs import single_config

pytestmark = pytest.mark.integration

EMAIL = common_pb2.CHANNEL_EMAIL
E = pb.ResolveErrorCode
Stub = pb_grpc.ResolverServiceStub
HUNG_IDS = [f"cust-{n:06d}" for n in range(1, 7)]


@pytest.fixture
async def metered_resolver(redis, redis_url, secret_key) -> AsyncIterator[tuple[Stub, InMemoryMetricReader]]:
    """A resolver with four concurrent PII API calls, two a workspace, and a metric reader."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("resolver", metric_readers=[reader])
    settings = resolver_settings(redis_url, secret_key, pii_concurrency=4, pii_concurrency_per_workspace=2)
    service, port = await build_server(settings, ResolverDeps.from_settings(settings, telemetry))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Stub(channel), reader
    await channel.close()
    await service.stop(0.5)
    telemetry.shutdown()


def waiting_calls(reader: InMemoryMetricReader) -> dict[str, int]:
    return waiting_by_workspace(reader, "tokensend.pii_api.waiting")


def request(workspace_id: str, ids: list[str]) -> pb.ResolveContactsRequest:
    return pb.ResolveContactsRequest(workspace_id=workspace_id, channel=EMAIL, anonymous_ids=ids)


async def test_a_hung_pii_api_holds_its_workspaces_share_and_another_brands_calls_answer_at_once(
    metered_resolver, start_pii_api_server, customers
):
    stub, reader = metered_resolver
    hung, fast = await start_pii_api_server(), await start_pii_api_server()
    for config in (
        single_config(hung.base_url, workspace_id="ws-hung", timeout_ms=5000, max_retries=0),
        single_config(fast.base_url, workspace_id="ws-fast"),
    ):
        await stub.PutPiiApiConfig(pb.PutPiiApiConfigRequest(config=config))
    hung.sandbox.faults.latency_ms = 2000
    held = stub.ResolveContacts(request("ws-hung", HUNG_IDS))  # no deadline: six lookups, two at a time
    await until(lambda: waiting_calls(reader).get("ws-hung") == 4)
    # The two given places send their requests; they may reach the API a moment after the others queue.
    await until(lambda: hung.sandbox.stats.requests >= 2)
    assert hung.sandbox.stats.requests == 2

    ids = ["cust-000001", "cust-000002", "cust-000003"]
    started = time.monotonic()
    reply = await stub.ResolveContacts(request("ws-fast", ids), timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in ids]

    # The hung brand's next caller waits for its own workspace's places, until its deadline.
    reply = await stub.ResolveContacts(request("ws-hung", ["cust-000007"]), timeout=0.5)
    error = reply.contacts[0].error
    assert error.code == E.RESOLVE_ERROR_CODE_TIMEOUT and error.attempts == 1
    assert error.detail == (
        "the caller's deadline came first, before one of its workspace's 2 concurrent PII API calls was free"
    )

    # The caller gone, its calls give their places back: the brand's API, well again, gets all its share.
    held.cancel()
    await until(lambda: waiting_calls(reader) == {"": 0})
    hung.sandbox.faults.latency_ms = 0
    reply = await stub.ResolveContacts(request("ws-hung", ids), timeout=1.0)
    assert [c.contact for c in reply.contacts] == [customers[i].email for i in ids]
