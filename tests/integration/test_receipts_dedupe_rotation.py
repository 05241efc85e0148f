"""Receipt dedupe across a rotation of `TOKENSEND_SECRET_KEY`.

Dedupe markers are written under the first key only, and an event counts as seen when its marker
under any configured key exists: an event delivered before the rotation and again while the old key
is still listed is a duplicate. Once the old key is dropped its markers are not looked at any more
(docs/operations.md: keep it listed for the dedupe TTL).
With one key nothing but the first key's marker is ever read.
"""

from __future__ import annotations

import base64
import dataclasses
import time
import uuid

import pytest

from libs.settings import ReceiptsSettings
from services.receipts.ledger import DeliveryLedger
from services.receipts.model import ReceiptEvent, Status
from services.receipts.server import dedupe_keys
from tests.conftest import new_secret_key
from tests.integration.test_receipts_harness import (
    WS,
    Pii,
    put_messages,
    running_receipts,
    sendgrid_event,
    stats,
    stream_entries,
)

pytestmark = pytest.mark.integration


def ledger_for(redis, secret_key: str) -> DeliveryLedger:
    first, *older = dedupe_keys(ReceiptsSettings(secret_key=secret_key))
    return DeliveryLedger(redis, dedupe_key=first, older_dedupe_keys=older, dedupe_ttl_seconds=3600, stream_maxlen=100)


def delivered(message_id: str) -> ReceiptEvent:
    return ReceiptEvent(
        provider="sendgrid",
        status=Status.DELIVERED,
        identities=(("sendgrid", uuid.uuid4().hex),),
        message_id=message_id,
        occurred_at=time.time(),
        dated=True,
    )


def test_dedupe_keys_follow_the_configured_keys_in_order():
    old, new = new_secret_key(), new_secret_key()

    def keys(secret: str) -> list[bytes]:
        return dedupe_keys(ReceiptsSettings(secret_key=secret))

    [only_new], [only_old] = keys(new), keys(old)
    assert keys(f"{new},{old}") == [only_new, only_old] and only_new != only_old
    assert keys(f"{new}, {old},{new}") == [only_new, only_old]  # a key listed twice is looked at once
    assert base64.urlsafe_b64decode(new + "==") not in keys(new)  # derived, never the key itself
    [dev] = dedupe_keys(ReceiptsSettings())
    assert len(dev) == 32


async def test_an_event_recorded_before_a_rotation_is_a_duplicate_during_it(redis):
    old, new = new_secret_key(), new_secret_key()
    [record] = await put_messages(redis, "sendgrid", 1)
    event = delivered(record.message_id)

    before = await ledger_for(redis, old).record(WS, [event])
    assert (before.mapped, before.duplicates) == (1, 0)

    during = await ledger_for(redis, f"{new},{old}").record(WS, [event])
    assert (during.mapped, during.unmapped, during.duplicates) == (0, 0, 1)
    assert (await stats(redis))["delivered"] == 1
    assert len(await stream_entries(redis)) == 1

    # Only the first key's marker is written: an event first seen during the rotation is found by a
    # process with the new key alone, not by one with the old key alone.
    other = delivered(record.message_id)
    await ledger_for(redis, f"{new},{old}").record(WS, [other])
    assert (await ledger_for(redis, new).record(WS, [other])).duplicates == 1
    assert (await ledger_for(redis, old).record(WS, [dataclasses.replace(other)])).duplicates == 0

    # The old key dropped: its markers are not looked at, so the event counts again.
    after = await ledger_for(redis, new).record(WS, [event])
    assert (after.mapped, after.duplicates) == (1, 0)


