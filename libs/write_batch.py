"""Many small writes of one workspace, sent as one script call.

A pipeline costs the client a command to pack and a reply to parse per write;
settling a batch of messages (claims, provider IDs, blind index, unsubscribe
links, archive) is thousands of writes a second, and that packing was the
dispatcher's largest CPU cost. A WriteBatch queues the same writes and runs
them as one Lua script call per few thousand.

All keys of one batch belong to one workspace (its `{workspace}` hash tag), so
the script is valid on Redis Cluster. Like a pipeline without MULTI it is not a
transaction: when a call fails part way, the writes before it stay done.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from operator import attrgetter
from typing import Protocol

import redis.asyncio as aioredis

Value = str | bytes | int

# ARGV[1] is "" or the TTL of a once-marker, KEYS[1] then (see `BatchWriter.execute`); then one op per
# key, in KEYS order, each with its code and arguments, but for a run of SETs ('X'), one op for its keys.
_SCRIPT = """
local unpack = unpack or table.unpack
local first = 1
if ARGV[1] ~= '' then
  -- A marker already there means this call ran, whole (a script runs alone): sent again after its
  -- reply was lost, it writes nothing, or it would undo what came since (a released claim retaken).
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
  first = 2
end
local a, i = 2, first
while i <= #KEYS do
  local key, op = KEYS[i], ARGV[a]
  if op == 'x' then
    redis.call('SET', key, ARGV[a + 1], 'EX', ARGV[a + 2])
    a = a + 3
  elseif op == 'X' then
    -- A run of SETs with one expiry: this key and the next n - 1, each given its value alone.
    local n, ex = tonumber(ARGV[a + 1]), ARGV[a + 2]
    for j = 0, n - 1 do
      redis.call('SET', KEYS[i + j], ARGV[a + 3 + j], 'EX', ex)
    end
    i = i + n - 1
    a = a + 3 + n
  elseif op == 's' then
    redis.call('SET', key, ARGV[a + 1])
    a = a + 2
  elseif op == 'd' then
    redis.call('DEL', key)
    a = a + 1
  elseif op == 'c' then
    -- Deleted only while it holds the value given: one rewritten since (a claim another run took) stays.
    if redis.call('GET', key) == ARGV[a + 1] then redis.call('DEL', key) end
    a = a + 2
  elseif op == 'z' then
    redis.call('ZREM', key, ARGV[a + 1])
    a = a + 2
  elseif op == 'f' then
    redis.call('HDEL', key, ARGV[a + 1])
    a = a + 2
  elseif op == 'Z' then
    redis.call('ZREM', key, ARGV[a + 1])
    if redis.call('ZCARD', key) == 1 and redis.call('ZSCORE', key, ARGV[a + 2]) then redis.call('DEL', key) end
    a = a + 3
  elseif op == 'h' then
    local n = tonumber(ARGV[a + 1])
    redis.call('HSET', key, unpack(ARGV, a + 2, a + 1 + 2 * n))
    a = a + 2 + 2 * n
  elseif op == 'e' then
    redis.call('EXPIRE', key, ARGV[a + 1])
    a = a + 2
  elseif op == 'i' then
    redis.call('HINCRBY', key, ARGV[a + 1], ARGV[a + 2])
    a = a + 3
  else
    return redis.error_reply('write batch: unknown op at ' .. a)
  end
  i = i + 1
