"""Suppressions: anonymous IDs that must not be sent to, per workspace, channel family and topic.

Keyed by anonymous ID only, so opting out never needs a contact. A suppression
with no topic covers every topic of the channel family; a campaign with a topic
skips recipients suppressed for that topic or for all of them.

Redis layout (per workspace, family and topic; suppressions have no TTL: opt-outs are permanent):
- `ts:{ws}:supp:<family>:<topic>` field `<anonymous_id>` = `<reason>:<created_ms>`, or several
  such pairs joined by commas (oldest first) when the ID is held for several reasons,
  where `<topic>` is `_all` for every topic (a topic ID can never start with `_`).
- `ts:{ws}:optin:<family>:<topic>` sorted set, member `<anonymous_id>`, score `<ms>`: when the customer
  last opted in again (SendGrid's group resubscribe; an inbound START, for every topic of SMS or WhatsApp),
  so that an opt-out sent before it and delivered after it changes nothing; kept until a later opt-out, at
  most `OPT_IN_KEPT_MS` (the key's TTL too), since no provider delivers an opt-out that late.

Every key of a workspace is in its `{ws}` slot, so a receipt's opt-outs, whatever their families and
topics, are written in one script call (`suppress_many`, `lift_many`), on a Redis Cluster too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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

# Twilio's "Attempt to send to unsubscribed recipient": the number replied STOP to the sender at Twilio. The
# dispatcher meets it as Twilio refuses a send, the receipts service in the status callback of a send a
# messaging service accepted; both suppress the recipient with PROVIDER_UNSUBSCRIBE, which START lifts.
TWILIO_OPTED_OUT = 21610

# How long an opt-in is kept against opt-outs made before it: SendGrid retries an event for 72 hours, WhatsApp
# a webhook for days, and receipts' identities are kept a week (TOKENSEND_RECEIPT_DEDUPE_TTL_SECONDS's default).
OPT_IN_KEPT_MS = 7 * 86400 * 1000

# A suppression is held for one reason or several: a brand's own hold and a customer's STOP are lifted
# apart, each by who made it. A value lists them, oldest first: "<reason>:<ms>[,<reason>:<ms>...]".

# Both scripts take a run of groups, applied in order in one call (a receipt's thousands of opt-outs in
# one round trip); a group's keys are positions in KEYS, 0 for none, and all of them share the
# workspace's slot.

# A group's ARGV: the suppressions', the every-topic ones' (for a topic's) and the customers' opt-ins'
# (to honour them) positions in KEYS, the reason, the time (ms), "1" when the time is when the customer
# acted (a STOP: one already held for that reason takes the later time, so that only a START sent after
# the last STOP lifts it), the number of IDs, then the IDs. A reason already held otherwise keeps its
# first time. An ID opted in after the time is left alone; one opted in before it (or in the same ms,
# which a lift would not undo either) forgets that opt-in. Returns {IDs newly suppressed, IDs suppressed
# before (for this reason or others, or for a topic, for every topic), IDs left alone}.
_SUPPRESS_SCRIPT = """
local added, before, left = 0, 0, 0
local g = 1
while g <= #ARGV do
  local supp = KEYS[tonumber(ARGV[g])]
  local covering = tonumber(ARGV[g + 1]) > 0 and KEYS[tonumber(ARGV[g + 1])] or nil
  local opt_ins = tonumber(ARGV[g + 2]) > 0 and KEYS[tonumber(ARGV[g + 2])] or nil
  local reason, stamp, as_of = ARGV[g + 3], ARGV[g + 4], ARGV[g + 5] == '1'
  local at = tonumber(stamp)
  local first, last = g + 7, g + 6 + tonumber(ARGV[g + 6])
  for i = first, last do
    local opted = opt_ins and redis.call('ZSCORE', opt_ins, ARGV[i])
    local late = opted and tonumber(opted) > at
    if opted and not late then
      redis.call('ZREM', opt_ins, ARGV[i])
    end
    local value = not late and redis.call('HGET', supp, ARGV[i])
    if late then
      -- The customer opted in again after this opt-out was made: it arrived late and changes nothing.
      left = left + 1
    elseif not value then
      redis.call('HSET', supp, ARGV[i], reason .. ':' .. stamp)
      if covering and redis.call('HEXISTS', covering, ARGV[i]) == 1 then
        before = before + 1
      else
        added = added + 1
      end
    else
      before = before + 1
      local held, found, changed = {}, false, false
      for r, ms in string.gmatch(value, '(%d+):(%d+)') do
        if r == reason then
          found = true
          if as_of and tonumber(ms) < at then
            ms, changed = stamp, true
          end
        end
        held[#held + 1] = r .. ':' .. ms
      end
      if not found then
        held[#held + 1] = reason .. ':' .. stamp
        changed = true
      end
      if changed then
        -- Oldest first: a STOP sent again moves its time, and one sent earlier may arrive after a hold.
        table.sort(held, function(a, b) return tonumber(a:match(':(%d+)')) < tonumber(b:match(':(%d+)')) end)
        redis.call('HSET', supp, ARGV[i], table.concat(held, ','))
      end
    end
  end
  g = last + 1
end
return {added, before, left}
"""

# A group's ARGV: the suppressions', the every-topic ones' (for a topic's) and the customers' opt-ins'
# (to keep the time as one) positions in KEYS, the time a lift must come after ("" for any), how long
# opt-ins are kept (ms), the number of reasons, the reasons, the number of IDs, then the IDs. Drops those
# reasons (held since before that time) from each ID; an ID left with none is no longer suppressed,
# unless an every-topic suppression still holds it for the topic. With opt-ins kept, the time is kept as
# each ID's opt-in (the latest one), and those older than that long are dropped. Returns {IDs no longer
# suppressed, IDs still suppressed}.
_LIFT_SCRIPT = """
local lifted, still = 0, 0
local now = nil
local g = 1
while g <= #ARGV do
  local supp = KEYS[tonumber(ARGV[g])]
  local covering = tonumber(ARGV[g + 1]) > 0 and KEYS[tonumber(ARGV[g + 1])] or nil
  local after, kept = tonumber(ARGV[g + 3]), tonumber(ARGV[g + 4])
  local opt_ins = tonumber(ARGV[g + 2]) > 0 and after and KEYS[tonumber(ARGV[g + 2])] or nil
  if opt_ins then
    -- No opt-out made that long ago is still delivered: the set keeps only what may matter.
    now = now or redis.call('TIME')
    redis.call('ZREMRANGEBYSCORE', opt_ins, '-inf', '(' .. (tonumber(now[1]) * 1000 - kept))
  end
  local n = tonumber(ARGV[g + 5])
  local lifting = {}
  for i = g + 6, g + 5 + n do
    lifting[ARGV[i]] = true
  end
  local first, last = g + 7 + n, g + 6 + n + tonumber(ARGV[g + 6 + n])
  for i = first, last do
    if opt_ins then
      local opted = redis.call('ZSCORE', opt_ins, ARGV[i])
      if not opted or tonumber(opted) < after then
        redis.call('ZADD', opt_ins, ARGV[g + 3], ARGV[i])
        redis.call('PEXPIRE', opt_ins, kept)
      end
    end
    local value = redis.call('HGET', supp, ARGV[i])
    local covered = covering and redis.call('HEXISTS', covering, ARGV[i]) == 1
    if value then
      local held, dropped = {}, false
      for r, ms in string.gmatch(value, '(%d+):(%d+)') do
        if lifting[r] and (after == nil or tonumber(ms) < after) then
          dropped = true
        else
          held[#held + 1] = r .. ':' .. ms
        end
      end
      if dropped and #held == 0 then
        redis.call('HDEL', supp, ARGV[i])
        if covered then still = still + 1 else lifted = lifted + 1 end
      else
        if dropped then
          redis.call('HSET', supp, ARGV[i], table.concat(held, ','))
        end
        still = still + 1
      end
    elseif covered then
      still = still + 1
    end
  end
  g = last + 1
end
return {lifted, still}
"""

# IDs per script call when writing many: a receipt's opt-outs in a few round trips, none holding Redis long.
MANY_PER_CALL = 5000


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
    reasons: tuple[tuple[int, int], ...]  # (reason, created ms), oldest first

    @property
    def reason(self) -> int:
        return self.reasons[0][0] if self.reasons else 0

    @property
    def created_at_ms(self) -> int:
        return self.reasons[0][1] if self.reasons else 0


@dataclass(frozen=True)
class Changed:
    """What a suppress or lift call did: IDs whose state changed, IDs suppressed before and after, and
    IDs an opt-out left alone because their customer opted in again after it was made."""

    changed: int
    held: int
    opted_in_later: int = 0


def held_reasons(value: str) -> tuple[tuple[int, int], ...]:
    """The (reason, ms) pairs of a stored value, oldest first."""
    pairs = []
    for part in value.split(","):
        reason, _, created = part.partition(":")
        if reason.isdigit():
            pairs.append((int(reason), int(created) if created.isdigit() else 0))
    return tuple(pairs)


@dataclass(frozen=True)
class OptOut:
    """One ID for `SuppressionStore.suppress_many`, with what `suppress` is given for it."""

    family: str
    topic: str
    anonymous_id: str
    reason: int
    at_ms: int | None = None
    after_opt_ins: bool = False


@dataclass(frozen=True)
class OptIn:
    """One ID for `SuppressionStore.lift_many`, with what `lift` is given for it."""

    family: str
    topic: str
    anonymous_id: str
    reasons: tuple[int, ...]
    sent_after_ms: int | None = None
    keep_opt_in: bool = False


def _runs(items: Iterable[Any], shared: Callable[[Any], tuple]) -> list[tuple[tuple, list[str]]]:
    """Consecutive items sharing `shared`: (what they share, their IDs without repeats)."""
    runs: list[tuple[tuple, dict[str, None]]] = []
    for item in items:
        key = shared(item)
        if not runs or runs[-1][0] != key:
            runs.append((key, {}))
        runs[-1][1][item.anonymous_id] = None
    return [(key, list(ids)) for key, ids in runs]


def _reasons(reasons: Iterable[int]) -> tuple[str, ...]:
    return tuple(sorted({str(int(r)) for r in reasons}))


class _Calls:
    """Script calls of groups (see the scripts): KEYS shared by a call's groups, ARGV the groups in order."""

    def __init__(self) -> None:
        self._calls: list[tuple[list[str], list[str]]] = []
        self._ids = MANY_PER_CALL

    def room(self, ids: list[str]) -> Iterator[list[str]]:
        """`ids` in chunks that fit, each for the current call (a new one once it is full)."""
        while ids:
            if self._ids >= MANY_PER_CALL:
                self._calls.append(([], []))
                self._ids = 0
            chunk, ids = ids[: MANY_PER_CALL - self._ids], ids[MANY_PER_CALL - self._ids :]
            yield chunk

    def positions(self, *keys: str | None) -> list[str]:
        """Each key's position in the current call's KEYS (added when new), "0" for none."""
        known = self._calls[-1][0]
        found = []
        for key in keys:
            if key is None:
                found.append("0")
                continue
            if key not in known:
                known.append(key)
            found.append(str(known.index(key) + 1))
        return found

    def add(self, group: list[str], ids: int) -> None:
        self._calls[-1][1].extend(group)
        self._ids += ids

    def done(self) -> list[tuple[list[str], list[str]]]:
        return self._calls


class SuppressionStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._suppress = redis.register_script(_SUPPRESS_SCRIPT)
        self._lift = redis.register_script(_LIFT_SCRIPT)

    @staticmethod
    def key(workspace_id: str, family: str, topic: str = "") -> str:
        return workspace_key(workspace_id, "supp", family, topic or ALL_TOPICS)

    @staticmethod
    def opt_in_key(workspace_id: str, family: str, topic: str = "") -> str:
        return workspace_key(workspace_id, "optin", family, topic or ALL_TOPICS)

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
        after_opt_ins: bool = False,
    ) -> Changed:
        """Suppresses each ID for `reason`, beside any other reason it is held for; a reason already
        held keeps its first time. With `at_ms` (an inbound STOP: when it was sent), as of then, and a
        STOP held from earlier takes the later time, so that only a START sent after the last STOP
        lifts it. With `after_opt_ins` too, an ID whose customer opted in again after `at_ms`
        (a `lift` that kept its opt-in) is left alone: an opt-out delivered after a later opt-in.
        `changed` counts the IDs newly suppressed, `held` those suppressed before (for a topic, those
        an every-topic suppression held too), `opted_in_later` those left alone."""
        return await self.suppress_many(
            workspace_id, (OptOut(family, topic, i, reason, at_ms, after_opt_ins) for i in anonymous_ids)
        )

    async def suppress_many(self, workspace_id: str, opt_outs: Iterable[OptOut]) -> Changed:
        """`suppress` for each opt-out, in order, in as few round trips as `MANY_PER_CALL` allows: a run
        of opt-outs sharing family, topic, reason and time is one `suppress` of their IDs (each counted
        once), and runs follow one another as separate calls would. The totals of those calls."""
        now = int(time.time() * 1000)
        calls = _Calls()
        for (family, topic, reason, at_ms, after_opt_ins), ids in _runs(
            opt_outs, lambda o: (o.family, o.topic, int(o.reason), o.at_ms, o.after_opt_ins)
        ):
            opt_ins = after_opt_ins and at_ms is not None
            at = str(int(at_ms) if at_ms is not None else now)
            as_of = "1" if at_ms is not None else "0"
            for chunk in calls.room(ids):
                keys = calls.positions(
                    self.key(workspace_id, family, topic),
                    self.key(workspace_id, family) if topic else None,
                    self.opt_in_key(workspace_id, family, topic) if opt_ins else None,
                )
                calls.add([*keys, str(reason), at, as_of, str(len(chunk)), *chunk], len(chunk))
        added = before = left = 0
        for keys, args in calls.done():
            done = await self._suppress(keys=keys, args=args)
            added, before, left = added + int(done[0]), before + int(done[1]), left + int(done[2])
        return Changed(added, before, left)

    async def lift(
        self,
        workspace_id: str,
        family: str,
        topic: str,
        anonymous_ids: Iterable[str],
        reasons: Iterable[int],
        sent_after_ms: int | None = None,
        keep_opt_in: bool = False,
    ) -> Changed:
        """Drops `reasons` from each ID's suppression (a START drops a STOP's, not the brand's own);
        given `sent_after_ms`, only reasons held since before it (a START sent before the STOP,
        delivered after it, undoes nothing), and with `keep_opt_in`, that time is kept as the
        customer's opt-in, for a `suppress(after_opt_ins=True)` of an opt-out made before it and
        delivered after it. `changed` counts the IDs no longer suppressed, `held` those still
        suppressed for another reason, or, for a topic, by an every-topic suppression (lifting a
        topic's hold sends nothing of it to a customer who left every topic)."""
        lifting = tuple(reasons)
        return await self.lift_many(
            workspace_id, (OptIn(family, topic, i, lifting, sent_after_ms, keep_opt_in) for i in anonymous_ids)
        )

    async def lift_many(self, workspace_id: str, opt_ins: Iterable[OptIn]) -> Changed:
        """`lift` for each opt-in, in order, in as few round trips as `MANY_PER_CALL` allows, as
        `suppress_many` does. The totals of those calls."""
        calls = _Calls()
        for (family, topic, lifting, sent_after_ms, keep_opt_in), ids in _runs(
            opt_ins, lambda o: (o.family, o.topic, _reasons(o.reasons), o.sent_after_ms, o.keep_opt_in)
        ):
            if not lifting:
                continue
            kept = keep_opt_in and sent_after_ms is not None
            after = str(sent_after_ms) if sent_after_ms is not None else ""
            for chunk in calls.room(ids):
                keys = calls.positions(
                    self.key(workspace_id, family, topic),
                    self.key(workspace_id, family) if topic else None,
                    self.opt_in_key(workspace_id, family, topic) if kept else None,
                )
                kept_ms = str(OPT_IN_KEPT_MS if kept else 0)
                calls.add([*keys, after, kept_ms, str(len(lifting)), *lifting, str(len(chunk)), *chunk], len(chunk))
        lifted = still = 0
        for keys, args in calls.done():
            done = await self._lift(keys=keys, args=args)
            lifted, still = lifted + int(done[0]), still + int(done[1])
        return Changed(lifted, still)

    async def page(
        self, workspace_id: str, family: str, topic: str, cursor: int, after: str, count: int
    ) -> tuple[list[SuppressionEntry], int, str]:
        """Up to `count` entries of one HSCAN step at `cursor`, in ID order past `after`, and where the
        next page starts: (cursor, after ID), (0, "") when done. Redis answers a small hash whole in one
        step whatever COUNT asks; such a step is paged by ID, so an entry present throughout is listed
        even when others are lifted between pages. A large hash's step runs past COUNT by the entries of
        its last bucket: it is asked again with a smaller COUNT until it fits, since the same step asked
        again after lifts would reach further buckets, whose entries a page by ID would skip for good.
        Only a bucket holding more entries than `count` is paged by ID (asked again with COUNT 1)."""
        key = self.key(workspace_id, family, topic)
        scan_count = 1 if cursor and after else count
        while True:
            next_cursor, fields = await self.redis.hscan(key, cursor, count=scan_count)
            whole = cursor == 0 and int(next_cursor) == 0
            if len(fields) <= count or whole or scan_count == 1:
                break
            scan_count = max(1, scan_count - (len(fields) - count))
        step = sorted((raw_id.decode(), raw_value.decode()) for raw_id, raw_value in fields.items())
        if after:
            step = [entry for entry in step if entry[0] > after]
        entries = [
            SuppressionEntry(anonymous_id, family, topic, held_reasons(value)) for anonymous_id, value in step[:count]
        ]
        if len(step) > count:
            return entries, cursor, entries[-1].anonymous_id
        return entries, int(next_cursor), ""
