"""A brand whose provider hangs holds its workspace's share of a dispatcher's send slots, not all of
them: another brand's campaign on the same dispatcher is still sent at once, and senders waiting for a
slot are shown by workspace on `tokensend.sends.waiting`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.telemetry import Telemetry, setup_telemetry
from sandbox.workspace import SandboxWorkspace, configure
from tests.fairness import until, waiting_by_workspace

pytestmark = pytest.mark.integration

SMS = pb.Content(sms_body="Hi {{ first_name }}")
HUNG_MS = 2000  # each of the hung brand's provider requests


def campaign(workspace_id: str, connector_id: str, instance: str, first: int, count: int) -> pb.DispatchRequest:
    return pb.DispatchRequest(
        workspace_id=workspace_id,
        campaign_id="spring",
        campaign_instance_id=instance,
        channel=common_pb2.CHANNEL_SMS,
        connector_id=connector_id,
        content=SMS,
        recipients=[pb.Recipient(anonymous_id=f"cust-{i:06d}") for i in range(first, first + count)],
    )


@pytest.fixture
def dispatcher_metrics() -> Iterator[tuple[Telemetry, InMemoryMetricReader]]:
    """The dispatcher's telemetry and a metric reader; asked for before the suite, shut down after it."""
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("dispatcher", metric_readers=[reader])
    yield telemetry, reader
    telemetry.shutdown()


def waiting_sends(reader: InMemoryMetricReader) -> dict[str, int]:
    return waiting_by_workspace(reader, "tokensend.sends.waiting")


async def test_a_hung_provider_holds_its_workspaces_share_of_the_send_slots_and_another_brand_still_sends(
    start_suite,
):
    """Four slots, two a workspace: the hung brand's four one-message requests (its gateway answers
    each after 2 s) go out two at a time, and the other brand's campaign, on another provider, is
    sent while they still hang. With one pool the hung brand took all four and the other waited 2 s."""
    suite = await start_suite(workspace_id="ws-hung", send_concurrency=4, send_concurrency_per_workspace=2)
    # The same sandbox accounts (its credentials) behind another brand's connectors.
    providers_url = f"http://127.0.0.1:{suite.providers_port}"
    fast = SandboxWorkspace("ws-fast", suite.pii_api.base_url, providers_url, suite.providers.sendgrid_public_key)
    await configure(fast, suite.resolver.stub, suite.dispatcher.stub)
    stub = suite.dispatcher.stub
    warm = await stub.Dispatch(campaign("ws-fast", "twilio", "warm", 1, 1))  # configs loaded, connections open
    assert warm.summary.sent == 1

    suite.providers.set_faults("custom", latency_ms=HUNG_MS)
    hung = asyncio.ensure_future(stub.Dispatch(campaign("ws-hung", "gateway", "hung", 1, 4)))
    await until(lambda: suite.providers.stats.peak_in_flight["custom"] >= 2)
    await asyncio.sleep(0.2)  # time for any further sender of the hung brand to take a slot

    started = time.monotonic()
    reply = await stub.Dispatch(campaign("ws-fast", "twilio", "fast", 11, 6), timeout=HUNG_MS / 1000 * 0.75)
    assert reply.summary.sent == 6
    assert time.monotonic() - started < HUNG_MS / 1000 * 0.75
    assert suite.providers.outbox_for("custom") == []  # sent while every hung request still waited
    assert suite.providers.stats.peak_in_flight["custom"] == 2

    assert (await hung).summary.sent == 4  # its share, two at a time: the brand's campaign still goes out


async def test_senders_waiting_on_their_workspaces_share_are_shown_by_workspace(dispatcher_metrics, start_suite):
    """Two slots a workspace: the hung brand's first campaign holds both, its second campaign's two
    senders wait on the workspace's share, and the gauge shows them for that workspace alone while
    the other brand's campaign is sent at once; none once the hung requests are answered."""
    telemetry, reader = dispatcher_metrics
    suite = await start_suite(
        workspace_id="ws-hung", send_concurrency=4, send_concurrency_per_workspace=2, telemetry=telemetry
    )
    providers_url = f"http://127.0.0.1:{suite.providers_port}"
    fast = SandboxWorkspace("ws-fast", suite.pii_api.base_url, providers_url, suite.providers.sendgrid_public_key)
    await configure(fast, suite.resolver.stub, suite.dispatcher.stub)
    stub = suite.dispatcher.stub
    assert (await stub.Dispatch(campaign("ws-fast", "twilio", "warm", 1, 1))).summary.sent == 1
    assert waiting_sends(reader) == {"": 0}

    suite.providers.set_faults("custom", latency_ms=HUNG_MS)
    first = asyncio.ensure_future(stub.Dispatch(campaign("ws-hung", "gateway", "hung-1", 1, 2)))
    await until(lambda: suite.providers.stats.peak_in_flight["custom"] >= 2)
    second = asyncio.ensure_future(stub.Dispatch(campaign("ws-hung", "gateway", "hung-2", 11, 2)))
    await until(lambda: waiting_sends(reader).get("ws-hung") == 2)

    sending = asyncio.ensure_future(
        stub.Dispatch(campaign("ws-fast", "twilio", "fast", 21, 3), timeout=HUNG_MS / 1000 * 0.75)
    )
    seen = []  # read while the other brand's campaign is sent: its senders take the free slots
    while not sending.done():
        seen.append(waiting_sends(reader))
        await asyncio.sleep(0.001)
    assert (await sending).summary.sent == 3
    assert seen and all(reading == {"ws-hung": 2} for reading in seen)

    assert (await first).summary.sent == 2
    assert (await second).summary.sent == 2
    assert waiting_sends(reader) == {"": 0}
