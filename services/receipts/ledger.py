"""The delivery ledger: records verified events exactly once and serves the event stream.

Per batch of events: one pipelined lookup in the message-ID map (and one for the
batch records this process has not read before), then one Lua script that,
atomically for each event,
1. drops it if any of its provider identities was seen (dedupe markers with a TTL), unless
   it was seen only unmapped and maps now: one event may reach us twice (SES's notification
   and its published event, the first of them naming only an SES message ID not indexed yet).
   Then the `unmapped` count the first added is taken back where it was counted (the marker
   says where), so the event is counted once, in the funnel;
2. for a message still in the map: moves the message's `status` only forward
   (by rank), counts its funnel counters once per message (which it has counted
   is kept with its status) in the campaign and the
   instance counters, and appends the anonymised event to `ts:{ws}:events`;
3. otherwise, for an event the caller says may wait (it names only the provider's
   message ID, which the dispatcher may not have indexed yet), writes nothing: the
   receipt is refused for its provider to send again, and that redelivery is recorded afresh;
4. otherwise counts `unmapped`: in the campaign the receipt names when that
   campaign already has counters (no key is ever made from a receipt value),
   else in the workspace's own counters.
Concurrent deliveries of the same event serialise on the script, so nothing is
counted twice, but another system's traffic on the provider's account (below), counted `unmapped` as
often as it is delivered. Identities are stored as keyed digests, never as sent.

Redis keys written (all in the workspace's hash slot):
- `ts:{ws}:rcpt:seen:<hmac>` = "1", or while seen only unmapped where that was counted: "uw" the
  workspace's counters, "uc" the campaign's, "ui" the campaign's and the instance's ("u", from before,
  says not where); none for another system's traffic (an event naming no ID of ours and no message of
  ours, from a provider whose receipts of our sends always name our ID). TTL `receipt_dedupe_ttl_seconds`.
  The HMAC is keyed with the first dedupe key;
  while `TOKENSEND_SECRET_KEY` lists several keys (a rotation) the markers under the others are read
  too, never written, so an event delivered before the rotation is still a duplicate. An inbound message
  being acted on holds its marker as a claim, "claim:<random token>", for `CLAIM_TTL_SECONDS` (`claim`),
  and so does an SNS subscription (its topic and token) being confirmed
- `ts:{ws}:msgstatus:<group>` a field per message of the map's group (its ID's own part):
  "<status rank>:<status>:<counted counters, comma-separated>", made at the group's first receipt with
  what is left of the group's entries' TTL; for an entry from before groups, `ts:{ws}:msg:<message_id>`
  fields `status`, `status_rank`, `counted:<counter>` (the entry's own hash, its TTL)
- `ts:{ws}:stats:<campaign>:all` and `ts:{ws}:stats:<campaign>:i:<instance>` counters, and
  `ts:{ws}:stats:_workspace:all` field `unmapped` (receipts naming no known campaign): each kept
  `stats_ttl_seconds` from its last count, as the dispatcher keeps them (0: until deleted)
- `ts:{ws}:events` stream, trimmed to about `events_stream_maxlen` entries, kept `events_stream_ttl_seconds`
  from its newest; each entry names the one before it (`prev`, "0-0" for the first of the stream), so that
  the oldest kept says which event was the newest trimmed

A reader whose position the trimming has passed, or that resumes from a stream that has expired since,
is told (`EventsTrimmed`), never handed the events after the gap as if nothing were missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from opentelemetry import trace
from redis.exceptions import RedisError

from libs.campaign_stats import campaign_key, instance_key
from libs.message_map import MessageMap, MessageRecord, is_message_id, split_message_id
from libs.store import MAX_U64, workspace_key
from services.receipts.errors import ClaimedElsewhere
from services.receipts.model import (
    FUNNEL_COUNTER,
    IMPLIED_COUNTERS,
    INDEXED_ONLY_PROVIDERS,
    STATUS_RANK,
    ReceiptEvent,
    Status,
)

log = logging.getLogger(__name__)

# Campaign IDs start with a letter or digit, so this can never be a campaign's key.
WORKSPACE_COUNTERS = "_workspace"
BATCH = 500  # events per script call: keeps each script short so Redis stays responsive
# How long a claim on an inbound message outlives a process that died acting on it: a redelivery meanwhile
# is taken for a duplicate, one after it acts.
CLAIM_TTL_SECONDS = 60

# KEYS[1] the identity's marker under the first dedupe key, KEYS[2..] under the others: claimed only when
# none exists, in one step, so that of two deliveries at once one alone acts. 1: claimed; 0: seen; -1: another
# delivery's claim holds it (acting now, or it failed and could not give the claim back).
_CLAIM_SCRIPT = """
local held_elsewhere = false
for i = 1, #KEYS do
  local mark = redis.call('GET', KEYS[i])
  if mark then
    if string.sub(mark, 1, 6) ~= 'claim:' then return 0 end
    held_elsewhere = true
  end
