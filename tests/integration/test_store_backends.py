"""The store contracts the services rely on, on real Redis and on the embedded in-process store.

The embedded store (`memory://`) is what the demo falls back to when no Redis answers; it must
behave like Redis for every command and Lua script the services use, so the same tests run on both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
import uuid

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as dpb
from tokensend.receipts.v1 import receipts_service_pb2 as cpb
from tokensend.receipts.v1 import receipts_service_pb2_grpc as cpb_grpc
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs import write_batch
from libs.blind_index import BlindIndex
from libs.campaign_stats import add_counts, read_counts
from libs.crypto import SealedDataInvalid, SecretBox
from libs.errors import FailedPrecondition
from libs.message_map import GROUP_PART, MessageMap, MessageRecord, new_message_ids, split_message_id
from libs.rate_limit import RateLimiter
from libs.settings import ReceiptsSettings
from libs.store import StoreMisconfigured, create_redis, eviction_risk, prepare_store, workspace_key
from libs.suppressions import OPT_IN_KEPT_MS, Changed, SuppressionStore
from libs.telemetry import ScrubbingFilter
from libs.write_batch import BATCH_RECORD_MARGIN_SECONDS, BatchWriter, WriteBatch
from services.dispatcher import admission as admission_module
from services.dispatcher.admission import ADMITTED, CAPPED, HELD, SUPPRESSED, Admission, Cap, Verdict
from services.dispatcher.guards import PENDING, SENT, ConnectorRateLimiter, FrequencyCaps, Idempotency
from services.receipts.ledger import DeliveryLedger, EventsAhead, EventsTrimmed
from services.resolver.configs import NOT_LOADED, OAuthConfigStore, PiiApiConfigStore
from tests.pii_configs import bulk_config

pytestmark = pytest.mark.integration


@pytest.fixture(params=["redis", "memory"])
async def store(request, redis, redis_url):
    client = create_redis(redis_url if request.param == "redis" else f"memory://{uuid.uuid4().hex}")
    yield client
    await client.aclose()


def _batch(**overrides) -> MessageRecord:
    fields = dict(
        message_id="",
        workspace_id="ws",
        campaign_id="camp",
        campaign_instance_id="run-1",
        anonymous_id="",
        channel=common_pb2.CHANNEL_EMAIL,
        connector_id="sg",
        provider="sendgrid",
        trace_id="ab" * 16,
        span_id="cd" * 8,
    )
    return MessageRecord(**{**fields, **overrides})


def mid(name: str) -> str:
    """A message ID of the dispatcher's shape (32 hex digits), named for the test: a group of its own."""
    return hashlib.md5(name.encode()).hexdigest()


async def mapped(store, message_id: str, workspace_id: str = "ws") -> bool:
    """Whether the message has its entry in its group's hash of the map."""
    group, own = split_message_id(message_id)
    return bool(await store.hexists(MessageMap.entries_key(workspace_id, group), own))


async def _admit(admission, pairs, batch=None, *, topic="", tracked=True, cap=None):
    verdicts = []
    async for start, chunk in admission.admit(batch or _batch(), "email", topic, pairs, tracked=tracked, cap=cap):
        assert start == len(verdicts)
        verdicts.extend(chunk)
    return verdicts


async def test_claims_are_won_once_and_released(store):
    admission = Admission(store, lease_seconds=60, message_map=MessageMap(store, ttl_seconds=60))
    claims = Idempotency(ttl_seconds=3600)
    first = await _admit(admission, [("a", mid("m1")), ("b", mid("m2"))])
    second = await _admit(admission, [("a", mid("m3")), ("c", mid("m4"))])
    assert [v.outcome for v in first] == [ADMITTED, ADMITTED]
    assert second == [Verdict(HELD, PENDING, mid("m1")), Verdict(ADMITTED)]
    assert 0 < await store.pttl(Idempotency.key("ws", "run-1", "a")) <= 60_000  # a lease, not for good
    writes = WriteBatch()
    claims.queue_release(writes, "ws", "run-1", "a", mid("m1"))
    claims.queue_settle_all(writes, Idempotency.key("ws", "run-1", ""), SENT, [("b", mid("m2"))])
    await BatchWriter(store).execute(writes)
    third = await _admit(admission, [("a", mid("m5")), ("b", mid("m6"))])
    assert third == [Verdict(ADMITTED), Verdict(HELD, SENT, mid("m2"))]
    assert [await mapped(store, mid(m)) for m in ("m1", "m3", "m5", "m6")] == [True, False, True, False]  # held


