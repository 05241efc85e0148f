"""The dispatcher when Redis goes away, under a shared rate limit, and with its connectors' secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.dispatcher.v1 import dispatcher_service_pb2_grpc as pb_grpc

from libs.campaign_stats import read_counts
from libs.connector_store import ConnectorStore
from libs.crypto import SecretBox
from libs.server import GrpcService
from libs.unsubscribe import linked_anonymous_id
from libs.write_batch import ONCE_MARKER_TTL_SECONDS, BatchWriter, WriteBatch
from services.dispatcher.campaign import CampaignSender
from services.dispatcher.connectors.base import OutboundMessage
from services.dispatcher.guards import ConnectorRateLimiter, Idempotency
from services.resolver.server import ResolverDeps
from services.resolver.server import build_server as build_resolver
from tests.conftest import Suite, bounded_teardown, free_port, resolver_settings
from tests.integration.test_dispatcher_campaigns import EMAIL, SMS, dispatch, recipients, slow_gateway

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
ROOT = Path(__file__).resolve().parents[2]


async def test_redis_down_fails_closed_and_nothing_is_sent(start_suite, disposable_redis, start_resolver):
    suite = await start_suite(redis_url=disposable_redis.url)
    # The dispatcher's own Redis holds nothing yet: give it the connectors.
    for connector in suite.workspace.connectors().values():
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=connector))
    first = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(3))
    assert first.summary.sent == 3

    disposable_redis.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5, start=10))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(suite.providers.outbox_for("custom")) == 3  # nothing went out without its map

    disposable_redis.start()  # an empty Redis: configs must be saved again, then the re-run sends
    for connector in suite.workspace.connectors().values():
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=connector))
    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5, start=10))
    assert again.summary.sent == 5


async def test_connector_secrets_are_sealed_and_masked(start_suite, redis):
    suite = await start_suite()
    read = await suite.dispatcher.stub.GetConnector(
        pb.GetConnectorRequest(workspace_id=suite.workspace_id, connector_id="twilio")
    )
    assert read.connector.credentials["auth_token"] == "********"
    assert read.connector.credentials["account_sid"] == "********"
    dump = b""
    async for key in redis.scan_iter():
        if (await redis.type(key)) == b"string":
            dump += await redis.get(key)
    assert b"sandbox-twilio-token" not in dump and b"sandbox-whatsapp-app-secret" not in dump

    read.connector.rate_limit_per_second = 5  # saved back masked: the secrets stay
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=read.connector))
    reply = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(1))
    assert reply.summary.sent == 1

    bad = pb.Connector()
    bad.CopyFrom(suite.workspace.connectors()["twilio"])
    bad.credentials["account_sid"] = "not-a-sid"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("connector.credentials['account_sid']")
    assert "not-a-sid" not in caught.value.details()


async def start_dispatcher_process(port: int, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.dispatcher", cwd=ROOT, env=env, stdout=out, stderr=out
        )
    for _ in range(100):
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 0.5)
                return proc
        except TimeoutError:
            if proc.returncode is not None:
                raise AssertionError(log.read_text()) from None
    raise AssertionError("dispatcher did not start")


async def test_rate_limit_holds_across_two_dispatcher_processes(start_suite, redis_url, secret_key, tmp_path):
    limit = 40
    suite = await start_suite(rate_limit_per_second=limit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSEND_")}
    env.update(
        TOKENSEND_REDIS_URL=redis_url,
        TOKENSEND_SECRET_KEY=secret_key,
        TOKENSEND_ALLOW_PRIVATE_NETWORKS="true",
        TOKENSEND_RESOLVER_ADDR=f"127.0.0.1:{suite.resolver.port}",
    )
    ports = [free_port(), free_port()]
    procs = [
        await start_dispatcher_process(port, {**env, "TOKENSEND_GRPC_PORT": str(port)}, tmp_path / f"d{port}.log")
        for port in ports
    ]
    try:
        per_process = 100
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        stubs = [pb_grpc.DispatcherServiceStub(ch) for ch in channels]

        async def send(stub, start):
            return await stub.Dispatch(
                pb.DispatchRequest(
                    workspace_id=suite.workspace_id,
                    campaign_id="rl",
                    campaign_instance_id="rl-1",
                    channel=C.CHANNEL_SMS,
                    connector_id="gateway",
                    content=SMS,
                    recipients=recipients(per_process, start=start),
                )
            )

        started = time.monotonic()
        replies = await asyncio.gather(send(stubs[0], 1), send(stubs[1], 1 + per_process))
        elapsed = time.monotonic() - started
        for ch in channels:
            await ch.close()
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()
    assert sum(r.summary.sent for r in replies) == 2 * per_process
    arrivals = sorted(m.received_at for m in suite.providers.outbox_for("custom"))
    observed = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"rate limit {limit}/s across two processes: observed {observed:.1f}/s over {elapsed:.1f}s")
    assert observed <= limit * 1.10


async def test_settle_writes_whose_reply_was_lost_are_sent_again_and_count_once(start_suite, redis, monkeypatch):
    """The settle script ran, but the connection dropped before its reply: the dispatcher cannot tell,
    so it sends the writes again. The claims end SENT (a re-run sends no one twice) and the campaign's
    counters count each message once."""
    execute = BatchWriter.execute
    lost = []

    async def reply_lost_once(self, batch, once=""):
        await execute(self, batch, once=once)
        if once and not lost:
            lost.append(once)
            raise RedisConnectionError("connection closed while reading the reply")

    monkeypatch.setattr(BatchWriter, "execute", reply_lost_once)
    suite = await start_suite()
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="lost-1")
    assert lost and {r.status for r in reply.results} == {pb.DISPATCH_STATUS_SENT}
    counts = await read_counts(redis, suite.workspace_id, "spring", "lost-1")
    assert (counts["attempted"], counts["sent"]) == (5, 5)
    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="lost-1")
    assert {r.status for r in again.results} == {pb.DISPATCH_STATUS_DUPLICATE}
    assert len(suite.providers.outbox_for("custom")) == 5


async def test_settle_writes_sent_again_after_a_lost_reply_do_not_undo_a_re_run(start_suite, redis, monkeypatch):
    """The settle script ran and released a recipient it could not resolve; its reply was lost. Before
    the writes are sent again, a re-run of the instance claims that recipient and sends it. The writes
    sent again must not release the re-run's claim: a third run would send the recipient twice."""
    suite = await start_suite()
    late = pb.Recipient(anonymous_id="late-1", attributes={"tier": "gold"})
    execute = BatchWriter.execute
    lost, re_runs = [], []

    async def re_run_while_the_reply_is_lost(self, batch, once=""):
        await execute(self, batch, once=once)
        if "settled" in once and not lost:
            lost.append(once)
            customers = suite.pii_api.sandbox.customers
            customers["late-1"] = dataclasses.replace(customers["cust-000001"], anonymous_id="late-1")
            re_run = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, [late], "lr-1")
            re_runs.extend(re_run.results)
            raise RedisConnectionError("connection closed while reading the reply")

    monkeypatch.setattr(BatchWriter, "execute", re_run_while_the_reply_is_lost)
    first = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, [*recipients(1), late], "lr-1")
    assert lost and [r.status for r in first.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_RESOLVE_FAILED]
    assert [r.status for r in re_runs] == [S.DISPATCH_STATUS_SENT]
    third = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, [late], "lr-1")
    assert [r.status for r in third.results] == [S.DISPATCH_STATUS_DUPLICATE]
    assert len(suite.providers.outbox_for("custom")) == 2  # cust-000001 and late-1, each once
    counts = await read_counts(redis, suite.workspace_id, "spring", "lr-1")
    assert (counts["attempted"], counts["sent"], counts["resolve_failed"]) == (3, 2, 1)


