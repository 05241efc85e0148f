"""An SES event that comes before the dispatcher has indexed its SES message ID is not lost.

An identity's notification names only SES's message ID, which the dispatcher indexes once SES answered
the send (when it settles the batch). A young one that finds no index entry is refused (503) for SNS to
deliver again, and counted once it maps; an old one is acknowledged and counted unmapped, as before.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
import uuid
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tokensend.receipts.v1 import receipts_service_pb2 as pb

from libs.message_map import MessageMap, MessageRecord
from libs.telemetry import setup_telemetry
from services.receipts.ledger import DeliveryLedger
from services.receipts.model import ReceiptEvent, Status
from tests.integration.test_operator_metrics import by_attributes, key
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    RunningReceipts,
    put_messages,
    running_receipts,
    ses_message,
    sns_notification,
    stats,
    stream_entries,
)

pytestmark = pytest.mark.integration

WINDOW = 45  # the default of TOKENSEND_RECEIPT_INDEX_WAIT_SECONDS


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


def ses_time(seconds_ago: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def notification(kind: str, pii: Pii, ses_id: str, seconds_ago: float) -> dict[str, Any]:
    """An identity's notification (no tags), SES's event dated `seconds_ago`."""
    message = ses_message(kind, pii, ses_message_id=ses_id, notification=True)
    message["mail"]["timestamp"] = ses_time(seconds_ago + 1)
    message[kind.lower()]["timestamp"] = ses_time(seconds_ago)
    return message


def signed(receipts: RunningReceipts, message: dict[str, Any], pii: Pii) -> tuple[bytes, dict[str, str]]:
    """One SNS message, signed once: SNS redelivers the very same body."""
    return receipts.ses_request(sns_notification(message, pii))


async def post(receipts: RunningReceipts, request: tuple[bytes, dict[str, str]]) -> tuple[int, str, dict]:
    """(status, Retry-After, JSON reply)."""
    body, headers = request
    async with receipts.http.post(receipts.local_url + receipts.path("ses"), data=body, headers=headers) as reply:
        return reply.status, reply.headers.get("Retry-After", ""), await reply.json(content_type=None)


async def index(redis, record: MessageRecord, ses_id: str) -> None:
    """What the dispatcher writes when it settles the batch, SES having answered with `ses_id`."""
    await redis.set(MessageMap.provider_key(WS, "ses", ses_id), record.message_id, ex=3600)


async def unmapped_anywhere(redis) -> int:
    return (await stats(redis)).get("unmapped", 0) + (await stats(redis, "_workspace")).get("unmapped", 0)


async def test_an_early_notification_is_refused_and_counted_once_its_redelivery_maps(redis, redis_url):
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    ses_id = f"0100{uuid.uuid4().hex}"
    async with running_receipts(redis, redis_url, telemetry) as receipts:
        [record] = await put_messages(redis, "ses", 1)  # sent, SES's reply not settled yet
        request = signed(receipts, notification("Bounce", pii, ses_id, seconds_ago=2), pii)
        status, retry_after, reply = await post(receipts, request)
        assert (status, retry_after) == (503, "20"), reply
        assert "not indexed yet" in reply["error"]
        # Nothing of it kept: no count, no event, no dedupe marker to make its redelivery a duplicate.
        assert "bounced" not in await stats(redis) and await unmapped_anywhere(redis) == 0
        assert await stream_entries(redis) == []
        assert [k async for k in redis.scan_iter(match=f"ts:{{{WS}}}:rcpt:seen:*")] == []
        await index(redis, record, ses_id)
        status, _, reply = await post(receipts, request)
        assert (status, reply) == (200, {"events": 1, "mapped": 1, "unmapped": 0, "duplicates": 0})
        status, _, reply = await post(receipts, request)
        assert (status, reply["duplicates"]) == (200, 1)
    telemetry.shutdown()
    assert (await stats(redis))["bounced"] == 1 and await unmapped_anywhere(redis) == 0
    [entry] = await stream_entries(redis)
    assert (entry["message_id"], entry["status"]) == (record.message_id, "bounced")
    assert by_attributes(reader, "tokensend.receipts") == {key(provider="ses", status="bounced"): 1}
    assert by_attributes(reader, "tokensend.receipts.unmapped") == {}
    assert by_attributes(reader, "tokensend.receipts.refused") == {key(provider="ses", code="not_indexed_yet"): 1}


@pytest.mark.parametrize("seconds_ago", [WINDOW + 15, 86400 * 400], ids=["past the window", "long ago"])
async def test_an_old_unmapped_notification_is_acknowledged_and_counted_unmapped(redis, redis_url, seconds_ago):
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry("receipts", metric_readers=[reader])
    pii = Pii.new()
    async with running_receipts(redis, redis_url, telemetry) as receipts:
        await put_messages(redis, "ses", 1)
        message = notification("Delivery", pii, f"0100{uuid.uuid4().hex}", seconds_ago)
        status, _, reply = await post(receipts, signed(receipts, message, pii))
    telemetry.shutdown()
    assert (status, reply) == (200, {"events": 1, "mapped": 0, "unmapped": 1, "duplicates": 0})
    assert (await stats(redis, "_workspace"))["unmapped"] == 1
    assert by_attributes(reader, "tokensend.receipts.unmapped") == {key(provider="ses"): 1}
    assert by_attributes(reader, "tokensend.receipts.refused") == {}


async def test_an_early_notification_whose_published_event_came_meanwhile_is_a_duplicate(receipts, redis):
    """Both an identity's notifications and a configuration set's event destination on: the published
    event carries our ID and is counted; the notification's redelivery is then a duplicate, and no
    unmapped count is made and taken back."""
    pii = Pii.new()
    ses_id = f"0100{uuid.uuid4().hex}"
    [record] = await put_messages(redis, "ses", 1)
    early = notification("Delivery", pii, ses_id, seconds_ago=1)
    published = ses_message("Delivery", pii, message_id=record.message_id, ses_message_id=ses_id, campaign="camp-1")
    published["delivery"]["timestamp"] = early["delivery"]["timestamp"]  # one event, two shapes
    request = signed(receipts, early, pii)
    assert (await post(receipts, request))[0] == 503
    assert (await receipts.post_ses(published, pii)).json()["mapped"] == 1
    status, _, reply = await post(receipts, request)
    assert (status, reply["duplicates"]) == (200, 1)
    assert (await stats(redis))["delivered"] == 1 and await unmapped_anywhere(redis) == 0
    assert len(await stream_entries(redis)) == 1


async def test_with_no_window_an_early_notification_is_counted_unmapped_at_once(redis, redis_url):
    pii = Pii.new()
    async with running_receipts(redis, redis_url, receipt_index_wait_seconds=0) as receipts:
        await put_messages(redis, "ses", 1)
        message = notification("Bounce", pii, f"0100{uuid.uuid4().hex}", seconds_ago=1)
        status, _, reply = await post(receipts, signed(receipts, message, pii))
    assert (status, reply["unmapped"]) == (200, 1)


async def test_a_relayed_early_notification_is_unavailable(receipts, redis):
    """`IngestReceipt` answers as the webhook does, in gRPC's terms: retry later."""
    pii = Pii.new()
    await put_messages(redis, "ses", 1)
    body, headers = signed(receipts, notification("Bounce", pii, f"0100{uuid.uuid4().hex}", seconds_ago=1), pii)
    request = pb.IngestReceiptRequest(
        workspace_id=WS, connector_id="ses-main", provider=pb.PROVIDER_SES, headers=headers, body=body
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await receipts.stub.IngestReceipt(request)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await unmapped_anywhere(redis) == 0


async def test_events_recorded_beside_a_waiting_one_are_duplicates_when_they_come_again(redis):
    """One batch holding an event that maps and one that waits for the index: the first is recorded
    once, the second left out; the batch again, once indexed, records the second and counts the first
    nothing more."""
    ledger = DeliveryLedger(redis, dedupe_key=b"k" * 32, dedupe_ttl_seconds=3600, stream_maxlen=1000)
    [delivered, bounced] = await put_messages(redis, "ses", 2)
    ses_id = f"0100{uuid.uuid4().hex}"
    mapped = ReceiptEvent(
        provider="ses",
        status=Status.DELIVERED,
        identities=(("ses-event", f"0100{uuid.uuid4().hex}", "delivery", "t1"),),
        message_id=delivered.message_id,
        occurred_at=time.time(),
        dated=True,
    )
    waiting = dataclasses.replace(
        mapped,
        status=Status.BOUNCED,
        identities=(("ses-event", ses_id, "bounce", "t2"),),
        message_id="",
        provider_message_id=ses_id,
    )
    batch = [mapped, waiting]
    first = await ledger.record(WS, batch, lambda event: not event.message_id)
    assert (first.mapped, first.waiting, first.unmapped, first.duplicates) == (1, 1, 0, 0)
    assert dict(first.recorded) == {Status.DELIVERED: 1}
    await index(redis, bounced, ses_id)
    again = await ledger.record(WS, batch, lambda event: not event.message_id)
    assert (again.mapped, again.waiting, again.unmapped, again.duplicates) == (1, 0, 0, 1)
    assert dict(again.recorded) == {Status.BOUNCED: 1}
    counters = await stats(redis)
    assert (counters["delivered"], counters["bounced"], counters.get("unmapped", 0)) == (1, 1, 0)
    assert [e["message_id"] for e in await stream_entries(redis)] == [delivered.message_id, bounced.message_id]
