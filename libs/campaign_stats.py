"""Campaign counters, per instance and per campaign, written by the dispatcher and receipts.

Each increment goes to the instance's hash and to the campaign's running total,
so both reads are one HGETALL. Both are kept `TOKENSEND_STATS_TTL_SECONDS` from
their last count (a send or a receipt). Resolve failures are also kept by reason
(`resolve_failed:<CODE>`), outside the delivery funnel.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from libs.store import workspace_key
from libs.write_batch import QueuedWrites

FUNNEL = (
    "attempted",
    "resolve_failed",
    "sent",
    "send_failed",
    "capped",
    "duplicate",
    "suppressed",
    "delivered",
    "bounced",
    "failed",
    "opened",
    "clicked",
    "complained",
    "unsubscribed",
    "unmapped",
)
RESOLVE_REASON_PREFIX = "resolve_failed:"


def instance_key(workspace_id: str, campaign_id: str, campaign_instance_id: str) -> str:
    return workspace_key(workspace_id, "stats", campaign_id, "i", campaign_instance_id)


def campaign_key(workspace_id: str, campaign_id: str) -> str:
    return workspace_key(workspace_id, "stats", campaign_id, "all")


def add_counts(
    pipe: QueuedWrites,
    workspace_id: str,
    campaign_id: str,
    campaign_instance_id: str,
    counts: Mapping[str, int],
    ttl_seconds: int = 0,
) -> None:
    """Queues the increments on `pipe` (the caller executes it with its other writes); the counters
    are then kept `ttl_seconds` from now (0: until deleted)."""
    keys = [campaign_key(workspace_id, campaign_id)]
    if campaign_instance_id:
        keys.append(instance_key(workspace_id, campaign_id, campaign_instance_id))
    counted = False
    for name, value in counts.items():
        if value:
            counted = True
            for key in keys:
                pipe.hincrby(key, name, value)
    if counted and ttl_seconds > 0:
        for key in keys:
            pipe.expire(key, ttl_seconds)


async def read_counts(
    redis: aioredis.Redis, workspace_id: str, campaign_id: str, campaign_instance_id: str = ""
) -> dict[str, int]:
    key = (
        instance_key(workspace_id, campaign_id, campaign_instance_id)
        if campaign_instance_id
        else campaign_key(workspace_id, campaign_id)
    )
    raw = await redis.hgetall(key)
    return {k.decode(): int(v) for k, v in raw.items()}