async def test_a_once_marker_lets_writes_be_sent_twice_and_count_once(redis):
    writer = BatchWriter(redis, writes_per_call=2)  # three calls: each has its own marker
    writes = WriteBatch()
    for name in ("a", "b", "c"):
        writes.set(f"ts:{{ws}}:{name}", "v", ex=60)
        writes.hincrby("ts:{ws}:counts", name, 1)
    for _ in range(2):
        await writer.execute(writes, once="ts:{ws}:once:1")
    assert await redis.hgetall("ts:{ws}:counts") == {b"a": b"1", b"b": b"1", b"c": b"1"}
    await writer.execute(writes)  # no marker: increments again
    assert await redis.hgetall("ts:{ws}:counts") == {b"a": b"2", b"b": b"2", b"c": b"2"}
    assert 0 < await redis.ttl("ts:{ws}:once:1:0") <= ONCE_MARKER_TTL_SECONDS


async def test_a_once_marker_outlives_the_time_its_writes_may_be_sent_again(redis):
    """Settle writes are sent again until the claims' lease runs out, however long it is set: their
    marker lives past that, or a late resend would count twice."""
    writes = WriteBatch()
    writes.hincrby("ts:{ws}:counts", "sent", 1)
    await BatchWriter(redis, retried_for_seconds=3600).execute(writes, once="ts:{ws}:once:2")
    assert await redis.ttl("ts:{ws}:once:2:0") > 3600


