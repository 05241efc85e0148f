"""Admission: which recipients of a batch may be sent to, decided in one script call.

For each recipient, in order: the idempotency claim (someone else's claim wins),
the suppressions (for every topic and for the campaign's), the frequency cap, and
then, only for those admitted, the claim's lease, the cap's count and the
message-map entry (a field of its group's hash, and once per group the group's
map record: libs.message_map). One call instead of a round
trip per step: a one-recipient Dispatch paid more for the round trips than for the
writes. A connector that gets no receipts (custom HTTP) has nothing to map: nothing
would ever read its entries.

The script touches only keys of one workspace (its `{workspace}` hash tag), so it
runs on Redis Cluster too. Calls are cut at ADMISSIONS_PER_SCRIPT recipients and
each is yielded as it returns: when a later call fails, what the earlier ones
admitted is known and can be released.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from itertools import chain

import redis.asyncio as aioredis

from libs.message_map import GROUP_PART, IDS_PER_GROUP, MessageMap, MessageRecord
from libs.store import key_part
from libs.suppressions import SuppressionStore
from services.dispatcher.guards import CAP_HORIZON, PENDING, FrequencyCaps, Idempotency

ADMITTED, SUPPRESSED, CAPPED, HELD = "admitted", "suppressed", "capped", "held"

# KEYS: the suppression hashes (ARGV[1] of them), then per group of the call's message IDs (when mapped)
# its map record and its entries, then per recipient its claim (when tracked) and its cap (when capped).
# ARGV: the suppression count, tracked (1/0), the claim lease (ms), the cap window (ms, 0 for none) and
# limit, the map entries' TTL and the records' (s), the group count (0: not mapped), the record's field
# count and pairs, the groups' parts (in KEYS order), then per recipient its anonymous ID and message
# ID. Returns per recipient 1 (admitted), 2 (suppressed), 3 (capped) or the claim that holds it
# ("<state>:<message ID>"). A group's record and entries are written once, after the loop, for the
# groups with an admitted recipient.
_SCRIPT = (
    """
local unpack = unpack or table.unpack
local nsupp, tracked, lease = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
local window, limit, ttl, record_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local ngroups, nfields = tonumber(ARGV[8]), tonumber(ARGV[9])
local fields_end = 9 + 2 * nfields
local capped = tracked and window > 0
local now = 0
if capped then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out = {}
-- Each recipient's IDs and keys first, so that the reads below are one command each for the call:
-- a redis.call per recipient and list cost more than the lookups themselves.
local ids, mids, claims, caps = {}, {}, {}, {}
local n, k = 0, nsupp + 2 * ngroups + 1
for a = fields_end + ngroups + 1, #ARGV, 2 do
  n = n + 1
  ids[n], mids[n] = ARGV[a], ARGV[a + 1]
  if tracked then claims[n] = KEYS[k]; k = k + 1 end
  if capped then caps[n] = KEYS[k]; k = k + 1 end
end
-- Per group: its admitted recipients' own parts and anonymous IDs, as HSET takes them.
local admitted = {}
for g = 1, ngroups do admitted[ARGV[fields_end + g]] = {} end
-- IDs are unique within a call, so no write below changes what these read.
local held, suppressed = {}, {}
if n > 0 then
  if tracked then held = redis.call('MGET', unpack(claims)) end
  for s = 1, nsupp do suppressed[s] = redis.call('HMGET', KEYS[s], unpack(ids)) end
