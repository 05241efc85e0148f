"""A brand whose provider hangs holds its workspace's share of a dispatcher's send slots, not all of
them: another brand's campaign on the same dispatcher is still sent at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from sandbox.workspace import SandboxWorkspace, configure

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


async def until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


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