async def test_a_batch_outliving_its_lease_keeps_its_claims(start_suite):
    """A batch waiting on a slow provider longer than the claim lease renews its claims: a re-run of
    the instance meanwhile finds them held (IN_FLIGHT) and sends none of them a second time."""
    suite = await start_suite(claim_lease_seconds=2)
    suite.providers.set_faults("custom", latency_ms=3500)
    people = recipients(10)
    first = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, instance="slow-1"))
    await asyncio.sleep(2.8)  # past the lease, the sends still waiting for their replies
    again = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, instance="slow-1")
    assert {r.error_code for r in again.results} == {"IN_FLIGHT"}
    assert {r.status for r in (await first).results} == {S.DISPATCH_STATUS_SENT}
    assert len(suite.providers.outbox_for("custom")) == 10  # each once


async def test_a_cancelled_stream_counts_what_it_sent(start_suite, redis):
    """The campaign engine goes away mid-stream: the batches cut off settle what they sent, and the
    campaign's stats count it, as they do a batch that finished."""
    suite = await start_suite(batch_size=10)
    suite.providers.set_faults("custom", latency_ms=400)

    async def parts():
        yield pb.DispatchStreamRequest(
            header=pb.DispatchStreamRequest.Header(
                workspace_id=suite.workspace_id,
                campaign_id="spring",
                campaign_instance_id="cut-3",
                channel=C.CHANNEL_SMS,
                connector_id="gateway",
                content=SMS,
            )
        )
        yield pb.DispatchStreamRequest(recipients=pb.DispatchStreamRequest.Recipients(recipients=recipients(40)))
        await asyncio.sleep(30)  # the client keeps the stream open, then goes away

    call = suite.dispatcher.stub.DispatchStream(parts())
    reader = asyncio.ensure_future(call.read())
    while len(suite.providers.outbox_for("custom")) < 10:
        await asyncio.sleep(0.01)
    call.cancel()
    reader.cancel()
    await asyncio.sleep(1.5)  # the cut batches settle
    sent = len(suite.providers.outbox_for("custom"))
    counts = await read_counts(redis, suite.workspace_id, "spring", "cut-3")
    assert counts.get("sent", 0) + counts.get("send_failed", 0) == sent, (counts, sent)


async def test_a_masked_provider_key_is_never_sent_to_another_host(start_suite, redis):
    """A connector read back (masked) and saved with its base URL changed would have sent the saved key
    to that host: the mask must be replaced by the value there."""
    suite = await start_suite()
    read = await suite.dispatcher.stub.GetConnector(
        pb.GetConnectorRequest(workspace_id=suite.workspace_id, connector_id="sendgrid")
    )
    assert set(read.connector.credentials.values()) == {"********"}
    read.connector.base_url = "https://collector.example.net"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=read.connector))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is masked, and the connector now sends to another host" in caught.value.details()


async def test_a_webhook_secret_is_saved_only_where_receipts_are_checked_with_it(start_suite, redis):
    """A WhatsApp connector needs its app secret (every webhook is refused without it) and keeps it
    when saved back masked; a Twilio connector, whose callbacks are signed with its auth token, has no
    use for one and is refused it. A connector saved with one before still loads and sends."""
    suite = await start_suite()
    read = await suite.dispatcher.stub.GetConnector(
        pb.GetConnectorRequest(workspace_id=suite.workspace_id, connector_id="whatsapp")
    )
    assert read.connector.webhook_secret == "********"
    read.connector.rate_limit_per_second = 5  # saved back masked: the app secret stays
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=read.connector))
    store = ConnectorStore(redis, SecretBox.from_settings(suite.dispatcher.settings))
    kept = await store.load(suite.workspace_id, "whatsapp")
    assert kept.webhook_secret == suite.workspace.connectors()["whatsapp"].webhook_secret

    read.connector.webhook_secret = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=read.connector))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("connector.webhook_secret: is required: WhatsApp signs its webhooks")

    twilio = suite.workspace.connectors()["twilio"]
    twilio.webhook_secret = "s3cr3t-that-checks-nothing"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=twilio))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("connector.webhook_secret: ")
    assert "auth_token" in caught.value.details() and twilio.webhook_secret not in caught.value.details()

    await store.save(twilio)  # as a dispatcher that took it saved it
    reply = await dispatch(suite, C.CHANNEL_SMS, "twilio", SMS, recipients(1))
    assert reply.results[0].status == S.DISPATCH_STATUS_SENT, reply.results[0].error_message


