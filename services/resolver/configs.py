"""Saved PII API and OAuth configs: versioned, sealed at rest, masked on read.

Every save of a PII API config is a new version; old versions are kept (bounded)
so a running campaign instance can keep the version it started with. The whole
config is sealed, so header values, keys and bodies are never in Redis in clear.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from tokensend.common.v1 import common_pb2
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs import config_index
from libs.config_cache import CHANNEL, MISSING, ConfigCache
from libs.config_index import STAMP_UPDATED, IndexBackfill, Layout, index_key, is_id, stale_version, updated_key
from libs.crypto import SealedDataInvalid, SecretBox
from libs.errors import FailedPrecondition, NotFound, require
from libs.masked_secrets import (
    MASK,
    header_secrets,
    masked_repeats,
    quoted_forms,
    restore_masked,
    restore_masked_url,
    secret_query_values,
    shown_query_value,
)
from libs.masked_secrets import masked_url as masked_secret_url
from libs.netguard import origin
from libs.store import key_part, workspace_key
from services.resolver.contacts import channel_family
from services.resolver.requests import SINGLE_PLACEHOLDER

# INCR the version, store the sealed config under it, drop every version that is now out of the window
# unless a campaign instance's pin still holds it (and those whose last pin has ended since), stamp
# the save's time (and index the name, for configs listed by name), and tell every process the
# config changed (ARGV[3]: the channel, ARGV[4]: the config's base, ARGV[5]: its name).
# The versions out of the window are dropped newest first, down to the first one already gone: each
# save leaves none below its window but the pinned ones, so those left are one run of numbers, however
# far TOKENSEND_CONFIG_VERSIONS_KEPT (ARGV[2]) was lowered since; the walk touches only versions stored.
# After a deletion, versions go on from the last deleted one (<base>:deleted): a pin or a version number
# given out before it never names a config saved since. While the config stays deleted that tombstone is
# its counter, kept as OAuth configs' and connectors' are. Once a save has carried the number on into
# <base>:latest, the tombstone only words the NOT_FOUND of the deleted versions' pins, so it expires with
# them (ARGV[9], the pin TTL: no pin starts on a deleted config, none is extended); any save sets that TTL
# on a tombstone that has none.
# A config naming an OAuth config (ARGV[6], its ID) is saved only while that exists, and counts one
# more use of it: an OAuth delete that checked meanwhile that nothing uses it sees the count moved
# (_DELETE_OAUTH).
# With an expected version (ARGV[8], '0' for none) the save is made only while the latest version is
# that one: the check and the write are one step, so of two saves expecting the same version one wins.
# Returns {SAVED, version}, {NO_OAUTH, 0} when the OAuth config is gone, {STALE, the latest version (0
# for none)} when the expectation no longer holds.
# KEYS: <base>:latest, <base>:v: (prefix), <base>:pinned (version → when its last pin ends, in s),
# <base>:deleted (the last version deleted), the workspace's updated hash, [its name index, when
# ARGV[7] is '1'], [the OAuth config's key and its uses count, when ARGV[6] is set: the last two].
SAVED, NO_OAUTH, STALE = 1, 0, -1
_SAVE_VERSION = (
    """
if ARGV[8] ~= '0' then
  local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
  if latest ~= tonumber(ARGV[8]) then return {-1, latest} end
