"""A batch's renders take turns with the process's other work: a heavy template rendered for a thousand
distinct recipients holds no other call, of any brand, for the batch's whole render time."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from tokensend.common.v1 import common_pb2
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb
from tokensend.resolver.v1 import resolver_service_pb2 as rpb

from libs.message_map import MessageMap
from libs.settings import DispatcherSettings
from services.dispatcher import campaign as campaign_module
from services.dispatcher.campaign import CampaignCall, CampaignSender, _Pending
from services.dispatcher.rendering import RenderedContent
from services.dispatcher.resolver_client import Resolution

RENDER_SECONDS = 0.01  # each render's CPU time, as a loop template's for one recipient
RECIPIENTS = 40


class BlockingTemplates:
    """Renders as a heavy template does: the event loop waits for each."""

    def render(self, fetched, attributes, content, memo=None) -> RenderedContent:
        time.sleep(RENDER_SECONDS)
        return RenderedContent(sms_body=f"Hi {fetched['first_name']}")


def a_batch(redis: aioredis.Redis, settings: DispatcherSettings):
    sender = CampaignSender(redis, None, MessageMap(redis, settings.message_ttl_seconds), settings)  # type: ignore[arg-type]
    call = CampaignCall(
        workspace_id="brand",
        campaign_id="spring",
        campaign_instance_id="run-1",
        channel=common_pb2.CHANNEL_SMS,
        connector=pb.Connector(connector_id="gateway", kind=pb.CONNECTOR_KIND_CUSTOM_HTTP),
        client=None,  # type: ignore[arg-type]
        content=pb.Content(sms_body="Hi {{ first_name }}"),
        templates=BlockingTemplates(),  # type: ignore[arg-type]
    )
    to_send = [_Pending(i, pb.Recipient(anonymous_id=f"c{i}"), f"m{i}", f"c{i}") for i in range(RECIPIENTS)]
    contacts = [
        rpb.ResolvedContact(anonymous_id=f"c{i}", contact=f"+1555010{i:04d}", attributes={"first_name": f"N{i}"})
        for i in range(RECIPIENTS)
    ]
    return sender, call, to_send, Resolution(contacts)


async def test_a_batch_of_slow_renders_lets_other_work_run_between_them(monkeypatch) -> None:
    monkeypatch.setattr(campaign_module, "RENDER_TURN_SECONDS", 0.02)
    settings = DispatcherSettings(redis_url="redis://127.0.0.1:1/0", secret_key="")
    redis = aioredis.Redis.from_url(settings.redis_url)
    sender, call, to_send, resolution = a_batch(redis, settings)
    ticks = 0

    async def other_work() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    beside = asyncio.ensure_future(other_work())
    await asyncio.sleep(0)
    try:
        outbound = await sender._prepare(call, to_send, resolution)
    finally:
        beside.cancel()
        await redis.aclose()
    assert len(outbound) == RECIPIENTS
    # 40 renders of 10 ms in turns of 20 ms: the other work ran about every other render. Held for the
    # whole batch, it would not have run at all until the batch was prepared.
    assert ticks >= RECIPIENTS // 4


async def test_a_batch_cancelled_between_turns_lets_its_contacts_go(monkeypatch) -> None:
    """The batch's state may be kept to settle later, for the claim lease: its contacts may not go with it."""
    monkeypatch.setattr(campaign_module, "RENDER_TURN_SECONDS", 0.02)
    settings = DispatcherSettings(redis_url="redis://127.0.0.1:1/0", secret_key="")
    redis = aioredis.Redis.from_url(settings.redis_url)
    sender, call, to_send, resolution = a_batch(redis, settings)
    preparing = asyncio.ensure_future(sender._prepare(call, to_send, resolution))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # it has taken its first turn, mid-batch
    preparing.cancel()
    try:
        await preparing
    except asyncio.CancelledError:
        pass
    finally:
        await redis.aclose()
    assert preparing.cancelled()
    assert resolution.contacts == []
