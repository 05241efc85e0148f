"""WhatsApp's marketing opt-outs reach the suppression store: a message Meta failed because its recipient
had stopped the business's marketing messages (131050), and the `user_preferences` webhook's stop and
resume, matched through the blind index of the `wa_id` as an inbound STOP or START is.

Both are opt-outs with WhatsApp itself, so both hold the recipient as the provider's unsubscribe, for
every topic of the WhatsApp family; a resume lifts it as Meta lifts its own block. Nothing of the number,
nor of the preference's `detail` text, reaches Redis, a log line or a reply.
"""

from __future__ import annotations

import json

import pytest

from libs.blind_index import BlindIndex
from libs.suppressions import INBOUND_STOP, PROVIDER_UNSUBSCRIBE
from tests.canary import redis_dump
from tests.integration.beyond import whatsapp_messages
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    leaks,
    log_text,
    now_ts,
    put_messages,
    running_receipts,
    stats,
    whatsapp_body,
    whatsapp_status,
)

pytestmark = pytest.mark.integration

SUPPRESSED = f"ts:{{{WS}}}:supp:whatsapp:_all"


@pytest.fixture
async def receipts(redis, redis_url):
    async with running_receipts(redis, redis_url) as running:
        yield running


async def suppressed(redis) -> dict[str, list[int]]:
    """Each suppressed ID's reasons, for every topic of the WhatsApp family."""
    held = await redis.hgetall(SUPPRESSED)
    return {k.decode(): [int(pair.split(":")[0]) for pair in v.decode().split(",")] for k, v in held.items()}


async def link(receipts, redis, number: str, anonymous_id: str) -> None:
    """The blind index's link the dispatcher writes when it sends to `number`."""
    index = BlindIndex(redis, receipts.settings.secret_key, ttl_seconds=600)
    async with redis.pipeline(transaction=False) as pipe:
        index.queue_link(pipe, WS, "whatsapp", index.digest(WS, number), anonymous_id)
        await pipe.execute()


def user_preferences(pii: Pii, *choices: tuple[str, int], extra: tuple = ()) -> dict:
    """A `user_preferences` webhook as Meta posts it: one item per (value, timestamp), for `pii`'s number."""
    items = [
        {
            "wa_id": pii.digits,
            "detail": f"User requested to {value} marketing messages {pii.tag}",
            "category": "marketing_messages",
            "value": value,
            "timestamp": timestamp,
        }
        for value, timestamp in choices
    ]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "106540352242922"},
        "contacts": [{"profile": {"name": pii.name}, "wa_id": pii.digits}],
        "user_preferences": items + list(extra),
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "user_preferences", "value": value}]}],
    }


async def assert_no_leaks(redis, captured_logs, pii: Pii, *replies) -> None:
    needles = pii.needles() | {b"marketing messages"}
    assert leaks(needles, await redis_dump(redis)) == []
    assert leaks(needles, log_text(captured_logs)) == []
    assert leaks(needles, [json.dumps(r.body).encode() for r in replies]) == []


async def test_a_failure_because_the_recipient_stopped_marketing_messages_suppresses_until_they_resume(
    receipts, redis, captured_logs
):
    """Meta fails a marketing message to a recipient who stopped the business's marketing messages with
    131050: the recipient is suppressed for every WhatsApp topic, as the provider's unsubscribe, and the
    message counts as failed; a redelivery changes nothing; Meta's other failures suppress no one; the
    customer resuming marketing messages lifts it, and the failure delivered again after that does not
    undo the resume."""
    stopped, other = Pii.new(), Pii.new()
    chat, undelivered = await put_messages(redis, "whatsapp", 2)
    await link(receipts, redis, stopped.phone, chat.anonymous_id)
    opted_out = whatsapp_body(
        [whatsapp_status("failed", stopped, message_id=chat.message_id, error_code=131050)], stopped, inbound=False
    )
    reply = await receipts.post_whatsapp(opted_out)
    assert reply.status == 200 and reply.json()["mapped"] == 1, reply.body
    assert await suppressed(redis) == {chat.anonymous_id: [PROVIDER_UNSUBSCRIBE]}
    assert [k async for k in redis.scan_iter(match=f"ts:{{{WS}}}:supp:*")] == [SUPPRESSED.encode()]

    again = await receipts.post_whatsapp(opted_out)
    assert again.json()["duplicates"] == 1
    for code in (131026, 131049):  # undeliverable; Meta's cap on marketing messages per user
        failure = whatsapp_status("failed", other, message_id=undelivered.message_id, error_code=code)
        failure["id"] += str(code)
        assert (await receipts.post_whatsapp(whatsapp_body([failure], other, inbound=False))).status == 200
    assert await suppressed(redis) == {chat.anonymous_id: [PROVIDER_UNSUBSCRIBE]}
    counts = await stats(redis)
    assert (counts["failed"], counts.get("unsubscribed", 0)) == (2, 0)  # failed, never the brand's unsubscribe

    resumed = await receipts.post_whatsapp(user_preferences(stopped, ("resume", now_ts() + 2)))
    assert resumed.status == 200
    assert await suppressed(redis) == {}
    status = whatsapp_status("failed", stopped, message_id=chat.message_id, error_code=131050)
    status["id"] += "-again"  # delivered again under another ID: still made before the resume
    await receipts.post_whatsapp(whatsapp_body([status], stopped, inbound=False))
    assert await suppressed(redis) == {}
    await assert_no_leaks(redis, captured_logs, stopped, reply, again, resumed)