end
return #KEYS
"""
# Redis runs a script alone: a few thousand writes keep each call near a millisecond.
WRITES_PER_CALL = 2000
# Fields per HSET the script unpacks: Lua's unpack stops at about 8,000 values.
FIELDS_PER_HSET = 1000
# Keys per run of SETs (`WriteBatch.set_all`): a call is never cut inside one, so it may hold this many more writes.
KEYS_PER_RUN = 500
_IN_RUN = -1  # `WriteBatch.starts` of a key inside a run, after its first: no call begins there
# How long a once-marker outlives the last time its writes may be sent again.
ONCE_MARKER_TTL_SECONDS = 600
# A group's map record outlives its entries by this much, so an entry that exists always finds it.
BATCH_RECORD_MARGIN_SECONDS = 3600


def new_batch_id() -> str:
    return uuid.uuid4().hex


def _pairs(mapping: Mapping[str, Value]) -> Iterator[Value]:
    """field, value, field, value...: how HSET and the script take a mapping."""
    return chain.from_iterable(mapping.items())


def common_fields(items: Sequence[object], names: Sequence[str], unique: str) -> list[str]:
    """The attributes among `names` that every item has alike (never `unique`): what the hashes of
    a batch or a group can keep once, in a shared record."""
    alike = []
    for name in names:
        if name != unique:
            values = list(map(attrgetter(name), items))
            if values.count(values[0]) == len(values):  # compared in C, item by item
                alike.append(name)
    return alike


class QueuedWrites(Protocol):
    """What both a redis-py pipeline and a WriteBatch accept, so helpers can queue on either."""

    def set(self, name: str, value: Value, ex: int | None = None) -> object: ...
    def delete(self, *names: str) -> object: ...
    def zrem(self, name: str, *values: Value) -> object: ...
    def hdel(self, name: str, *keys: str) -> object: ...
    def hset(self, name: str, *, mapping: Mapping[str, Value]) -> object: ...
    def expire(self, name: str, time: int) -> object: ...
    def hincrby(self, name: str, key: str, amount: int = 1) -> object: ...


class WriteBatch:
    """Queued writes; `BatchWriter.execute` sends them."""

    __slots__ = ("keys", "args", "starts")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list[Value] = []
        self.starts: list[int] = []  # where each key's op's arguments begin, to cut calls at op boundaries

    def __len__(self) -> int:
        return len(self.keys)

    def _op(self, key: str, *args: Value) -> None:
        self.keys.append(key)
        self.starts.append(len(self.args))
        self.args.extend(args)

    def set(self, name: str, value: Value, ex: int | None = None) -> None:
        # `_op` inline: a batch's settle queues a SET for every message it sent.
        if ex is not None and ex < 1:
            raise ValueError("a write's expiry must be at least 1 second")
        self.keys.append(name)
        self.starts.append(len(self.args))
        self.args += ("s", value) if ex is None else ("x", value, ex)

    def set_all(self, names: Sequence[str], values: Sequence[Value], ex: int) -> None:
        """SET each name to its value, all with one expiry: each key's value its only argument (a
        batch's settled claims: two arguments a claim, where `set` takes four)."""
        if ex < 1:
            raise ValueError("a write's expiry must be at least 1 second")
        for first in range(0, len(names), KEYS_PER_RUN):
            run = names[first : first + KEYS_PER_RUN]
            self.starts.append(len(self.args))
            self.starts += [_IN_RUN] * (len(run) - 1)
            self.keys += run
            self.args += ("X", len(run), ex)
            self.args += values[first : first + KEYS_PER_RUN]

    def delete(self, *names: str) -> None:
        for name in names:
            self._op(name, "d")

    def delete_if(self, name: str, value: str) -> None:
        """DEL, only while the key holds `value`: what a writer may delete only while it is still its own."""
        self._op(name, "c", value)

    def zrem(self, name: str, *values: Value) -> None:
        for value in values:
            self._op(name, "z", value)

    def hdel(self, name: str, *keys: str) -> None:
        for key in keys:
            self._op(name, "f", key)

    def zrem_with_bookkeeping(self, name: str, value: Value, bookkeeping: Value) -> None:
        """ZREM, and the whole set when `bookkeeping` (a member that says how the set is kept, not
        an item of it) is all that is left."""
        self._op(name, "Z", value, bookkeeping)

    def hset(self, name: str, *, mapping: Mapping[str, Value]) -> None:
        """HSET, as several when the mapping is larger than the script can unpack in one."""
        if len(mapping) <= FIELDS_PER_HSET:
            if mapping:
                self._op(name, "h", len(mapping), *_pairs(mapping))
            return
        items = list(mapping.items())
        for first in range(0, len(items), FIELDS_PER_HSET):
            part = items[first : first + FIELDS_PER_HSET]
            self._op(name, "h", len(part), *chain.from_iterable(part))

    def expire(self, name: str, time: int) -> None:
        self._op(name, "e", time)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self._op(name, "i", key, amount)


class BatchWriter:
    def __init__(
        self, redis: aioredis.Redis, writes_per_call: int = WRITES_PER_CALL, retried_for_seconds: int = 0
    ) -> None:
        """`retried_for_seconds`: how long after a first try the same writes may still be sent again;
        their once-markers outlive it."""
        self._script = redis.register_script(_SCRIPT)
        self._per_call = max(1, writes_per_call)
        self._marker_ttl = str(retried_for_seconds + ONCE_MARKER_TTL_SECONDS)

    async def execute(self, batch: WriteBatch, once: str = "") -> None:
        """Sends the queued writes, in order; raises what Redis raised.

        With `once` (a key of the batch's workspace, unique to these writes), the writes may be sent
        again after an error that leaves unknown whether a call ran (its reply lost): a call whose
        marker, `<once>:<n>`, says it ran writes nothing the second time, its increments included."""
        keys, args, starts, step = batch.keys, batch.args, batch.starts, self._per_call
        header = [self._marker_ttl if once else ""]
        first, n = 0, 0
        while first < len(keys):
            last = min(first + step, len(keys))
            while last < len(keys) and starts[last] == _IN_RUN:  # a run of SETs goes whole
                last += 1
            end = starts[last] if last < len(keys) else len(args)
            marker = [f"{once}:{n}"] if once else []
            await self._script(keys=marker + keys[first:last], args=header + args[starts[first] : end])
            first, n = last, n + 1
