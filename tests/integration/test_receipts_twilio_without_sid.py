"""A Twilio status callback without MessageSid is named by our ID from its callback URL.

Its identity was ("twilio", "", status): the first such callback of a status marked it seen, and every other
message's callback of that status was then dropped as a redelivery of it, never counted.
"""

from __future__ import annotations

import pytest

from tests.integration.test_receipts_harness import (
    Pii,
    put_messages,
    running_receipts,
    stats,
    stream_entries,
    twilio_params,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


def without_sid(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in params if name not in ("MessageSid", "SmsSid")]


async def test_callbacks_without_a_sid_for_two_messages_are_two_events(receipts, redis):
    pii = Pii.new()
    first, second = await put_messages(redis, "twilio", 2)
    for record in (first, second):
        reply = await receipts.post_twilio(without_sid(twilio_params("delivered", pii)), record.message_id)
        assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body
    assert (await stats(redis))["delivered"] == 2
    assert [e["message_id"] for e in await stream_entries(redis)] == [first.message_id, second.message_id]


async def test_a_callback_without_a_sid_redelivered_is_a_duplicate(receipts, redis):
    pii = Pii.new()
    [record] = await put_messages(redis, "twilio", 1)
    params = without_sid(twilio_params("undelivered", pii, error_code="30003"))
    # Each delivery with a token of its own: only the callback's own identity tells they are one event.
    replies = [await receipts.post_twilio(params, record.message_id, token=f"tok-{n}") for n in range(2)]
    assert [r.json()["duplicates"] for r in replies] == [0, 1]
    assert (await stats(redis))["failed"] == 1
