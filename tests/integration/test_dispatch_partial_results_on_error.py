"""A `Dispatch` of several batches that fails after its first keeps what it answered: the error, its code
and message kept, says how many recipients were answered and carries their results (a DispatchResponse)
as a google.rpc.Status detail, read with the generated stubs and with grpcurl over reflection."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import json_format
from grpc_status import rpc_status
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from sandbox.pii_api import generate_customers
from services.dispatcher import servicer
from services.dispatcher.campaign import CampaignSender
from services.dispatcher.guards import CampaignInstances
from services.resolver.server import ResolverDeps
from services.resolver.server import build_server as build_resolver
from tests.conftest import bounded_teardown, grpcurl_path, resolver_settings
from tests.integration.test_dispatcher_campaigns import EMAIL, SMS, dispatch, dispatch_request, recipients
from tests.integration.test_dispatcher_faults import LostResolver

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
MESSAGE_ID = re.compile(r"[0-9a-f]{32}")


def partial_results(error: grpc.aio.AioRpcError) -> pb.DispatchResponse:
    """The one detail of the error's google.rpc.Status: the results the call had."""
    status = rpc_status.from_call(error)
    assert status is not None and len(status.details) == 1
    partial = pb.DispatchResponse()
    assert status.details[0].Unpack(partial)
    return partial


def taken_by_another_campaign_before_the_second_batch(monkeypatch, redis, workspace_id: str) -> None:
    """The record expires while the call runs and campaign "spring" takes the instance: the call's take
    before its second batch finds it another's."""
    monkeypatch.setattr(servicer, "INSTANCE_REFRESH_SECONDS", 0)
    take, seen = CampaignInstances.take, []

    async def taken_meanwhile(self, ws, campaign_id, instance):
        seen.append(campaign_id)
        if len(seen) == 2:
            await redis.set(CampaignInstances.key(workspace_id, instance), "spring")
        return await take(self, ws, campaign_id, instance)

    monkeypatch.setattr(CampaignInstances, "take", taken_meanwhile)


async def test_an_instance_taken_between_batches_ends_the_call_with_the_first_batch_s_results(
    start_suite, redis, monkeypatch
):
    suite = await start_suite(batch_size=5)
    taken_by_another_campaign_before_the_second_batch(monkeypatch, redis, suite.workspace_id)
    people = recipients(12)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, instance="i1", campaign="summer")
    error = caught.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("campaign_instance_id: instance 'i1' was started by campaign 'spring'")
    assert error.details().endswith(
        "that campaign took it: 7 of the call's 12 recipients were not sent; 5 of the call's 12 recipients "
        "were answered, their results are in the error's details"
    ), error.details()

    partial = partial_results(error)
    assert [r.anonymous_id for r in partial.results] == [p.anonymous_id for p in people[:5]]
    assert {r.status for r in partial.results} == {S.DISPATCH_STATUS_SENT}
    assert all(MESSAGE_ID.fullmatch(r.message_id) for r in partial.results)
    assert (partial.summary.attempted, partial.summary.sent) == (5, 5)
    sent = suite.providers.outbox_for("custom")
    assert len(sent) == 5


@pytest.fixture
async def resolver(redis_url, secret_key) -> AsyncIterator[LostResolver]:
    """A resolver of the test's own, for it to stop."""
    settings = resolver_settings(redis_url, secret_key)
    resolver = LostResolver(*await build_resolver(settings, ResolverDeps.from_settings(settings)))
    yield resolver
    if not resolver.stopped:
        await bounded_teardown(resolver.stop(), "resolver stop")


