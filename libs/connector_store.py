"""Saved provider connectors: sealed at rest, masked on read.

The dispatcher saves and sends through connectors; the receipts service reads
them for webhook secrets. Both go through this module, never through each other.
"""

from __future__ import annotations

import hashlib
import re

import redis.asyncio as aioredis
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs import config_index
from libs.config_cache import CHANNEL, ConfigCache
from libs.crypto import SealedDataInvalid, SecretBox
from libs.errors import NotFound, require
from libs.masked_secrets import (
    MASK,
    masked_repeats,
    masked_url,
    restore_masked,
    restore_masked_url,
    secret_query_values,
)
from libs.netguard import origin
from libs.store import workspace_key

# What a CUSTOM_HTTP template fills in (services.dispatcher.connectors.custom_http renders with it): a
# query value holding one is a template, shown on read; `@credentials.<name>` names a secret, never holds one.
TEMPLATE_PLACEHOLDER = re.compile(r"@credentials\.([A-Za-z_][A-Za-z0-9_]*)|@(message_id|sender|text|to_digits|to)\b")


def masked_connector(connector: pb.Connector) -> pb.Connector:
    """A copy with credentials, the webhook secret, custom-HTTP header values, the template URL's secret
    query values and userinfo (`libs.masked_secrets.masked_url`) masked, and any of those secrets written
    again into the template's URL or body."""
    out = pb.Connector()
    out.CopyFrom(connector)
    for name in list(out.credentials):
        out.credentials[name] = MASK
    if out.webhook_secret:
        out.webhook_secret = MASK
    out.base_url = masked_url(out.base_url, TEMPLATE_PLACEHOLDER)
    if out.HasField("custom_http"):  # set on any other kind, the template would refuse its save back
        template = out.custom_http
        for name in list(template.headers):
            template.headers[name] = MASK
        secrets = [
            *connector.credentials.values(),
            *connector.custom_http.headers.values(),
            *secret_query_values(connector.custom_http.url, TEMPLATE_PLACEHOLDER),
        ]
        template.url = masked_repeats(masked_url(template.url, TEMPLATE_PLACEHOLDER), secrets)
        template.body = masked_repeats(template.body, secrets)
    return out


def _destinations(connector: pb.Connector) -> tuple:
    return origin(connector.base_url), origin(connector.custom_http.url)


def keep_masked_secrets(new: pb.Connector, previous: pb.Connector | None) -> None:
    """A connector read back (masked) and saved again keeps the secrets it had, as long as its requests
    still go where the saved one's did: a provider key is never sent to another host. A mask with no
    saved value behind it is refused rather than sent as eight stars."""
    shown = masked_connector(previous) if previous is not None else pb.Connector()
    if previous is not None and new.HasField("custom_http") and new.custom_http.url == shown.custom_http.url:
        new.custom_http.url = previous.custom_http.url  # as read back, even with a secret repeated in its host
    moved = previous is not None and _destinations(new) != _destinations(previous)
    why = "the connector now sends to another host than the saved one" if moved else ""
    restore_masked(new.credentials, previous.credentials if previous else {}, "connector.credentials", why)
    saved = previous.custom_http if previous else pb.CustomHttpTemplate()
    restore_masked(new.custom_http.headers, saved.headers, "connector.custom_http.headers", why)
    if new.HasField("custom_http"):
        template = new.custom_http
        template.url = restore_masked_url(
            template.url, saved.url, shown.custom_http.url, "connector.custom_http.url", why
        )
        # A body's secrets (a key written into it) go only where the saved body went, as headers' do.
        if previous is not None and template.body == shown.custom_http.body and not moved:
            template.body = saved.body
        require(
            MASK not in template.body,
            "connector.custom_http.body",
            f"holds a masked value (********), and {why}: enter it"
            if moved
            else "holds a masked value (********) the saved body does not: enter it",
        )
    require(MASK not in new.base_url, "connector.base_url", "holds a masked value (********): enter it")
    if new.webhook_secret == MASK:  # checks receipts, is sent nowhere
        # Each kind's secret is another thing (SendGrid's public key, WhatsApp's app secret): none carries over.
        require(
            previous is not None and bool(previous.webhook_secret) and previous.kind == new.kind,
            "connector.webhook_secret",
            "is masked (********) but no saved secret of this kind of connector stands behind it: enter it",
        )
        new.webhook_secret = previous.webhook_secret


