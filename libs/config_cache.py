"""Configs read on every call, kept in the process until a save says they changed.

A `Dispatch` reads its connector and a `ResolveContacts` its PII API and OAuth configs: a Redis
round trip, a decryption and a parse each time for values that change a few times a day. Each
save publishes what it changed (the config's key, or a versioned config's base) on `CHANNEL`, in
the same script as the write, and every process subscribed forgets that topic.

The cache is used only while the subscription is confirmed. Before it, from the moment the
subscriber's connection fails and until a new subscription is confirmed, every read goes to
Redis and nothing is kept, so a message missed while disconnected cannot leave an old config
behind. A read that was in flight when any change was announced is not kept either (it may have
been answered before the write). Whatever happens, an entry is read again after `max_age_seconds`.

Keys, config IDs and version numbers only: nothing fetched from a PII API passes through here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from libs.tasks import stop_task

log = logging.getLogger(__name__)

CHANNEL = "ts:configs:changed"
MISSING: Any = object()
TOPICS_KEPT = 1024
# Entries kept per topic: a campaign instance pins a config version of its own, so a topic can gather
# one per instance. Past this, the expired go first, then the oldest.
ENTRIES_PER_TOPIC = 1024
LISTEN_SECONDS = 1.0  # a quiet subscription is PINGed after this long...
SILENCE_SECONDS = 5.0  # ...and given up after this long without a word (a half-open connection)
RETRY_SECONDS = (0.1, 5.0)  # re-subscription backoff: first and longest delay


class ConfigCache:
    """Values by topic (a Redis key or a versioned config's base) and name within it."""

    def __init__(
        self,
        redis: aioredis.Redis,
        max_age_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._max_age = max_age_seconds
        self._clock = clock
        self._topics: OrderedDict[str, dict[Hashable, tuple[Any, float]]] = OrderedDict()
        self._generation = 0
        self._live = False
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def off(cls, redis: aioredis.Redis) -> ConfigCache:
        """One that never keeps anything: every read goes to Redis."""
        return cls(redis, 0)

    @property
    def enabled(self) -> bool:
        return self._max_age > 0

    @property
    def live(self) -> bool:
        return self._live

    # -- reads ---------------------------------------------------------------------------------

    def get(self, topic: str, name: Hashable) -> Any:
        """The kept value, or MISSING (nothing kept, too old, or not subscribed)."""
        if not self._live:
            return MISSING
        entry = self._topics.get(topic, {}).get(name)
        if entry is None or entry[1] <= self._clock():
            return MISSING
        return entry[0]

    def mark(self) -> int | None:
        """Taken before reading Redis and handed to `put`: None when the read may not be kept."""
        return self._generation if self._live else None

    def put(self, topic: str, name: Hashable, value: Any, mark: int | None, expires_at: float | None = None) -> None:
        """Keeps what a read found, unless a change was announced (or the subscription lost) since
        `mark`; `expires_at` (monotonic) shortens the life of an entry that ends sooner."""
        if mark is None or mark != self._generation or not self._live:
            return
        deadline = self._clock() + self._max_age
        entries = self._topics.get(topic)
        if entries is None:
            entries = self._topics[topic] = {}
            while len(self._topics) > TOPICS_KEPT:
                self._topics.popitem(last=False)
        else:
            self._topics.move_to_end(topic)
            if name not in entries and len(entries) >= ENTRIES_PER_TOPIC:
                now = self._clock()
                for stale in [key for key, (_, until) in entries.items() if until <= now]:
                    del entries[stale]
                while len(entries) >= ENTRIES_PER_TOPIC:
                    del entries[next(iter(entries))]
        entries[name] = (value, deadline if expires_at is None else min(deadline, expires_at))

    async def read_through(self, topic: str, name: Hashable, read: Callable[[], Awaitable[Any]]) -> Any:
        """The kept value, or `read()`'s, kept when no change was announced meanwhile."""
        value = self.get(topic, name)
        if value is MISSING:
            mark = self.mark()
            value = await read()
            self.put(topic, name, value, mark)
        return value

    def forget(self, topic: str) -> None:
        """What this process just changed itself: read it again at once (others hear it on CHANNEL)."""
        self._generation += 1
        self._topics.pop(topic, None)

    # -- the subscription ----------------------------------------------------------------------

    async def start(self, wait_seconds: float = 2.0) -> None:
        """Subscribes in the background; waits a little for the first confirmation so a service
        starts with its cache on, and serves (reading Redis every time) if it does not come."""
        if not self.enabled or self._task is not None:
            return
        self._task = asyncio.create_task(self._listen(), name="config-cache")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):  # not wait_for, which on 3.11 can drop a cancellation
                await self._subscribed.wait()

    async def close(self) -> None:
        if self._task is not None:
            await stop_task(self._task, "the config-change subscription")
            self._task = None
        self._go_dark()

    def _go_dark(self) -> None:
        self._live = False
        self._generation += 1
        self._topics.clear()

    async def _listen(self) -> None:
        delay = RETRY_SECONDS[0]
        while True:
            client, pubsub = self._subscriber(), None
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(CHANNEL)
                heard = self._clock()
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_SECONDS)
                    now = self._clock()
                    if message is not None:
                        heard = now
                        delay = RETRY_SECONDS[0]
                        self._on_message(message)
                    elif now - heard > SILENCE_SECONDS:
                        raise ConnectionError(f"no word from Redis for {SILENCE_SECONDS:.0f} s")
                    else:
                        await pubsub.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: read Redis every time until back
                if self._live:
                    log.warning(
                        "config changes: subscription lost (%s); configs are read from Redis on every call "
                        "until it is back",
                        type(exc).__name__,
                    )
            finally:
                self._go_dark()
                self._subscribed.clear()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                if client is not self._redis:
                    with contextlib.suppress(Exception):
                        await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_SECONDS[1])

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # A (re)subscription: anything kept from before it may have missed a change.
            self._go_dark()
            self._live = True
            self._subscribed.set()
        elif kind == "message":
            data = message.get("data")
            self.forget(data.decode() if isinstance(data, bytes) else str(data))

    def _subscriber(self) -> aioredis.Redis:
        """A connection of its own that reports a failure at once: the shared pools retry quietly,
        and a quiet reconnection could miss a change without the cache knowing."""
        no_retry = Retry(NoBackoff(), 0)
        if isinstance(self._redis, RedisCluster):
            # A change published on any node reaches every node: subscribe to one, a different
            # one after each failure.
            node = self._redis.get_random_node()
            pool = aioredis.ConnectionPool(
                connection_class=node.connection_class,
                max_connections=2,
                **{**node.connection_kwargs, "host": node.host, "port": node.port, "retry": no_retry},
            )
            return aioredis.Redis(connection_pool=pool)
        pool = getattr(self._redis, "connection_pool", None)
        if not isinstance(pool, aioredis.ConnectionPool) or type(self._redis).__module__.startswith("fakeredis"):
            return self._redis  # the embedded store: nothing to lose
        sub = aioredis.ConnectionPool(
            connection_class=pool.connection_class,
            max_connections=2,
            **{**pool.connection_kwargs, "retry": no_retry},
        )
        return aioredis.Redis(connection_pool=sub)


async def running_cache(existing: ConfigCache | None, redis: aioredis.Redis, max_age_seconds: float) -> ConfigCache:
    """A service's cache: the one its dependencies brought, or a new one; subscribing (once) either way."""
    cache = existing or ConfigCache(redis, max_age_seconds)
    await cache.start()
    return cache