async def test_a_batch_releases_only_the_claims_still_its_own(store):
    """The lease of a batch's claims lapsed with its requests at the provider, and a re-run took two of
    them under its own message IDs. The batch's release leaves the re-run's claim (deleted, a third run
    would send the recipient while the re-run still is) and frees the one still its own; its settle of a
    message it sent says SENT over the re-run's claim, so a later run answers DUPLICATE."""
    admission = Admission(store, lease_seconds=60, message_map=MessageMap(store, ttl_seconds=60))
    claims = Idempotency(ttl_seconds=3600)
    ours = [("failed", mid("m1")), ("taken-failed", mid("m2")), ("taken-sent", mid("m3"))]
    assert [v.outcome for v in await _admit(admission, ours)] == [ADMITTED] * 3
    for anonymous_id, message_id in ours[1:]:  # what admission of the re-run would write, its lease lapsed
        await store.set(Idempotency.key("ws", "run-1", anonymous_id), f"{PENDING}:{mid('re-' + message_id)}", px=60_000)
    writes = WriteBatch()
    for anonymous_id, message_id in ours[:2]:
        claims.queue_release(writes, "ws", "run-1", anonymous_id, message_id)
    claims.queue_settle_all(writes, Idempotency.key("ws", "run-1", ""), SENT, ours[2:])
    await BatchWriter(store).execute(writes, once="ts:{ws}:settled:b1")
    held = await store.mget([Idempotency.key("ws", "run-1", anonymous_id) for anonymous_id, _ in ours])
    assert held == [None, f"{PENDING}:{mid('re-' + mid('m2'))}".encode(), f"{SENT}:{mid('m3')}".encode()]
    assert 0 < await store.pttl(Idempotency.key("ws", "run-1", "taken-failed")) <= 60_000  # the re-run's lease
    again = await _admit(admission, [(anonymous_id, mid("third-" + anonymous_id)) for anonymous_id, _ in ours])
    assert again == [Verdict(ADMITTED), Verdict(HELD, PENDING, mid("re-" + mid("m2"))), Verdict(HELD, SENT, mid("m3"))]


async def test_frequency_caps_slide_and_release(store):
    admission = Admission(store, lease_seconds=60, message_map=MessageMap(store, ttl_seconds=60))
    cap = Cap(max_messages=2, window_seconds=60)
    admitted = [
        (await _admit(admission, [("a", mid(f"m{i}"))], _batch(campaign_instance_id=f"run-{i}"), cap=cap))[0].outcome
        for i in range(3)
    ]
    assert admitted == [ADMITTED, ADMITTED, CAPPED]
    # A capped recipient holds no claim and no map entry: a later run of the instance may send it.
    assert await store.exists(Idempotency.key("ws", "run-2", "a")) == 0
    assert not await mapped(store, mid("m2"))
    writes = WriteBatch()
    FrequencyCaps().queue_release(writes, "ws", "email", "a", mid("m0"))
    await BatchWriter(store).execute(writes)
    again = await _admit(admission, [("a", mid("m9"))], _batch(campaign_instance_id="run-9"), cap=cap)
    assert again == [Verdict(ADMITTED)]
    untracked = await _admit(
        admission, [("a", mid("t1"))], _batch(campaign_instance_id="run-9"), cap=cap, tracked=False
    )
    assert untracked == [Verdict(ADMITTED)]  # a test send: no claim, no cap, but mapped
    assert await mapped(store, mid("t1"))


async def test_a_short_windowed_cap_keeps_the_history_a_longer_one_counts(store):
    """Campaigns cap with windows of their own on one recipient's history: a cap of five a second
    must not forget the message a cap of one a day counts, nor let the history expire before a day."""
    admission = Admission(store, lease_seconds=60, message_map=MessageMap(store, ttl_seconds=60))
    daily, per_second = Cap(max_messages=1, window_seconds=86400), Cap(max_messages=5, window_seconds=1)

    async def admit(cap: Cap, run: str) -> str:
        (verdict,) = await _admit(admission, [("a", f"m-{run}")], _batch(campaign_instance_id=run), cap=cap)
        return verdict.outcome

    assert await admit(daily, "daily-1") == ADMITTED
    assert await admit(per_second, "burst-1") == ADMITTED
    await asyncio.sleep(1.1)
    assert await admit(per_second, "burst-2") == ADMITTED  # a second's window: the older two are out of it
    assert await admit(daily, "daily-2") == CAPPED
    cap_key = FrequencyCaps.key("ws", "email", "a")
    assert await store.pttl(cap_key) > 86_000_000
    # Released sends count no more, and a history left with none is gone with its horizon.
    writes = WriteBatch()
    for run in ("daily-1", "burst-1"):
        FrequencyCaps().queue_release(writes, "ws", "email", "a", f"m-{run}")
    await BatchWriter(store).execute(writes)
    assert await store.exists(cap_key) == 1
    writes = WriteBatch()
    FrequencyCaps().queue_release(writes, "ws", "email", "a", "m-burst-2")
    await BatchWriter(store).execute(writes)
    assert await store.exists(cap_key) == 0
    assert await admit(daily, "daily-3") == ADMITTED


async def test_suppressed_recipients_are_neither_claimed_nor_mapped(store):
    admission = Admission(store, lease_seconds=60, message_map=MessageMap(store, ttl_seconds=60))
    suppressions = SuppressionStore(store)
    await suppressions.suppress("ws", "email", "", ["everywhere"], reason=1)
    await suppressions.suppress("ws", "email", "news", ["news-only"], reason=2)
    pairs = [("everywhere", "m1"), ("news-only", "m2"), ("welcome", "m3")]
    assert [v.outcome for v in await _admit(admission, pairs)] == [SUPPRESSED, ADMITTED, ADMITTED]
    on_topic = await _admit(admission, pairs, _batch(campaign_instance_id="run-2"), topic="news")
    assert [v.outcome for v in on_topic] == [SUPPRESSED, SUPPRESSED, ADMITTED]
    assert await store.exists(Idempotency.key("ws", "run-2", "everywhere"), MessageMap.key("ws", "m1")) == 0


