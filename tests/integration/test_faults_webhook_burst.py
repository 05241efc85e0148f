"""A burst of 10,000 genuine webhook events, with redeliveries mixed in, posted concurrently.

Every genuine event must be counted exactly once and none lost: the funnel counters, the
per-post replies and the event stream must all agree. SendGrid-style batches (500 events a
POST, as SendGrid's event webhook batches them), eight POSTs in flight at a time, and the
duplicates spread over other POSTs so they race their originals.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.integration.test_receipts_harness import Pii, put_messages, running_receipts, sendgrid_event, stats

pytestmark = pytest.mark.integration

MESSAGES = 5_000  # two genuine events each (delivered, open): 10,000
DUPLICATES = 1_500
PER_POST = 500
IN_FLIGHT = 8


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


async def test_ten_thousand_events_each_counted_once_none_lost(receipts, redis):
    rng = random.Random(8)
    pii = Pii.new()
    records = await put_messages(redis, "sendgrid", MESSAGES)
    genuine = [
        sendgrid_event(kind, pii, message_id=record.message_id) for record in records for kind in ("delivered", "open")
    ]
    assert len(genuine) == 10_000
    redelivered = rng.sample(genuine, DUPLICATES)  # same sg_event_id: a provider's retry
    stream = genuine + redelivered
    rng.shuffle(stream)
    posts = [stream[i : i + PER_POST] for i in range(0, len(stream), PER_POST)]
    posts.append(posts[0])  # and one whole POST delivered twice, as after a timeout on the provider's side

    gate = asyncio.Semaphore(IN_FLIGHT)

    async def post(events):
        async with gate:
            return await receipts.post_sendgrid(events)

    started = time.monotonic()
    replies = await asyncio.gather(*(post(events) for events in posts))
    elapsed = time.monotonic() - started
    assert [r.status for r in replies] == [200] * len(posts)
    mapped = sum(r.json()["mapped"] for r in replies)
    duplicates = sum(r.json()["duplicates"] for r in replies)
    posted = sum(len(events) for events in posts)
    print(
        f"webhook burst: {posted} events in {len(posts)} POSTs, {elapsed:.1f}s; {mapped} counted, {duplicates} dropped"
    )

    assert mapped == 10_000  # every genuine event, once
    assert duplicates == posted - 10_000  # every redelivery dropped
    assert sum(r.json()["unmapped"] for r in replies) == 0
    counts = await stats(redis)
    assert counts["delivered"] == MESSAGES and counts["opened"] == MESSAGES
    assert await redis.xlen(f"ts:{{{records[0].workspace_id}}}:events") == 10_000  # none lost from the stream
