"""At shutdown, settles still waiting for Redis are given up with a line saying what that means."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from libs.message_map import MessageMap
from libs.settings import DispatcherSettings
from services.dispatcher.campaign import CampaignSender


async def test_settles_still_waiting_at_shutdown_are_given_up_and_said(caplog) -> None:
    settings = DispatcherSettings(redis_url="redis://127.0.0.1:1/0", secret_key="")
    redis = aioredis.Redis.from_url(settings.redis_url)
    sender = CampaignSender(redis, None, MessageMap(redis, settings.message_ttl_seconds), settings, None)  # type: ignore[arg-type]
    settle = asyncio.ensure_future(asyncio.sleep(60))  # a background settle retrying while Redis is away
    sender._later.add(settle)
    settle.add_done_callback(sender._later.discard)
    with caplog.at_level(logging.ERROR, logger="services.dispatcher.campaign"):
        await sender.wind_down(timeout=0.05)
    await asyncio.sleep(0)
    assert settle.cancelled()
    assert [r.getMessage() for r in caplog.records if r.name == "services.dispatcher.campaign"] == [
        "gave up settling 1 batch(es) at shutdown: Redis was still away; a re-run of their instances after the "
        "claims' lease may send them again"
    ]
    await redis.aclose()