async def test_an_opt_in_kept_by_a_lift_outlasts_an_opt_out_made_before_it(store):
    """SendGrid's group resubscribe and unsubscribe: a lift that keeps the opt-in's time makes a
    suppression as of an earlier time, delivered after it, change nothing; one as of a later time holds."""
    suppressions = SuppressionStore(store)
    lifted = await suppressions.lift("ws", "email", "g", ["a", "b"], [3], sent_after_ms=2000, keep_opt_in=True)
    assert lifted == Changed(0, 0)
    late = await suppressions.suppress("ws", "email", "g", ["a"], 3, at_ms=1000, after_opt_ins=True)
    later = await suppressions.suppress("ws", "email", "g", ["b"], 3, at_ms=3000, after_opt_ins=True)
    assert (late, later) == (Changed(0, 0, opted_in_later=1), Changed(1, 0))
    assert await suppressions.find("ws", "email", "g", ["a", "b"]) == {"b"}
    assert await store.zrange(SuppressionStore.opt_in_key("ws", "email", "g"), 0, -1, withscores=True) == [
        (b"a", 2000.0)
    ]
    # Without the flag, as before: the suppression is made.
    assert (await suppressions.suppress("ws", "email", "g", ["a"], 3, at_ms=1000)).changed == 1


async def test_opt_ins_are_kept_only_as_long_as_an_opt_out_made_before_them_may_arrive(store):
    """Customers who opt in again and never leave would otherwise be kept forever."""
    suppressions = SuppressionStore(store)
    now_ms = int(time.time() * 1000)
    long_ago, lately = now_ms - OPT_IN_KEPT_MS - 60_000, now_ms - 3_600_000
    await suppressions.lift("ws", "email", "g", ["a"], [3], sent_after_ms=long_ago, keep_opt_in=True)
    await suppressions.lift("ws", "email", "g", ["b"], [3], sent_after_ms=lately, keep_opt_in=True)
    key = SuppressionStore.opt_in_key("ws", "email", "g")
    assert await store.zrange(key, 0, -1) == [b"b"]
    assert 0 < await store.pttl(key) <= OPT_IN_KEPT_MS


async def test_a_number_is_looked_up_under_each_of_its_whatsapp_spellings(store):
    index = BlindIndex(store, None, ttl_seconds=600)
    await store.set(BlindIndex.key("ws", "whatsapp", index.digest("ws", "+5511987654321")), "br")
    assert await index.lookup("ws", "whatsapp", "551187654321") == "br"
    assert await index.lookup("ws", "whatsapp", "5211987654321") is None


async def test_admission_is_cut_into_calls_and_maps_as_records_one_by_one_would(store, monkeypatch):
    monkeypatch.setattr(admission_module, "ADMISSIONS_PER_SCRIPT", 2)
    message_map = MessageMap(store, ttl_seconds=60)
    admission = Admission(store, lease_seconds=60, message_map=message_map)
    sent, written = new_message_ids(5), new_message_ids(5)
    pairs = [(f"anon-{i}", message_id) for i, message_id in enumerate(sent)]
    assert [v.outcome for v in await _admit(admission, pairs)] == [ADMITTED] * 5
    await message_map.put_many([_batch(message_id=m, anonymous_id=f"anon-{i}") for i, m in enumerate(written)])
    for i in range(5):
        by_admission, by_put = await message_map.get("ws", sent[i]), await message_map.get("ws", written[i])
        assert by_admission.sent_at == pytest.approx(by_put.sent_at, abs=60)
        assert dataclasses.replace(by_admission, message_id="", sent_at=0) == dataclasses.replace(
            by_put, message_id="", sent_at=0
        )
        assert (by_admission.message_id, by_admission.anonymous_id) == (sent[i], f"anon-{i}")
    # The group's hash holds a field per message, its own part = its anonymous ID, whatever the number
    # of calls; its record what they share; no key per message.
    group = sent[0][:GROUP_PART]
    entries = await store.hgetall(MessageMap.entries_key("ws", group))
    assert entries == {m[GROUP_PART:].encode(): f"anon-{i}".encode() for i, m in enumerate(sent)}
    assert 0 < await store.ttl(MessageMap.entries_key("ws", group)) <= 60
    assert await store.exists(*(MessageMap.key("ws", m) for m in sent)) == 0
    record_ttl = await store.ttl(MessageMap.batch_key("ws", group))
    assert 60 < record_ttl <= 60 + BATCH_RECORD_MARGIN_SECONDS  # it outlives its entries


async def test_a_message_not_sent_leaves_its_group_and_nothing_else(store):
    message_map = MessageMap(store, ttl_seconds=60)
    ids = new_message_ids(3)
    await message_map.put_many([_batch(message_id=m, anonymous_id=f"anon-{i}") for i, m in enumerate(ids)])
    writes = WriteBatch()
    message_map.queue_forget(writes, "ws", ids[1])
    await BatchWriter(store).execute(writes)
    found = await message_map.get_many("ws", ids)
    assert [r.anonymous_id if r else None for r in found.values()] == ["anon-0", None, "anon-2"]


async def test_message_map_refuses_what_a_group_cannot_hold(store):
    message_map = MessageMap(store, ttl_seconds=60)
    with pytest.raises(ValueError, match="32 hex digits"):
        await message_map.put_many([_batch(message_id="m1", anonymous_id="anon-1")])
    first, second = new_message_ids(2)
    with pytest.raises(ValueError, match="differ in more than their anonymous ID") as refused:
        await message_map.put_many(
            [
                _batch(message_id=first, anonymous_id="anon-1"),
                _batch(message_id=second, anonymous_id="anon-2", campaign_id="other"),
            ]
        )
    assert "anon-" not in str(refused.value)