async def test_a_batch_cut_off_while_its_settle_reply_is_on_its_way_counts_once(start_suite, redis, monkeypatch):
    """Redis ran the settle script, its reply has not come back, and the call is cancelled: the batch
    replays the same writes under the same once-key, so its sends are counted once, not twice."""
    suite = await start_suite()
    real = BatchWriter.execute
    settled = asyncio.Event()

    async def reply_late(self, batch, once=""):
        await real(self, batch, once=once)
        if "settled" in once and not settled.is_set():
            settled.set()
            await asyncio.sleep(5)

    monkeypatch.setattr(BatchWriter, "execute", reply_late)
    call = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(5), instance="late-reply"))
    await asyncio.wait_for(settled.wait(), 10)
    call.cancel()
    with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
        await call
    await asyncio.sleep(1.0)
    counts = await read_counts(redis, suite.workspace_id, "spring", "late-reply")
    assert (counts.get("sent"), counts.get("attempted")) == (5, 5)


async def test_no_renewal_takes_back_a_claim_the_batch_released(start_suite, redis, monkeypatch):
    """The keeper stops before the batch settles: a renewal landing after could otherwise put back the
    claim of a recipient just released (not found), holding it IN_FLIGHT for a whole lease."""
    suite = await start_suite(claim_lease_seconds=3)
    real = BatchWriter.execute

    async def reply_slowly(self, batch, once=""):
        await real(self, batch, once=once)
        if "settled" in once:
            await asyncio.sleep(1.3)  # past a renewal's turn (every third of the lease)

    monkeypatch.setattr(BatchWriter, "execute", reply_slowly)
    people = [*recipients(2), pb.Recipient(anonymous_id="ghost-1")]
    first = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, instance="ghost-run")
    assert first.results[2].error_code == "NOT_FOUND"
    assert await redis.get(f"ts:{{{suite.workspace_id}}}:idem:ghost-run:ghost-1") is None


async def test_a_connector_sealed_under_a_key_no_longer_set_is_saved_over_with_its_secrets_entered(start_suite, redis):
    """The secret key was changed without re-sealing (a dev-mode restart makes a new one): the stored
    connector no longer opens. Saved again with its secrets in clear, it works; a masked secret has
    nothing behind it and is refused by name."""
    suite = await start_suite()
    connector = suite.workspace.connectors()["gateway"]
    key = ConnectorStore.key(suite.workspace_id, "gateway")
    await redis.set(key, SecretBox([b"o" * 32]).seal(connector.SerializeToString(), key.encode()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.GetConnector(
            pb.GetConnectorRequest(workspace_id=suite.workspace_id, connector_id="gateway")
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith(f"connector 'gateway' in workspace {suite.workspace_id!r} does not open")
    listed = await suite.dispatcher.stub.ListConnectors(pb.ListConnectorsRequest(workspace_id=suite.workspace_id))
    assert [c.connector_id for c in listed.connectors if c.unreadable] == ["gateway"]  # the others still listed
    masked = pb.Connector()
    masked.CopyFrom(connector)
    for name in masked.credentials:
        masked.credentials[name] = "********"
    assert masked.credentials
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=masked))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("connector.credentials")
    await suite.dispatcher.stub.PutConnector(pb.PutConnectorRequest(connector=connector))
    reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1))
    assert reply.results[0].status == S.DISPATCH_STATUS_SENT