end
if held_elsewhere then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
# Only the claim's own token: one that lapsed and was claimed again, or marked seen since, stays.
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_RECORD_SCRIPT = """
local ttl = tonumber(ARGV[1])
local maxlen = ARGV[2]
local stats_ttl = tonumber(ARGV[3])
local stream_ttl = tonumber(ARGV[4])
local last_event = false
local function count(key, name)
  redis.call('HINCRBY', key, name, 1)
  if stats_ttl > 0 then redis.call('EXPIRE', key, stats_ttl) end
end
local function uncount(key, name)
  -- Only while counted: a counter that has expired since is not made again at -1.
  if (tonumber(redis.call('HGET', key, name) or '0') or 0) > 0 then redis.call('HINCRBY', key, name, -1) end
end
-- A message of a group: its status rank, status and counted counters in one field of the group's
-- statuses hash, "<rank>:<status>:<counter>,<counter>"; made with what is left of the entries' TTL.
local function record_grouped(e)
  local statuses, own = KEYS[e.t], e.o
  local held = redis.call('HGET', statuses, own)
  local rank, status, counted = 0, '', ''
  if held then
    local r, s, c = string.match(held, '^(%d+):([^:]*):(.*)$')
    rank, status, counted = tonumber(r) or 0, s or '', c or ''
  end
  local changed = not held
  if e.r > rank then rank, status, changed = e.r, e.s, true end
  for _, c in ipairs(e.c) do
    if not string.find(',' .. counted .. ',', ',' .. c .. ',', 1, true) then
      counted = counted == '' and c or counted .. ',' .. c
      changed = true
      for _, k in ipairs(e.k) do count(KEYS[k], c) end
    end
  end
  if changed then
    local new = redis.call('EXISTS', statuses) == 0
    redis.call('HSET', statuses, own, rank .. ':' .. status .. ':' .. counted)
    if new then
      local left = redis.call('PTTL', KEYS[e.g])
      if left > 0 then redis.call('PEXPIRE', statuses, left) else redis.call('EXPIRE', statuses, ttl) end
    end
  end
end
local seen, unmapped_at
local function look(markers)
  for _, k in ipairs(markers) do
    local mark = redis.call('GET', KEYS[k])
    if mark and string.sub(mark, 1, 1) == 'u' then
      unmapped_at = unmapped_at or mark
    elseif mark then
      seen = true
    end
  end
end
local results = {}
for n = 5, #ARGV do
  local e = cjson.decode(ARGV[n])
  seen, unmapped_at = false, nil
  -- The markers under the first key (the only ones written), then, during a key rotation, under the others.
  look(e.d)
  if e.x then look(e.x) end
  -- In the map: its field in its group's hash, or (written before groups) its own hash.
  local grouped = e.g and redis.call('HEXISTS', KEYS[e.g], e.o) == 1
  local mapped = grouped or (e.m and redis.call('EXISTS', KEYS[e.m]) == 1)
  if seen or (unmapped_at and not mapped) then
    results[#results + 1] = 'duplicate'
  elseif mapped then
    for _, k in ipairs(e.d) do redis.call('SET', KEYS[k], '1', 'EX', ttl) end
    -- Its other shape came first and was counted unmapped: that count moves to the funnel below.
    if unmapped_at == 'uw' then
      uncount(KEYS[2], 'unmapped')
    elseif (unmapped_at == 'uc' or unmapped_at == 'ui') and e.h then
      uncount(KEYS[e.h], 'unmapped')
      if unmapped_at == 'ui' and e.i then uncount(KEYS[e.i], 'unmapped') end
    end
    if grouped then
      record_grouped(e)
    else
      local msg = KEYS[e.m]
      local rank = tonumber(redis.call('HGET', msg, 'status_rank') or '0') or 0
      if e.r > rank then redis.call('HSET', msg, 'status', e.s, 'status_rank', e.r) end
      for _, c in ipairs(e.c) do
        if redis.call('HSETNX', msg, 'counted:' .. c, '1') == 1 then
          for _, k in ipairs(e.k) do count(KEYS[k], c) end
        end
      end
    end
    -- Each entry names the one before it: once that one is trimmed, readers after it missed nothing.
    if not last_event then
      local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
      last_event = newest[1] and newest[1][1] or '0-0'
    end
    local f = e.f
    f[#f + 1] = 'prev'
    f[#f + 1] = last_event
    last_event = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(f))
    results[#results + 1] = unmapped_at and 'remapped' or 'mapped'
  elseif e.w then
    results[#results + 1] = 'waiting'
  else
    local mark = 'uw'
    if e.h and redis.call('EXISTS', KEYS[e.h]) == 1 then
      count(KEYS[e.h], 'unmapped')
      mark = 'uc'
      if e.i and redis.call('EXISTS', KEYS[e.i]) == 1 then
        count(KEYS[e.i], 'unmapped')
        mark = 'ui'
      end
    else
      count(KEYS[2], 'unmapped')
    end
    for _, k in ipairs(e.d) do redis.call('SET', KEYS[k], mark, 'EX', ttl) end
    results[#results + 1] = 'unmapped'
  end
end
if last_event then redis.call('EXPIRE', KEYS[1], stream_ttl) end
return results
"""