async def test_message_map_reads_entries_written_before_batch_records(store):
    message_map = MessageMap(store, ttl_seconds=60)
    await store.hset(
        MessageMap.key("ws", "old"),
        mapping={
            "message_id": "old",
            "workspace_id": "ws",
            "campaign_id": "camp",
            "campaign_instance_id": "run-1",
            "anonymous_id": "anon-1",
            "channel": str(common_pb2.CHANNEL_SMS),
            "connector_id": "gw",
            "provider": "custom",
            "sent_at": "5.0",
            "status": "delivered",  # a receipt's, beside the dispatcher's fields
        },
    )
    old = await message_map.get("ws", "old")
    assert (old.campaign_id, old.anonymous_id, old.sent_at) == ("camp", "anon-1", 5.0)
    assert old.channel == common_pb2.CHANNEL_SMS


async def test_message_map_reads_entries_written_before_groups(store):
    """One hash per message holding its anonymous ID and its batch's ID, the batch's record beside it."""
    message_map = MessageMap(store, ttl_seconds=60)
    older = mid("older")
    await store.hset(MessageMap.key("ws", older), mapping={"batch": "b" * 32, "anonymous_id": "anon-9"})
    await store.hset(MessageMap.batch_key("ws", "b" * 32), mapping=MessageMap.batch_fields(_batch()))
    record = await message_map.get("ws", older)
    assert (record.message_id, record.anonymous_id, record.campaign_id) == (older, "anon-9", "camp")


async def test_an_entry_whose_batch_record_is_gone_reads_as_unknown(store):
    message_map = MessageMap(store, ttl_seconds=60)
    m1 = mid("m1")
    await message_map.put_many([_batch(message_id=m1, anonymous_id="anon-1")])
    await store.delete(MessageMap.batch_key("ws", m1[:GROUP_PART]))
    assert await MessageMap(store, ttl_seconds=60).get("ws", m1) is None  # a reader that never saw it
    assert await message_map.get_many("ws", [m1, "nobody"]) == {m1: None, "nobody": None}


@pytest.mark.parametrize("writes_per_call", [1, 3, 2000])
async def test_write_batch_applies_every_write_in_order(store, writes_per_call):
    await store.set("ts:{ws}:gone", "x")
    await store.zadd("ts:{ws}:z", {"m1": 1, "m2": 2})
    await store.set("ts:{ws}:mine", "p:1")
    await store.set("ts:{ws}:theirs", "p:2")
    writes = WriteBatch()
    writes.set("ts:{ws}:a", "1", ex=60)
    writes.set("ts:{ws}:a", "2", ex=120)  # later writes win, as in a pipeline
    writes.set("ts:{ws}:plain", b"\x00bytes")
    writes.delete("ts:{ws}:gone")
    writes.delete_if("ts:{ws}:mine", "p:1")
    writes.delete_if("ts:{ws}:theirs", "p:1")  # rewritten since: kept
    writes.zrem("ts:{ws}:z", "m1")
    writes.hset("ts:{ws}:h", mapping={"f1": "v1", "f2": 2})
    writes.expire("ts:{ws}:h", 30)
    writes.hincrby("ts:{ws}:n", "sent", 5)
    writes.hincrby("ts:{ws}:n", "sent", -2)
    writes.hset("ts:{ws}:g", mapping={"f1": "v1", "f2": "v2", "f3": "v3"})
    writes.hdel("ts:{ws}:g", "f1", "f3")
    await BatchWriter(store, writes_per_call=writes_per_call).execute(writes)
    assert await store.get("ts:{ws}:a") == b"2" and 60 < await store.ttl("ts:{ws}:a") <= 120
    assert await store.get("ts:{ws}:plain") == b"\x00bytes" and await store.ttl("ts:{ws}:plain") == -1
    assert await store.exists("ts:{ws}:gone", "ts:{ws}:mine") == 0 and await store.get("ts:{ws}:theirs") == b"p:2"
    assert await store.zrange("ts:{ws}:z", 0, -1) == [b"m2"]
    assert await store.hgetall("ts:{ws}:h") == {b"f1": b"v1", b"f2": b"2"} and 0 < await store.ttl("ts:{ws}:h") <= 30
    assert await store.hget("ts:{ws}:n", "sent") == b"3"
    assert await store.hgetall("ts:{ws}:g") == {b"f2": b"v2"}


@pytest.mark.parametrize("writes_per_call", [1, 3, 2000])
async def test_a_run_of_sets_is_written_whole_whatever_the_calls(store, writes_per_call, monkeypatch):
    """A batch's settled claims go as runs of SETs sharing one expiry: each key gets its own value, and
    a call is cut before or after a run, never inside it (its keys' values follow its one op code)."""
    monkeypatch.setattr(write_batch, "KEYS_PER_RUN", 4)
    writes = WriteBatch()
    writes.set("ts:{ws}:before", "b", ex=60)
    claims = [f"ts:{{ws}}:idem:run-1:cust-{i}" for i in range(10)]
    writes.set_all(claims, [f"s:{i:032x}" for i in range(10)], ex=90)
    writes.hincrby("ts:{ws}:counts", "sent", 10)
    assert len(writes) == 12
    await BatchWriter(store, writes_per_call=writes_per_call).execute(writes, once="ts:{ws}:once:run")
    assert await store.mget(claims) == [f"s:{i:032x}".encode() for i in range(10)]
    assert all([60 < await store.ttl(claim) <= 90 for claim in claims])
    assert await store.get("ts:{ws}:before") == b"b" and await store.hget("ts:{ws}:counts", "sent") == b"10"
    # Cut only at the runs' edges: five calls of one op each at one write a call, three at three, one.
    calls = {1: 5, 3: 3, 2000: 1}[writes_per_call]
    markers = [f"ts:{{ws}}:once:run:{n}" for n in range(calls + 1)]
    assert await store.exists(*markers) == calls and await store.exists(markers[-1]) == 0