@pytest.mark.parametrize(
    ("channel", "connector_id", "content"), [(C.CHANNEL_EMAIL, "sendgrid", EMAIL), (C.CHANNEL_SMS, "twilio", SMS)]
)
async def test_a_batch_cut_off_mid_send_keeps_what_its_recipients_need_later(
    start_suite, redis, channel, connector_id, content
):
    """The messages that may have left a batch cut off mid-send carry an unsubscribe link, may be
    answered STOP, and may be asked about: each has its link (or its number's blind index) and its
    archive entry, as a message of a batch that finished has."""
    suite = await start_suite(batch_size=5)
    suite.providers.set_faults(connector_id, latency_ms=600)  # the provider records each request after it
    call = suite.dispatcher.stub.DispatchStream(
        iter(
            [
                pb.DispatchStreamRequest(
                    header=pb.DispatchStreamRequest.Header(
                        workspace_id=suite.workspace_id,
                        campaign_id="spring",
                        campaign_instance_id="cut-4",
                        channel=channel,
                        connector_id=connector_id,
                        content=content,
                    )
                ),
                pb.DispatchStreamRequest(recipients=pb.DispatchStreamRequest.Recipients(recipients=recipients(40))),
            ]
        )
    )
    reader = asyncio.ensure_future(call.read())
    while not suite.providers.outbox_for(connector_id):  # the first requests answered: the next are on their way
        await asyncio.sleep(0.01)
    call.cancel()
    reader.cancel()
    await asyncio.sleep(1.5)  # the cut batches settle; the provider records the requests they had sent
    outbox = suite.providers.outbox_for(connector_id)
    if channel == C.CHANNEL_EMAIL:
        message_ids = [m.custom_args["tokensend_message_id"] for m in outbox]
        for message_id in message_ids:
            assert await linked_anonymous_id(redis, suite.workspace_id, message_id), message_id
    else:
        message_ids = [m.status_callback.rsplit("message_id=", 1)[1] for m in outbox]
        linked = [key async for key in redis.scan_iter(match=f"ts:{{{suite.workspace_id}}}:bidx:*")]
        assert len(linked) == len(message_ids)
    assert message_ids
    counts = await read_counts(redis, suite.workspace_id, "spring", "cut-4")
    # Each message that left is counted, sent or failed (its outcome unknown); one of a batch cut before its
    # request went out was released and is counted failed too, so the count may pass what left, never fall short.
    counted = counts.get("sent", 0) + counts.get("send_failed", 0)
    assert counts.get("sent", 0) <= len(message_ids) <= counted <= 40, counts
    for message_id in message_ids:
        again = await suite.dispatcher.stub.ReconstructMessage(
            pb.ReconstructMessageRequest(
                workspace_id=suite.workspace_id, message_id=message_id, requested_by="dpo-7", reason="DSAR"
            )
        )
        assert again.campaign_instance_id == "cut-4"


@dataclasses.dataclass
class LostResolver:
    """A resolver of the test's own, for it to stop."""

    service: GrpcService
    port: int
    stopped: bool = False

    async def stop(self) -> None:
        self.stopped = True
        await self.service.stop(0)


@pytest.fixture
async def lost_resolver(redis_url, secret_key) -> AsyncIterator[LostResolver]:
    settings = resolver_settings(redis_url, secret_key)
    resolver = LostResolver(*await build_resolver(settings, ResolverDeps.from_settings(settings)))
    yield resolver
    if not resolver.stopped:
        await bounded_teardown(resolver.stop(), "resolver stop")


async def paced_batch_losing_its_resolver(
    start_suite, resolver: LostResolver, instance: str
) -> tuple[Suite, asyncio.Future]:
    """30 recipients at 10 a second in parts of 20 (2 s of sending): the resolver stops once the first
    part sends, so the second part's fetch, a second before the first part's last slot, fails."""
    suite = await start_suite(paced_fetch_seconds=2, resolver_addr=f"127.0.0.1:{resolver.port}")
    await slow_gateway(suite)
    call = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "slow-gateway", SMS, recipients(30), instance))
    while not suite.providers.outbox_for("custom"):
        await asyncio.sleep(0.01)
    await resolver.stop()
    return suite, call


async def rerun(suite: Suite, start_dispatcher, instance: str) -> pb.DispatchResponse:
    """The instance again, through a dispatcher that reaches the suite's resolver."""
    other = await start_dispatcher(suite.resolver, paced_fetch_seconds=2)
    return await dispatch(
        dataclasses.replace(suite, dispatcher=other), C.CHANNEL_SMS, "slow-gateway", SMS, recipients(30), instance
    )