def foreign(event: ReceiptEvent, record: MessageRecord | None) -> bool:
    """Whether `event` is another system's traffic on the provider's account: it names no ID of ours and no
    message of ours, from a provider whose receipts of our sends always name our ID (not SES's, whose
    notifications may name only its own ID, found once the dispatcher indexed it). Counted `unmapped` as often
    as it is delivered, never marked seen, and not among the statuses of our sends."""
    return record is None and not event.message_id and event.provider not in INDEXED_ONLY_PROVIDERS


@dataclass
class LedgerResult:
    mapped: int = 0
    unmapped: int = 0
    duplicates: int = 0
    # Events neither recorded nor counted: they may map once the dispatcher indexes the provider's ID.
    waiting: int = 0
    # Each event once, mapped or unmapped, by status: one that maps after it was recorded unmapped (its
    # other shape came first) is in `mapped`, and was in `recorded` then. Another system's (`foreign`) never.
    recorded: Counter[Status] = field(default_factory=Counter)


class EventsTrimmed(Exception):
    """Events after `after_id` may have been trimmed from the stream, or expired with it, before they were read.

    `oldest_kept` is "" when no stream is kept now (it expired)."""

    def __init__(self, after_id: str, oldest_kept: str, *, expired: bool = False) -> None:
        gone = "expired with an earlier stream" if expired else "been trimmed"
        kept = f"the oldest kept is {oldest_kept}" if oldest_kept else "none is kept"
        super().__init__(f"events after {after_id} may have {gone}; {kept}")
        self.after_id = after_id
        self.oldest_kept = oldest_kept
        self.expired = expired


class EventsAhead(Exception):
    """`after_id` is after the stream's newest event (`newest`, "" when there is no stream) and the store's clock:
    every event to come would sort before it, so a read after it would wait for good."""

    def __init__(self, after_id: str, newest: str) -> None:
        super().__init__(f"after_id {after_id} is after every event (the newest: {newest or 'none'}) and the clock")
        self.after_id = after_id
        self.newest = newest


# Events after a position, with what tells whether the stream has dropped any of them: its oldest
# entry (which names the entry before it), and, for entries written before they named it, how many
# were ever added and are kept; the server's time and the newest ID the stream gave, which tell a
# position no event has reached.
_READ_SCRIPT = """
local entries = {}
if ARGV[1] ~= '' then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
local now = redis.call('TIME')
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {entries, false, 0, 0, now[1], now[2], false}
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local fields = {}
for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
return {entries, fields['first-entry'] or false, fields['entries-added'], fields['length'], now[1], now[2],
  fields['last-generated-id']}
"""

