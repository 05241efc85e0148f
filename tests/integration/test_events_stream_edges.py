"""The delivery event stream's edges, on real Redis and on the embedded store: it expires like every
other key, and a reader is told exactly when events after its position are gone (trimmed or expired)."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from tokensend.common.v1 import common_pb2
from tokensend.receipts.v1 import receipts_service_pb2 as pb

from libs.message_map import MessageMap, MessageRecord, new_message_ids
from libs.store import EVENTS_AFTER_ID_HEADER, create_redis, parse_stream_id
from services.receipts.ledger import DeliveryLedger, EventsAhead, EventsTrimmed, events_key, stream_id_order
from services.receipts.model import ReceiptEvent, Status
from tests.integration.test_receipts_harness import WS as HARNESS_WS
from tests.integration.test_receipts_harness import Pii, put_messages, running_receipts, sendgrid_event

pytestmark = pytest.mark.integration

WS = "ws"
KEY = events_key(WS)
MAXLEN = 10


@pytest.fixture(params=["redis", "memory"])
async def store(request, redis, redis_url):
    client = create_redis(redis_url if request.param == "redis" else f"memory://{uuid.uuid4().hex}")
    yield client
    await client.aclose()


def new_ledger(store, **options) -> DeliveryLedger:
    return DeliveryLedger(store, dedupe_key=b"k" * 32, dedupe_ttl_seconds=3600, stream_maxlen=MAXLEN, **options)


async def record_events(store, ledger: DeliveryLedger, count: int) -> list[str]:
    """`count` delivered events recorded through the ledger, ten a batch; the IDs they got, those trimmed since
    included (each batch's are read as it is recorded, before a later one can trim them)."""
    ids: list[str] = []
    for start in range(0, count, 10):
        size = min(10, count - start)
        records = [
            MessageRecord(message_id, WS, "camp", "run-1", f"anon-{n}", common_pb2.CHANNEL_EMAIL, "sg", "sendgrid")
            for n, message_id in enumerate(new_message_ids(size))
        ]
        await MessageMap(store, 3600).put_many(records)
        events = [
            ReceiptEvent(
                provider="sendgrid",
                status=Status.DELIVERED,
                identities=(("sg-event", record.message_id),),
                message_id=record.message_id,
                occurred_at=time.time(),
            )
            for record in records
        ]
        assert (await ledger.record(WS, events)).mapped == size
        ids += reversed([entry_id.decode() for entry_id, _ in await store.xrevrange(KEY, count=size)])
    return ids


async def server_ms(store) -> int:
    seconds, micros = await store.time()
    return seconds * 1000 + micros // 1000


async def test_the_stream_expires_its_ttl_after_its_newest_event(store):
    """As every other key: a workspace gone quiet does not keep its events for good."""
    await record_events(store, new_ledger(store), 2)
    assert 0 < await store.ttl(KEY) <= 7 * 86400
    await store.expire(KEY, 5)
    await record_events(store, new_ledger(store, stream_ttl_seconds=600), 1)  # each write renews it
    assert 5 < await store.ttl(KEY) <= 600


async def test_a_reader_whose_last_event_was_the_newest_trimmed_missed_nothing(store):
    ledger = new_ledger(store)
    ids = await record_events(store, ledger, 300)
    [(oldest, _)] = await store.xrange(KEY, count=1)
    kept_from = ids.index(oldest.decode())
    assert kept_from >= 2  # trimmed
    events = await ledger.read(WS, ids[kept_from - 1], 500, None)
    assert [e.event_id for e in events] == ids[kept_from:]
    with pytest.raises(EventsTrimmed) as gap:
        await ledger.read(WS, ids[kept_from - 2], 500, None)  # the event after it is gone
    assert gap.value.oldest_kept == ids[kept_from]


async def test_a_new_only_position_on_an_empty_stream_is_judged_when_trimmed(store):
    """ "$" on an empty stream: a position the events that follow come after, which a later trimming passes."""
    ledger = new_ledger(store)
    position = await ledger.last_id(WS)
    assert parse_stream_id(position) == position and position != "0-0"
    assert await ledger.read(WS, position, 10, None) == []
    first = await record_events(store, ledger, 3)
    assert [e.event_id for e in await ledger.read(WS, position, 10, None)] == first
    await record_events(store, ledger, 300)
    with pytest.raises(EventsTrimmed):
        await ledger.read(WS, position, 10, None)


async def test_a_reader_resuming_on_a_stream_that_expired_is_told(store):
    ledger = new_ledger(store, stream_ttl_seconds=1)
    [_, last] = await record_events(store, ledger, 2)
    for _ in range(100):  # the stream expires a second after its newest event
        if not await store.exists(KEY):
            break
        await asyncio.sleep(0.1)
    assert not await store.exists(KEY)
    with pytest.raises(EventsTrimmed) as gap:
        await ledger.read(WS, last, 10, None)
    assert gap.value.expired and gap.value.oldest_kept == ""
    # New events make a new stream: the position is still from before it.
    [newer] = await record_events(store, ledger, 1)
    with pytest.raises(EventsTrimmed) as gap:
        await ledger.read(WS, last, 10, None)
    assert gap.value.oldest_kept == newer
    assert [e.event_id for e in await ledger.read(WS, "0-0", 10, None)] == [newer]


async def test_a_position_younger_than_the_ttl_is_not_from_an_expired_stream(store):
    """A "$" resolved while no stream was there, or a tail that stayed open across its expiry, missed nothing."""
    ledger = new_ledger(store, stream_ttl_seconds=60)
    recent = await ledger.last_id(WS)
    taken_long_ago = f"{await server_ms(store) - 120_000}-0"
    assert await ledger.read(WS, recent, 10, None) == []
    with pytest.raises(EventsTrimmed):  # as old as an event of a stream expired since
        await ledger.read(WS, taken_long_ago, 10, None)
    # A tail reading again at its own position (open all along) is not judged on the TTL.
    assert await ledger.read(WS, taken_long_ago, 10, None, resumed=False) == []
    ids = await record_events(store, ledger, 2)
    assert [e.event_id for e in await ledger.read(WS, recent, 10, None)] == ids
    assert [e.event_id for e in await ledger.read(WS, taken_long_ago, 10, None, resumed=False)] == ids
    with pytest.raises(EventsTrimmed):
        await ledger.read(WS, taken_long_ago, 10, None)


async def test_stream_delivery_events_resumed_on_an_expired_stream_is_out_of_range(redis, redis_url):
    async with running_receipts(redis, redis_url, events_stream_ttl_seconds=1) as receipts:
        records = await put_messages(redis, "sendgrid", 2)
        await receipts.post_sendgrid([sendgrid_event("delivered", Pii.new(), message_id=r.message_id) for r in records])
        [(last, _)] = await redis.xrevrange(f"ts:{{{HARNESS_WS}}}:events", count=1)
        for _ in range(100):
            if not await redis.exists(f"ts:{{{HARNESS_WS}}}:events"):
                break
            await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in receipts.stub.StreamDeliveryEvents(
                pb.StreamDeliveryEventsRequest(workspace_id=HARNESS_WS, after_id=last.decode())
            ):
                pass
        assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error.value.details() == (
            f"events after {last.decode()} may have expired before they were read (the stream is kept 1 s after "
            "its newest event); none is kept now: resume with an empty after_id to read from the oldest kept"
        )


async def test_a_tail_open_across_the_ttl_gets_the_next_event(redis, redis_url):
    """Its position is its own, not one brought from an expired stream: nothing is missing before the event."""
    async with running_receipts(redis, redis_url, events_stream_ttl_seconds=1, events_stream_block_ms=1) as receipts:
        tail = receipts.stub.StreamDeliveryEvents(pb.StreamDeliveryEventsRequest(workspace_id=HARNESS_WS, after_id="$"))
        began = dict(await tail.initial_metadata())[EVENTS_AFTER_ID_HEADER]
        await asyncio.sleep(1.5)  # quiet for longer than the TTL, reading again every millisecond
        [record] = await put_messages(redis, "sendgrid", 1)
        await receipts.post_sendgrid([sendgrid_event("delivered", Pii.new(), message_id=record.message_id)])
        event = await asyncio.wait_for(tail.read(), 10)
        tail.cancel()
    assert event.message_id == record.message_id
    assert stream_id_order(event.event_id)[0] >= stream_id_order(began)[0] + 1000


async def test_a_position_no_event_has_reached_is_refused(store):
    """After the newest event and the store's clock: every event to come sorts below it, so a read there would wait
    for good; the caller is told instead, and a position within the stream or the clock is read as before."""
    ledger = new_ledger(store)
    now = await server_ms(store)
    for position in (f"{now + 3_600_000}-0", "99999999999999-0", "18446744073709551615-18446744073709551615"):
        with pytest.raises(EventsAhead) as ahead:
            await ledger.read(WS, position, 10, None)  # no stream yet: judged on the clock
        assert ahead.value.after_id == position and ahead.value.newest == ""
    ids = await record_events(store, ledger, 2)
    with pytest.raises(EventsAhead) as ahead:
        await ledger.read(WS, "99999999999999-0", 10, None)
    assert ahead.value.newest == ids[-1]
    assert await ledger.read(WS, ids[-1], 10, None) == []
    assert [e.event_id for e in await ledger.read(WS, f"{now - 1}-0", 10, None)] == ids
    assert [e.event_id for e in await ledger.read(WS, "0-0", 10, None)] == ids


async def test_stream_delivery_events_after_a_position_no_event_has_reached_is_out_of_range(redis, redis_url):
    async with running_receipts(redis, redis_url) as receipts:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in receipts.stub.StreamDeliveryEvents(
                pb.StreamDeliveryEventsRequest(workspace_id=HARNESS_WS, after_id="99999999999999-0")
            ):
                pass
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error.value.details().startswith("after_id 99999999999999-0 is after every event of this workspace")