class ConnectorStore:
    """With a `ConfigCache`, `load_for_call` keeps what it read until a save announces a change."""

    layout = config_index.Layout("connector", "connector", config_index.is_id)  # where unindexed ones are found

    def __init__(
        self,
        redis: aioredis.Redis,
        box: SecretBox,
        cache: ConfigCache | None = None,
        backfill: config_index.IndexBackfill | None = None,
    ) -> None:
        self._redis = redis
        self._box = box
        self._cache = cache or ConfigCache.off(redis)
        self._backfill = backfill or config_index.IndexBackfill(redis, [])  # lists and deletes wait for it
        self._save = redis.register_script(_SAVE_CONNECTOR)
        self._delete = redis.register_script(_DELETE_CONNECTOR)
        self._log_unreadable = config_index.UnreadableLog()

    @staticmethod
    def key(workspace_id: str, connector_id: str) -> str:
        return workspace_key(workspace_id, "connector", connector_id)

    @staticmethod
    def version_key(workspace_id: str, connector_id: str) -> str:
        """How many times the connector was saved (`_SAVE_CONNECTOR`); kept past a deletion."""
        return f"{ConnectorStore.key(workspace_id, connector_id)}:version"

    def _keys(self, workspace_id: str, connector_id: str) -> list[str]:
        """The keys the save and delete scripts take."""
        key = self.key(workspace_id, connector_id)
        return [key, *_listing_keys(workspace_id), self.version_key(workspace_id, connector_id)]

    async def save(self, connector: pb.Connector, expected_version: int = 0) -> int:
        """Saves the connector; its new version. With `expected_version`, only while the connector is at
        that version (Aborted naming the version it is at otherwise)."""
        key = self.key(connector.workspace_id, connector.connector_id)
        stored = pb.Connector()
        stored.CopyFrom(connector)
        stored.ClearField("version")
        sealed = self._box.seal(stored.SerializeToString(), key.encode())
        keys = self._keys(connector.workspace_id, connector.connector_id)
        args = [sealed, CHANNEL, connector.connector_id, expected_version]
        outcome, version = (int(n) for n in await self._save(keys=keys, args=args))
        if outcome < 0:
            raise config_index.stale_version(
                _what(connector.workspace_id, connector.connector_id), expected_version, version
            )
        self._cache.forget(key)
        return version

    async def find_for_call(self, workspace_id: str, connector_id: str) -> pb.Connector | None:
        """`find`, through what this process kept (`load_for_call`)."""
        try:
            connector, _ = await self.load_for_call(workspace_id, connector_id)
        except NotFound:
            return None
        return connector

    async def load_for_call(self, workspace_id: str, connector_id: str) -> tuple[pb.Connector, str]:
        """`load` for sending, and the connector's fingerprint (a digest of its saved form, which names
        its client); what this process read before while no save changed it. Callers must not change
        the connector they get."""

        async def read() -> tuple[pb.Connector, str]:
            connector = await self.load(workspace_id, connector_id)
            return connector, hashlib.sha256(connector.SerializeToString(deterministic=True)).hexdigest()

        return await self._cache.read_through(self.key(workspace_id, connector_id), "connector", read)

    async def find(self, workspace_id: str, connector_id: str) -> pb.Connector | None:
        key = self.key(workspace_id, connector_id)
        sealed, version = await self._redis.mget([key, self.version_key(workspace_id, connector_id)])
        if sealed is None:
            return None
        connector = pb.Connector.FromString(self._box.open(sealed, key.encode()))
        connector.version = int(version or 0)
        return connector

    async def load(self, workspace_id: str, connector_id: str) -> pb.Connector:
        connector = await self.find(workspace_id, connector_id)
        if connector is None:
            raise NotFound(f"no connector {connector_id!r} in workspace {workspace_id!r}")
        return connector

    async def delete(self, workspace_id: str, connector_id: str, expected_version: int = 0) -> None:
        """Deletes the connector and its sealed secrets; NotFound when there is none. With
        `expected_version`, Aborted when the connector is at another version."""
        await self._backfill.wait()
        key = self.key(workspace_id, connector_id)
        keys = self._keys(workspace_id, connector_id)
        outcome = [int(n) for n in await self._delete(keys=keys, args=[CHANNEL, connector_id, expected_version])]
        if outcome[0] < 0:
            raise config_index.stale_version(_what(workspace_id, connector_id), expected_version, outcome[1])
        self._cache.forget(key)
        if not outcome[0]:
            raise NotFound(f"no connector {connector_id!r} in workspace {workspace_id!r}")

    async def summaries(
        self, workspace_id: str, page_size: int, page_token: str
    ) -> tuple[list[pb.ConnectorSummary], str]:
        """One page of the workspace's connectors by ID (kind and channel, no secret); the next page's token."""
        await self._backfill.wait()
        names, updated, token = await config_index.page(
            self._redis, workspace_id, CONNECTOR_KIND, page_size, page_token, config_index.is_id
        )
        keys = [key for name in names for key in (self.key(workspace_id, name), self.version_key(workspace_id, name))]
        values = await self._redis.mget(keys) if names else []
        summaries = []
        for name, value, version in zip(names, values[::2], values[1::2], strict=True):
            if value is None:  # deleted since the page was read
                continue
            summary = pb.ConnectorSummary(connector_id=name, updated_at_ms=updated[name], version=int(version or 0))
            key = self.key(workspace_id, name)
            try:
                connector = pb.Connector.FromString(self._box.open(value, key.encode()))
            except SealedDataInvalid as exc:  # the rest of the page is still listed; Get and sends still fail
                self._log_unreadable(key, exc)
                summary.unreadable = True
            else:
                summary.kind, summary.channel = connector.kind, connector.channel
            summaries.append(summary)
        return summaries, token


