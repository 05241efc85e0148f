"""A Redis Cluster master dies mid-campaign and its replica takes over.

A cluster of its own (three masters, one replica each, a one-second node timeout), so the
session's cluster is left alone. What must hold: while the workspace's slot has no master, calls
fail `UNAVAILABLE` and send nothing; once the replica is promoted the same services carry on
without a restart, and what was sent before the failover is still known (a repeat is DUPLICATE,
never a second message).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.conftest import RedisClusterNodes
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    put_messages,
    running_receipts,
    sendgrid_event,
    stats,
    stream_entries,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cluster_mode")]

C = common_pb2.Channel
S = pb.DispatchStatus
FAILOVER_SECONDS = 30  # node timeout, election and the client finding the new master, with room


@pytest.fixture
def failover_cluster(tmp_path) -> RedisClusterNodes:
    nodes = RedisClusterNodes.start(tmp_path, masters=3, replicas=1, node_timeout_ms=1000)
    yield nodes
    nodes.stop()


@pytest.fixture
def redis_url(failover_cluster) -> str:
    return failover_cluster.url


@pytest.fixture
async def redis(redis_url) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_url)
    await client.initialize()
    yield client
    await client.aclose()


async def test_a_master_failing_over_mid_campaign(start_suite, redis, failover_cluster):
    suite = await start_suite()
    first = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(20), instance="fo-1")
    assert first.summary.sent == 20

    master = redis.get_node_from_key("ts:{" + suite.workspace_id + "}:x")
    # The replica has every write so far before its master goes.
    await replicated(redis, master)
    index = failover_cluster.ports.index(master.port)
    failover_cluster.processes[index].send_signal(signal.SIGKILL)
    failover_cluster.processes[index].wait(10)

    refused: list[grpc.StatusCode] = []
    killed_at = time.monotonic()
    deadline = killed_at + FAILOVER_SECONDS
    while True:
        try:
            second = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(20, start=21), instance="fo-1")
            break
        except grpc.aio.AioRpcError as exc:
            refused.append(exc.code())
            assert time.monotonic() < deadline, f"no master for the workspace's slot after {FAILOVER_SECONDS}s"
            await asyncio.sleep(0.5)
    assert set(refused) <= {grpc.StatusCode.UNAVAILABLE}, refused
    assert second.summary.sent == 20

    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(40), instance="fo-1")
    assert [r.status for r in again.results] == [S.DISPATCH_STATUS_DUPLICATE] * 40
    sent = [m.client_ref for m in suite.providers.outbox_for("custom")]
    assert len(sent) == len(set(sent)) == 40  # the refused attempts sent nothing; nobody twice
    settled = time.monotonic() - killed_at
    print(f"failover: {len(refused)} calls refused UNAVAILABLE, sending again {settled:.1f}s after the kill")


async def replicated(redis, master) -> None:
    """Waits until the master's replica has every write so far (WAIT), within FAILOVER_SECONDS.

    Each WAIT blocks at most a second, well inside the client's 5 s socket timeout: a replica still
    finishing its first sync on a loaded machine can take longer than one WAIT."""
    deadline = time.monotonic() + FAILOVER_SECONDS
    while await redis.execute_command("WAIT", 1, 1000, target_nodes=master) < 1:
        assert time.monotonic() < deadline, f"the replica did not catch up in {FAILOVER_SECONDS}s"


async def settled_read(read):
    """The test's own read after a failover: its cluster client may still know the old topology."""
    deadline = time.monotonic() + FAILOVER_SECONDS
    while True:
        try:
            return await read()
        except (RedisError, OSError):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)


async def test_receipts_while_a_master_fails_over(redis, redis_url, failover_cluster):
    """A webhook that arrives while the workspace's slot has no master either waits for the promoted
    replica (the cluster client retries) or is answered 503, and the provider redelivers it; either
    way it is counted once, and the events from before the failover are still known."""
    async with running_receipts(redis, redis_url) as receipts:
        pii = Pii.new()
        before, during = await put_messages(redis, "sendgrid", 2)
        first = [sendgrid_event("delivered", pii, message_id=before.message_id)]
        assert (await receipts.post_sendgrid(first)).status == 200

        master = redis.get_node_from_key("ts:{" + WS + "}:x")
        await replicated(redis, master)
        index = failover_cluster.ports.index(master.port)
        failover_cluster.processes[index].send_signal(signal.SIGKILL)
        failover_cluster.processes[index].wait(10)

        events = [sendgrid_event("delivered", pii, message_id=during.message_id)]
        answers: list[int] = []
        deadline = time.monotonic() + FAILOVER_SECONDS
        while (status := (await receipts.post_sendgrid(events)).status) != 200:
            answers.append(status)
            assert time.monotonic() < deadline, f"no master for the workspace's slot after {FAILOVER_SECONDS}s"
            await asyncio.sleep(0.5)
        assert set(answers) <= {503}, answers

        for redelivered in (first, events):  # the same events again: duplicates, counted once
            assert (await receipts.post_sendgrid(redelivered)).status == 200
        assert (await settled_read(lambda: stats(redis)))["delivered"] == 2
        assert len(await settled_read(lambda: stream_entries(redis))) == 2
        print(f"receipts failover: {len(answers)} webhooks answered 503 before the replica took over")
