"""What must hold across every dispatcher process, kept in Redis.

- Idempotency: one send per campaign instance and anonymous ID. A recipient is
  claimed with a lease before anything is fetched; the claim becomes permanent
  when the provider took the message (or may have: no blind resend), and is
  released when nothing was sent, so a re-run retries it. A crashed process's
  claims expire with their lease: only its in-flight batch can be sent twice.
- Frequency caps: a sliding window of sends per anonymous ID and channel.
- Rate limits: a reservation schedule per connector on Redis' clock, so several
  processes together stay within the connector's messages per second.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from libs.store import workspace_key
from libs.write_batch import QueuedWrites

PENDING, SENT, UNKNOWN = "p", "s", "u"

# Sliding-window log: drop old sends, admit if under the cap. Returns 1/0 per key.
_CAP_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) < limit then
    redis.call('ZADD', key, now, ARGV[2 + i])
    redis.call('PEXPIRE', key, window)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# Reserve `n` send slots `interval` microseconds apart; returns the wait before the first.
_RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local start = tat
tat = tat + n * interval
redis.call('SET', KEYS[1], tat, 'PX', math.floor((tat - now) / 1000) + 1000)
return start - now
"""


# Claims a batch in one command: SET NX GET per key; returns each key's previous value (nil: ours now).
_CLAIM_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('SET', key, ARGV[i + 1], 'NX', 'PX', ARGV[1], 'GET')
end
return out
"""
CLAIMS_PER_SCRIPT = 1000


@dataclass(frozen=True)
class Claim:
    anonymous_id: str
    message_id: str
    won: bool  # False: someone claimed it before; message_id is theirs
    state: str = PENDING  # when not won: PENDING (a batch in flight holds it), SENT or UNKNOWN


class Idempotency:
    def __init__(self, redis: aioredis.Redis, lease_seconds: int, ttl_seconds: int) -> None:
        self._redis = redis
        self._lease_ms = lease_seconds * 1000
        self._ttl = ttl_seconds
        self._claim = redis.register_script(_CLAIM_SCRIPT)

    @staticmethod
    def key(workspace_id: str, campaign_instance_id: str, anonymous_id: str) -> str:
        return workspace_key(workspace_id, "idem", campaign_instance_id, anonymous_id)

    async def claim(self, workspace_id: str, campaign_instance_id: str, wanted: dict[str, str]) -> dict[str, Claim]:
        """`wanted` maps anonymous ID → the message ID we would use; one script call per 1,000 IDs
        (a command per ID cost more in the client than the claims cost Redis)."""
        items = list(wanted.items())
        previous: list[bytes | None] = []
        for start in range(0, len(items), CLAIMS_PER_SCRIPT):
            chunk = items[start : start + CLAIMS_PER_SCRIPT]
            previous.extend(
                await self._claim(
                    keys=[self.key(workspace_id, campaign_instance_id, a) for a, _ in chunk],
                    args=[self._lease_ms, *(f"{PENDING}:{m}" for _, m in chunk)],
                )
            )
        claims = {}
        for (anonymous_id, message_id), before in zip(wanted.items(), previous, strict=True):
            if before is None:
                claims[anonymous_id] = Claim(anonymous_id, message_id, True)
            else:
                state, _, theirs = before.decode().partition(":")
                claims[anonymous_id] = Claim(anonymous_id, theirs, False, state)
        return claims

    def queue_settle(
        self,
        pipe: QueuedWrites,
        workspace_id: str,
        instance: str,
        anonymous_id: str,
        state: str,
        message_id: str,
    ) -> None:
        pipe.set(self.key(workspace_id, instance, anonymous_id), f"{state}:{message_id}", ex=self._ttl)

    def queue_release(self, pipe: QueuedWrites, workspace_id: str, instance: str, anonymous_id: str) -> None:
        pipe.delete(self.key(workspace_id, instance, anonymous_id))


class FrequencyCaps:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(_CAP_SCRIPT)

    @staticmethod
    def key(workspace_id: str, channel_family: str, anonymous_id: str) -> str:
        return workspace_key(workspace_id, "cap", channel_family, anonymous_id)

    async def admit(
        self, workspace_id: str, channel_family: str, members: dict[str, str], max_messages: int, window_seconds: int
    ) -> dict[str, bool]:
        """`members` maps anonymous ID → message ID; True where the send fits under the cap (and is counted)."""
        if not members:
            return {}
        keys = [self.key(workspace_id, channel_family, a) for a in members]
        allowed = await self._script(keys=keys, args=[window_seconds * 1000, max_messages, *members.values()])
        return {a: bool(ok) for a, ok in zip(members, allowed, strict=True)}

    def queue_release(
        self, pipe: QueuedWrites, workspace_id: str, channel_family: str, anonymous_id: str, message_id: str
    ) -> None:
        """A message that was not sent does not count against the cap."""
        pipe.zrem(self.key(workspace_id, channel_family, anonymous_id), message_id)


class ConnectorRateLimiter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(_RATE_SCRIPT)

    async def reserve(self, workspace_id: str, connector_id: str, per_second: int, slots: int) -> tuple[float, float]:
        """(seconds to wait before the first slot, seconds between slots)."""
        interval_us = 1_000_000 // per_second
        wait_us = await self._script(
            keys=[workspace_key(workspace_id, "rate", connector_id)], args=[interval_us, slots]
        )
        return int(wait_us) / 1_000_000, interval_us / 1_000_000
