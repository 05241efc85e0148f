"""Saved provider connectors: sealed at rest, masked on read.

The dispatcher saves and sends through connectors; the receipts service reads
them for webhook secrets. Both go through this module, never through each other.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.crypto import SecretBox
from libs.errors import NotFound
from libs.store import workspace_key

MASK = "********"


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


def keep_masked_secrets(new: pb.Connector, previous: pb.Connector | None) -> None:
    """A connector read back (masked) and saved again keeps the secrets it had."""
    if previous is None:
        return
    for name, value in list(new.credentials.items()):
        if value == MASK and name in previous.credentials:
            new.credentials[name] = previous.credentials[name]
    if new.webhook_secret == MASK:
        new.webhook_secret = previous.webhook_secret
    for name, value in list(new.custom_http.headers.items()):
        if value == MASK and name in previous.custom_http.headers:
            new.custom_http.headers[name] = previous.custom_http.headers[name]


class ConnectorStore:
    def __init__(self, redis: aioredis.Redis, box: SecretBox) -> None:
        self._redis = redis
        self._box = box

    @staticmethod
    def key(workspace_id: str, connector_id: str) -> str:
        return workspace_key(workspace_id, "connector", connector_id)

    async def save(self, connector: pb.Connector) -> None:
        key = self.key(connector.workspace_id, connector.connector_id)
        await self._redis.set(key, self._box.seal(connector.SerializeToString(), key.encode()))

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