async def test_an_unmapped_copy_counted_before_a_rotation_moves_to_the_funnel_during_it(redis):
    """SES: the notification counted unmapped under the old key, its published event mapping during the
    rotation: counted once, in the funnel, the unmapped count taken back."""
    old, new = new_secret_key(), new_secret_key()
    [record] = await put_messages(redis, "ses", 1)
    ses_id = f"0100{uuid.uuid4().hex}"
    notification = ReceiptEvent(
        provider="ses",
        status=Status.BOUNCED,
        identities=(("ses-event", ses_id, "bounce", "t1"),),
        campaign_hint="camp-1",
        occurred_at=time.time(),
        dated=True,
    )
    first = await ledger_for(redis, old).record(WS, [notification])
    assert first.unmapped == 1 and (await stats(redis))["unmapped"] == 1

    published = dataclasses.replace(notification, message_id=record.message_id)
    during = ledger_for(redis, f"{new},{old}")
    second = await during.record(WS, [published])
    assert (second.mapped, second.unmapped, second.duplicates) == (1, 0, 0)
    counters = await stats(redis)
    assert (counters["bounced"], counters.get("unmapped", 0)) == (1, 0)
    # Either shape again: a duplicate, counted nothing more.
    again = await during.record(WS, [notification, published])
    assert again.duplicates == 2
    assert (await stats(redis))["bounced"] == 1


async def test_an_inbound_message_acted_on_before_a_rotation_is_seen_during_it(redis):
    old, new = new_secret_key(), new_secret_key()
    identity = ("inbound", "sms", f"SM{uuid.uuid4().hex}")
    await ledger_for(redis, old).mark_seen(WS, identity)
    assert await ledger_for(redis, f"{new},{old}").seen(WS, identity)
    assert not await ledger_for(redis, new).seen(WS, identity)
    await ledger_for(redis, f"{new},{old}").mark_seen(WS, ("inbound", "sms", "other"))
    assert await ledger_for(redis, new).seen(WS, ("inbound", "sms", "other"))


async def test_with_one_key_only_the_first_keys_markers_are_read(redis):
    old, new = new_secret_key(), new_secret_key()
    [record] = await put_messages(redis, "sendgrid", 1)
    event = delivered(record.message_id)
    calls: list[tuple[list[str], list[str]]] = []

    def spying(ledger: DeliveryLedger) -> DeliveryLedger:
        script = ledger._script

        async def run(keys, args):
            calls.append((list(keys), list(args)))
            return await script(keys=keys, args=args)

        ledger._script = run
        return ledger

    await spying(ledger_for(redis, new)).record(WS, [event])
    await spying(ledger_for(redis, f"{new},{old}")).record(WS, [event])
    one, two = calls
    markers = [[k for k in keys if ":rcpt:seen:" in k] for keys, _ in calls]
    assert len(markers[0]) == 1 and len(markers[1]) == 2 and markers[0][0] == markers[1][0]
    assert '"x"' not in one[1][4] and '"x"' in two[1][4]
    assert all(k.startswith(f"ts:{{{WS}}}:") for k in two[0])  # one hash slot, as ever


async def test_a_redelivery_through_the_webhook_during_a_rotation_is_counted_once(redis, redis_url):
    old, new = new_secret_key(), new_secret_key()
    [record] = await put_messages(redis, "sendgrid", 1)
    pii = Pii.new()
    events = [sendgrid_event("delivered", pii, message_id=record.message_id)]

    async with running_receipts(redis, redis_url, secret_key=old) as receipts:
        reply = await receipts.post_sendgrid(events)
        assert reply.status == 200 and reply.json()["mapped"] == 1

    async with running_receipts(redis, redis_url, secret_key=f"{new},{old}") as receipts:
        reply = await receipts.post_sendgrid(events)
        assert reply.status == 200 and (reply.json()["mapped"], reply.json()["duplicates"]) == (0, 1)
    assert (await stats(redis))["delivered"] == 1
    assert len(await stream_entries(redis)) == 1

    # The old key dropped: what only it marked is forgotten (docs/operations.md says to keep it listed
    # for the dedupe TTL).
    async with running_receipts(redis, redis_url, secret_key=new) as receipts:
        reply = await receipts.post_sendgrid(events)
        assert reply.status == 200 and (reply.json()["mapped"], reply.json()["duplicates"]) == (1, 0)
