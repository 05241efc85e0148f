"""Requests per second shared by every process that calls the same peer, on Redis' clock.

A key holds the time its next free slot starts (the theoretical arrival time); a reservation
of `n` slots moves it `n` intervals on and tells the caller how long to wait before its first.
One script does both, so processes never hand out the same slot, and the clock is Redis',
so processes whose clocks differ still space their requests. The dispatcher keeps its
connectors to their messages per second this way, the resolver PII and content APIs to
their requests per second.
"""

from __future__ import annotations

import redis.asyncio as aioredis

# Reserve ARGV[2] slots ARGV[1] microseconds apart; returns {the wait before the first, 1}. With
# ARGV[3], a first slot more than ARGV[3] microseconds away is not reserved: {the wait, 0}.
_RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - now
if ARGV[3] and wait > tonumber(ARGV[3]) then
  return {wait, 0}
end
tat = tat + n * interval
redis.call('SET', KEYS[1], tat, 'PX', math.floor((tat - now) / 1000) + 1000)
return {wait, 1}
"""


class RateLimiter:
    """Slots at `per_second` per key. Raises the store's errors when Redis is down: callers answer as
    they do for any other read of shared state (UNAVAILABLE)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(_RATE_SCRIPT)

    async def reserve(self, key: str, per_second: int, slots: int) -> tuple[float, float]:
        """Reserves `slots` slots, however far off: (seconds to wait before the first, seconds between slots)."""
        wait, interval, _ = await self._reserve(key, per_second, [slots])
        return wait, interval

    async def reserve_within(self, key: str, per_second: int, within: float) -> float | None:
        """Reserves one slot that starts within `within` seconds: the seconds to wait for it; None when
        there is none that soon, and nothing is reserved: a slot a caller could not use in time would
        only delay the callers after it."""
        wait, _, reserved = await self._reserve(key, per_second, [1, max(0, int(within * 1_000_000))])
        return wait if reserved else None

    async def next_slot_in(self, key: str, per_second: int) -> float:
        """Seconds until the next free slot starts; reserves nothing (a first slot more than -1 µs away
        is never taken)."""
        wait, _, _ = await self._reserve(key, per_second, [0, -1])
        return wait

    async def _reserve(self, key: str, per_second: int, args: list[int]) -> tuple[float, float, bool]:
        interval_us = 1_000_000 // per_second
        wait_us, reserved = await self._script(keys=[key], args=[interval_us, *args])
        return int(wait_us) / 1_000_000, interval_us / 1_000_000, bool(int(reserved))