async def test_a_batch_failing_unavailable_after_one_sent_gives_the_sent_one_s_message_ids(
    start_suite, start_dispatcher, resolver, redis, monkeypatch
):
    """The resolver goes away once the first batch is sent: the second batch's fetch fails, the call ends
    UNAVAILABLE with the first batch's results; a re-run sends the rest and answers the first batch
    DUPLICATE under the same message IDs."""
    suite = await start_suite(batch_size=5, resolver_addr=f"127.0.0.1:{resolver.port}")
    send_batch = CampaignSender.send_batch

    async def resolver_lost_after_the_first(self, call, chunk):
        report = await send_batch(self, call, chunk)
        if not resolver.stopped:
            await resolver.stop()
        return report

    monkeypatch.setattr(CampaignSender, "send_batch", resolver_lost_after_the_first)
    people = recipients(12)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, instance="gone-1")
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith("resolver unavailable"), error.details()
    assert (
        "; 5 of the call's 12 recipients were answered, their results are in the error's details; of the other 7, "
        "the failed batch's were sent only where the provider took them before it failed, and none after it was: "
        "a re-run of the instance sends those not sent and answers the others DUPLICATE with their message IDs"
    ) in error.details()
    partial = partial_results(error)
    first = {r.anonymous_id: r.message_id for r in partial.results}
    assert list(first) == [p.anonymous_id for p in people[:5]]
    assert all(MESSAGE_ID.fullmatch(m) for m in first.values())
    assert partial.summary.sent == 5
    assert len(suite.providers.outbox_for("custom")) == 5

    monkeypatch.setattr(CampaignSender, "send_batch", send_batch)
    other = await start_dispatcher(suite.resolver)
    again = await dispatch(
        dataclasses.replace(suite, dispatcher=other), C.CHANNEL_SMS, "gateway", SMS, people, "gone-1"
    )
    assert {r.anonymous_id: r.message_id for r in again.results[:5]} == first
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_DUPLICATE] * 5 + [S.DISPATCH_STATUS_SENT] * 7
    assert len(suite.providers.outbox_for("custom")) == 12


async def test_a_first_batch_s_results_past_what_a_client_takes_are_cut_to_the_first_and_summarised(
    start_suite, redis, monkeypatch
):
    """400 results would be some 22 kB of metadata: gRPC clients refuse some errors past 8 KiB by default and
    every one past 16 KiB (RESOURCE_EXHAUSTED, the error itself lost). The details hold the first results and
    the summary of all, and the message says so. Redis fails at the take before the second batch:
    UNAVAILABLE, the rest not sent."""
    suite = await start_suite(batch_size=400)
    suite.pii_api.sandbox.customers.update(generate_customers(410))
    monkeypatch.setattr(servicer, "INSTANCE_REFRESH_SECONDS", 0)
    take, seen = CampaignInstances.take, []

    async def unreachable_the_second_time(self, workspace_id, campaign_id, instance):
        seen.append(campaign_id)
        if len(seen) == 2:
            raise RedisConnectionError("connection refused")
        return await take(self, workspace_id, campaign_id, instance)

    monkeypatch.setattr(CampaignInstances, "take", unreachable_the_second_time)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", EMAIL, recipients(410), instance="big-1")
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    partial = partial_results(error)
    held = len(partial.results)
    assert 50 < held < 400
    assert [r.anonymous_id for r in partial.results] == [f"cust-{i:06d}" for i in range(1, held + 1)]
    assert (partial.summary.attempted, partial.summary.sent) == (400, 400)
    assert error.details() == (
        f"storage unavailable, retry later; 400 of the call's 410 recipients were answered, their results are in "
        f"the error's details (the first {held} and the summary of all: a gRPC client takes 8 KiB of metadata "
        "by default); the other 10 were not sent (nothing claimed): a re-run of the instance sends them"
    )
    assert len(suite.providers.outbox_for("sendgrid")) == 400


async def test_grpcurl_shows_the_results_a_failed_dispatch_had(start_suite, redis, monkeypatch):
    """What an operator sees: grpcurl, reading the types over reflection, prints the DispatchResponse
    detail with the message IDs of the batch sent."""
    suite = await start_suite(batch_size=2)
    taken_by_another_campaign_before_the_second_batch(monkeypatch, redis, suite.workspace_id)
    request = dispatch_request(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(3), "i2", "summer")
    shown = await asyncio.create_subprocess_exec(
        grpcurl_path(), "-plaintext", "-d", json_format.MessageToJson(request), f"127.0.0.1:{suite.dispatcher.port}",
        "tokensend.dispatcher.v1.DispatcherService/Dispatch",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(shown.communicate(), 20)
    text = (out + err).decode()
    assert shown.returncode != 0, text
    assert "Code: FailedPrecondition" in text, text
    assert "2 of the call's 3 recipients were answered, their results are in the error's details" in text, text
    # Each detail as JSON on its own line, numbered: "  1)\t{...}".
    [line] = [line for line in text.splitlines() if line.strip().startswith("1)")]
    detail = json.loads(line.split(")", 1)[1])
    assert detail["@type"] == "type.googleapis.com/tokensend.dispatcher.v1.DispatchResponse"
    assert [r["anonymous_id"] for r in detail["results"]] == ["cust-000001", "cust-000002"], text
    assert all(MESSAGE_ID.fullmatch(r["message_id"]) for r in detail["results"])
    assert detail["summary"] == {"attempted": 2, "sent": 2}
