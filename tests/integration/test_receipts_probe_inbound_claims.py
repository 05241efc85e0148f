"""An inbound STOP whose first delivery failed with the store away is acted on when the provider sends it again.

The first delivery claims the message, fails to write the suppression, and (the store still away) cannot
give its claim back, which then lapses on its own. A redelivery while that claim holds is answered 503 for
the provider to send again, never 200 as if the STOP had been taken; once the claim lapses, it suppresses.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.blind_index import BlindIndex
from libs.suppressions import SuppressionStore
from services.receipts import ledger as ledger_module
from services.receipts.ledger import DeliveryLedger
from tests.integration.test_receipts_harness import WS, running_receipts

pytestmark = pytest.mark.integration

NUMBER = "+447400765432"
PHONE_NUMBER_ID = "106540352242922"


def stop_reply(wamid: str) -> dict:
    """A customer's "STOP" to the brand's WhatsApp number, as Meta posts it."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE_NUMBER_ID},
        "contacts": [{"profile": {"name": "Customer"}, "wa_id": NUMBER.lstrip("+")}],
        "messages": [
            {
                "from": NUMBER.lstrip("+"),
                "id": wamid,
                "timestamp": str(int(time.time())),
                "type": "text",
                "text": {"body": "STOP"},
            }
        ],
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
    }


async def test_a_stop_redelivered_while_a_failed_deliverys_claim_holds_is_refused_then_acted_on(
    redis, redis_url, monkeypatch
):
    monkeypatch.setattr(ledger_module, "CLAIM_TTL_SECONDS", 1)
    async with running_receipts(redis, redis_url) as receipts:
        index = BlindIndex(redis, receipts.settings.secret_key, ttl_seconds=600)
        async with redis.pipeline(transaction=False) as pipe:
            index.queue_link(pipe, WS, "whatsapp", index.digest(WS, NUMBER), "cust-7")
            await pipe.execute()

        # The store goes away once the STOP is claimed: its suppression is not written, its claim not given back.
        real_suppress, real_release = SuppressionStore.suppress, DeliveryLedger.release
        outage = {"suppress": 1, "release": 1}

        async def suppress(self, *args, **kwargs):
            if outage["suppress"]:
                outage["suppress"] -= 1
                raise RedisConnectionError("connection lost")
            return await real_suppress(self, *args, **kwargs)

        async def release(self, *args, **kwargs):
            if outage["release"]:
                outage["release"] -= 1
                raise RedisConnectionError("connection lost")
            return await real_release(self, *args, **kwargs)

        monkeypatch.setattr(SuppressionStore, "suppress", suppress)
        monkeypatch.setattr(DeliveryLedger, "release", release)

        body = json.dumps(stop_reply("wamid.claimed-stop")).encode()
        first = await receipts.post_whatsapp(body)
        assert first.status == 503, first.body

        # Back at once, as Meta may be: the failed delivery's claim still holds.
        again = await receipts.post_whatsapp(body)
        assert again.status == 503, again.body
        assert not await SuppressionStore(redis).find(WS, "whatsapp", "", ["cust-7"])

        await asyncio.sleep(1.2)  # the claim lapses
        last = await receipts.post_whatsapp(body)
        assert last.status == 200, last.body
        assert await SuppressionStore(redis).find(WS, "whatsapp", "", ["cust-7"]) == {"cust-7"}
        assert (await receipts.post_whatsapp(body)).status == 200  # now a duplicate
