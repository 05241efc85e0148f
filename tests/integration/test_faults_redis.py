"""Redis stops in the middle of a campaign, then comes back with its data (an append-only file).

What must hold: the recipients not yet sent get UNAVAILABLE (the call fails; nothing of theirs
went out), no message left without its message-ID map entry, and once Redis is back the same
campaign instance, run again from the start, sends exactly the recipients that were not sent.
(test_dispatcher_faults.py covers a Redis that is down before the campaign starts.)
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import Counter

import grpc
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.campaign_stats import read_counts
from libs.message_map import MessageMap
from libs.store import IDLE_CHECK_SECONDS, create_redis
from tests.conftest import DisposableRedis, free_port
from tests.integration.test_dispatcher_campaigns import SMS, dispatch, recipients
from tests.integration.test_receipts_harness import (
    Pii,
    put_messages,
    running_receipts,
    sendgrid_event,
    stats,
    stream_entries,
)

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
BATCH = 20
LEASE_SECONDS = 5  # long enough for the re-run right after Redis is back, short enough to wait out


@pytest.fixture
def persistent_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is installed by `make redis`")
    server = DisposableRedis(free_port(), data_dir=str(tmp_path))
    server.start()
    yield server
    server.stop()


def header(suite, instance: str) -> pb.DispatchStreamRequest:
    return pb.DispatchStreamRequest(
        header=pb.DispatchStreamRequest.Header(
            workspace_id=suite.workspace_id,
            campaign_id="spring",
            campaign_instance_id=instance,
            channel=C.CHANNEL_SMS,
            connector_id="twilio",
            content=SMS,
        )
    )


def part(start: int) -> pb.DispatchStreamRequest:
    return pb.DispatchStreamRequest(recipients=pb.DispatchStreamRequest.Recipients(recipients=recipients(BATCH, start)))


# Twilio, an SMS provider that sends receipts: what they are matched with, the message map, must be
# written before each send whatever Redis does. (Custom gateways send none and are mapped not at all.)
def our_message_id(message) -> str:
    """Our message ID, from the StatusCallback URL Twilio got with the message."""
    return message.status_callback.rsplit("message_id=", 1)[1]


async def assert_every_message_is_mapped(suite, redis_url: str) -> None:
    """Each message the provider got carries our message ID and has its map entry."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        message_map = MessageMap(client, 3600)
        for message in suite.providers.outbox_for("twilio"):
            record = await message_map.get(suite.workspace_id, our_message_id(message))
            assert record is not None, "a message went out without its map entry"
            assert record.campaign_id == "spring"
    finally:
        await client.aclose()


def sent_per_recipient(suite) -> Counter[str]:
    return Counter(m.to for m in suite.providers.outbox_for("twilio"))


async def test_stream_cut_mid_campaign_fails_unavailable_and_a_rerun_sends_only_the_rest(
    start_suite, persistent_redis, caplog
):
    suite = await start_suite(redis_url=persistent_redis.url, batch_size=BATCH)
    call = suite.dispatcher.stub.DispatchStream()
    await call.write(header(suite, "cut-1"))
    await call.write(part(1))
    first = await call.read()
    assert [r.status for r in first.results] == [S.DISPATCH_STATUS_SENT] * BATCH

    persistent_redis.stop()
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.write(part(1 + BATCH))
        await call.write(part(1 + 2 * BATCH))
        await call.done_writing()
    later = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        while (reply := await call.read()) is not grpc.aio.EOF:
            later.append(reply)
    code, details = await call.code(), await call.details()
    if code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
        # grpc/grpc#36066: a client write that fails as the RPC ends replaces the status the server
        # sent with this one, on the client. What the server sent is in its log.
        logged = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("store unavailable in") and "DispatchStream" in m for m in logged)
    else:
        assert code == grpc.StatusCode.UNAVAILABLE, details
    assert later == []  # the unsent recipients got no result but the call's UNAVAILABLE
    assert len(suite.providers.outbox_for("twilio")) == BATCH  # nothing of theirs went out

    persistent_redis.start()  # the same data: configs, claims and maps survived
    await assert_every_message_is_mapped(suite, persistent_redis.url)

    async def rerun():
        yield header(suite, "cut-1")
        for start in (1, 1 + BATCH, 1 + 2 * BATCH):
            yield part(start)

    results = [r for reply in [x async for x in suite.dispatcher.stub.DispatchStream(rerun())] for r in reply.results]
    statuses = Counter(S.Name(r.status) for r in results)
    assert statuses == {"DISPATCH_STATUS_DUPLICATE": BATCH, "DISPATCH_STATUS_SENT": 2 * BATCH}
    per_recipient = sent_per_recipient(suite)
    assert len(per_recipient) == 3 * BATCH and set(per_recipient.values()) == {1}  # none lost, none twice
    await assert_every_message_is_mapped(suite, persistent_redis.url)