end
if ARGV[6] ~= '' then
  if redis.call('EXISTS', KEYS[#KEYS - 1]) == 0 then return {0, 0} end
  redis.call('INCR', KEYS[#KEYS])
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  local deleted = redis.call('GET', KEYS[4])
  if deleted then redis.call('SET', KEYS[1], deleted) end
end
redis.call('EXPIRE', KEYS[4], ARGV[9], 'NX')
local version = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2] .. version, ARGV[1])
local out = version - tonumber(ARGV[2])
local now = tonumber(redis.call('TIME')[1])
for older = out, 1, -1 do
  if (tonumber(redis.call('ZSCORE', KEYS[3], older)) or 0) <= now then
    if redis.call('DEL', KEYS[2] .. older) == 0 then break end
    redis.call('ZREM', KEYS[3], older)
  end
end
for _, ended in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  if tonumber(ended) <= out then redis.call('DEL', KEYS[2] .. ended) end
  redis.call('ZREM', KEYS[3], ended)
end
"""
    + STAMP_UPDATED.format(key="KEYS[5]", name="ARGV[5]")
    + """
if ARGV[7] == '1' then redis.call('ZADD', KEYS[6], 0, ARGV[5]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, version}
"""
)

# Deletes a versioned config: every version still stored, the counter and the pins' end times; keeps
# the last version as <base>:deleted (the counter a new save goes on from); unstamps, unindexes and
# announces it. The pins themselves (a version number each) end with their TTL. What can still be
# stored is one run of versions down from the latest, then those in <base>:pinned (_SAVE_VERSION drops
# the rest): the work is bounded by them, not by how often the config was saved nor by the versions kept.
# With an expected version (ARGV[4], '0' for none) it deletes only while the latest version is that one.
# KEYS: as _SAVE_VERSION's. ARGV: the name, the channel, the base, expected version.
# Returns the last version, 0 for none, minus the latest version when the expectation no longer holds.
_DELETE_VERSIONS = """
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
if latest == 0 then return 0 end
if ARGV[4] ~= '0' and tonumber(ARGV[4]) ~= latest then return -latest end
for version = latest, 1, -1 do
  if redis.call('DEL', KEYS[2] .. version) == 0 then break end
end
for _, pinned in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  redis.call('DEL', KEYS[2] .. pinned)
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[4], latest)
redis.call('HDEL', KEYS[5], ARGV[1])
if KEYS[6] then redis.call('ZREM', KEYS[6], ARGV[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return latest
"""


# One round trip for a config: the version (given, the latest, or the one this campaign instance
# pinned, pinning the latest on its first call), the sealed config stored under it, the pin's
# remaining life in ms (-1 without a pin), when asked one more key of the workspace read in the
# same call (the OAuth config the last version used), and the latest version.
# A new pin holds its version past the versions kept until the pin ends (`<base>:pinned`).
# KEYS: <base>:latest, <base>:v: (prefix), [<base>:pin:<instance>, <base>:pinned], [other key].
# ARGV: version (0 = latest), pin TTL, 1 when the pin keys are given else 0.
_LOAD_VERSION = """
local version = tonumber(ARGV[1])
local other = KEYS[3 + 2 * tonumber(ARGV[3])]
local pin_ms = -1
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
if version == 0 then
  version = latest
  if version == 0 then return {0, false, false, -1, 0} end
  if ARGV[3] == '1' then
    local pinned = redis.call('SET', KEYS[3], version, 'NX', 'GET', 'EX', ARGV[2])
    if pinned then
      version = tonumber(pinned)
    else
      local ends = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[2])
      redis.call('ZADD', KEYS[4], 'GT', ends, version)
    end
    pin_ms = redis.call('PTTL', KEYS[3])
  end
elseif version > latest then
  -- No save made it; given back as written: a Lua number keeps 53 bits, and a reply integer 63.
  return {ARGV[1], false, false, -1, latest}
end
return {version, redis.call('GET', KEYS[2] .. version), other and redis.call('GET', other) or false, pin_ms, latest}
"""
OPENED_CONFIGS_KEPT = 256
# The first channel of each family, in the order lists give them.
FAMILY_CHANNELS = (common_pb2.CHANNEL_EMAIL, common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_WHATSAPP)

# An OAuth config and its token status, saved together, versioned, stamped, indexed, and the change
# announced. The version counter outlives a deletion, so a version read before it never matches a config
# saved since. With an expected version (ARGV[6], '0' for none), saved only while the config is at that
# version. Returns {SAVED, version} or {STALE, its version (0 when there is none)}.
# KEYS: the config, its status, the workspace's OAuth index and updated hash, its version counter.
# ARGV[5]: the config's ID.
_SAVE_OAUTH = (
    """
if ARGV[6] ~= '0' then
  local current = 0
  if redis.call('EXISTS', KEYS[1]) == 1 then current = tonumber(redis.call('GET', KEYS[5]) or '0') end
  if current ~= tonumber(ARGV[6]) then return {-1, current} end
end
local version = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'status', ARGV[2], 'reason', ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[5])
"""
    + STAMP_UPDATED.format(key="KEYS[4]", name="ARGV[5]")
    + """
redis.call('PUBLISH', ARGV[4], KEYS[1])
return {1, version}
"""
)

# An OAuth config, its status, its uses count, its index entry and stamp deleted (its version counter
# kept), and the change announced, unless a config naming it was saved since the caller read the count
# (ARGV[3], '' for none) and checked that none uses it: {-1} then, to check again; or unless an expected
# version is given (ARGV[4], '0' for none) and the config is at another: {-2, its version}.
# Returns {0} when there was none, {1} once deleted.
# KEYS: as _SAVE_OAUTH's (the version counter fifth), then its uses count. ARGV: the config's ID, the
# channel, the count read, the expected version.
_DELETE_OAUTH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local current = tonumber(redis.call('GET', KEYS[5]) or '0')
  if ARGV[4] ~= '0' and current ~= tonumber(ARGV[4]) then return {-2, current} end
  if (redis.call('GET', KEYS[6]) or '') ~= ARGV[3] then return {-1} end
end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[6])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if existed == 0 then return {0} end
redis.call('PUBLISH', ARGV[2], KEYS[1])
return {1}
"""

# A token request's status, written only while the config it was asked with is the one saved (its sealed
# bytes, ARGV[1], unchanged): a save or a deletion meanwhile has the last word. Returns 1 when written.
# KEYS: the config, its status. ARGV: the sealed config as read, the status, the reason.
_SET_STATUS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'status', ARGV[2], 'reason', ARGV[3])
return 1
"""
# What a token request is made with: a save changing none of them leaves the token's status standing.
_TOKEN_FIELDS = ("token_url", "client_id", "client_secret", "scope", "audience")


def masked_pii_config(config: pb.PiiApiConfig | pb.ContentApiConfig) -> pb.PiiApiConfig | pb.ContentApiConfig:
    """A copy with header values, secret query values (`libs.masked_secrets.shown_query_value`: every
    value but a template holding @anonymous_id or a plain parameter's, as `?api_key=...` may be a key),
    the URL's userinfo and the encryption key masked (PII API and content API configs)."""
    out = type(config)()
    out.CopyFrom(config)
    for name in list(out.headers):
        out.headers[name] = MASK
    for name, value in list(out.query_params.items()):
        if not shown_query_value(name, value, SINGLE_PLACEHOLDER):
            out.query_params[name] = MASK
    out.url = masked_url(out.url)
    # A secret written again into the URL's path or the body (`/v1/<key>/customers`) is masked there too.
    secrets = _secrets(config)
    out.url = masked_repeats(out.url, secrets)
    out.body = masked_repeats(out.body, secrets)
    if out.encryption_key:
        out.encryption_key = MASK
    return out


def _secrets(config: pb.PiiApiConfig | pb.ContentApiConfig) -> list[str]:
    """The values a read masks: header values (and the credentials in them, `header_secrets`), secret query
    values, the URL's."""
    fixed_queries = [v for k, v in config.query_params.items() if not shown_query_value(k, v, SINGLE_PLACEHOLDER)]
    headers = header_secrets(config.headers.values())
    return [*headers, *fixed_queries, *secret_query_values(config.url, SINGLE_PLACEHOLDER)]


def tested_config_secrets(config: pb.PiiApiConfig | pb.ContentApiConfig, tokens: Iterable[str] = ()) -> list[str]:
    """What a Test reply masks should the API quote it back (an error naming the key it refused): the
    values a read masks, the encryption key and the OAuth access tokens the call sent, in each form a
    reply may quote them."""
    return quoted_forms([*_secrets(config), config.encryption_key, *tokens])


def masked_oauth_config(config: pb.OAuthConfig) -> pb.OAuthConfig:
    out = pb.OAuthConfig()
    out.CopyFrom(config)
    if out.client_secret:
        out.client_secret = MASK
    out.token_url = masked_url(out.token_url)
    return out


def masked_url(url: str) -> str:
    """`url` with its userinfo and each secret value of its query string masked (`?api_key=********`),
    as `query_params` are; a value holding @anonymous_id is a template, shown."""
    return masked_secret_url(url, SINGLE_PLACEHOLDER)


def kept_url(new: str, previous: str, field: str) -> str:
    """`new` with the masked query values it gives back put back from `previous`, while it points at the
    saved URL's host; refused (naming `field`) otherwise, or when a mask has no saved value behind it."""
    moved = "it points at another host than the saved one" if origin(new) != origin(previous) else ""
    return restore_masked_url(new, previous, masked_url(previous), field, moved)


def keep_masked_secrets(
    new: pb.PiiApiConfig | pb.ContentApiConfig,
    previous: pb.PiiApiConfig | pb.ContentApiConfig | None,
    prefix: str = "config",
) -> None:
    """A config read back (masked) and saved or tested again keeps the secrets it had, as long as its
    requests still go where the saved one's did: a masked secret is never sent to another host. A
    mask with no saved value behind it is refused rather than sent as eight stars."""
    shown = masked_pii_config(previous) if previous is not None else None
    if shown is not None and new.url == shown.url:  # as read back, even with a secret repeated in its host
        new.url = previous.url
    moved = previous is not None and origin(new.url) != origin(previous.url)
    why = "the URL now points at another host than the saved one" if moved else ""
    # A body's secrets (a key written again into it) go only where the saved body went, as headers' do.
    if shown is not None and new.body == shown.body and not moved:
        new.body = previous.body
    restore_masked(new.headers, previous.headers if previous else {}, f"{prefix}.headers", why, any_case=True)
    restore_masked(new.query_params, previous.query_params if previous else {}, f"{prefix}.query_params", why)
    new.url = restore_masked_url(
        new.url, previous.url if previous else "", shown.url if shown else "", f"{prefix}.url", why
    )
    require(
        MASK not in new.body,
        f"{prefix}.body",
        f"holds a masked value (********), and {why}: enter it"
        if moved
        else "holds a masked value (********) the saved body does not: enter it",
    )
    if new.encryption_key == MASK:
        require(
            previous is not None and bool(previous.encryption_key),
            f"{prefix}.encryption_key",
            "is masked (********) but no saved key stands behind it: enter it",
        )
        new.encryption_key = previous.encryption_key


@dataclass(frozen=True)
class Unreadable:
    """A config's latest version that does not open with the configured keys, as a list shows it."""

    version: int


@dataclass(frozen=True)
class Unopened:
    """A config version a check of who uses an OAuth config could not open, so could not rule out: `what`
    names the config as a person reads it ("content API 'loyalty'"); `pinned` when it is not the latest but
    a version a campaign instance's pin holds, which saving the config again does not replace."""

    what: str
    version: int
    pinned: bool


def summary_of(summary: Any, config: Any) -> Any:
    """`summary` (the fields the index gives) with the version, mode and OAuth config of the latest version
    `config`, or marked unreadable (its version alone known) when it does not open."""
    summary.version = config.version
    if isinstance(config, Unreadable):
        summary.unreadable = True
    else:
        summary.mode, summary.oauth_config_id = config.mode, config.oauth_config_id
    return summary


class VersionedConfigStore:
    """Sealed configs with versions: `<base>:latest` (the counter), `<base>:v:<n>` (the last
    `versions_kept`, and older ones while an instance's pin holds them), `<base>:pin:<campaign
    instance>` (the version an instance started with), `<base>:pinned` (when each pinned
    version's last pin ends) and, after a deletion, `<base>:deleted` (the last version deleted).

    With a `ConfigCache`, reads made for a call (`cached=True`) keep what they found: which version
    is the latest or an instance's pin (until the pin expires), and each version's config. A save
    announces the base, and every process reads it again."""

    message_type: type  # each store's config message
    kind: str  # its part of the index keys (`libs.config_index`)
    indexed = True  # listed by name; PII API configs, one per channel family, are found without

    def __init__(
        self,
        redis: aioredis.Redis,
        box: SecretBox,
        versions_kept: int,
        pin_ttl_seconds: int,
        cache: ConfigCache | None = None,
        backfill: IndexBackfill | None = None,
    ) -> None:
        self._redis = redis
        self._box = box
        self._backfill = backfill or IndexBackfill(redis, [])  # lists and deletes wait for it
        self._log_unreadable = config_index.UnreadableLog()
        self._type = self.message_type
        self._versions_kept = versions_kept
        self._pin_ttl = pin_ttl_seconds
        self._cache = cache or ConfigCache.off(redis)
        self._save = redis.register_script(_SAVE_VERSION)
        self._delete = redis.register_script(_DELETE_VERSIONS)
        self._load = redis.register_script(_LOAD_VERSION)
        # Decrypted configs by their sealed bytes: a config is opened once, not on every lookup.
        self._opened: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def _keys(self, base: str, workspace_id: str) -> list[str]:
        """The keys the save and delete scripts take."""
        keys = [f"{base}:latest", f"{base}:v:", f"{base}:pinned", f"{base}:deleted"]
        keys.append(updated_key(workspace_id, self.kind))
        return keys + [index_key(workspace_id, self.kind)] if self.indexed else keys

    async def _save_at(
        self, base: str, config, workspace_id: str, name: str, what: str = "", expected_version: int = 0
    ) -> int:
        """Saves a new version; with `expected_version`, only while the latest is that one (Aborted
        naming `what` and the latest version otherwise)."""
        stored = self._type()
        stored.CopyFrom(config)
        stored.ClearField("version")
        sealed = self._box.seal(stored.SerializeToString(), base.encode())
        keys = self._keys(base, workspace_id)
        if config.oauth_config_id:
            oauth_key = OAuthConfigStore.key(workspace_id, config.oauth_config_id)
            keys += [oauth_key, OAuthConfigStore.uses_key(workspace_id, config.oauth_config_id)]
        args = [sealed, self._versions_kept, CHANNEL, base, name, config.oauth_config_id, int(self.indexed)]
        args += [expected_version, self._pin_ttl]
        outcome, version = (int(n) for n in await self._save(keys=keys, args=args))
        self._cache.forget(base)
        if outcome == STALE:
            raise stale_version(what, expected_version, version)
        if outcome == NO_OAUTH:  # deleted since the caller checked it exists
            raise FailedPrecondition(f"config.oauth_config_id: OAuth config {config.oauth_config_id!r} does not exist")
        return version

    async def _delete_at(
        self, base: str, workspace_id: str, name: str, what: str = "", expected_version: int = 0
    ) -> int:
        """Deletes every version; the last one it had, 0 when there was none. With `expected_version`,
        only while the latest is that one (Aborted naming `what` and the latest version otherwise)."""
        args = [name, CHANNEL, base, expected_version]
        version = int(await self._delete(keys=self._keys(base, workspace_id), args=args))
        if version < 0:
            raise stale_version(what, expected_version, -version)
        self._cache.forget(base)
        for opened in [key for key in self._opened if key[0] == base]:
            del self._opened[opened]
        return version

    async def _latest_configs(self, bases: list[str]) -> list[Any]:
        """The latest version of the config at each base (with its version set), None where there is none,
        `Unreadable` (logged by its key) where it does not open: a list goes on past it."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for base in bases:
                pipe.get(f"{base}:latest")
            latest = [int(v or 0) for v in await pipe.execute()]
        async with self._redis.pipeline(transaction=False) as pipe:
            for base, version in zip(bases, latest, strict=True):
                pipe.get(f"{base}:v:{version}")
            sealed = await pipe.execute()
        configs = []
        for base, version, value in zip(bases, latest, sealed, strict=True):
            config = None
            if version and value is not None:  # None too when deleted between the two reads
                try:
                    config = self._type.FromString(self._open(base, value))
                except SealedDataInvalid as exc:  # Get and use of this one still fail, naming it
                    self._log_unreadable(f"{base}:v:{version}", exc)
                    config = Unreadable(version)
                else:
                    config.version = version
            configs.append(config)
        return configs

    async def _version_using_oauth(self, base: str, oauth_config_id: str) -> tuple[int, Unopened | None]:
        """The latest version, or else the newest a campaign instance's pin still holds, that names the
        OAuth config, 0 for none; and, when none does, the newest of those that does not open (it may name
        it). Older versions no pin holds are history: they name what they named."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(f"{base}:latest")
            pipe.zrangebyscore(f"{base}:pinned", f"({int(time.time())}", "+inf")
            latest, pinned = await pipe.execute()
        latest = int(latest or 0)
        versions = sorted({latest, *(int(v) for v in pinned)} - {0}, reverse=True)
        if not versions:
            return 0, None
        sealed = await self._redis.mget([f"{base}:v:{version}" for version in versions])
        unopened = None
        for version, value in zip(versions, sealed, strict=True):
            if value is None:
                continue
            try:
                plain = self._open(base, value)
            except SealedDataInvalid:
                unopened = unopened or Unopened("", version, pinned=version != latest)
                continue
            if self._type.FromString(plain).oauth_config_id == oauth_config_id:
                return version, None
        return 0, unopened

    async def _latest_at(self, base: str) -> int:
        value = await self._redis.get(f"{base}:latest")
        return int(value) if value else 0

    async def _load_at(
        self, base: str, version: int, what: str, campaign_instance_id: str = "", *, cached: bool = False
    ):
        """The config at `version` (0 = latest, or with `campaign_instance_id` the version that instance
        pinned); NotFound naming `what` when there is none."""
        config = self._kept(base, version, campaign_instance_id) if cached else None
        if config is None:
            config, _ = await self._load_with(base, version, what, campaign_instance_id, cached=cached)
        return config

    def _kept(self, base: str, version: int, campaign_instance_id: str):
        """The config this process kept for that version, latest or pin; None when it must read Redis.
        Kept configs are shared: callers read them and never change them."""
        if version == 0:
            version = self._cache.get(base, ("version", campaign_instance_id))
            if version is MISSING:
                return None
        config = self._cache.get(base, ("config", version))
        return None if config is MISSING else config

    async def _load_with(
        self,
        base: str,
        version: int,
        what: str,
        campaign_instance_id: str = "",
        other: str = "",
        *,
        cached: bool = False,
    ):
        """`_load_at`, and the value of the key `other` (None when absent or not asked), read in the same call."""
        keys = [f"{base}:latest", f"{base}:v:"]
        pinned = version == 0 and bool(campaign_instance_id)
        if pinned:
            keys += [f"{base}:pin:{key_part(campaign_instance_id)}", f"{base}:pinned"]
        if other:
            keys.append(other)
        mark = self._cache.mark() if cached else None
        started = time.monotonic()
        found, sealed, other_value, pin_ms, latest = await self._load(
            keys=keys, args=[version, self._pin_ttl, int(pinned)]
        )
        if int(found) == 0 or int(latest) == 0:
            raise NotFound(f"no {what}")
        if sealed is None:
            if int(found) > int(latest):  # asked for a version no save has made
                raise NotFound(f"{what}: there is no version {int(found)} (the latest is {int(latest)})")
            deleted = await self._redis.get(f"{base}:deleted")
            if deleted is not None and int(found) <= int(deleted):
                # A pinned instance of a deleted config: it never moves to one saved since.
                raise NotFound(f"{what}: version {int(found)} was deleted with the config")
            raise NotFound(f"{what}: version {int(found)} is not kept any more")
        try:
            config = self._type.FromString(self._open(base, sealed))
        except SealedDataInvalid as exc:
            if int(found) == int(latest):
                raise  # the config itself: saving it again mends it, as the error mapping says
            # An older version, which a save does not mend: a pinned instance stays on it until its pin ends.
            then = "the campaign instance is pinned to it: start a new instance, which takes" if pinned else "ask for"
            raise FailedPrecondition(
                f"{what}: version {int(found)} does not open with TOKENSEND_SECRET_KEY: it was sealed under another "
                f"key (a dev-mode key of an earlier run, or a key changed without re-sealing); {then} the latest "
                f"version ({int(latest)})"
            ) from exc
        config.version = int(found)
        if mark is not None:
            if version == 0:
                # A pin ends when Redis forgets it; then the next call pins the latest version again.
                ends = started + int(pin_ms) / 1000 if pinned and int(pin_ms) >= 0 else None
                self._cache.put(base, ("version", campaign_instance_id if pinned else ""), config.version, mark, ends)
            self._cache.put(base, ("config", config.version), config, mark)
        return config, other_value

    def _open(self, base: str, sealed: bytes) -> bytes:
        key = (base, sealed)
        plain = self._opened.get(key)
        if plain is None:
            plain = self._box.open(sealed, base.encode())
            self._opened[key] = plain
            while len(self._opened) > OPENED_CONFIGS_KEPT:
                self._opened.popitem(last=False)
        else:
            self._opened.move_to_end(key)
        return plain


class NotLoaded:
    """An OAuth config not read with its PII API config: load it on its own."""


NOT_LOADED = NotLoaded()


class PiiApiConfigStore(VersionedConfigStore):
    message_type = pb.PiiApiConfig
    kind = "pii"
    indexed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._oauth_ids: dict[str, str] = {}  # per config base: the OAuth config its last version named

    @staticmethod
    def _base(workspace_id: str, channel: int) -> str:
        return workspace_key(workspace_id, "pii", channel_family(channel))

    @staticmethod
    def _what(workspace_id: str, channel: int) -> str:
        return f"PII API config for workspace {workspace_id!r}, channel family {channel_family(channel)}"

    async def save(self, config: pb.PiiApiConfig, expected_version: int = 0) -> int:
        """Saves a new version; with `expected_version`, only while the latest is that one (Aborted)."""
        base = self._base(config.workspace_id, config.channel)
        what = self._what(config.workspace_id, config.channel)
        family = channel_family(config.channel)
        return await self._save_at(base, config, config.workspace_id, family, what, expected_version)

    async def delete(self, workspace_id: str, channel: int, expected_version: int = 0) -> int:
        """Deletes the channel family's config, every version; NotFound when there is none. With
        `expected_version`, only while the latest version is that one (Aborted)."""
        base = self._base(workspace_id, channel)
        what = self._what(workspace_id, channel)
        version = await self._delete_at(base, workspace_id, channel_family(channel), what, expected_version)
        if not version:
            raise NotFound(f"no {self._what(workspace_id, channel)}")
        return version

    async def summaries(self, workspace_id: str) -> list[pb.PiiApiConfigSummary]:
        """The latest version of each channel family's config, by the family's first channel."""
        channels = list(FAMILY_CHANNELS)
        configs = await self._latest_configs([self._base(workspace_id, c) for c in channels])
        stamps = await self._redis.hmget(updated_key(workspace_id, self.kind), [channel_family(c) for c in channels])
        return [
            summary_of(pb.PiiApiConfigSummary(channel=channel, updated_at_ms=int(stamp or 0)), config)
            for channel, config, stamp in zip(channels, configs, stamps, strict=True)
            if config is not None
        ]

    async def oauth_user(self, workspace_id: str, oauth_config_id: str) -> tuple[str, Unopened | None]:
        """Which PII API config (and version) uses the OAuth config, as a person reads it, "" when none does;
        and, when none does, the first version found that does not open, so may use it."""
        unopened = None
        for channel in FAMILY_CHANNELS:
            version, found = await self._version_using_oauth(self._base(workspace_id, channel), oauth_config_id)
            what = f"the PII API config for channel family {channel_family(channel)}"
            if version:
                return f"{what} (version {version})", None
            if found and not unopened:
                unopened = replace(found, what=what)
        return "", unopened

    async def latest_version(self, workspace_id: str, channel: int) -> int:
        return await self._latest_at(self._base(workspace_id, channel))

    async def load(
        self, workspace_id: str, channel: int, version: int = 0, campaign_instance_id: str = ""
    ) -> pb.PiiApiConfig:
        what = self._what(workspace_id, channel)
        return await self._load_at(self._base(workspace_id, channel), version, what, campaign_instance_id)

    async def load_with_oauth(
        self,
        oauth_configs: OAuthConfigStore,
        workspace_id: str,
        channel: int,
        version: int = 0,
        campaign_instance_id: str = "",
    ) -> tuple[pb.PiiApiConfig, pb.OAuthConfig | None | NotLoaded]:
        """`load`, and the OAuth config it names, read in the same round trip when it is the one the
        last config loaded here named (the usual case); NOT_LOADED when it must be loaded on its own.
        Both are kept in this process until a save changes them (with a cache)."""
        base, what = self._base(workspace_id, channel), self._what(workspace_id, channel)
        kept = self._kept(base, version, campaign_instance_id)
        if kept is not None:
            if not kept.oauth_config_id:
                return kept, None
            oauth = oauth_configs.kept(workspace_id, kept.oauth_config_id)
            if oauth is not None:
                return kept, oauth
        guess = self._oauth_ids.get(base, "")
        other = OAuthConfigStore.key(workspace_id, guess) if guess else ""
        mark = self._cache.mark()
        config, sealed_oauth = await self._load_with(base, version, what, campaign_instance_id, other, cached=True)
        if not config.oauth_config_id:
            return config, None
        if len(self._oauth_ids) >= OPENED_CONFIGS_KEPT and base not in self._oauth_ids:
            self._oauth_ids.clear()
        self._oauth_ids[base] = config.oauth_config_id
        if config.oauth_config_id != guess or sealed_oauth is None:
            return config, NOT_LOADED
        return config, oauth_configs.open(workspace_id, config.oauth_config_id, sealed_oauth, mark)


class OAuthConfigStore:
    layout = Layout("oauth", "oauth", is_id)  # where configs saved before the index are found

    def __init__(
        self,
        redis: aioredis.Redis,
        box: SecretBox,
        cache: ConfigCache | None = None,
        backfill: IndexBackfill | None = None,
    ) -> None:
        self._redis = redis
        self._box = box
        self._backfill = backfill or IndexBackfill(redis, [])  # lists and deletes wait for it
        self._log_unreadable = config_index.UnreadableLog()
        self._cache = cache or ConfigCache.off(redis)
        self._save = redis.register_script(_SAVE_OAUTH)
        self._delete = redis.register_script(_DELETE_OAUTH)
        self._set_status = redis.register_script(_SET_STATUS)

    @staticmethod
    def key(workspace_id: str, oauth_config_id: str) -> str:
        return workspace_key(workspace_id, "oauth", oauth_config_id)

    @staticmethod
    def version_key(workspace_id: str, oauth_config_id: str) -> str:
        """How many times the config was saved (`_SAVE_OAUTH`); kept past a deletion."""
        return f"{OAuthConfigStore.key(workspace_id, oauth_config_id)}:version"

    @staticmethod
    def uses_key(workspace_id: str, oauth_config_id: str) -> str:
        """How many saves have named the OAuth config (`_SAVE_VERSION`): what a delete checks did not move."""
        return f"{OAuthConfigStore.key(workspace_id, oauth_config_id)}:uses"

    @staticmethod
    def _listing_keys(workspace_id: str) -> list[str]:
        return [index_key(workspace_id, "oauth"), updated_key(workspace_id, "oauth")]

    def kept(self, workspace_id: str, oauth_config_id: str) -> pb.OAuthConfig | None:
        """The config `open` kept in this process (without its token status), if any."""
        config = self._cache.get(self.key(workspace_id, oauth_config_id), "opened")
        return None if config is MISSING else config

    def open(self, workspace_id: str, oauth_config_id: str, sealed: bytes, mark: int | None = None) -> pb.OAuthConfig:
        """A sealed OAuth config read elsewhere (its token status is not part of it); kept when the read
        began at `mark` (`ConfigCache.mark`)."""
        key = self.key(workspace_id, oauth_config_id)
        config = pb.OAuthConfig.FromString(self._box.open(sealed, key.encode()))
        self._cache.put(key, "opened", config, mark)
        return config

    @staticmethod
    def _what(workspace_id: str, oauth_config_id: str) -> str:
        return f"OAuth config {oauth_config_id!r} in workspace {workspace_id!r}"

    async def save(self, config: pb.OAuthConfig, expected_version: int = 0) -> int:
        """Saves the config; its new version. With `expected_version`, only while the config is at
        that version (Aborted naming the version it is at otherwise)."""
        key = self.key(config.workspace_id, config.oauth_config_id)
        stored = pb.OAuthConfig()
        stored.CopyFrom(config)
        status, reason = stored.status, stored.status_reason
        stored.ClearField("status")
        stored.ClearField("status_reason")
        stored.ClearField("version")
        sealed = self._box.seal(stored.SerializeToString(), key.encode())
        keys = [key, f"{key}:status", *self._listing_keys(config.workspace_id)]
        keys.append(self.version_key(config.workspace_id, config.oauth_config_id))
        args = [sealed, int(status), reason, CHANNEL, config.oauth_config_id, expected_version]
        outcome, version = (int(n) for n in await self._save(keys=keys, args=args))
        if outcome == STALE:
            raise stale_version(self._what(config.workspace_id, config.oauth_config_id), expected_version, version)
        self._cache.forget(key)
        return version

    async def check_version(self, workspace_id: str, oauth_config_id: str, expected_version: int) -> None:
        """Aborted now when the config has moved past `expected_version`: before a save asks the token
        endpoint for a token it would not keep. The save's script checks again, atomically."""
        if not expected_version:
            return
        current = int(await self._redis.get(self.version_key(workspace_id, oauth_config_id)) or 0)
        if current != expected_version:
            raise stale_version(self._what(workspace_id, oauth_config_id), expected_version, current)

    async def load(self, workspace_id: str, oauth_config_id: str) -> pb.OAuthConfig:
        key = self.key(workspace_id, oauth_config_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.hgetall(f"{key}:status")
            pipe.get(self.version_key(workspace_id, oauth_config_id))
            sealed, status, version = await pipe.execute()
        if sealed is None:
            raise NotFound(f"no OAuth config {oauth_config_id!r} in workspace {workspace_id!r}")
        config = pb.OAuthConfig.FromString(self._box.open(sealed, key.encode()))
        config.version = int(version or 0)
        config.status = int(status.get(b"status", pb.TOKEN_STATUS_FAILED))
        config.status_reason = status.get(b"reason", b"").decode()
        return config

    async def uses(self, workspace_id: str, oauth_config_id: str) -> bytes:
        """The config's uses count, read before checking that no config uses it (b"" for none yet)."""
        return await self._redis.get(self.uses_key(workspace_id, oauth_config_id)) or b""

    async def delete(self, workspace_id: str, oauth_config_id: str, uses: bytes, expected_version: int = 0) -> bool:
        """Deletes the config and its status, unless a config naming it was saved since its `uses` count
        was read: False then (callers check again that it is unused). NotFound when there is none;
        with `expected_version`, Aborted when the config is at another version."""
        await self._backfill.wait()
        key = self.key(workspace_id, oauth_config_id)
        keys = [
            key,
            f"{key}:status",
            *self._listing_keys(workspace_id),
            self.version_key(workspace_id, oauth_config_id),
        ]
        keys.append(self.uses_key(workspace_id, oauth_config_id))
        outcome = [
            int(n) for n in await self._delete(keys=keys, args=[oauth_config_id, CHANNEL, uses, expected_version])
        ]
        deleted = outcome[0]
        if deleted == -2:
            raise stale_version(self._what(workspace_id, oauth_config_id), expected_version, outcome[1])
        self._cache.forget(key)
        if deleted == 0:
            raise NotFound(f"no OAuth config {oauth_config_id!r} in workspace {workspace_id!r}")
        return deleted == 1

    async def summaries(
        self, workspace_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.OAuthConfigSummary], str]:
        """One page of the workspace's OAuth configs by ID, with their token status; the next page's token.
        Each config is opened (not parsed) to tell whether it opens: one that does not is listed unreadable,
        logged by its key; one deleted since the page was read is not listed."""
        await self._backfill.wait()
        names, updated, token = await config_index.page(
            self._redis, workspace_id, "oauth", page_size, page_token, config_index.is_id
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                key = self.key(workspace_id, name)
                pipe.get(key)
                pipe.hgetall(f"{key}:status")
                pipe.get(self.version_key(workspace_id, name))
            replies = await pipe.execute()
        summaries = []
        for name, sealed, status, version in zip(names, replies[::3], replies[1::3], replies[2::3], strict=True):
            if sealed is None:  # deleted since the page was read (its version counter outlives it)
                continue
            summary = pb.OAuthConfigSummary(
                oauth_config_id=name,
                status=int(status.get(b"status", pb.TOKEN_STATUS_FAILED)),
                status_reason=status.get(b"reason", b"").decode(),
                updated_at_ms=updated[name],
                version=int(version or 0),
            )
            key = self.key(workspace_id, name)
            try:
                self._box.open(sealed, key.encode())
            except SealedDataInvalid as exc:  # the rest of the page is still listed; Get and use still fail
                self._log_unreadable(key, exc)
                summary.unreadable = True
            summaries.append(summary)
        return summaries, token

    async def set_status(
        self,
        workspace_id: str,
        oauth_config_id: str,
        status: int,
        reason: str,
        *,
        asked_with: pb.OAuthConfig | None = None,
    ) -> bool:
        """Stores the config's token status; whether it was. With `asked_with` (the config a token request
        was made with), only while the config saved asks for tokens the same way: a request still out when
        the config was deleted, or saved with other credentials (whose save stored their own status), does
        not have the last word."""
        key = self.key(workspace_id, oauth_config_id)
        if asked_with is None:
            await self._redis.hset(f"{key}:status", mapping={"status": int(status), "reason": reason})
            return True
        sealed = await self._redis.get(key)
        if sealed is None:
            return False
        try:
            saved = pb.OAuthConfig.FromString(self._box.open(sealed, key.encode()))
        except SealedDataInvalid:  # saved since under a key this process does not hold: not the one asked with
            return False
        if any(getattr(saved, name) != getattr(asked_with, name) for name in _TOKEN_FIELDS):
            return False
        return bool(await self._set_status(keys=[key, f"{key}:status"], args=[sealed, int(status), reason]))