# The newest entry's ID, or the server's time when there is no stream.
_LAST_ID_SCRIPT = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if newest[1] then return newest[1][1] end
return redis.call('TIME')
"""


def stream_id_order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def next_stream_id(event_id: str) -> str:
    """The smallest ID after `event_id`, or "" when none can follow it."""
    ms, seq = stream_id_order(event_id)
    if seq < MAX_U64:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < MAX_U64 else ""


@dataclass(frozen=True)
class StoredEvent:
    """An anonymised event as kept in the stream."""

    event_id: str
    message_id: str
    campaign_id: str
    campaign_instance_id: str
    anonymous_id: str
    channel: int
    provider: str
    status: str
    reason_code: str
    occurred_at_ms: int


def events_key(workspace_id: str) -> str:
    return workspace_key(workspace_id, "events")


def workspace_counters_key(workspace_id: str) -> str:
    return campaign_key(workspace_id, WORKSPACE_COUNTERS)


def statuses_key(workspace_id: str, group: str) -> str:
    """What receipts recorded of the messages of a group of the message map, a field each."""
    return workspace_key(workspace_id, "msgstatus", group)


class _KeyTable:
    """KEYS of one script call, each named once, referenced by 1-based index."""

    def __init__(self, *fixed: str) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        for key in fixed:
            self.add(key)

    def add(self, key: str) -> int:
        if key not in self._index:
            self.keys.append(key)
            self._index[key] = len(self.keys)
        return self._index[key]


@dataclass
class ActingOnce:
    """A claim held for a block (`DeliveryLedger.acting_once`): `acted` False gives it up at the end."""

    acted: bool = True


class DeliveryLedger:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        dedupe_key: bytes,
        dedupe_ttl_seconds: int,
        stream_maxlen: int,
        stats_ttl_seconds: int = 0,
        stream_ttl_seconds: int = 7 * 86400,
        older_dedupe_keys: Sequence[bytes] = (),
    ) -> None:
        """Markers are written under `dedupe_key`; those under `older_dedupe_keys` (the other keys of a
        rotation) are looked at too, so that what was seen before the rotation stays seen."""
        self._redis = redis
        self._dedupe_key = dedupe_key
        self._older_dedupe_keys = tuple(k for k in dict.fromkeys(older_dedupe_keys) if k != dedupe_key)
        self._dedupe_ttl = dedupe_ttl_seconds
        self._stream_maxlen = stream_maxlen
        self._stats_ttl = stats_ttl_seconds
        self._stream_ttl = stream_ttl_seconds
        self._script = redis.register_script(_RECORD_SCRIPT)
        self._read_script = redis.register_script(_READ_SCRIPT)
        self._last_id_script = redis.register_script(_LAST_ID_SCRIPT)
        self._claim_script = redis.register_script(_CLAIM_SCRIPT)
        self._release_script = redis.register_script(_RELEASE_SCRIPT)
        self._map = MessageMap(redis, 0)  # read only: keeps the batch records it reads

    async def seen(self, workspace_id: str, identity: tuple[str, ...]) -> bool:
        """Whether `identity` was marked seen within the dedupe TTL (inbound messages, by their ID), under
        any of the dedupe keys."""
        keys = [self._seen_key(workspace_id, identity), *self._older_seen_keys(workspace_id, identity)]
        return bool(await self._redis.exists(*keys))

    async def mark_seen(self, workspace_id: str, identity: tuple[str, ...]) -> None:
        await self._redis.set(self._seen_key(workspace_id, identity), 1, ex=self._dedupe_ttl)

    async def claim(self, workspace_id: str, identity: tuple[str, ...]) -> str | None:
        """Claims `identity`, not seen under any dedupe key nor claimed, for the caller to act on: a token
        for `release`, or None when seen already. `mark_seen` ends the claim once acted on; a claim neither
        ends lapses after CLAIM_TTL_SECONDS.

        Raises ClaimedElsewhere while another delivery's claim holds it: that one may yet fail (and, the store
        away, keep its claim until it lapses), so this delivery is not answered as done but sent again."""
        token = "claim:" + secrets.token_hex(8)
        keys = [self._seen_key(workspace_id, identity), *self._older_seen_keys(workspace_id, identity)]
        claimed = int(await self._claim_script(keys=keys, args=[token, CLAIM_TTL_SECONDS]))
        if claimed < 0:
            raise ClaimedElsewhere()
        return token if claimed else None

    async def release(self, workspace_id: str, identity: tuple[str, ...], token: str) -> None:
        """Gives up a claim not acted on: the next delivery of `identity` acts."""
        await self._release_script(keys=[self._seen_key(workspace_id, identity)], args=[token])

    @contextlib.asynccontextmanager
    async def acting_once(self, workspace_id: str, identity: tuple[str, ...]) -> AsyncIterator[ActingOnce | None]:
        """`identity` claimed for the block (None: seen already, nothing to do), marked seen when the block
        ends, released for its next delivery when the block raised or set `acted` False. Raises
        ClaimedElsewhere, before the block, while another delivery's claim holds it."""
        token = await self.claim(workspace_id, identity)
        if token is None:
            yield None
            return
        acting = ActingOnce()
        try:
            yield acting
        except BaseException:
            # The block's error is the one to raise: a claim not released lapses on its own.
            with contextlib.suppress(RedisError):
                await self.release(workspace_id, identity, token)
            raise
        if acting.acted:
            await self.mark_seen(workspace_id, identity)
        else:
            await self.release(workspace_id, identity, token)

    def _seen_key(self, workspace_id: str, identity: tuple[str, ...], dedupe_key: bytes | None = None) -> str:
        # Keyed, so a low-entropy value a provider put in an ID cannot be recovered from the key. Lone
        # surrogates (JSON allows "\ud800") are hashed as they are: one odd ID must not fail its batch.
        joined = "\x1f".join(identity).encode("utf-8", "surrogatepass")
        key = self._dedupe_key if dedupe_key is None else dedupe_key
        digest = hmac.new(key, joined, hashlib.sha256).hexdigest()[:40]
        return workspace_key(workspace_id, "rcpt", "seen", digest)

    def _older_seen_keys(self, workspace_id: str, identity: tuple[str, ...]) -> list[str]:
        """The identity's markers under the other keys of a rotation: read, never written."""
        return [self._seen_key(workspace_id, identity, key) for key in self._older_dedupe_keys]

    async def attribute(self, workspace_id: str, events: Sequence[ReceiptEvent]) -> list[MessageRecord | None]:
        """Each event's message: by our echoed ID, else by the provider's ID; None when unknown or expired.

        As `MessageMap.get` / `find_by_provider_id`, for the whole batch at once.
        """
        by_id = await self._map.get_many(workspace_id, sorted({e.message_id for e in events if e.message_id}))
        by_provider_id: dict[tuple[str, str], MessageRecord | None] = {}
        unresolved = [e for e in events if e.provider_message_id and not by_id.get(e.message_id)]
        fallbacks = sorted({(e.provider, e.provider_message_id) for e in unresolved})
        if fallbacks:
            async with self._redis.pipeline(transaction=False) as pipe:
                for provider, provider_message_id in fallbacks:
                    pipe.get(MessageMap.provider_key(workspace_id, provider, provider_message_id))
                found = [(pair, raw.decode()) for pair, raw in zip(fallbacks, await pipe.execute(), strict=True) if raw]
            if found:
                mapped = await self._map.get_many(workspace_id, [message_id for _, message_id in found])
                by_provider_id = {pair: mapped[message_id] for pair, message_id in found}
        records: list[MessageRecord | None] = []
        for event in events:
            record = by_id.get(event.message_id) if event.message_id else None
            if record is None and event.provider_message_id:
                record = by_provider_id.get((event.provider, event.provider_message_id))
            # A receipt from one provider never moves a message sent through another.
            records.append(record if record is not None and record.provider == event.provider else None)
        return records

    async def record(
        self,
        workspace_id: str,
        events: Sequence[ReceiptEvent],
        may_wait: Callable[[ReceiptEvent], bool] | None = None,
        result: LedgerResult | None = None,
    ) -> LedgerResult:
        """Records `events`; one that maps to no message, was not seen before and for which `may_wait`
        says yes is left out entirely (`waiting`), so its redelivery is recorded as if it came first.

        Into `result` when given, batch by batch: should a later batch fail, it holds what the earlier ones
        recorded, which the receipt's redelivery finds as duplicates."""
        result = LedgerResult() if result is None else result
        for start in range(0, len(events), BATCH):
            chunk = events[start : start + BATCH]
            records = await self.attribute(workspace_id, chunk)
            link_to_sends(records)
            outcomes = await self._run(workspace_id, chunk, records, may_wait)
            for event, record, outcome in zip(chunk, records, outcomes, strict=True):
                name = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
                if name == "remapped":
                    result.mapped += 1
                    continue
                if name == "mapped":
                    result.mapped += 1
                elif name == "unmapped":
                    result.unmapped += 1
                    if foreign(event, record):  # not ours to count by status (`tokensend.receipts`)
                        continue
                elif name == "waiting":
                    result.waiting += 1
                    continue
                else:
                    result.duplicates += 1
                    continue
                result.recorded[event.status] += 1
        return result

    async def _run(
        self,
        workspace_id: str,
        events: Sequence[ReceiptEvent],
        records: Sequence[MessageRecord | None],
        may_wait: Callable[[ReceiptEvent], bool] | None,
    ) -> list[bytes]:
        table = _KeyTable(events_key(workspace_id), workspace_counters_key(workspace_id))
        args = [str(self._dedupe_ttl), str(self._stream_maxlen), str(self._stats_ttl), str(self._stream_ttl)]
        for event, record in zip(events, records, strict=True):
            # Never marked seen (`foreign`): a busy sender beside the brand's campaigns would fill Redis with
            # a marker per event for the dedupe TTL. A redelivery of it is counted again, as `unmapped` only.
            identities = () if foreign(event, record) else event.identities
            entry: dict[str, object] = {
                "d": [table.add(self._seen_key(workspace_id, identity)) for identity in identities],
                "r": STATUS_RANK[event.status],
                "s": event.status.value,
                "c": [c for c in (FUNNEL_COUNTER.get(event.status, ""), *IMPLIED_COUNTERS.get(event.status, ())) if c],
            }
            if self._older_dedupe_keys:  # a key rotation: with one key, nothing more is read
                entry["x"] = [
                    table.add(key) for identity in identities for key in self._older_seen_keys(workspace_id, identity)
                ]
            if record is None and may_wait is not None and may_wait(event):
                entry["w"] = 1
            if record is not None:
                entry["m"] = table.add(MessageMap.key(workspace_id, record.message_id))
                if is_message_id(record.message_id):
                    group, entry["o"] = split_message_id(record.message_id)
                    entry["g"] = table.add(MessageMap.entries_key(workspace_id, group))
                    entry["t"] = table.add(statuses_key(workspace_id, group))
                stats = []
                if record.campaign_id:
                    stats.append(table.add(campaign_key(workspace_id, record.campaign_id)))
                    if record.campaign_instance_id:
                        stats.append(
                            table.add(instance_key(workspace_id, record.campaign_id, record.campaign_instance_id))
                        )
                entry["k"] = stats
                entry["f"] = [
                    "message_id", record.message_id,
                    "campaign_id", record.campaign_id,
                    "campaign_instance_id", record.campaign_instance_id,
                    "anonymous_id", record.anonymous_id,
                    "channel", str(record.channel),
                    "provider", event.provider,
                    "status", event.status.value,
                    "reason_code", event.reason_code,
                    "occurred_at_ms", str(int(event.occurred_at * 1000)),
                ]  # fmt: skip
            campaign = event.campaign_hint or (record.campaign_id if record else "")
            if campaign:
                entry["h"] = table.add(campaign_key(workspace_id, campaign))
                instance = event.instance_hint or (record.campaign_instance_id if record else "")
                if instance:
                    entry["i"] = table.add(instance_key(workspace_id, campaign, instance))
            args.append(json.dumps(entry, separators=(",", ":")))
        return await self._script(keys=table.keys, args=args)

    async def read(
        self, workspace_id: str, after_id: str, count: int, block_ms: int | None, *, resumed: bool = True
    ) -> list[StoredEvent]:
        """Events after `after_id` ("0-0" from the oldest kept), waiting up to `block_ms` when there are none.

        Raises EventsTrimmed when events after `after_id` (other than "0-0") may have been trimmed or, when
        `resumed` (a position the caller brings, not one this stream's reader reached on its previous read),
        may have expired with an earlier stream: that is any position older than the TTL from the stream's
        beginning (or from now, when there is none), since a stream lives at least that long after its newest.
        Raises EventsAhead when a resumed position is after the newest ID the stream gave and after the
        store's clock (a later millisecond): no event has reached it, and those to come would sort before it.
        """
        key = events_key(workspace_id)
        entries, oldest, added, length, seconds, micros, newest = await self._read_script(
            keys=[key], args=[next_stream_id(after_id), count]
        )
        if after_id != "0-0":
            _check_position(
                after_id,
                oldest,
                (added, length),
                _milliseconds(seconds, micros),
                newest.decode() if newest else "",
                self._stream_ttl * 1000,
                resumed,
            )
        if not entries and block_ms is not None:
            # Nothing kept after the position: only new events can follow, at the stream's newest end.
            reply = await self._redis.xread({key: after_id}, count=count, block=block_ms)
            entries = [entry for _stream, stream_entries in reply or [] for entry in stream_entries]
        return [_stored_event(entry_id, fields) for entry_id, fields in entries]

    async def last_id(self, workspace_id: str) -> str:
        """The newest entry's ID, or for an empty stream one just before the server's time (every event to
        come is after it), so that "$" can resume without gaps and a later trimming or expiry is judged."""
        reply = await self._last_id_script(keys=[events_key(workspace_id)])
        if isinstance(reply, bytes):
            return reply.decode()
        return f"{_milliseconds(*reply) - 1}-0"