async def test_a_hash_larger_than_one_script_unpack_is_written_in_parts(store):
    """10,000 fields are 20,000 values, more than Lua's unpack takes at once: whatever a caller queues
    (a hash per group of messages stays at 128 fields, a batch record at a few dozen) is written."""
    links = {f"{i:016x}": f"cust-{i}" for i in range(10_000)}
    writes = WriteBatch()
    writes.hset("ts:{ws}:unsublinks:0123456789abcdef", mapping=links)
    writes.expire("ts:{ws}:unsublinks:0123456789abcdef", 60)
    assert len(writes) == 11  # ten HSETs of 1,000 fields and the EXPIRE
    await BatchWriter(store).execute(writes)
    stored = await store.hgetall("ts:{ws}:unsublinks:0123456789abcdef")
    assert {k.decode(): v.decode() for k, v in stored.items()} == links
    assert 0 < await store.ttl("ts:{ws}:unsublinks:0123456789abcdef") <= 60


async def test_write_batch_refuses_a_write_that_would_never_expire_by_mistake(store):
    with pytest.raises(ValueError, match="at least 1 second") as refused:
        WriteBatch().set("ts:{ws}:bidx:sms:5e1f0c", "1", ex=0)
    assert "5e1f0c" not in str(refused.value)  # key names (digests, IDs) stay out of error texts
    await BatchWriter(store).execute(WriteBatch())  # nothing queued: no call


async def test_message_map_entries_keep_every_field_whatever_they_share(store):
    message_map = MessageMap(store, ttl_seconds=60)
    m1, m2, m3 = mid("m1"), mid("m2"), mid("m3")
    records = [
        MessageRecord(m1, "ws", "camp-a", "run-1", "anon-1", common_pb2.CHANNEL_SMS, "gw", "custom", "P1"),
        MessageRecord(m2, "ws", "camp-a", "run-1", "anon-2", common_pb2.CHANNEL_SMS, "gw", "custom", sent_at=5.0),
        MessageRecord(m3, "ws", "camp-b", "run-1", "anon-3", common_pb2.CHANNEL_SMS, "gw", "custom"),
    ]
    await message_map.put_many(records)
    stored = [await message_map.get("ws", m) for m in (m1, m2, m3)]
    assert [(r.campaign_id, r.anonymous_id, r.connector_id) for r in stored] == [
        ("camp-a", "anon-1", "gw"),
        ("camp-a", "anon-2", "gw"),
        ("camp-b", "anon-3", "gw"),
    ]
    assert stored[0].sent_at > 1e9 and stored[1].sent_at == 5.0  # unset means now
    assert stored[0].provider_message_id == ""  # never stored: only its digest, as the index
    assert (await message_map.find_by_provider_id("ws", "custom", "P1")).message_id == m1
    assert 0 < await store.ttl(MessageMap.entries_key("ws", m3[:GROUP_PART])) <= 60


async def test_rate_limit_reservations_are_spaced(store):
    limiter = ConnectorRateLimiter(store)
    first_wait, interval = await limiter.reserve("ws", "c1", per_second=100, slots=50)
    second_wait, _ = await limiter.reserve("ws", "c1", per_second=100, slots=1)
    assert first_wait == 0 and interval == pytest.approx(0.01)
    assert 0.4 <= second_wait <= 0.5  # the second caller waits behind the first caller's 50 slots


async def test_a_slot_wanted_within_a_time_is_reserved_only_if_it_comes_by_then(store):
    limiter = RateLimiter(store)
    key = workspace_key("ws", "pii-rate", "email")
    assert await limiter.reserve_within(key, 10, within=1.0) == 0
    second = await limiter.reserve_within(key, 10, within=1.0)
    assert second is not None and 0.05 <= second <= 0.1
    assert await limiter.reserve_within(key, 10, within=0.05) is None  # refused: and nothing reserved
    third = await limiter.reserve_within(key, 10, within=1.0)
    assert third is not None and 0.15 <= third <= 0.2  # right behind the second, not behind the refused one


async def test_the_next_free_slot_is_read_without_reserving_it(store):
    limiter = ConnectorRateLimiter(store)
    assert await limiter.next_slot_in("ws", "c1", per_second=10) == 0
    await limiter.reserve("ws", "c1", per_second=10, slots=5)
    ahead = await limiter.next_slot_in("ws", "c1", per_second=10)
    assert 0.4 <= ahead <= 0.5
    assert 0.4 <= await limiter.next_slot_in("ws", "c1", per_second=10) <= ahead  # reading took nothing
    wait, _ = await limiter.reserve("ws", "c1", per_second=10, slots=1)
    assert 0.4 <= wait <= ahead


