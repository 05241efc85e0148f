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
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from tests.conftest import RedisClusterNodes
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
FAILOVER_SECONDS = 30  # node timeout, election and the client finding the new master, with room


@pytest.fixture(autouse=True)
def cluster_mode(monkeypatch) -> None:
    monkeypatch.setenv("TOKENSEND_REDIS_CLUSTER", "true")


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
    assert await redis.execute_command("WAIT", 1, 5000, target_nodes=master) == 1
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
