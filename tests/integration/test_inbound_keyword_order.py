"""Inbound STOP and START ordered by when the customer sent them, whichever reaches us first: a STOP
sent before the customer's last START and delivered after it (a redelivery, a webhook that raced the
START) leaves them opted in."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.blind_index import BlindIndex
from libs.opt_out import KeywordStore
from libs.suppressions import SuppressionStore
from libs.unsubscribe import UnsubscribeTokens
from services.receipts.errors import ClaimedElsewhere
from services.receipts.ledger import DeliveryLedger
from services.receipts.opt_outs import InboundText, OptOuts
from tests.integration.beyond import people, receipts_for, reply_by_whatsapp
from tests.integration.test_dispatcher_campaigns import dispatch

pytestmark = pytest.mark.integration

C = common_pb2.Channel
S = pb.DispatchStatus
WHATSAPP = pb.Content(sms_body="Hi {{ first_name }}, reply STOP to opt out")


async def status_after(suite, run: str) -> int:
    """The status the next WhatsApp campaign gives the one recipient."""
    return (await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP, people(1), run)).results[0].status


async def test_a_stop_sent_before_the_last_start_and_delivered_after_it_changes_nothing(
    start_suite, customers, redis, redis_url, secret_key
):
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP, people(1), "run-1")
    phone = customers["cust-000001"].phone
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000100)
        assert await status_after(suite, "run-2") == S.DISPATCH_STATUS_SUPPRESSED
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "START", sent_at=1700000300)
        assert await status_after(suite, "run-3") == S.DISPATCH_STATUS_SENT
        # Sent between the two, delivered last: the customer's last word was START.
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000200)
        assert await status_after(suite, "run-4") == S.DISPATCH_STATUS_SENT
        # A STOP sent after the START stops, as ever.
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000400)
        assert await status_after(suite, "run-5") == S.DISPATCH_STATUS_SUPPRESSED


async def test_a_start_that_lifted_nothing_still_outlasts_an_earlier_stop_delivered_after_it(
    start_suite, customers, redis, redis_url, secret_key
):
    """The START reached us first, with no STOP yet to lift: its time is kept all the same."""
    suite = await start_suite()
    await dispatch(suite, C.CHANNEL_WHATSAPP, "whatsapp", WHATSAPP, people(1), "run-1")
    phone = customers["cust-000001"].phone
    async with receipts_for(redis, redis_url, secret_key) as receipts:
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "START", sent_at=1700000200)
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000100)
        assert await status_after(suite, "run-2") == S.DISPATCH_STATUS_SENT
        # One sent in the same second as the START stops: a START in the STOP's second lifts nothing either.
        await reply_by_whatsapp(receipts, suite.workspace_id, phone, "STOP", sent_at=1700000200)
        assert await status_after(suite, "run-3") == S.DISPATCH_STATUS_SUPPRESSED


NUMBER = "+447400123456"


async def test_a_late_stop_is_counted_as_no_opt_out_and_logged_without_its_number(redis, secret_key, caplog):
    index = BlindIndex(redis, SecretStr(secret_key), ttl_seconds=600)
    async with redis.pipeline(transaction=False) as pipe:
        index.queue_link(pipe, "ws-order", "whatsapp", index.digest("ws-order", NUMBER), "cust-1")
        await pipe.execute()
    ledger = DeliveryLedger(redis, dedupe_key=b"k" * 32, dedupe_ttl_seconds=600, stream_maxlen=100)
    suppressions = SuppressionStore(redis)
    opt_outs = OptOuts(redis, suppressions, index, KeywordStore(redis), UnsubscribeTokens(None), ledger)
    now_ms = int(time.time() * 1000)
    opt_ins = SuppressionStore.opt_in_key("ws-order", "whatsapp")

    assert await opt_outs.inbound("ws-order", "whatsapp", [InboundText(NUMBER, "START", "wamid.1", now_ms)]) == (0, 0)
    assert await redis.zrange(opt_ins, 0, -1, withscores=True) == [(b"cust-1", float(now_ms))]
    with caplog.at_level(logging.INFO, logger="services.receipts.opt_outs"):
        late = [InboundText(NUMBER, "Stop", "wamid.2", now_ms - 60_000)]
        assert await opt_outs.inbound("ws-order", "whatsapp", late) == (0, 0)
    assert await suppressions.find("ws-order", "whatsapp", "", ["cust-1"]) == set()
    assert "sent before a later start: ignored" in caplog.text
    assert NUMBER.lstrip("+") not in caplog.text and "Stop" not in caplog.text

    later = [InboundText(NUMBER, "STOP", "wamid.3", now_ms + 1_000)]
    assert await opt_outs.inbound("ws-order", "whatsapp", later) == (1, 0)
    assert await redis.exists(opt_ins) == 0  # the STOP after it forgets the START

    # Without a send time, as before: the START lifts whatever came before, and keeps no time.
    assert await opt_outs.inbound("ws-order", "whatsapp", [InboundText(NUMBER, "START", "wamid.4")]) == (0, 1)
    assert await redis.exists(opt_ins) == 0


class CountingSuppressions(SuppressionStore):
    """The real store, counting its writes; `failures` of them fail first, as a Redis gone midway would."""

    def __init__(self, redis, failures: int = 0) -> None:
        super().__init__(redis)
        self.writes = 0
        self.failures = failures

    async def suppress(self, *args, **kwargs):
        self.writes += 1
        await asyncio.sleep(0.01)  # a round trip: a concurrent delivery gets its turn meanwhile
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("connection lost")
        return await super().suppress(*args, **kwargs)


def inbound_opt_outs(redis, secret_key: str, suppressions: SuppressionStore) -> OptOuts:
    index = BlindIndex(redis, SecretStr(secret_key), ttl_seconds=600)
    ledger = DeliveryLedger(redis, dedupe_key=b"k" * 32, dedupe_ttl_seconds=600, stream_maxlen=100)
    return OptOuts(redis, suppressions, index, KeywordStore(redis), UnsubscribeTokens(None), ledger)


async def link(redis, secret_key: str, workspace_id: str) -> None:
    index = BlindIndex(redis, SecretStr(secret_key), ttl_seconds=600)
    async with redis.pipeline(transaction=False) as pipe:
        index.queue_link(pipe, workspace_id, "whatsapp", index.digest(workspace_id, NUMBER), "cust-1")
        await pipe.execute()


async def test_a_stop_delivered_twice_at_once_acts_once(redis, secret_key):
    await link(redis, secret_key, "ws-twice")
    suppressions = CountingSuppressions(redis)
    opt_outs = inbound_opt_outs(redis, secret_key, suppressions)
    stop = [InboundText(NUMBER, "STOP", "wamid.twice", int(time.time() * 1000))]

    # The second, while the first holds its claim, is refused for its provider to send again (the first may
    # yet fail): not answered as done.
    results = await asyncio.gather(
        *(opt_outs.inbound("ws-twice", "whatsapp", stop) for _ in range(2)), return_exceptions=True
    )
    assert (1, 0) in results and suppressions.writes == 1
    assert [type(r) for r in results if r != (1, 0)] == [ClaimedElsewhere]
    assert await opt_outs.inbound("ws-twice", "whatsapp", stop) == (0, 0) and suppressions.writes == 1
    assert await suppressions.find("ws-twice", "whatsapp", "", ["cust-1"]) == {"cust-1"}
    stored = [key async for key in redis.scan_iter(match="ts:{ws-twice}:*")]
    stored += [await redis.get(key) for key in stored if await redis.type(key) == b"string"]
    assert not any(b"wamid" in value or NUMBER.lstrip("+").encode() in value for value in stored if value)


async def test_a_stop_whose_write_failed_acts_when_delivered_again(redis, secret_key):
    await link(redis, secret_key, "ws-retry")
    suppressions = CountingSuppressions(redis, failures=1)
    opt_outs = inbound_opt_outs(redis, secret_key, suppressions)
    stop = [InboundText(NUMBER, "STOP", "wamid.retry", int(time.time() * 1000))]

    with pytest.raises(RedisConnectionError):
        await opt_outs.inbound("ws-retry", "whatsapp", stop)
    assert await opt_outs.inbound("ws-retry", "whatsapp", stop) == (1, 0) and suppressions.writes == 2
    assert await opt_outs.inbound("ws-retry", "whatsapp", stop) == (0, 0) and suppressions.writes == 2


async def test_a_stop_that_matched_no_one_acts_when_delivered_again(redis, secret_key):
    """The number's link may be written after the STOP first arrives (a send settling): its redelivery finds it."""
    suppressions = CountingSuppressions(redis)
    opt_outs = inbound_opt_outs(redis, secret_key, suppressions)
    stop = [InboundText(NUMBER, "STOP", "wamid.early", int(time.time() * 1000))]

    assert await opt_outs.inbound("ws-early", "whatsapp", stop) == (0, 0)
    await link(redis, secret_key, "ws-early")
    assert await opt_outs.inbound("ws-early", "whatsapp", stop) == (1, 0) and suppressions.writes == 1