def _milliseconds(seconds: bytes | int, micros: bytes | int) -> int:
    """Redis TIME's reply in milliseconds."""
    return int(seconds) * 1000 + int(micros) // 1000


def _check_position(
    after_id: str,
    oldest: list | None,
    counts: tuple[bytes | int, bytes | int],
    now_ms: int,
    newest: str,
    ttl_ms: int,
    resumed: bool,
) -> None:
    """Raises EventsAhead or EventsTrimmed for a position (`after_id`) the stream cannot continue from, as
    `DeliveryLedger.read` says: `oldest` is the oldest entry kept (None without a stream), `counts` the
    entries ever added and kept, `newest` the newest ID the stream gave ("" for none)."""
    position = stream_id_order(after_id)
    if resumed and position[0] > now_ms and (not newest or position > stream_id_order(newest)):
        raise EventsAhead(after_id, newest)
    if not oldest:
        if resumed and position[0] + ttl_ms <= now_ms:
            raise EventsTrimmed(after_id, "", expired=True)
        return
    oldest_id = oldest[0].decode()
    if stream_id_order(oldest_id) <= position:
        return
    fields = oldest[1]
    prev = next((v.decode() for k, v in zip(fields[::2], fields[1::2], strict=True) if k == b"prev"), None)
    if prev == "0-0":  # the first of its stream: an earlier one may have expired
        if resumed and position[0] + ttl_ms <= stream_id_order(oldest_id)[0]:
            raise EventsTrimmed(after_id, oldest_id, expired=True)
        return
    # Trimmed past the position: the newest trimmed came after it (for an entry from before entries named
    # the one before them: the stream has dropped some).
    added, length = counts
    if (stream_id_order(prev) > position) if prev else int(added) > int(length):
        raise EventsTrimmed(after_id, oldest_id)