async def test_dispatch_cut_while_batches_are_in_flight(start_suite, persistent_redis):
    """A unary Dispatch of three batches; Redis stops the moment the first batch reached the provider.

    Depending on timing the second batch may be claimed before the cut: it then goes out during it
    (its map was written first), or fails before sending and cannot release its claims while Redis
    is down. Those claims hold until their lease runs out, so a re-run right away reports them
    DUPLICATE with error code IN_FLIGHT, and a run after the lease sends them. (The first batch's
    claims, when its settle was cut, hold the same way; within the lease nothing of it is resent.)
    Either way nothing is sent without its map and every recipient is sent exactly once overall.
    """
    suite = await start_suite(redis_url=persistent_redis.url, batch_size=BATCH, claim_lease_seconds=LEASE_SECONDS)
    suite.providers.set_faults("twilio", latency_ms=150)
    people = recipients(3 * BATCH)
    call = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people, instance="cut-2"))
    while len(suite.providers.outbox_for("twilio")) < BATCH and not call.done():
        await asyncio.sleep(0.005)
    persistent_redis.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    sent_before = len(suite.providers.outbox_for("twilio"))
    assert BATCH <= sent_before < 3 * BATCH

    persistent_redis.start()
    suite.providers.clear_faults()
    await assert_every_message_is_mapped(suite, persistent_redis.url)
    again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people, instance="cut-2")
    held = [r for r in again.results if r.status == S.DISPATCH_STATUS_DUPLICATE and r.error_code == "IN_FLIGHT"]
    sent_refs = {our_message_id(m) for m in suite.providers.outbox_for("twilio")}
    held_unsent = [r for r in held if r.message_id not in sent_refs]
    sent_again = again.summary.sent
    if held_unsent:
        # The second batch was claimed, then failed before sending; the first had settled (batches of
        # a unary call go one after another), so every held claim is an unsent one.
        assert len(held_unsent) == len(held) == BATCH
        await asyncio.sleep(LEASE_SECONDS + 0.5)
        after_lease = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, people, instance="cut-2")
        assert after_lease.summary.sent == len(held)
        sent_again += after_lease.summary.sent
    assert sent_again == 3 * BATCH - sent_before
    per_recipient = sent_per_recipient(suite)
    assert len(per_recipient) == 3 * BATCH and set(per_recipient.values()) == {1}
    print(
        f"Redis cut mid-Dispatch: {sent_before} sent before the cut, {len(held)} held by their lease, "
        f"{sent_again} by the re-runs, 0 twice"
    )


async def test_a_full_redis_refuses_the_batch_and_nothing_is_sent(start_suite, disposable_redis):
    """Redis at maxmemory under noeviction refuses writes (OOM): the call is UNAVAILABLE, as for a Redis
    that is down, nothing is sent, and once there is room the same call sends everyone."""
    suite = await start_suite(redis_url=disposable_redis.url)
    client = aioredis.from_url(disposable_redis.url)
    try:
        await fill_up(client)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="full-1")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry later" in refused.value.details() and "OOM" not in refused.value.details()
        assert suite.providers.outbox_for("custom") == []
        await make_room(client)
        again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="full-1")
        assert again.summary.sent == 5
    finally:
        await client.aclose()


async def test_receipts_refused_by_a_full_redis_are_answered_503_and_counted_once_when_redelivered(
    disposable_redis,
):
    """A receipt that cannot be recorded is not acknowledged: the provider gets a 503 and redelivers.
    Once Redis has room the redelivery is counted, once, and a further one is a duplicate."""
    client = aioredis.from_url(disposable_redis.url)
    try:
        async with running_receipts(client, disposable_redis.url) as receipts:
            pii = Pii.new()
            [message] = await put_messages(client, "sendgrid", 1)
            events = [sendgrid_event("delivered", pii, message_id=message.message_id)]
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", str(used // 2))
            refused = await receipts.post_sendgrid(events)
            assert refused.status == 503
            assert pii.email not in str(refused.body)
            await client.config_set("maxmemory", "0")
            assert (await stats(client)).get("delivered", 0) == 0
            assert (await receipts.post_sendgrid(events)).status == 200
            assert (await receipts.post_sendgrid(events)).status == 200
            assert (await stats(client))["delivered"] == 1
            assert len(await stream_entries(client)) == 1
    finally:
        await client.aclose()


async def settled_in_the_background(suite, instance: str) -> None:
    """Re-runs the batch until its background settle has gone through: held (IN_FLIGHT) meanwhile, never
    sent again, then DUPLICATE, settled SENT before the lease ran out."""
    codes: set[str] = set()
    for _ in range(30):  # the background tries come 1, 2, 4, then 5 s apart
        again = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(BATCH), instance=instance)
        codes = {r.error_code for r in again.results}
        if codes == {"DUPLICATE"}:
            break
        assert codes == {"IN_FLIGHT"}, codes
        await asyncio.sleep(0.5)
    assert codes == {"DUPLICATE"}


