"""The suite on a 3-master Redis Cluster: campaigns, receipts, scripts and pipelines, slot by slot.

Every setting built in this module reads TOKENSEND_REDIS_CLUSTER=true, and the `redis`/`redis_url`
fixtures point at the session's cluster (tests/conftest.py `redis_cluster`), so the campaign and
receipt tests imported below run here once more, unchanged, against the cluster. The tests of this
module's own drive the whole flow (send → provider → signed receipts → stats) and check that the
key layout really spreads workspaces over the masters while keeping each one in a single slot.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import grpc
import pytest
import redis as redis_sync
from grpc_health.v1 import health
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.receipts.v1 import receipts_service_pb2 as rpb
from tokensend.resolver.v1 import resolver_service_pb2 as resolver_pb

from libs.crypto import SecretBox
from libs.rekey import rekey
from libs.server import StoreWatch
from libs.store import _HiredisPacking, create_redis, eviction_risk, prepare_store
from sandbox.providers.receipts import default_receipt_script
from services.resolver.configs import PiiApiConfigStore
from tests.conftest import RedisClusterNodes, cluster_ports, new_secret_key
from tests.integration.test_config_cache import (  # noqa: F401 - collected again, on the cluster
    test_a_config_saved_by_one_resolver_is_used_by_another_on_its_next_call,
    test_a_connector_saved_on_one_dispatcher_is_sent_through_by_another,
)
from tests.integration.test_config_index_backfill import (  # noqa: F401 - collected again, on the cluster
    test_configs_saved_before_the_index_are_listed_and_an_oauth_config_they_use_is_kept,
    test_connectors_saved_before_the_index_are_listed_and_deleted,
    test_the_backfill_may_run_in_several_processes_at_once_and_indexes_no_deleted_config,
)
from tests.integration.test_config_lists import (  # noqa: F401 - collected again, on the cluster
    api,
    test_a_config_naming_the_oauth_config_saved_while_its_delete_checks_keeps_it,
    test_a_config_saved_while_the_oauth_config_it_names_is_deleted_is_refused,
)
from tests.integration.test_dispatcher_campaigns import (  # noqa: F401 - collected again, on the cluster
    EMAIL,
    SMS,
    dispatch,
    recipients,
    test_a_repeat_sends_nothing_new,
    test_campaign_arrives_personalised_and_mapped,
    test_concurrent_duplicate_calls_send_once,
    test_config_change_applies_from_the_next_instance,
    test_dispatch_stream_sends_a_large_campaign_in_batches,
    test_frequency_caps_hold_on_every_channel,
    test_resolve_and_render_failures_are_per_recipient,
)
from tests.integration.test_dispatcher_faults import test_connector_secrets_are_sealed_and_masked  # noqa: F401
from tests.integration.test_receipts_harness import running_receipts
from tests.integration.test_receipts_webhooks import (  # noqa: F401 - collected again, on the cluster
    test_concurrent_duplicates_count_once,
    test_out_of_order_counts_once_and_status_never_moves_back,
    test_provider_id_fallback_and_provider_must_match,
    test_redelivery_five_times_counts_once,
    test_sendgrid_every_event_type,
    test_unknown_ids_are_unmapped_and_dropped,
    test_whatsapp_several_statuses_per_post,
)
from tests.pii_configs import bulk_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cluster_mode")]

C = common_pb2.Channel


@pytest.fixture
def redis_url(redis_cluster) -> str:
    return redis_cluster.url


@pytest.fixture
async def redis(redis_url) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_url)
    await client.flushdb(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


async def test_workspaces_spread_over_the_masters_and_each_keeps_one_slot(start_suite, redis):
    """Three workspaces, three campaigns: every key of a workspace in its own slot, the slots on >1 node."""
    suites = [await start_suite(workspace_id=ws) for ws in ("brand", "acme", "globex")]
    for suite in suites:
        reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5))
        assert reply.summary.sent == 5
    slots: dict[str, set[int]] = {}
    async for key in redis.scan_iter(match="ts:*"):
        if key.startswith(b"ts:config-index-backfilled:"):
            continue  # once per Redis, no workspace's (libs.config_index)
        workspace = key.decode().split("{", 1)[1].split("}", 1)[0]
        slots.setdefault(workspace, set()).add(key_slot(key))
    assert set(slots) == {"brand", "acme", "globex"}
    assert all(len(s) == 1 for s in slots.values()), slots
    nodes = {redis.get_node_from_key(f"ts:{{{ws}}}:x").name for ws in slots}
    assert len(nodes) > 1  # the test means something only if the workspaces are not all on one master


async def test_campaign_and_receipts_flow_on_the_cluster(start_suite, redis, redis_url, secret_key):
    async with running_receipts(redis, redis_url, secret_key=secret_key) as receipts:
        suite = await start_suite(receipts_url=receipts.local_url)
        email = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", EMAIL, recipients(30), instance="run-1")
        whatsapp = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, recipients(20), instance="run-2")
        assert email.summary.sent == 30 and whatsapp.summary.sent == 20
        await suite.providers.drain_receipts()

        expected = {"run-1": 0, "run-2": 0}
        for provider, instance in (("sendgrid", "run-1"), ("whatsapp", "run-2")):
            for message in suite.providers.outbox_for(provider):
                expected[instance] += "delivered" in default_receipt_script(provider, message)
        for instance in ("run-1", "run-2"):
            stats = await receipts.stub.GetCampaignStats(
                rpb.GetCampaignStatsRequest(
                    workspace_id=suite.workspace_id, campaign_id="spring", campaign_instance_id=instance
                )
            )
            assert stats.delivered == expected[instance] > 0, instance
            assert stats.unmapped == 0

        events = []
        async for event in receipts.stub.StreamDeliveryEvents(
            rpb.StreamDeliveryEventsRequest(workspace_id=suite.workspace_id)
        ):
            events.append(event)
            if len(events) >= sum(expected.values()):
                break
        assert {e.campaign_id for e in events} == {"spring"}


async def test_dispatch_stream_with_caps_on_the_cluster(start_suite, redis):
    """DispatchStream over several batches; the claim/cap/map pipelines and scripts all run per slot."""
    suite = await start_suite(batch_size=50)
    cap = pb.FrequencyCap(max_messages=1, window_seconds=3600)

    async def requests():
        yield pb.DispatchStreamRequest(
            header=pb.DispatchStreamRequest.Header(
                workspace_id=suite.workspace_id,
                campaign_id="stream",
                campaign_instance_id="s-1",
                channel=C.CHANNEL_SMS,
                connector_id="gateway",
                content=SMS,
                frequency_cap=cap,
            )
        )
        for start in (1, 101):
            yield pb.DispatchStreamRequest(
                recipients=pb.DispatchStreamRequest.Recipients(recipients=recipients(100, start=start))
            )

    summaries = [r.summary async for r in suite.dispatcher.stub.DispatchStream(requests()) if r.HasField("summary")]
    assert summaries[-1].sent == 200
    again = [r async for r in suite.dispatcher.stub.DispatchStream(requests())]
    assert again[-1].summary.duplicate == 200
    assert len(suite.providers.outbox_for("custom")) == 200


async def test_rekey_scans_every_master(start_suite, redis, secret_key):
    """Configs of three workspaces (three slots, more than one node) are all re-sealed, once."""
    for workspace_id in ("brand", "acme", "globex"):
        await start_suite(workspace_id=workspace_id)
    box = SecretBox([base64.urlsafe_b64decode(k + "==") for k in (new_secret_key(), secret_key)])
    first = await rekey(redis, box)
    second = await rekey(redis, box)
    # per workspace: an OAuth config, three PII API configs and four connectors
    assert first.resealed == first.sealed >= 3 * 8 and first.unreadable == 0
    assert second.resealed == 0 and second.current == first.sealed


async def test_cluster_client_survives_concurrent_batches(start_suite):
    suite = await start_suite()
    replies = await asyncio.gather(
        *(dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(20, start=1 + 20 * i)) for i in range(5))
    )
    assert sum(r.summary.sent for r in replies) == 100


async def test_every_cluster_node_packs_commands_with_hiredis(start_suite):
    """The cluster client builds its nodes itself; each one, the start-up node included, must still
    pack the batch scripts' thousands of arguments in C."""
    suite = await start_suite()
    reply = await dispatch(suite, C.CHANNEL_EMAIL, "sendgrid", EMAIL, recipients(30))
    assert reply.summary.sent == 30
    client = suite.dispatcher.deps.redis
    nodes = client.get_nodes()
    assert len(nodes) >= 3
    assert all(issubclass(node.connection_class, _HiredisPacking) for node in nodes)
    opened = [connection for node in nodes for connection in node._connections]
    assert opened and all(isinstance(connection, _HiredisPacking) for connection in opened)


