"""Suppressions: anonymous IDs that must not be sent to, per workspace, channel family and topic.

Keyed by anonymous ID only, so opting out never needs a contact. A suppression
with no topic covers every topic of the channel family; a campaign with a topic
skips recipients suppressed for that topic or for all of them.

Redis layout (one hash per workspace, family and topic; no TTL: opt-outs are permanent):
- `ts:{ws}:supp:<family>:<topic>` field `<anonymous_id>` = `<reason>:<created_ms>`,
  where `<topic>` is `_all` for every topic (a topic ID can never start with `_`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from tokensend.common.v1 import common_pb2

from libs.store import workspace_key

ALL_TOPICS = "_all"
FAMILIES = ("email", "sms", "whatsapp")

# Reasons, as stored (the values of the dispatcher's SuppressionReason enum).
MANUAL = 1
UNSUBSCRIBE_LINK = 2
PROVIDER_UNSUBSCRIBE = 3
COMPLAINT = 4
INBOUND_STOP = 5

# HDEL each field whose stored reason is ARGV[1]; returns how many went. ARGV: the reason, the time a
# lift must come after ("" for any), then the IDs. A value is "<reason>:<ms>"; only one of that reason,
# suppressed before that time, is lifted.
_LIFT_SCRIPT = """
local prefix = ARGV[1] .. ':'
local after = tonumber(ARGV[2])
local lifted = 0
for i = 3, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value and string.sub(value, 1, string.len(prefix)) == prefix then
    local at = tonumber(string.sub(value, string.len(prefix) + 1))
    if after == nil or at == nil or at < after then
      redis.call('HDEL', KEYS[1], ARGV[i])
      lifted = lifted + 1
    end
  end
end
return lifted
"""


# KEYS[1] the suppressions; ARGV the value ("<reason>:<ms>"), then the IDs. An ID not suppressed is;
# one suppressed for the same reason earlier takes the later time (a STOP sent again after a START:
# a START sent between the two must not lift it); any other suppression stays as it is. Returns how
# many were not suppressed before.
_SUPPRESS_AS_OF_SCRIPT = """
local reason, at = string.match(ARGV[1], '^(%d+):(%d+)$')
local prefix = reason .. ':'
local added = 0
for i = 2, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if not value then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
    added = added + 1
  elseif string.sub(value, 1, string.len(prefix)) == prefix then
    local was = tonumber(string.sub(value, string.len(prefix) + 1))
    if was == nil or was < tonumber(at) then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
    end
  end
end
return added
"""


def channel_family(channel: int) -> str:
    """Email, SMS (with MMS and RCS) and WhatsApp: the families suppressions and PII configs share."""
    if channel == common_pb2.CHANNEL_EMAIL:
        return "email"
    if channel == common_pb2.CHANNEL_WHATSAPP:
        return "whatsapp"
    return "sms"


def family_channel(family: str) -> int:
    """The channel that stands for a family in replies."""
    return {"email": common_pb2.CHANNEL_EMAIL, "whatsapp": common_pb2.CHANNEL_WHATSAPP}.get(
        family, common_pb2.CHANNEL_SMS
    )


@dataclass(frozen=True)
class SuppressionEntry:
    anonymous_id: str
    family: str
    topic: str  # "" for every topic
    reason: int
    created_at_ms: int


class SuppressionStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._lift = redis.register_script(_LIFT_SCRIPT)
        self._suppress_as_of = redis.register_script(_SUPPRESS_AS_OF_SCRIPT)

    @staticmethod
    def key(workspace_id: str, family: str, topic: str = "") -> str:
        return workspace_key(workspace_id, "supp", family, topic or ALL_TOPICS)

    async def find(self, workspace_id: str, family: str, topic: str, anonymous_ids: Sequence[str]) -> set[str]:
        """The IDs among `anonymous_ids` suppressed for `topic` or for every topic: one round trip."""
        if not anonymous_ids:
            return set()
        ids = list(anonymous_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.key(workspace_id, family), ids)
            if topic:
                pipe.hmget(self.key(workspace_id, family, topic), ids)
            replies = await pipe.execute()
        return {i for reply in replies for i, value in zip(ids, reply, strict=True) if value is not None}

    async def suppress(
        self,
        workspace_id: str,
        family: str,
        topic: str,
        anonymous_ids: Iterable[str],
        reason: int,
        at_ms: int | None = None,
    ) -> int:
        """Suppresses each ID; one already suppressed keeps its first reason and time. Returns how many
        are new. With `at_ms` (an inbound STOP: when it was sent), as of then, and one suppressed for
        the same reason earlier takes the later time, so that only a START sent after the last STOP
        lifts it."""
        ids = list(dict.fromkeys(anonymous_ids))
        if not ids:
            return 0
        key = self.key(workspace_id, family, topic)
        if at_ms is not None:
            return int(await self._suppress_as_of(keys=[key], args=[f"{int(reason)}:{int(at_ms)}", *ids]))
        value = f"{int(reason)}:{int(time.time() * 1000)}"
        async with self.redis.pipeline(transaction=False) as pipe:
            for anonymous_id in ids:
                pipe.hsetnx(key, anonymous_id, value)
            return sum(int(bool(r)) for r in await pipe.execute())

    async def unsuppress(self, workspace_id: str, family: str, topic: str, anonymous_ids: Iterable[str]) -> int:
        ids = list(dict.fromkeys(anonymous_ids))
        if not ids:
            return 0
        return int(await self.redis.hdel(self.key(workspace_id, family, topic), *ids))

    async def lift(
        self,
        workspace_id: str,
        family: str,
        anonymous_ids: Iterable[str],
        reason: int,
        sent_after_ms: int | None = None,
    ) -> int:
        """Lifts every-topic suppressions made for `reason` only (a START undoes a STOP, not the brand's
        own) and, given `sent_after_ms`, only those made before it (a START sent before the STOP,
        delivered after it, undoes nothing)."""
        ids = list(dict.fromkeys(anonymous_ids))
        if not ids:
            return 0
        after = str(sent_after_ms) if sent_after_ms is not None else ""
        return int(await self._lift(keys=[self.key(workspace_id, family)], args=[str(int(reason)), after, *ids]))

    async def page(
        self, workspace_id: str, family: str, topic: str, cursor: int, count: int
    ) -> tuple[list[SuppressionEntry], int]:
        """One HSCAN step: entries and the next cursor (0 when done). A step may return fewer than `count`."""
        next_cursor, fields = await self.redis.hscan(self.key(workspace_id, family, topic), cursor, count=count)
        entries = []
        for raw_id, raw_value in fields.items():
            reason, _, created = raw_value.decode().partition(":")
            entries.append(
                SuppressionEntry(
                    anonymous_id=raw_id.decode(),
                    family=family,
                    topic=topic,
                    reason=int(reason) if reason.isdigit() else 0,
                    created_at_ms=int(created) if created.isdigit() else 0,
                )
            )
        return entries, int(next_cursor)