async def test_message_map_and_counters(store):
    message_map = MessageMap(store, ttl_seconds=60)
    m1 = mid("m1")
    record = MessageRecord(m1, "ws", "camp", "run-1", "anon-1", common_pb2.CHANNEL_SMS, "twilio", "twilio")
    await message_map.put_many([record])
    async with store.pipeline(transaction=False) as pipe:
        message_map.queue_provider_id(pipe, "ws", m1, "twilio", "SM123")
        add_counts(pipe, "ws", "camp", "run-1", {"sent": 2, "attempted": 3})
        await pipe.execute()
    assert (await message_map.get("ws", m1)).anonymous_id == "anon-1"
    assert (await message_map.find_by_provider_id("ws", "twilio", "SM123")).message_id == m1
    assert 0 < await store.ttl(MessageMap.entries_key("ws", m1[:GROUP_PART])) <= 60
    assert (await read_counts(store, "ws", "camp")) == {"sent": 2, "attempted": 3}

    # An entry written when the hash still repeated its workspace and message ID reads the same.
    older = {"message_id": "m0", "workspace_id": "ws", "campaign_id": "camp", "campaign_instance_id": "run-1"}
    older |= {"anonymous_id": "anon-0", "channel": "2", "connector_id": "twilio", "provider": "twilio"}
    await store.hset(MessageMap.key("ws", "m0"), mapping=older)
    assert await message_map.get("ws", "m0") == dataclasses.replace(record, message_id="m0", anonymous_id="anon-0")


async def test_config_versions_are_kept_and_pinned(store):
    configs = PiiApiConfigStore(store, SecretBox([b"k" * 32]), versions_kept=2, pin_ttl_seconds=60)
    for _ in range(3):
        await configs.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    assert await configs.latest_version("ws", common_pb2.CHANNEL_EMAIL) == 3
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, 2)).version == 2
    with pytest.raises(Exception, match="not kept"):
        await configs.load("ws", common_pb2.CHANNEL_EMAIL, 1)
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, campaign_instance_id="run-1")).version == 3
    await configs.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, campaign_instance_id="run-1")).version == 3
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, campaign_instance_id="run-2")).version == 4
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL)).version == 4
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, 3, campaign_instance_id="run-2")).version == 3
    for _ in range(3):  # versions 5-7: the window passes versions 3-5; run-1 and run-2 hold 3 and 4
        await configs.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, campaign_instance_id="run-1")).version == 3
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, campaign_instance_id="run-2")).version == 4
    with pytest.raises(Exception, match="version 5 is not kept"):
        await configs.load("ws", common_pb2.CHANNEL_EMAIL, 5)


async def test_a_pinned_version_is_kept_until_its_last_pin_ends(store):
    """A campaign instance runs on the version it started with, however often the config is saved
    meanwhile; once its pin ends, the next save lets the version go."""
    # The pin outlives the saves below on a busy machine (25 saves once took more than a second there).
    configs = PiiApiConfigStore(store, SecretBox([b"k" * 32]), versions_kept=1, pin_ttl_seconds=3)
    email = common_pb2.CHANNEL_EMAIL
    await configs.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    assert (await configs.load("ws", email, campaign_instance_id="run-1")).version == 1
    for _ in range(5):  # more than the versions kept
        await configs.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    assert (await configs.load("ws", email, campaign_instance_id="run-1")).version == 1
    with pytest.raises(Exception, match="version 2 is not kept"):
        await configs.load("ws", email, 2)
    await asyncio.sleep(3.1)  # run-1's pin ends
    await configs.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    with pytest.raises(Exception, match="version 1 is not kept"):
        await configs.load("ws", email, 1)
    assert await store.zcard(f"{PiiApiConfigStore._base('ws', email)}:pinned") == 0


async def test_a_pinned_version_sealed_under_an_old_key_says_to_start_a_new_instance(store):
    """After a dev-mode restart (a new throwaway key) the config is saved again, but an instance started
    before stays pinned to a version the new key cannot open: saving once more would not mend it."""
    email = common_pb2.CHANNEL_EMAIL
    before = PiiApiConfigStore(store, SecretBox([b"o" * 32]), versions_kept=5, pin_ttl_seconds=60)
    await before.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    assert (await before.load("ws", email, campaign_instance_id="run-1")).version == 1
    after = PiiApiConfigStore(store, SecretBox([b"n" * 32]), versions_kept=5, pin_ttl_seconds=60)
    with pytest.raises(SealedDataInvalid):  # the latest: the error mapping says to save it again
        await after.load("ws", email)
    await after.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    with pytest.raises(FailedPrecondition) as pinned:
        await after.load("ws", email, campaign_instance_id="run-1")
    assert pinned.value.message == (
        "PII API config for workspace 'ws', channel family email: version 1 does not open with "
        "TOKENSEND_SECRET_KEY: it was sealed under another key (a dev-mode key of an earlier run, or a key changed "
        "without re-sealing); the campaign instance is pinned to it: start a new instance, which takes the latest "
        "version (2)"
    )
    with pytest.raises(FailedPrecondition, match=r"version 1 does not open .*; ask for the latest version \(2\)"):
        await after.load("ws", email, 1)
    assert (await after.load("ws", email, campaign_instance_id="run-2")).version == 2