CONNECTOR_KIND = ConnectorStore.layout.kind  # the connectors' part of the index keys


def _what(workspace_id: str, connector_id: str) -> str:
    return f"connector {connector_id!r} in workspace {workspace_id!r}"


def _listing_keys(workspace_id: str) -> list[str]:
    index = config_index.index_key(workspace_id, CONNECTOR_KIND)
    return [index, config_index.updated_key(workspace_id, CONNECTOR_KIND)]


# The sealed connector saved, versioned, indexed and stamped for ListConnectors, and the change announced
# (in the same call, so a failed save announces nothing). The version counter outlives a deletion, so a version
# read before it never matches a connector saved since. With an expected version (ARGV[4], '0' for none),
# saved only while the connector is at that version: the check and the write are one step.
# KEYS: the connector, the index, the updated hash, the version counter. ARGV: sealed, channel, connector
# ID, expected version. Returns {1, the new version} or {-1, its version (0 when there is none)}.
_SAVE_CONNECTOR = (
    """
if ARGV[4] ~= '0' then
  local current = 0
  if redis.call('EXISTS', KEYS[1]) == 1 then current = tonumber(redis.call('GET', KEYS[4]) or '0') end
  if current ~= tonumber(ARGV[4]) then return {-1, current} end
end
local version = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
"""
    + config_index.STAMP_UPDATED.format(key="KEYS[3]", name="ARGV[3]")
    + """
redis.call('PUBLISH', ARGV[2], KEYS[1])
return {1, version}
"""
)

# The connector, its index entry and stamp deleted (its version counter kept), and the change announced;
# {0} when there was none, {-1, its version} when an expected version is given (ARGV[3], '0' for none)
# and the connector is at another. KEYS: as _SAVE_CONNECTOR's. ARGV: channel, connector ID, expected version.
_DELETE_CONNECTOR = """
if ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[1]) == 1 then
  local current = tonumber(redis.call('GET', KEYS[4]) or '0')
  if current ~= tonumber(ARGV[3]) then return {-1, current} end
end
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
if existed == 0 then return {0} end
redis.call('PUBLISH', ARGV[1], KEYS[1])
return {1}
"""