async def test_a_paced_batch_whose_later_part_cannot_be_fetched_settles_what_it_sent(
    start_suite, start_dispatcher, lost_resolver, redis
):
    """The resolver goes away while a rate-limited batch's first part sends: the call fails UNAVAILABLE
    once that part has sent, its messages are settled SENT and counted once, the rest released: a
    re-run of the instance sends exactly the rest."""
    suite, call = await paced_batch_losing_its_resolver(start_suite, lost_resolver, "paced-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(suite.providers.outbox_for("custom")) == 20
    counts = await read_counts(redis, suite.workspace_id, "spring", "paced-1")
    assert (counts.get("attempted"), counts.get("sent")) == (20, 20), counts

    again = await rerun(suite, start_dispatcher, "paced-1")
    assert (again.summary.sent, again.summary.duplicate) == (10, 20)
    outbox = suite.providers.outbox_for("custom")
    assert len(outbox) == len({m.to for m in outbox}) == 30
    counts = await read_counts(redis, suite.workspace_id, "spring", "paced-1")
    assert (counts.get("attempted"), counts.get("sent")) == (30, 30), counts


async def test_a_paced_batch_cancelled_while_its_sending_part_finishes_sends_nothing_after(
    start_suite, start_dispatcher, lost_resolver, redis
):
    """The call is cancelled while the first part finishes sending after the second's fetch failed:
    that part's sends stop with the call, rather than going on once the batch released their claims,
    so a re-run sends the rest exactly once."""
    suite, call = await paced_batch_losing_its_resolver(start_suite, lost_resolver, "paced-2")
    while len(suite.providers.outbox_for("custom")) < 15:  # the second part's fetch failed about 0.5 s ago
        await asyncio.sleep(0.01)
    call.cancel()
    await asyncio.sleep(1.5)  # past the first part's last slot
    left = len(suite.providers.outbox_for("custom"))
    assert left < 20
    counts = await read_counts(redis, suite.workspace_id, "spring", "paced-2")
    # Each message that left is counted; one whose request the cancellation cut may be counted and not have left.
    counted = counts.get("sent", 0) + counts.get("send_failed", 0)
    assert counts.get("sent", 0) <= left <= counted <= left + 1, counts

    again = await rerun(suite, start_dispatcher, "paced-2")
    assert again.summary.sent == 30 - counted
    outbox = suite.providers.outbox_for("custom")
    assert len(outbox) == len({m.to for m in outbox})


async def test_a_paced_batch_cancelled_while_it_waits_for_the_schedule_fetches_nothing_and_holds_nothing(
    start_suite, redis
):
    """Cancelled while the connector's schedule is taken by others: no contact was fetched, every claim
    is released and nothing counted, so a re-run sends them all."""
    suite = await start_suite(paced_fetch_seconds=0.5)
    await slow_gateway(suite)
    await ConnectorRateLimiter(redis).reserve(suite.workspace_id, "slow-gateway", 10, 30)  # the next 3 s
    stats = suite.pii_api.sandbox.stats
    stats.reset()
    people = recipients(5)
    call = dispatch(suite, C.CHANNEL_SMS, "slow-gateway", SMS, people, "paced-3")
    await asyncio.sleep(0.5)
    call.cancel()
    claims = [Idempotency.key(suite.workspace_id, "paced-3", p.anonymous_id) for p in people]
    for _ in range(100):
        if not await redis.exists(*claims):
            break
        await asyncio.sleep(0.05)
    assert not await redis.exists(*claims)
    assert stats.ids_requested == 0
    assert await read_counts(redis, suite.workspace_id, "spring", "paced-3") == {}
    again = await dispatch(suite, C.CHANNEL_SMS, "slow-gateway", SMS, people, "paced-3")
    assert again.summary.sent == 5 and len(suite.providers.outbox_for("custom")) == 5


def live_messages(message_ids: set[str]) -> int:
    """How many of these messages (each holding its recipient's contact) are still in memory."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, OutboundMessage) and o.message_id in message_ids)


async def test_a_paced_part_whose_slots_cannot_be_reserved_lets_its_contacts_go_while_the_others_send(
    start_suite, start_dispatcher, redis, monkeypatch
):
    """Redis fails as the second part of a rate-limited batch reserves its slots, just after its fetch:
    that part's messages are dropped at once, not held through the seconds the first part still sends;
    the call then fails UNAVAILABLE as before, the first part settled, the second released."""
    suite = await start_suite(paced_fetch_seconds=2)
    await slow_gateway(suite)
    parts: list[set[str]] = []  # the message IDs of each part made ready to send
    prepare = CampaignSender._prepare
    reserve, next_slot_in = ConnectorRateLimiter.reserve, ConnectorRateLimiter.next_slot_in
    refused = asyncio.Event()

    async def prepared(self, call, to_send, resolution):
        outbound = await prepare(self, call, to_send, resolution)
        parts.append({message.message_id for _, message in outbound})
        return outbound

    async def refused_after_the_first(self, *args):
        if parts[1:]:
            refused.set()
            raise RedisConnectionError("connection refused")
        return await reserve(self, *args)

    async def free_now(self, *args) -> float:
        return 0.0  # the second part is fetched as soon as the first has its slots: two seconds before they end

    monkeypatch.setattr(CampaignSender, "_prepare", prepared)
    monkeypatch.setattr(ConnectorRateLimiter, "reserve", refused_after_the_first)
    monkeypatch.setattr(ConnectorRateLimiter, "next_slot_in", free_now)
    call = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "slow-gateway", SMS, recipients(30), "paced-4"))
    await refused.wait()
    await asyncio.sleep(0.05)
    first, second = parts
    assert (len(first), len(second)) == (20, 10)
    assert len(suite.providers.outbox_for("custom")) < 20  # the first part still sends
    assert live_messages(first) > 0  # its messages are held while they send
    assert live_messages(second) == 0

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(suite.providers.outbox_for("custom")) == 20
    counts = await read_counts(redis, suite.workspace_id, "spring", "paced-4")
    assert (counts.get("attempted"), counts.get("sent")) == (20, 20), counts
    monkeypatch.setattr(ConnectorRateLimiter, "reserve", reserve)
    monkeypatch.setattr(ConnectorRateLimiter, "next_slot_in", next_slot_in)
    again = await rerun(suite, start_dispatcher, "paced-4")
    assert (again.summary.sent, again.summary.duplicate) == (10, 20)


async def test_a_paced_part_whose_claims_another_run_took_while_it_waited_fetches_nothing_for_them(
    start_suite, redis, monkeypatch
):
    """Redis refuses a batch's renewals while it waits for the connector's schedule, its claims expire
    and a re-run takes them: the re-run fetches and sends those recipients, and the first batch, told so
    at its next renewal, answers them IN_FLIGHT without fetching their contacts or taking their slots."""
    suite = await start_suite(paced_fetch_seconds=0.5, claim_lease_seconds=1)
    await slow_gateway(suite)
    await ConnectorRateLimiter(redis).reserve(suite.workspace_id, "slow-gateway", 10, 30)  # the next 3 s
    stats = suite.pii_api.sandbox.stats
    stats.reset()
    renew, away = Idempotency.renew, True

    async def renewed_unless_away(self, *args, **kwargs):
        if away:
            raise RedisConnectionError("Connection refused")
        return await renew(self, *args, **kwargs)

    monkeypatch.setattr(Idempotency, "renew", renewed_unless_away)
    people = recipients(5)
    claims = [Idempotency.key(suite.workspace_id, "lost-1", p.anonymous_id) for p in people]
    first = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "slow-gateway", SMS, people, "lost-1"))
    while not all(held := await redis.mget(claims)):
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.1)  # past the lease
    second = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "slow-gateway", SMS, people, "lost-1"))
    while set(await redis.mget(claims)) & set(held):  # the re-run holds every claim
        await asyncio.sleep(0.01)
    away = False
    assert {(r.status, r.error_code) for r in (await first).results} == {(S.DISPATCH_STATUS_DUPLICATE, "IN_FLIGHT")}
    assert {r.status for r in (await second).results} == {S.DISPATCH_STATUS_SENT}
    assert stats.ids_requested == 5 and len(suite.providers.outbox_for("custom")) == 5


@pytest.mark.parametrize("redis_back", [True, False])
async def test_a_batch_whose_claims_lapsed_sends_none_before_it_knows_they_are_still_its_own(
    start_suite, redis, monkeypatch, redis_back
):
    """A batch's renewals fail for longer than its lease while it waits to send (its fetch slow here),
    and a re-run takes the lapsed claims and sends their recipients. Before sending, the batch asks
    whose the claims are rather than waiting for its next renewal's turn: told another run's (Redis
    back), or told nothing (Redis still away), it sends none of them."""
    suite = await start_suite(claim_lease_seconds=1)

    async def no_turn_yet(self, call, claimed, state):
        await asyncio.Event().wait()  # its renewals failing, or its next turn not come yet

    monkeypatch.setattr(CampaignSender, "_keep_claims", no_turn_yet)
    if not redis_back:

        async def refused(self, *args, **kwargs):
            raise RedisConnectionError("Connection refused")

        monkeypatch.setattr(Idempotency, "renew", refused)
    fetch, fetched, go_on = CampaignSender._fetch, asyncio.Event(), asyncio.Event()

    async def fetched_then_held(self, call, to_send):
        resolution = await fetch(self, call, to_send)
        if not fetched.is_set():  # the first run's batch waits; the re-run's goes on
            fetched.set()
            await go_on.wait()
        return resolution

    monkeypatch.setattr(CampaignSender, "_fetch", fetched_then_held)
    people = recipients(3)
    claims = [Idempotency.key(suite.workspace_id, "lapsed-1", p.anonymous_id) for p in people]
    first = asyncio.ensure_future(dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, "lapsed-1"))
    await asyncio.wait_for(fetched.wait(), 10)
    while await redis.exists(*claims):  # the lease runs out, nothing renewing it
        await asyncio.sleep(0.05)
    second = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, people, "lapsed-1")
    assert {r.status for r in second.results} == {S.DISPATCH_STATUS_SENT}
    go_on.set()
    assert {(r.status, r.error_code) for r in (await first).results} == {(S.DISPATCH_STATUS_DUPLICATE, "IN_FLIGHT")}
    assert len(suite.providers.outbox_for("custom")) == 3  # each once
    assert [v.decode()[:2] for v in await redis.mget(claims)] == ["s:"] * 3  # the re-run's, left as it settled


async def test_a_batch_whose_lease_lapsed_mid_send_leaves_the_claims_a_re_run_took(
    start_suite, redis, customers, monkeypatch
):
    """The lease of a batch's claims lapses with its requests at the provider (its renewals failing), and a
    re-run takes the claims, each under its own message ID. The provider refuses one recipient: the batch
    releases that claim only if it is still its own, so the re-run's stays and a third run answers it
    IN_FLIGHT rather than sending it while the re-run still is. The recipient the batch did reach is
    settled SENT over the re-run's claim: a later run answers it DUPLICATE."""
    suite = await start_suite()
    people = recipients(2)
    suite.providers.set_faults("whatsapp", reject_to=[customers[people[1].anonymous_id].phone])
    claims = [Idempotency.key(suite.workspace_id, "taken-1", p.anonymous_id) for p in people]
    re_run = [f"p:{n:032x}" for n in (1, 2)]
    send = CampaignSender._send

    async def taken_while_at_the_provider(self, call, outbound, state, slots=None):
        await send(self, call, outbound, state, slots)
        for claim, marker in zip(claims, re_run, strict=True):
            await redis.set(claim, marker, px=60_000)

    monkeypatch.setattr(CampaignSender, "_send", taken_while_at_the_provider)
    first = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people, "taken-1")
    assert [r.status for r in first.results] == [S.DISPATCH_STATUS_SENT, S.DISPATCH_STATUS_SEND_FAILED]
    assert await redis.mget(claims) == [f"s:{first.results[0].message_id}".encode(), re_run[1].encode()]
    monkeypatch.setattr(CampaignSender, "_send", send)
    third = await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", SMS, people, "taken-1")
    assert [(r.status, r.error_code) for r in third.results] == [
        (S.DISPATCH_STATUS_DUPLICATE, "DUPLICATE"),
        (S.DISPATCH_STATUS_DUPLICATE, "IN_FLIGHT"),
    ]
    assert len(suite.providers.outbox_for("whatsapp")) == 1