async def test_the_oauth_config_comes_with_the_pii_config_once_the_store_knows_which(store):
    box = SecretBox([b"k" * 32])
    configs = PiiApiConfigStore(store, box, versions_kept=5, pin_ttl_seconds=60)
    oauth_configs = OAuthConfigStore(store, box)
    for ident, secret in (("auth-1", "s1"), ("auth-2", "s2")):
        await oauth_configs.save(
            rpb.OAuthConfig(workspace_id="ws", oauth_config_id=ident, token_url="https://t", client_secret=secret)
        )
    await configs.save(bulk_config("https://pii.example.com", workspace_id="ws", oauth_config_id="auth-1"))
    email = common_pb2.CHANNEL_EMAIL
    _, first = await configs.load_with_oauth(oauth_configs, "ws", email)
    assert first is NOT_LOADED  # the store has not seen this config yet
    config, oauth = await configs.load_with_oauth(oauth_configs, "ws", email, campaign_instance_id="run-1")
    assert (config.oauth_config_id, oauth.oauth_config_id, oauth.client_secret) == ("auth-1", "auth-1", "s1")
    # A new version naming another OAuth config: read on its own once, then with the config again.
    await configs.save(bulk_config("https://pii.example.com", workspace_id="ws", oauth_config_id="auth-2"))
    _, changed = await configs.load_with_oauth(oauth_configs, "ws", email)
    assert changed is NOT_LOADED
    assert (await configs.load_with_oauth(oauth_configs, "ws", email))[1].client_secret == "s2"
    # The pinned instance keeps its version, and so its OAuth config.
    pinned, _ = await configs.load_with_oauth(oauth_configs, "ws", email, campaign_instance_id="run-1")
    assert pinned.oauth_config_id == "auth-1"
    # An OAuth config that is gone is left to the usual load (which says so).
    await store.delete(OAuthConfigStore.key("ws", "auth-2"))
    assert (await configs.load_with_oauth(oauth_configs, "ws", email))[1] is NOT_LOADED
    await configs.save(bulk_config("https://pii.example.com", workspace_id="ws"))
    assert (await configs.load_with_oauth(oauth_configs, "ws", email))[1] is None  # no OAuth at all


async def test_a_config_is_the_one_stored_under_its_version_however_often_it_is_read(store):
    box = SecretBox([b"k" * 32])
    configs = PiiApiConfigStore(store, box, versions_kept=5, pin_ttl_seconds=60)
    await configs.save(bulk_config("https://one.example.com", workspace_id="ws"))
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL)).url.startswith("https://one.")
    await configs.save(bulk_config("https://two.example.com", workspace_id="ws"))
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL)).url.startswith("https://two.")
    assert (await configs.load("ws", common_pb2.CHANNEL_EMAIL, 1)).url.startswith("https://one.")
    # Another workspace's sealed bytes do not open here, decrypted before or not.
    base_one, base_other = PiiApiConfigStore._base("ws", common_pb2.CHANNEL_EMAIL), "ts:{other}:pii:email"
    await store.set(f"{base_other}:latest", 1)
    await store.set(f"{base_other}:v:1", await store.get(f"{base_one}:v:1"))
    with pytest.raises(Exception, match="does not open"):
        await configs.load("other", common_pb2.CHANNEL_EMAIL)


async def test_whole_suite_runs_on_the_embedded_store(
    start_pii_api_server, start_resolver, start_dispatcher, secret_key
):
    """Resolver, dispatcher and receipts in one process on one memory:// store, with signed receipts."""
    from sandbox.pii_api import OAuthClient
    from sandbox.providers import ProviderSandbox, start_providers
    from sandbox.workspace import OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SandboxWorkspace, configure
    from services.receipts.server import ReceiptsDeps, start_receipts
    from tests.conftest import free_port

    url = f"memory://{uuid.uuid4().hex}"
    http_port = free_port()
    pii_api = await start_pii_api_server(oauth=OAuthClient(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET))
    resolver = await start_resolver(redis_url=url)
    dispatcher = await start_dispatcher(resolver, redis_url=url, public_webhook_url=f"http://127.0.0.1:{http_port}")
    receipts_settings = ReceiptsSettings(
        redis_url=url,
        secret_key=secret_key,
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_port=http_port,
        http_host="127.0.0.1",
        allow_private_networks=True,
        public_webhook_url=f"http://127.0.0.1:{http_port}",
    )
    receipts, receipts_port = await start_receipts(receipts_settings, ReceiptsDeps.from_settings(receipts_settings))
    providers = ProviderSandbox(
        receipts_url=f"http://127.0.0.1:{http_port}", receipt_script=lambda p, m: ["sent", "delivered"]
    )
    runner, port = await start_providers(providers)
    try:
        workspace = SandboxWorkspace("mem", pii_api.base_url, f"http://127.0.0.1:{port}", providers.sendgrid_public_key)
        for account in workspace.provider_accounts():
            providers.add_account(account)
        await configure(workspace, resolver.stub, dispatcher.stub)
        reply = await dispatcher.stub.Dispatch(
            dpb.DispatchRequest(
                workspace_id="mem",
                campaign_id="c",
                campaign_instance_id="i",
                channel=common_pb2.CHANNEL_SMS,
                connector_id="twilio",
                content=dpb.Content(sms_body="Hi {{ first_name }}"),
                recipients=[dpb.Recipient(anonymous_id=f"cust-{n:06d}") for n in range(1, 11)],
            )
        )
        assert reply.summary.sent == 10
        await providers.drain_receipts()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{receipts_port}") as channel:
            stub = cpb_grpc.ReceiptsServiceStub(channel)
            for _ in range(50):
                stats = await stub.GetCampaignStats(cpb.GetCampaignStatsRequest(workspace_id="mem", campaign_id="c"))
                if stats.delivered == 10:
                    break
                await asyncio.sleep(0.1)
        assert (stats.sent, stats.delivered) == (10, 10)
        version = await resolver.stub.GetPiiApiConfig(rpb.GetPiiApiConfigRequest(workspace_id="mem", channel=2))
        assert version.version == 1
    finally:
        await providers.close()
        await runner.cleanup()
        await receipts.stop(0.5)