async def test_a_master_that_would_evict_keys_is_named(redis):
    """Each master is asked: one evicting master is enough to lose claims of the slots it holds."""
    assert await eviction_risk(redis) == ""
    master = redis.get_primaries()[-1]
    settings = {"maxmemory-policy": "volatile-lru", "maxmemory": "209715200"}
    try:
        for name, value in settings.items():
            await redis.config_set(name, value, target_nodes=master)
        assert await eviction_risk(redis) == "maxmemory-policy volatile-lru, maxmemory 200 MiB"
    finally:
        await redis.config_set("maxmemory", "0", target_nodes=master)
        await redis.config_set("maxmemory-policy", "noeviction", target_nodes=master)


async def test_a_service_starting_before_its_cluster_waits_for_it(tmp_path, caplog):
    """No node answers yet (the cluster is starting beside the service): the service waits, saying so,
    and goes on once the cluster is up. On a cluster of its own, started late on ports chosen first."""
    ports = cluster_ports(3)
    client = create_redis(f"redis://127.0.0.1:{ports[0]}/0", cluster=True)
    preparing = asyncio.create_task(prepare_store(client))
    nodes = None
    try:
        await asyncio.sleep(1.0)
        assert not preparing.done()
        assert f"Redis Cluster at 127.0.0.1:{ports[0]}: no node answers; not serving yet" in caplog.text
        nodes = await asyncio.to_thread(RedisClusterNodes.start, tmp_path, ports=ports)
        await asyncio.wait_for(preparing, 30)
        await client.set("ts:{ws}:ready", 1)
        assert len(client.get_primaries()) == 3
    finally:
        preparing.cancel()
        await client.aclose()
        if nodes is not None:
            nodes.stop()


