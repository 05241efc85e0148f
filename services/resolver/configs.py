"""Saved PII API and OAuth configs: versioned, sealed at rest, masked on read.

Every save of a PII API config is a new version; old versions are kept (bounded)
so a running campaign instance can keep the version it started with. The whole
config is sealed, so header values, keys and bodies are never in Redis in clear.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import redis.asyncio as aioredis
from tokensend.resolver.v1 import resolver_service_pb2 as pb

from libs.config_cache import CHANNEL, MISSING, ConfigCache
from libs.crypto import SecretBox
from libs.errors import NotFound, require
from libs.masked_secrets import MASK, restore_masked
from libs.netguard import origin
from libs.store import key_part, workspace_key
from services.resolver.contacts import channel_family
from services.resolver.requests import SINGLE_PLACEHOLDER

# INCR the version, store the sealed config under it, drop the version that fell out of the window
# unless a campaign instance's pin still holds it (and those whose last pin has ended since), and
# tell every process the config changed (ARGV[3]: the channel, ARGV[4]: the config's base).
# KEYS: <base>:latest, <base>:v: (prefix), <base>:pinned (version → when its last pin ends, in s).
_SAVE_VERSION = """
local version = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2] .. version, ARGV[1])
local out = version - tonumber(ARGV[2])
local now = tonumber(redis.call('TIME')[1])
if out >= 1 and (tonumber(redis.call('ZSCORE', KEYS[3], out)) or 0) <= now then
  redis.call('DEL', KEYS[2] .. out)
  redis.call('ZREM', KEYS[3], out)
end
for _, ended in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  if tonumber(ended) <= out then redis.call('DEL', KEYS[2] .. ended) end
  redis.call('ZREM', KEYS[3], ended)
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return version
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
end
return {version, redis.call('GET', KEYS[2] .. version), other and redis.call('GET', other) or false, pin_ms, latest}
"""
OPENED_CONFIGS_KEPT = 256

# An OAuth config and its token status, saved together, and the change announced.
_SAVE_OAUTH = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'status', ARGV[2], 'reason', ARGV[3])
redis.call('PUBLISH', ARGV[4], KEYS[1])
return 1
"""


# Secrets this long are masked wherever the config repeats them; a shorter header value ("1") would
# mask half the URL.
MIN_MASKED_REPEAT = 8


def masked_pii_config(config: pb.PiiApiConfig | pb.ContentApiConfig) -> pb.PiiApiConfig | pb.ContentApiConfig:
    """A copy with header values, fixed query values and the encryption key masked (PII API and content
    API configs). A query value may be an API key (`?api_key=...`); one holding @anonymous_id is a
    template, shown as it is."""
    out = type(config)()
    out.CopyFrom(config)
    for name in list(out.headers):
        out.headers[name] = MASK
    for name, value in list(out.query_params.items()):
        if not SINGLE_PLACEHOLDER.search(value):
            out.query_params[name] = MASK
    out.url = masked_url(out.url)
    # A secret written again into the URL's path or the body (`/v1/<key>/customers`) is masked there too.
    fixed_queries = [v for v in config.query_params.values() if not SINGLE_PLACEHOLDER.search(v)]
    for secret in sorted({*config.headers.values(), *fixed_queries}, key=len, reverse=True):
        if len(secret) >= MIN_MASKED_REPEAT:
            out.url = out.url.replace(secret, MASK)
            out.body = out.body.replace(secret, MASK)
    if out.encryption_key:
        out.encryption_key = MASK
    return out


def masked_oauth_config(config: pb.OAuthConfig) -> pb.OAuthConfig:
    out = pb.OAuthConfig()
    out.CopyFrom(config)
    if out.client_secret:
        out.client_secret = MASK
    out.token_url = masked_url(out.token_url)
    return out


def masked_url(url: str) -> str:
    """`url` with each fixed value of its query string masked (`?api_key=********`), as `query_params`
    are; a value holding @anonymous_id is a template, shown."""
    head, question, rest = url.partition("?")
    if not question:
        return url
    query, hash_mark, fragment = rest.partition("#")
    pairs = []
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        pairs.append(f"{name}={MASK}" if equals and value and not SINGLE_PLACEHOLDER.search(value) else pair)
    return f"{head}?{'&'.join(pairs)}{hash_mark}{fragment}"


def kept_url(new: str, previous: str) -> str:
    """The saved URL when `new` is it as read back (masked), else `new`."""
    return previous if new != previous and new == masked_url(previous) else new