async def test_a_redis_that_would_evict_keys_is_named_at_start(disposable_redis, caplog):
    """Evicted claims, suppressions or map entries would be lost without an error: the services say so."""
    client = create_redis(disposable_redis.url)
    try:
        await prepare_store(client)
        assert await eviction_risk(client) == "" and "evict" not in caplog.text  # Redis's default
        await client.config_set("maxmemory-policy", "allkeys-lru")
        assert await eviction_risk(client) == ""  # no limit: Redis never evicts
        await client.config_set("maxmemory", "104857600")
        with caplog.at_level(logging.WARNING, logger="libs.store"):
            await prepare_store(client)
        # As the log shows it: scrubbed like every line, where a byte count reads as a phone number.
        (record,) = [r for r in caplog.records if "evict" in r.getMessage()]
        ScrubbingFilter().filter(record)
        assert "maxmemory-policy allkeys-lru, maxmemory 100 MiB" in record.getMessage()
        assert "noeviction" in record.getMessage()
    finally:
        await client.aclose()
    assert await eviction_risk(create_redis("memory://eviction-check")) == ""  # the embedded store cannot say


async def test_a_cancellation_that_comes_as_a_command_is_written_reaches_the_caller(redis_url, monkeypatch):
    """redis-py writes under `asyncio.wait_for`, which on Python 3.11 drops a cancellation that comes
    as the write finishes: a claim keeper cancelled so carried on, and its batch never ended."""
    client = create_redis(redis_url)
    connection_class = client.connection_pool.connection_class
    written = connection_class._send_packed_command
    caller: asyncio.Task | None = None

    async def written_as_the_caller_is_cancelled(self, command):
        await written(self, command)
        if caller is not None and b"cancel-me" in b"".join(command):
            caller.cancel()  # lands while wait_for waits for this write, which is finished

    monkeypatch.setattr(connection_class, "_send_packed_command", written_as_the_caller_is_cancelled)
    try:
        caller = asyncio.create_task(client.set("ts:test:cancel", "cancel-me"))
        with pytest.raises(asyncio.CancelledError):
            await caller
        caller = None
        # The command went out; its connection, whose reply was never read, serves no other command.
        for n in range(20):
            assert await client.set(f"ts:test:after{n}", n) is True
            assert await client.get("ts:test:cancel") == b"cancel-me"
    finally:
        await client.aclose()


async def test_stream_read_stops_where_events_were_trimmed(store):
    """The same check runs on every read of a stream that is open, so falling behind while it
    streams ends it at the gap."""
    ledger = DeliveryLedger(store, dedupe_key=b"k" * 32, dedupe_ttl_seconds=60, stream_maxlen=10)
    key = "ts:{ws}:events"
    ids = [(await store.xadd(key, {"message_id": str(n)})).decode() for n in range(5)]
    assert [e.message_id for e in await ledger.read("ws", ids[1], 10, None)] == ["2", "3", "4"]
    for n in range(5, 300):
        await store.xadd(key, {"message_id": str(n)}, maxlen=10, approximate=True)
    with pytest.raises(EventsTrimmed) as gap:
        await ledger.read("ws", ids[2], 10, None)
    assert gap.value.oldest_kept == (await store.xrange(key, count=1))[0][0].decode()
    last = "18446744073709551615-18446744073709551615"  # no ID follows it: no event can come after it
    with pytest.raises(EventsAhead):
        await ledger.read("ws", last, 10, None)
    assert await ledger.read("ws", last, 10, None, resumed=False) == []


async def test_ids_holding_colons_keep_to_their_own_keys(store):
    """IDs may hold ':', the separator of a key's parts: each still has keys of its own."""
    oauth_configs = OAuthConfigStore(store, SecretBox([b"k" * 32]))
    for ident, secret in (("x", "s1"), ("x:status", "s2")):
        await oauth_configs.save(
            rpb.OAuthConfig(workspace_id="ws", oauth_config_id=ident, token_url="https://t", client_secret=secret)
        )
    await oauth_configs.set_status("ws", "x", rpb.TOKEN_STATUS_ACTIVE, "")  # config x's status hash
    assert (await oauth_configs.load("ws", "x:status")).client_secret == "s2"
    async with store.pipeline(transaction=False) as pipe:
        add_counts(pipe, "ws", "a:i:b", "", {"sent": 1})
        add_counts(pipe, "ws", "a", "b:all", {"sent": 5})
        await pipe.execute()
    assert await read_counts(store, "ws", "a:i:b") == {"sent": 1}
    admission = Admission(store, lease_seconds=60, message_map=MessageMap(store, ttl_seconds=60))
    first = await _admit(admission, [("x", "m1")], _batch(campaign_instance_id="run:1"))
    second = await _admit(admission, [("1:x", "m2")], _batch(campaign_instance_id="run"))
    assert [v.outcome for v in first + second] == [ADMITTED, ADMITTED]  # two recipients, not one claim


async def test_cluster_mode_against_a_single_redis_is_a_setting_to_fix(redis_url):
    """Not a wait for a cluster that will never come: the service stops at once, saying which settings."""
    client = create_redis(redis_url.rsplit("/", 1)[0] + "/0", cluster=True)  # a cluster has only database 0
    try:
        with pytest.raises(StoreMisconfigured, match="TOKENSEND_REDIS_CLUSTER is set"):
            await asyncio.wait_for(prepare_store(client), 10)
    finally:
        await client.aclose()
