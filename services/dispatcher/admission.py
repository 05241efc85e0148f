"""Admission: which recipients of a batch may be sent to, decided in one script call.

For each recipient, in order: the idempotency claim (someone else's claim wins),
the suppressions (for every topic and for the campaign's), the frequency cap, and
then, only for those admitted, the claim's lease, the cap's count and the
message-map entry (and once, the batch's map record). One call instead of a round
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

from libs.message_map import MessageMap, MessageRecord
from libs.store import key_part
from libs.suppressions import SuppressionStore
from libs.write_batch import new_batch_id
from services.dispatcher.guards import CAP_HORIZON, PENDING, FrequencyCaps, Idempotency

ADMITTED, SUPPRESSED, CAPPED, HELD = "admitted", "suppressed", "capped", "held"

# KEYS: the suppression hashes (ARGV[1] of them), the batch's map record, then per recipient its claim
# (when tracked), its cap (when capped) and its map entry (when mapped). ARGV: the suppression count,
# tracked (1/0), the claim lease (ms), the cap window (ms, 0 for none) and limit, the map entries' TTL and
# the batch record's (s), the batch ID, mapped (1/0), the record's field count and pairs, then per
# recipient its anonymous ID and message ID. Returns per recipient 1 (admitted), 2 (suppressed), 3
# (capped) or the claim that holds it ("<state>:<message ID>"). The batch record is written with the
# first entry that needs it.
_SCRIPT = """
local unpack = unpack or table.unpack
local nsupp, tracked, lease = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
local window, limit, ttl, batch_ttl, batch = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local mapped, nfields = ARGV[9] == '1', tonumber(ARGV[10])
local record = KEYS[nsupp + 1]
local capped = tracked and window > 0
local now = 0
if capped then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out = {}
local recorded = false
-- Each recipient's IDs and keys first, so that the reads below are one command each for the call:
-- a redis.call per recipient and list cost more than the lookups themselves.
local ids, mids, claims, caps, entries = {}, {}, {}, {}, {}
local n, k = 0, nsupp + 2
for a = 11 + 2 * nfields, #ARGV, 2 do
  n = n + 1
  ids[n], mids[n] = ARGV[a], ARGV[a + 1]
  if tracked then claims[n] = KEYS[k]; k = k + 1 end
  if capped then caps[n] = KEYS[k]; k = k + 1 end
  if mapped then entries[n] = KEYS[k]; k = k + 1 end
end
-- IDs are unique within a call, so no write below changes what these read.
local held, suppressed = {}, {}
if n > 0 then
  if tracked then held = redis.call('MGET', unpack(claims)) end
  for s = 1, nsupp do suppressed[s] = redis.call('HMGET', KEYS[s], unpack(ids)) end
end
for i = 1, n do
  local id, mid, claim, cap, entry = ids[i], mids[i], claims[i], caps[i], entries[i]
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
    if entry then
      if not recorded then
        redis.call('HSET', record, unpack(ARGV, 11, 10 + 2 * nfields))
        redis.call('EXPIRE', record, batch_ttl)
        recorded = true
      end
      redis.call('HSET', entry, 'batch', batch, 'anonymous_id', id)
      redis.call('EXPIRE', entry, ttl)
    end
  end
  out[#out + 1] = verdict
end
return out
""".replace("@PENDING@", PENDING).replace("@HORIZON@", CAP_HORIZON)
# Also what the script's MGET and HMGET unpack in one go: Lua's unpack stops at about 8,000 values.
ADMISSIONS_PER_SCRIPT = 1000
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
        batch_id = new_batch_id()
        header = [
            len(suppressions),
            int(tracked),
            self._lease_ms,
            window_ms,
            cap.max_messages if window_ms else 0,
            self._map.ttl_seconds,
            self._map.batch_ttl_seconds,
            batch_id,
            int(mapped),
            len(fields),
            *chain.from_iterable(fields.items()),
        ]
        # Each recipient's keys end in its IDs: the rest is made once per batch.
        claim_prefix = Idempotency.key(workspace_id, instance, "")
        cap_prefix = FrequencyCaps.key(workspace_id, family, "")
        map_prefix = MessageMap.key(workspace_id, "")
        for start in range(0, len(recipients), ADMISSIONS_PER_SCRIPT):
            chunk = recipients[start : start + ADMISSIONS_PER_SCRIPT]
            keys = [*suppressions, MessageMap.batch_key(workspace_id, batch_id)]
            args = list(header)
            for anonymous_id, message_id in chunk:
                if tracked or window_ms:
                    part = key_part(anonymous_id)
                    if tracked:
                        keys.append(claim_prefix + part)
                    if window_ms:
                        keys.append(cap_prefix + part)
                if mapped:
                    keys.append(map_prefix + message_id)  # ours: hex, nothing to escape
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