async def test_health_says_not_serving_once_a_master_with_no_replica_is_down(tmp_path):
    """Its slots unserved, the cluster refuses every command: health must say so, though the node a
    PING reaches (the client's default node, left running here) still answers. On a cluster of its own."""
    nodes = RedisClusterNodes.start(tmp_path, node_timeout_ms=1000)
    client = create_redis(nodes.url, cluster=True)
    health_servicer = health.aio.HealthServicer()
    watch = StoreWatch(client, health_servicer, ["x"], interval=1.0)
    try:
        await prepare_store(client)
        await watch.check()
        await watch.check()
        assert watch.serving
        default = client.get_default_node().port
        victim = next(i for i, port in enumerate(nodes.ports) if port != default)
        nodes.processes[victim].kill()
        for _ in range(50):  # the others mark it failed after the node timeout
            await asyncio.sleep(0.2)
            info = await client.cluster_info(target_nodes=client.get_default_node())
            if info["cluster_state"] == "fail":
                break
        assert await client.ping()  # what the health check asked before
        await watch.check()
        await watch.check()
        assert not watch.serving
    finally:
        await client.aclose()
        nodes.stop()


async def test_a_workspace_whose_slot_is_moving_answers_unavailable(start_resolver, tmp_path):
    """While a slot moves between masters (`redis-cli --cluster reshard`), a script over keys of which
    some have moved gets TRYAGAIN until the move ends: the call is UNAVAILABLE, as any cluster trouble,
    and the same call goes through once the slot has moved. On a cluster of its own: the test moves a slot."""
    nodes = RedisClusterNodes.start(tmp_path)
    try:
        resolver = await start_resolver(redis_url=nodes.url)
        config = bulk_config("http://127.0.0.1:9")
        await resolver.stub.PutPiiApiConfig(resolver_pb.PutPiiApiConfigRequest(config=config))
        base = PiiApiConfigStore._base("ws-1", common_pb2.CHANNEL_EMAIL)
        slot = key_slot(base.encode())
        clients = [redis_sync.Redis(port=port) for port in nodes.ports]
        ids = [client.execute_command("CLUSTER MYID").decode() for client in clients]
        source = next(i for i, c in enumerate(clients) if c.execute_command("CLUSTER COUNTKEYSINSLOT", slot))
        target = (source + 1) % len(clients)
        clients[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        clients[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        moved = f"{base}:latest"
        clients[source].execute_command("MIGRATE", "127.0.0.1", nodes.ports[target], "", 0, 5000, "KEYS", moved)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await resolver.stub.PutPiiApiConfig(resolver_pb.PutPiiApiConfigRequest(config=config))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        rest = [key for key in clients[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 100)]
        if rest:
            clients[source].execute_command("MIGRATE", "127.0.0.1", nodes.ports[target], "", 0, 5000, "KEYS", *rest)
        for client in clients:
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        saved = await resolver.stub.PutPiiApiConfig(resolver_pb.PutPiiApiConfigRequest(config=config))
        assert saved.version == 2
        for client in clients:
            client.close()
    finally:
        nodes.stop()