def keep_masked_secrets(
    new: pb.PiiApiConfig | pb.ContentApiConfig,
    previous: pb.PiiApiConfig | pb.ContentApiConfig | None,
    prefix: str = "config",
) -> None:
    """A config read back (masked) and saved or tested again keeps the secrets it had, as long as its
    requests still go where the saved one's did: a masked secret is never sent to another host. A
    mask with no saved value behind it is refused rather than sent as eight stars."""
    shown = masked_pii_config(previous) if previous is not None else None
    if shown is not None and new.url == shown.url:
        new.url = previous.url
    moved = previous is not None and origin(new.url) != origin(previous.url)
    why = "the URL now points at another host than the saved one" if moved else ""
    # A body's secrets (a key written again into it) go only where the saved body went, as headers' do.
    if shown is not None and new.body == shown.body and not moved:
        new.body = previous.body
    restore_masked(new.headers, previous.headers if previous else {}, f"{prefix}.headers", why, any_case=True)
    restore_masked(new.query_params, previous.query_params if previous else {}, f"{prefix}.query_params", why)
    require(MASK not in new.url, f"{prefix}.url", "holds a masked value (********) the saved URL does not: enter it")
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


class VersionedConfigStore:
    """Sealed configs with versions: `<base>:latest` (the counter), `<base>:v:<n>` (the last
    `versions_kept`, and older ones while an instance's pin holds them), `<base>:pin:<campaign
    instance>` (the version an instance started with) and `<base>:pinned` (when each pinned
    version's last pin ends).

    With a `ConfigCache`, reads made for a call (`cached=True`) keep what they found: which version
    is the latest or an instance's pin (until the pin expires), and each version's config. A save
    announces the base, and every process reads it again."""

    message_type: type  # each store's config message

    def __init__(
        self,
        redis: aioredis.Redis,
        box: SecretBox,
        versions_kept: int,
        pin_ttl_seconds: int,
        cache: ConfigCache | None = None,
    ) -> None:
        self._redis = redis
        self._box = box
        self._type = self.message_type
        self._versions_kept = versions_kept
        self._pin_ttl = pin_ttl_seconds
        self._cache = cache or ConfigCache.off(redis)
        self._save = redis.register_script(_SAVE_VERSION)
        self._load = redis.register_script(_LOAD_VERSION)
        # Decrypted configs by their sealed bytes: a config is opened once, not on every lookup.
        self._opened: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    async def _save_at(self, base: str, config) -> int:
        stored = self._type()
        stored.CopyFrom(config)
        stored.ClearField("version")
        sealed = self._box.seal(stored.SerializeToString(), base.encode())
        keys = [f"{base}:latest", f"{base}:v:", f"{base}:pinned"]
        args = [sealed, self._versions_kept, CHANNEL, base]
        version = int(await self._save(keys=keys, args=args))
        self._cache.forget(base)
        return version

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
            raise NotFound(f"{what}: version {int(found)} is not kept any more")
        config = self._type.FromString(self._open(base, sealed))
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._oauth_ids: dict[str, str] = {}  # per config base: the OAuth config its last version named

    @staticmethod
    def _base(workspace_id: str, channel: int) -> str:
        return workspace_key(workspace_id, "pii", channel_family(channel))

    @staticmethod
    def _what(workspace_id: str, channel: int) -> str:
        return f"PII API config for workspace {workspace_id!r}, channel family {channel_family(channel)}"

    async def save(self, config: pb.PiiApiConfig) -> int:
        return await self._save_at(self._base(config.workspace_id, config.channel), config)

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
    def __init__(self, redis: aioredis.Redis, box: SecretBox, cache: ConfigCache | None = None) -> None:
        self._redis = redis
        self._box = box
        self._cache = cache or ConfigCache.off(redis)
        self._save = redis.register_script(_SAVE_OAUTH)

    @staticmethod
    def key(workspace_id: str, oauth_config_id: str) -> str:
        return workspace_key(workspace_id, "oauth", oauth_config_id)

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

    async def save(self, config: pb.OAuthConfig) -> None:
        key = self.key(config.workspace_id, config.oauth_config_id)
        stored = pb.OAuthConfig()
        stored.CopyFrom(config)
        status, reason = stored.status, stored.status_reason
        stored.ClearField("status")
        stored.ClearField("status_reason")
        sealed = self._box.seal(stored.SerializeToString(), key.encode())
        await self._save(keys=[key, f"{key}:status"], args=[sealed, int(status), reason, CHANNEL])
        self._cache.forget(key)

    async def load(self, workspace_id: str, oauth_config_id: str) -> pb.OAuthConfig:
        key = self.key(workspace_id, oauth_config_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.hgetall(f"{key}:status")
            sealed, status = await pipe.execute()
        if sealed is None:
            raise NotFound(f"no OAuth config {oauth_config_id!r} in workspace {workspace_id!r}")
        config = pb.OAuthConfig.FromString(self._box.open(sealed, key.encode()))
        config.status = int(status.get(b"status", pb.TOKEN_STATUS_FAILED))
        config.status_reason = status.get(b"reason", b"").decode()
        return config

    async def set_status(self, workspace_id: str, oauth_config_id: str, status: int, reason: str) -> None:
        key = self.key(workspace_id, oauth_config_id)
        await self._redis.hset(f"{key}:status", mapping={"status": int(status), "reason": reason})
