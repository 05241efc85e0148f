"""Redis access: the client factory and the key layout every service shares.

Keys are `ts:{<workspace>}:<kind>:...`; the braces are a Redis Cluster hash tag,
so everything of one workspace lives in one slot and multi-key commands work.
Workspace IDs are validated before they reach a key. The parts after it are
joined by ':', which IDs may hold too: a part's ':' and '%' are escaped
(`%3A`, `%25`), so that two IDs never make one key (campaign `a:i:b`'s counters
were instance `b:all`'s of campaign `a`; OAuth config `x:status` was config `x`'s
status hash).
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import cache

import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.errors import require
from libs.ids import ID_RULE, is_id
from libs.settings import CommonSettings
from libs.telemetry import Telemetry, instrument_redis

log = logging.getLogger(__name__)
# A pooled connection idle this long is pinged before its next command (redis-py's health check).
IDLE_CHECK_SECONDS = 1

PREFIX = "ts"


class WritesRefused(ResponseError):
    """Redis refuses writes for now: fewer replicas keep up than `min-replicas-to-write` asks (NOREPLICAS), or
    its last snapshot failed under `stop-writes-on-bgsave-error` (MISCONF: a full disk, say)."""


class StoreBusy(ResponseError):
    """BUSY: a script or function has run past `busy-reply-threshold`; Redis answers nothing else until it ends."""


class RoleChanged(ResponseError):
    """UNBLOCKED: a blocking read (an event tail's XREAD) cut off because its master was demoted (a failover)."""


# Error replies redis-py leaves as a bare ResponseError, which every caller took for a fault of ours (INTERNAL,
# 500) where Redis means "not now". Registered with redis-py's parsers (hiredis's and its own share the table);
# only codes it does not name itself.
_NOT_NOW_REPLIES = {"NOREPLICAS": WritesRefused, "MISCONF": WritesRefused, "BUSY": StoreBusy, "UNBLOCKED": RoleChanged}
for _code, _kind in _NOT_NOW_REPLIES.items():
    BaseParser.EXCEPTION_CLASSES.setdefault(_code, _kind)

# Redis unreachable, too slow, full (OOM under noeviction), refusing writes for now (NOREPLICAS, MISCONF),
# busy with a long script (BUSY), demoted to a replica (READONLY, and UNBLOCKED for a blocked read: a
# failover moved the master), or a cluster that is (re)electing, missing slots or moving one: retry later.
# ClusterError covers CLUSTERDOWN and MASTERDOWN, and the client's "TTL exhausted" once redirections
# or TRYAGAIN outlast its retries (a workspace's slot half moved).
STORE_ERRORS = (
    OutOfMemoryError,
    ReadOnlyError,
    WritesRefused,
    StoreBusy,
    RoleChanged,
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
)


def check_id(value: str, field: str) -> str:
    """Workspace, campaign and config IDs: short, printable, safe inside keys."""
    require(bool(value), field, "is required")
    require(is_id(value), field, ID_RULE)
    return value


# Redis's stream IDs and scan cursors are unsigned 64-bit numbers: a larger one is an error from Redis.
MAX_U64 = 2**64 - 1
_STREAM_ID = re.compile(r"^([0-9]{1,20})(?:-([0-9]{1,20}))?\Z")


def parse_stream_id(value: str) -> str:
    """A full stream ID ("1700000000000-0"; "1700000000000" means "-0"), or "" when `value` is not one."""
    match = _STREAM_ID.match(value)
    if not match:
        return ""
    ms, seq = int(match.group(1)), int(match.group(2) or 0)
    return f"{ms}-{seq}" if ms <= MAX_U64 and seq <= MAX_U64 else ""


# The response header of StreamDeliveryEvents naming the position it reads after ("$" resolved: the newest event,
# or on an empty stream an ID just before the store's time; "0-0" for the oldest kept): sent as the stream opens,
# so a client can tell an open, quiet stream from a service not answering and resume a new-only tail without a gap.
EVENTS_AFTER_ID_HEADER = "tokensend-after-id"


def parse_cursor(value: str) -> int | None:
    """A SCAN-family cursor given back by a client, or None when it cannot be one."""
    if not (value.isdigit() and value.isascii() and len(value) <= 20):
        return None
    cursor = int(value)
    return cursor if cursor <= MAX_U64 else None


_KEY_PART_ESCAPES = str.maketrans({"%": "%25", ":": "%3A"})


def key_part(value: str) -> str:
    """`value` as one part of a key, its ':' and '%' escaped (most values hold neither)."""
    return value.translate(_KEY_PART_ESCAPES) if ":" in value or "%" in value else value


def workspace_key(workspace_id: str, *parts: str) -> str:
    if not parts:
        return f"{PREFIX}:{{{workspace_id}}}"
    joined = ":".join(parts)
    if "%" in joined or joined.count(":") >= len(parts):  # a part holds one: escape them all
        joined = ":".join(map(key_part, parts))
    return f"{PREFIX}:{{{workspace_id}}}:" + joined


EMBEDDED_SCHEME = "memory://"
# The embedded store lives in the process by nature: every client of one memory:// URL in this
# process shares its server, so `serve all` (three services, one process) shares one store.
_embedded_servers: dict[str, object] = {}


def create_embedded_store(url: str) -> aioredis.Redis:
    """An in-process store speaking the Redis protocol (fakeredis, with Lua), for a demo or a
    laptop without Redis. Nothing survives the process and nothing is shared with others."""
    import fakeredis

    server = _embedded_servers.setdefault(url, fakeredis.FakeServer())
    return fakeredis.FakeAsyncRedis(server=server)


def create_redis(url: str, max_connections: int = 256, *, cluster: bool = False) -> aioredis.Redis:
    """A pooled client that fails fast when Redis is down (callers answer UNAVAILABLE) and,
    under load, waits for a free connection instead of failing. `memory://NAME` is the embedded
    in-process store instead.

    With `cluster` (TOKENSEND_REDIS_CLUSTER), `url` names any node of a Redis Cluster and the
    client routes each command by its key's slot. Every key of a workspace carries the
    `{workspace}` hash tag, so a batch's pipelines and Lua scripts stay in one slot.
    """
    if url.startswith(EMBEDDED_SCHEME):
        return create_embedded_store(url)
    if cluster:
        client = RedisCluster.from_url(
            url,
            max_connections=max_connections,  # per node
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=IDLE_CHECK_SECONDS,
        )
        cluster_packing(client)
        return client
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=IDLE_CHECK_SECONDS,
    )
    pool.connection_class = hiredis_packing(pool.connection_class)
    # The client owns its pool: `aclose()` then disconnects the pool's connections too, where a client
    # given a pool leaves them open (sockets left behind at every stop, a failed start's included).
    return aioredis.Redis.from_pool(pool)