async def test_a_settle_cut_longer_than_its_retries_goes_through_once_redis_is_back(start_suite, persistent_redis):
    """Redis stops as a batch's sends come back and stays away past the call's own settle retries: the
    call fails UNAVAILABLE, and the batch's settle goes through in the background once Redis is back,
    within the claims' lease, so a re-run finds the batch sent and sends none of it again."""
    suite = await start_suite(redis_url=persistent_redis.url, batch_size=BATCH, claim_lease_seconds=20)
    # Redis stops once every send has reached the provider, which answers 1.5 s later: well after the stop
    # (a shutdown that saves its data), even on a busy machine. (The outbox records a send after its latency.)
    suite.providers.set_faults("twilio", latency_ms=1500)
    call = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(BATCH), instance="late-1"))
    while suite.providers.stats.requests["twilio"] < BATCH:
        await asyncio.sleep(0.005)
    assert not suite.providers.outbox_for("twilio")
    persistent_redis.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.sleep(1.0)
    persistent_redis.start()
    suite.providers.clear_faults()
    await settled_in_the_background(suite, "late-1")
    assert len(suite.providers.outbox_for("twilio")) == BATCH
    client = aioredis.Redis.from_url(persistent_redis.url)
    try:
        counts = await read_counts(client, suite.workspace_id, "spring", "late-1")
    finally:
        await client.aclose()
    assert counts["sent"] == BATCH


async def fill_up(client) -> None:
    """Full under noeviction: writes refused with OOM."""
    await client.config_set("maxmemory-policy", "noeviction")
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", str(used // 2))


async def make_room(client) -> None:
    await client.config_set("maxmemory", "0")


async def lose_replicas(client) -> None:
    """Fewer replicas keep up than `min-replicas-to-write` asks (there are none): writes refused with NOREPLICAS."""
    await client.config_set("min-replicas-to-write", "1")


async def regain_replicas(client) -> None:
    await client.config_set("min-replicas-to-write", "0")


@pytest.mark.parametrize(("refuse", "allow"), [(fill_up, make_room), (lose_replicas, regain_replicas)])
async def test_a_settle_refused_for_now_goes_through_once_writes_are_taken_again(
    start_suite, disposable_redis, refuse, allow
):
    """Redis refuses writes for now (full under noeviction: OOM; too few replicas: NOREPLICAS) as a batch's
    sends come back: its settle is refused and the call fails UNAVAILABLE, "retry later". Given up at once,
    the batch's claims ran out their lease and the retry sent everyone again; with writes taken again
    within the lease, the settle goes through in the background and the retry finds the batch sent."""
    # Four sends at a time, 300 ms each: the batch's sends take over a second after its admission.
    suite = await start_suite(
        redis_url=disposable_redis.url, batch_size=BATCH, claim_lease_seconds=30, send_concurrency=4
    )
    suite.providers.set_faults("twilio", latency_ms=300)
    client = aioredis.from_url(disposable_redis.url)
    try:
        call = asyncio.ensure_future(
            dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(BATCH), instance="refused-mid")
        )
        while not suite.providers.outbox_for("twilio"):
            await asyncio.sleep(0.005)
        await refuse(client)  # before the batch settles
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        await allow(client)  # the operator makes room, the replica catches up
        suite.providers.clear_faults()
        await settled_in_the_background(suite, "refused-mid")
        assert len(suite.providers.outbox_for("twilio")) == BATCH
        assert (await read_counts(client, suite.workspace_id, "spring", "refused-mid"))["sent"] == BATCH
    finally:
        await client.aclose()


async def test_connections_left_in_the_pool_across_a_redis_restart_do_not_fail_a_call(disposable_redis):
    """Each connection the pool kept from before a restart used to fail one call (UNAVAILABLE) while
    health already said SERVING: one idle for a second is pinged first, and reconnected when stale."""
    client = create_redis(disposable_redis.url)
    try:
        await asyncio.gather(*(client.set(f"k{i}", i) for i in range(8)))  # several pooled connections
        disposable_redis.stop()
        disposable_redis.start()
        await asyncio.sleep(IDLE_CHECK_SECONDS + 0.2)
        assert await asyncio.gather(*(client.get(f"k{i}") for i in range(8))) == [None] * 8
    finally:
        await client.aclose()


@pytest.fixture
def second_redis():
    server = DisposableRedis(free_port())
    server.start()
    yield server
    server.stop()


async def test_a_redis_demoted_to_a_replica_is_retried_later_on_new_connections(
    start_suite, disposable_redis, second_redis
):
    """A failover demoted the master the services write to (READONLY): the call is UNAVAILABLE, as for
    a Redis that is down, nothing is sent, and the connection that met the replica is closed, so the
    next command connects anew (to wherever the URL's name now points)."""
    suite = await start_suite(redis_url=disposable_redis.url)
    admin = aioredis.from_url(disposable_redis.url)
    client = create_redis(disposable_redis.url, max_connections=1)
    try:
        first = await client.client_id()
        await admin.replicaof("127.0.0.1", second_redis.port)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="demoted-1")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry later" in refused.value.details()
        assert suite.providers.outbox_for("custom") == []
        with pytest.raises(ReadOnlyError):
            await client.set("ts:{ws}:k", 1)
        assert await client.client_id() != first  # the connection that met the replica is gone
        await admin.replicaof("NO", "ONE")  # the failover's new master, reached at the same address
        await asyncio.sleep(0.2)
        again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="demoted-1")
        assert again.summary.sent == 5
    finally:
        await client.aclose()
        await admin.aclose()
