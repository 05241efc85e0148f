"""Saved provider connectors: sealed at rest, masked on read.

The dispatcher saves and sends through connectors; the receipts service reads
them for webhook secrets. Both go through this module, never through each other.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.config_cache import CHANNEL, SET_AND_ANNOUNCE, ConfigCache
from libs.crypto import SecretBox
from libs.errors import NotFound, require
from libs.masked_secrets import MASK, restore_masked
from libs.netguard import origin
from libs.store import workspace_key


def masked_connector(connector: pb.Connector) -> pb.Connector:
    out = pb.Connector()
    out.CopyFrom(connector)
    for name in list(out.credentials):
        out.credentials[name] = MASK
    if out.webhook_secret:
        out.webhook_secret = MASK
    for name in list(out.custom_http.headers):
        out.custom_http.headers[name] = MASK
    return out


def _destinations(connector: pb.Connector) -> tuple:
    return origin(connector.base_url), origin(connector.custom_http.url)


def keep_masked_secrets(new: pb.Connector, previous: pb.Connector | None) -> None:
    """A connector read back (masked) and saved again keeps the secrets it had, as long as its requests
    still go where the saved one's did: a provider key is never sent to another host. A mask with no
    saved value behind it is refused rather than sent as eight stars."""
    moved = previous is not None and _destinations(new) != _destinations(previous)
    why = "the connector now sends to another host than the saved one" if moved else ""
    restore_masked(new.credentials, previous.credentials if previous else {}, "connector.credentials", why)
    saved_headers = previous.custom_http.headers if previous else {}
    restore_masked(new.custom_http.headers, saved_headers, "connector.custom_http.headers", why)
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

    def __init__(self, redis: aioredis.Redis, box: SecretBox, cache: ConfigCache | None = None) -> None:
        self._redis = redis
        self._box = box
        self._cache = cache or ConfigCache.off(redis)
        self._save = redis.register_script(SET_AND_ANNOUNCE)

    @staticmethod
    def key(workspace_id: str, connector_id: str) -> str:
        return workspace_key(workspace_id, "connector", connector_id)

    async def save(self, connector: pb.Connector) -> None:
        key = self.key(connector.workspace_id, connector.connector_id)
        await self._save(keys=[key], args=[self._box.seal(connector.SerializeToString(), key.encode()), CHANNEL])
        self._cache.forget(key)

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
        sealed = await self._redis.get(key)
        if sealed is None:
            return None
        return pb.Connector.FromString(self._box.open(sealed, key.encode()))

    async def load(self, workspace_id: str, connector_id: str) -> pb.Connector:
        connector = await self.find(workspace_id, connector_id)
        if connector is None:
            raise NotFound(f"no connector {connector_id!r} in workspace {workspace_id!r}")
        return connector