_PACKED_BY_HIREDIS = frozenset((str, bytes, int))


class _ReconnectsWhenStale:
    """A connection whose idle check reconnects once when the ping fails, so the command goes out on a
    live connection: after Redis restarted, each connection left in the pool failed one call
    (UNAVAILABLE) while health said SERVING. Commands themselves are never retried here: one that
    reached Redis may have run."""

    async def check_health(self) -> None:
        if not self.health_check_interval or asyncio.get_running_loop().time() <= self.next_health_check:  # type: ignore[attr-defined]
            return
        try:
            await self._send_ping()  # type: ignore[attr-defined]
        except (ConnectionError, TimeoutError, OSError, RedisConnectionError, RedisTimeoutError):
            await self.disconnect()  # type: ignore[attr-defined]
            await self.connect_check_health(check_health=False)  # type: ignore[attr-defined]
            await self._send_ping()  # type: ignore[attr-defined]


class _LeavesAReplica:
    """A connection that finds it writes to a replica closes, so that the next command connects anew:
    after a failover the URL's name points at the new master, but a connection kept to the demoted
    one would fail every write (READONLY) until the process restarted. A blocked read the demotion
    cut off (UNBLOCKED) was on such a connection too."""

    async def read_response(self, *args: object, **kwargs: object) -> object:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except (ReadOnlyError, RoleChanged):
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise


class _DeliversCancellation:
    """A cancellation that comes in as a command is written reaches the caller. redis-py writes under
    `asyncio.wait_for`, which on Python 3.11 returns the result of a write that had finished as the
    cancellation came and drops the cancellation (fixed in 3.12). Of 1,500 cancellations, the 208 that
    landed on a write were all lost; a batch whose claim keeper so never stopped hung its stream."""

    async def send_packed_command(self, command: object, check_health: bool = True) -> None:
        task = asyncio.current_task()
        asked = task.cancelling() if task is not None else 0
        await super().send_packed_command(command, check_health)  # type: ignore[misc]
        if task is not None and task.cancelling() > asked:
            # The command went out but its reply will not be read: the connection goes, as redis-py's
            # own cancellation of a write leaves it.
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise asyncio.CancelledError


class _HiredisPacking:
    """Commands packed by hiredis, in C. redis-py's asyncio connections pack every argument in
    Python, which was a tenth of the dispatcher's CPU (its batch scripts carry thousands)."""

    def pack_command(self, *args: object) -> list[bytes]:
        name = args[0].decode(errors="replace") if isinstance(args[0], bytes) else str(args[0])
        if " " in name or not _PACKED_BY_HIREDIS.issuperset(map(type, args)):
            # Multi-word command names, floats and anything odd keep redis-py's own rules and errors.
            return super().pack_command(*args)  # type: ignore[misc]
        return [hiredis.pack_command(args)]


@cache
def hiredis_packing(connection_class: type) -> type:
    """`connection_class` (TCP, TLS or Unix socket, as the URL chose) packing with hiredis,
    reconnecting once when a connection left idle turns out stale, leaving a demoted master, and never
    dropping a cancellation."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(
        f"Hiredis{connection_class.__name__}",
        (_HiredisPacking, _ReconnectsWhenStale, _LeavesAReplica, _DeliversCancellation, connection_class),
        {},
    )


def cluster_packing(client: RedisCluster) -> None:
    """Every node of a cluster client, known now or found later, packs commands with hiredis.

    The cluster client takes no connection class of ours: its node manager builds each node from
    its own connection settings, so the class goes there, and onto the start-up nodes it made
    before any connection was opened."""
    settings = client.nodes_manager.connection_kwargs
    settings["connection_class"] = hiredis_packing(settings.get("connection_class", aioredis.Connection))
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = hiredis_packing(node.connection_class)


def service_store(settings: CommonSettings, telemetry: Telemetry | None = None) -> aioredis.Redis:
    """A service's Redis client from its settings, traced when telemetry is on. It connects on its first
    command: `prepare_store` then checks that Redis is what the settings say."""
    client = create_redis(settings.redis_url, cluster=settings.redis_cluster)
    instrument_redis(client, telemetry)
    return client


# While no node of a cluster answers at start, the first tries come soon, then one every 10 s.
CLUSTER_RETRY_FIRST_SECONDS = 0.5
CLUSTER_RETRY_MAX_SECONDS = 10.0


class StoreMisconfigured(RuntimeError):
    """The Redis the settings name is not what they say it is: the service cannot start."""


NOT_A_CLUSTER = (
    "TOKENSEND_REDIS_CLUSTER is set, but the Redis at TOKENSEND_REDIS_URL is not in cluster "
    "mode: unset TOKENSEND_REDIS_CLUSTER, or name a node of the cluster"
)
# The start-up check's wait to connect to the node named, and then for its answer; a node that does
# not answer in time is left to `learn_cluster`.
CLUSTER_MODE_CHECK_SECONDS = 1.0


async def check_cluster_mode(url: str) -> None:
    """StoreMisconfigured when the Redis at `url` answers that it is not in cluster mode (INFO cluster).

    Runs once, at start, on the event loop (which may already serve another service: `serve all`), and
    waits twice CLUSTER_MODE_CHECK_SECONDS at most. A node that is down, slow or refuses INFO passes
    here; `learn_cluster` then waits for the cluster as ever.
    """
    node = aioredis.Redis.from_url(
        url,
        socket_connect_timeout=CLUSTER_MODE_CHECK_SECONDS,
        socket_timeout=CLUSTER_MODE_CHECK_SECONDS,
        retry=Retry(NoBackoff(), 0),  # one try: a node that does not answer is the cluster's wait to make
    )
    try:
        async with asyncio.timeout(2 * CLUSTER_MODE_CHECK_SECONDS):
            enabled = (await node.info("cluster")).get("cluster_enabled")
    except (redis.RedisError, OSError):  # TimeoutError among them
        return
    finally:
        await node.aclose()
    if enabled == 0:
        raise StoreMisconfigured(NOT_A_CLUSTER)


async def prepare_store(client: aioredis.Redis, url: str = "") -> None:
    """Learns a cluster's topology before serving (a cluster client that initialises under the first
    burst of requests can close connections other requests are still opening: a redis-py race), and
    warns when Redis would drop keys to make room. With `url`, the one the client was made from, a
    cluster client's node is first asked whether it is in cluster mode (`check_cluster_mode`)."""
    if isinstance(client, RedisCluster):
        if url:
            await check_cluster_mode(url)
        await learn_cluster(client)
    risk = await eviction_risk(client)
    if risk:
        log.warning(
            "Redis may evict keys when full (%s): claims, suppressions and the message map would be lost "
            "without an error; set maxmemory-policy noeviction (writes then fail and calls answer UNAVAILABLE)",
            risk,
        )