async def test_a_resolver_back_on_its_address_is_reached_within_seconds(
    start_suite, lost_resolver, redis_url, secret_key
):
    """A resolver restarted (a rollout, a crash) where it was: the dispatcher's channel to it, which
    failed to reconnect while it was away, tries again within its capped backoff rather than after
    gRPC's default, which grows to two minutes: campaigns go on a second or two after it is back."""
    suite = await start_suite(resolver_addr=f"127.0.0.1:{lost_resolver.port}")
    assert (await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1), "before")).summary.sent == 1
    await lost_resolver.stop()
    away_until = time.monotonic() + 12  # long enough for an uncapped backoff to pass 10 s
    while time.monotonic() < away_until:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1, start=2), "away")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(0.5)
    settings = resolver_settings(redis_url, secret_key, grpc_port=lost_resolver.port)
    back = LostResolver(*await build_resolver(settings, ResolverDeps.from_settings(settings)))
    try:
        returned_at = time.monotonic()
        while True:
            try:
                reply = await dispatch(suite, C.CHANNEL_SMS, "gateway", SMS, recipients(1, start=2), "away")
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - returned_at < 3, "the resolver was back, the dispatcher still not using it"
                await asyncio.sleep(0.1)
        assert reply.summary.sent == 1
    finally:
        await bounded_teardown(back.stop(), "resolver stop")