end
for i = 1, n do
  local id, mid, claim, cap = ids[i], mids[i], claims[i], caps[i]
  local verdict = 1
  if held[i] then
    verdict = held[i]
  else
    for s = 1, nsupp do
      if suppressed[s][i] then verdict = 2; break end
    end
  end
  if verdict == 1 and cap then
    -- Campaigns cap one history with windows of their own: it is kept for the longest window asked
    -- of it, whose length the member @HORIZON@ holds as a negative score (out of every range below).
    local horizon = -(tonumber(redis.call('ZSCORE', cap, '@HORIZON@')) or 0)
    local longer = window > horizon
    if longer then horizon = window; redis.call('ZADD', cap, -window, '@HORIZON@') end
    redis.call('ZREMRANGEBYSCORE', cap, 0, now - horizon)
    if redis.call('ZCOUNT', cap, '(' .. (now - window), '+inf') < limit then
      redis.call('ZADD', cap, now, mid)
      redis.call('PEXPIRE', cap, horizon)
    else
      verdict = 3
      if longer then redis.call('PEXPIRE', cap, horizon) end
    end
  end
  if verdict == 1 then
    if claim then redis.call('SET', claim, '@PENDING@:' .. mid, 'PX', lease) end
    if ngroups > 0 then
      local entries = admitted[string.sub(mid, 1, @GROUP@)]
      entries[#entries + 1] = string.sub(mid, @GROUP@ + 1)
      entries[#entries + 1] = id
    end
  end
  out[#out + 1] = verdict
end
for g = 1, ngroups do
  local entries = admitted[ARGV[fields_end + g]]
  if #entries > 0 then
    local record = KEYS[nsupp + 2 * g - 1]
    redis.call('HSET', record, unpack(ARGV, 10, fields_end))
    redis.call('EXPIRE', record, record_ttl)
    redis.call('HSET', KEYS[nsupp + 2 * g], unpack(entries))
    redis.call('EXPIRE', KEYS[nsupp + 2 * g], ttl)
  end
end
return out
""".replace("@PENDING@", PENDING)
    .replace("@HORIZON@", CAP_HORIZON)
    .replace("@GROUP@", str(GROUP_PART))
)
# Also what the script's MGET and HMGET unpack in one go: Lua's unpack stops at about 8,000 values. A
# multiple of the IDs per group, so that a batch's groups are whole in each call.
ADMISSIONS_PER_SCRIPT = 8 * IDS_PER_GROUP
_CODES = {1: ADMITTED, 2: SUPPRESSED, 3: CAPPED}


@dataclass(frozen=True)
class Verdict:
    outcome: str  # ADMITTED, SUPPRESSED, CAPPED or HELD
    state: str = ""  # HELD: the holding claim's state (PENDING, SENT or UNKNOWN)
    message_id: str = ""  # HELD: the message ID of the send that holds it


@dataclass(frozen=True)
class Cap:
    max_messages: int
    window_seconds: int


class Admission:
    def __init__(self, redis: aioredis.Redis, lease_seconds: int, message_map: MessageMap) -> None:
        self._script = redis.register_script(_SCRIPT)
        self._lease_ms = lease_seconds * 1000
        self._map = message_map

    async def admit(
        self,
        batch: MessageRecord,
        family: str,
        topic: str,
        recipients: Sequence[tuple[str, str]],
        *,
        tracked: bool,
        cap: Cap | None = None,
        mapped: bool = True,
    ) -> AsyncIterator[tuple[int, list[Verdict]]]:
        """`recipients` are (anonymous ID, message ID) pairs, each ID once; yields (offset, verdicts)
        per script call. `batch` holds what every map entry shares (campaign, connector, trace).
        Untracked (test) sends take no claim and count against no cap; unmapped ones write no map entry."""
        workspace_id, instance = batch.workspace_id, batch.campaign_instance_id
        suppressions = [SuppressionStore.key(workspace_id, family)]
        if topic:
            suppressions.append(SuppressionStore.key(workspace_id, family, topic))
        window_ms = cap.window_seconds * 1000 if tracked and cap is not None and cap.max_messages > 0 else 0
        fields = self._map.batch_fields(batch) if mapped else {}
        header = [
            len(suppressions),
            int(tracked),
            self._lease_ms,
            window_ms,
            cap.max_messages if window_ms else 0,
            self._map.ttl_seconds,
            self._map.batch_ttl_seconds,
        ]
        fields_part = [len(fields), *chain.from_iterable(fields.items())]
        # Each recipient's keys end in its IDs: the rest is made once per batch.
        claim_prefix = Idempotency.key(workspace_id, instance, "")
        cap_prefix = FrequencyCaps.key(workspace_id, family, "")
        for start in range(0, len(recipients), ADMISSIONS_PER_SCRIPT):
            chunk = recipients[start : start + ADMISSIONS_PER_SCRIPT]
            # The call's groups, in order (a batch's IDs come group by group): a record and entries each.
            groups = list(dict.fromkeys([message_id[:GROUP_PART] for _, message_id in chunk])) if mapped else []
            keys = list(suppressions)
            for group in groups:
                keys.append(MessageMap.batch_key(workspace_id, group))
                keys.append(MessageMap.entries_key(workspace_id, group))
            args = [*header, len(groups), *fields_part, *groups]
            for anonymous_id, message_id in chunk:
                if tracked or window_ms:
                    part = key_part(anonymous_id)
                    if tracked:
                        keys.append(claim_prefix + part)
                    if window_ms:
                        keys.append(cap_prefix + part)
                args.append(anonymous_id)
                args.append(message_id)
            replies = await self._script(keys=keys, args=args)
            # Most replies are a code, whose verdict is shared: looked up without a call per recipient.
            yield start, [_VERDICTS[reply] if type(reply) is int else _verdict(reply) for reply in replies]


_VERDICTS = {code: Verdict(outcome) for code, outcome in _CODES.items()}  # shared: verdicts never change


def _verdict(reply: int | bytes) -> Verdict:
    if isinstance(reply, int):
        return _VERDICTS[reply]
    state, _, message_id = reply.decode().partition(":")
    return Verdict(HELD, state, message_id)