async def learn_cluster(client: RedisCluster) -> None:
    """Reads the cluster's slot map, waiting for it while no node answers (the cluster may be starting
    beside the service): the service does not serve before it knows where each workspace lives. A
    node that is not in cluster mode is a setting to fix, not a wait: StoreMisconfigured."""
    delay = CLUSTER_RETRY_FIRST_SECONDS
    while True:
        try:
            await client.initialize()
            return
        except RedisClusterException as exc:
            if "Cluster mode is not enabled" in str(exc):
                raise StoreMisconfigured(NOT_A_CLUSTER) from None
            reason = "no node answers"
        except STORE_ERRORS as exc:
            reason = type(exc).__name__
        nodes = ", ".join(f"{n.host}:{n.port}" for n in client.nodes_manager.startup_nodes.values())
        log.warning("Redis Cluster at %s: %s; not serving yet, trying again in %.1fs", nodes, reason, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, CLUSTER_RETRY_MAX_SECONDS)


class ClusterNotServing(ClusterError):
    """No node of the cluster answers that it serves every slot."""


async def check_cluster_serves(client: RedisCluster) -> None:
    """Returns once a node answers that the cluster serves every slot (`cluster_state:ok`), else raises.
    A PING reaches one node only: it answered while a master with no replica to take over was down,
    its slots unserved, and Redis refusing every command (cluster-require-full-coverage, the default)."""
    asked = [asyncio.ensure_future(client.cluster_info(target_nodes=node)) for node in client.get_nodes()]
    try:
        for answer in asyncio.as_completed(asked):
            try:
                info = await answer
            except Exception:  # noqa: BLE001 - a node down: another may still answer
                continue
            if isinstance(info, dict) and info.get("cluster_state") == "ok":
                return
    finally:
        for call in asked:
            call.cancel()
        await asyncio.gather(*asked, return_exceptions=True)
    raise ClusterNotServing("no node of the cluster says it serves every slot")


async def eviction_risk(client: aioredis.Redis) -> str:
    """How Redis would drop keys when full ("maxmemory-policy allkeys-lru, maxmemory 100 MiB"),
    or "" when it would refuse writes instead (noeviction, or no limit) or does not say: managed
    services often refuse CONFIG, and the embedded store has none."""
    try:
        if isinstance(client, RedisCluster):
            replies = list((await client.config_get("maxmemory*", target_nodes=RedisCluster.PRIMARIES)).values())
        else:
            replies = [await client.config_get("maxmemory*")]
    except Exception:  # noqa: BLE001 - a check that cannot run must not stop the service
        return ""
    risks = set()
    for reply in replies:
        values = {_text(k): _text(v) for k, v in reply.items()} if isinstance(reply, dict) else {}
        policy, limit = values.get("maxmemory-policy", "noeviction"), values.get("maxmemory", "0")
        if policy != "noeviction" and limit != "0":  # without a limit Redis never evicts
            risks.add(f"maxmemory-policy {policy}, maxmemory {_memory_size(limit)}")
    return "; ".join(sorted(risks))


def _memory_size(limit: str) -> str:
    """A byte count in the largest binary unit it fills: logs scrub runs of seven digits or more as
    phone numbers, so "104857600 bytes" would reach the operator as "[phone] bytes"."""
    try:
        size = int(limit)
    except ValueError:
        return limit
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{round(size / scale, 1):g} {unit}"
    return f"{size} bytes"


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