MAX_LINKS = 32


def link_to_sends(records: Sequence[MessageRecord | None]) -> None:
    """Links the current (receipt) span to the traces of the sends it reports on."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    seen: set[tuple[str, str]] = set()
    for record in records:
        if record is None or not record.trace_id or not record.span_id or len(seen) >= MAX_LINKS:
            continue
        key = (record.trace_id, record.span_id)
        if key in seen:
            continue
        seen.add(key)
        try:
            context = trace.SpanContext(int(key[0], 16), int(key[1], 16), is_remote=True)
        except ValueError:
            continue
        if context.is_valid:
            span.add_link(context, {"tokensend.link": "send"})


def _stored_event(entry_id: bytes, fields: dict[bytes, bytes] | list[bytes]) -> StoredEvent:
    # XREAD's reply comes as a mapping, a script's as the flat list Redis sends.
    pairs = fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2], strict=True)
    text = {k.decode(): v.decode() for k, v in pairs}

    def number(name: str) -> int:
        try:
            return int(text.get(name, "0"))
        except ValueError:
            return 0

    return StoredEvent(
        event_id=entry_id.decode(),
        message_id=text.get("message_id", ""),
        campaign_id=text.get("campaign_id", ""),
        campaign_instance_id=text.get("campaign_instance_id", ""),
        anonymous_id=text.get("anonymous_id", ""),
        channel=number("channel"),
        provider=text.get("provider", ""),
        status=text.get("status", ""),
        reason_code=text.get("reason_code", ""),
        occurred_at_ms=number("occurred_at_ms"),
    )