async def test_a_stop_in_whatsapps_settings_suppresses_and_a_resume_lifts_in_the_order_they_were_made(
    receipts, redis, captured_logs
):
    """`user_preferences` stop and resume act on the recipient last sent to the `wa_id`'s number, in the
    order of their timestamps, whatever order they arrive in; a redelivery acts once."""
    pii = Pii.new()
    await link(receipts, redis, pii.phone, "anon-pref")
    t = now_ts() - 600

    stop = await receipts.post_whatsapp(user_preferences(pii, ("stop", t)))
    assert stop.status == 200 and stop.json() == {"events": 1, "mapped": 0, "unmapped": 0, "duplicates": 0}
    assert await suppressed(redis) == {"anon-pref": [PROVIDER_UNSUBSCRIBE]}
    # A resume made before the stop, delivered after it, lifts nothing.
    await receipts.post_whatsapp(user_preferences(pii, ("resume", t - 60)))
    assert await suppressed(redis) == {"anon-pref": [PROVIDER_UNSUBSCRIBE]}

    resume = await receipts.post_whatsapp(user_preferences(pii, ("resume", t + 60)))
    assert resume.status == 200
    assert await suppressed(redis) == {}
    # The stop delivered again, or another made before the resume, changes nothing: the last word was resume.
    await receipts.post_whatsapp(user_preferences(pii, ("stop", t)))
    await receipts.post_whatsapp(user_preferences(pii, ("stop", t + 30)))
    assert await suppressed(redis) == {}

    # In one post, out of order: the later stop wins.
    both = await receipts.post_whatsapp(user_preferences(pii, ("stop", t + 180), ("resume", t + 120)))
    assert both.json()["events"] == 2
    assert await suppressed(redis) == {"anon-pref": [PROVIDER_UNSUBSCRIBE]}
    await assert_no_leaks(redis, captured_logs, pii, stop, resume, both)


async def test_a_resume_lifts_the_customers_stop_reply_as_a_start_would(receipts, redis, captured_logs):
    """A customer who replied STOP and then resumed marketing messages in WhatsApp's settings said their
    last word: both their STOP and the provider's unsubscribe go."""
    pii = Pii.new()
    await link(receipts, redis, pii.phone, "anon-both")
    t = now_ts() - 600
    assert (await receipts.post_whatsapp(whatsapp_messages(pii.phone, "STOP", sent_at=t))).status == 200
    await receipts.post_whatsapp(user_preferences(pii, ("stop", t + 10)))
    assert await suppressed(redis) == {"anon-both": [INBOUND_STOP, PROVIDER_UNSUBSCRIBE]}
    await receipts.post_whatsapp(user_preferences(pii, ("resume", t + 20)))
    assert await suppressed(redis) == {}
    # A reply and a preference in one post are each acted on, in the order they were made.
    mixed = whatsapp_messages(pii.phone, "STOP", sent_at=t + 40)
    mixed["entry"][0]["changes"] += user_preferences(pii, ("resume", t + 30))["entry"][0]["changes"]
    reply = await receipts.post_whatsapp(mixed)
    assert reply.status == 200 and reply.json()["events"] == 2
    assert await suppressed(redis) == {"anon-both": [INBOUND_STOP]}
    await assert_no_leaks(redis, captured_logs, pii, reply)


async def test_preferences_not_acted_on_are_named_as_unusable_and_change_nothing(receipts, redis, captured_logs):
    """Another category or value than Meta documents, or no `wa_id`, is left out and named by its place;
    a number never sent to matches no one."""
    pii, stranger = Pii.new(), Pii.new()
    await link(receipts, redis, pii.phone, "anon-odd")
    odd = [
        {"wa_id": pii.digits, "category": "utility_messages", "value": "stop", "timestamp": now_ts()},
        {"wa_id": pii.digits, "category": "marketing_messages", "value": "pause", "timestamp": now_ts()},
        {"category": "marketing_messages", "value": "stop", "detail": pii.name},
    ]
    reply = await receipts.post_whatsapp(user_preferences(pii, extra=tuple(odd)))
    assert reply.status == 200
    where = "entry[0].changes[0].value.user_preferences"
    assert reply.json()["unusable_entries"] == [
        f"{where}[0].category: must be marketing_messages",
        f"{where}[1].value: must be stop or resume",
        f"{where}[2].wa_id: is required",
    ]
    unknown = await receipts.post_whatsapp(user_preferences(stranger, ("stop", now_ts())))
    assert unknown.status == 200
    assert await suppressed(redis) == {}
    await assert_no_leaks(redis, captured_logs, pii, reply, unknown)
    await assert_no_leaks(redis, captured_logs, stranger, unknown)
