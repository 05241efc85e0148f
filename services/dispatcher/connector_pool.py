"""Connector clients, built once per saved connector and reused across calls."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import aiohttp
from tokensend.dispatcher.v1 import dispatcher_service_pb2 as pb

from libs.connector_store import ConnectorStore
from libs.errors import NotFound
from libs.settings import DispatcherSettings
from services.dispatcher.connectors import RetryPolicy, build_connector
from services.dispatcher.connectors.base import Connector, OutboundMessage, SendOutcome
from services.dispatcher.connectors.message_client import MessageClient

MAX_CLIENTS = 256


class PooledClient:
    """A connector client as the pool lends it. Evicted, it is closed once no send of it is under way,
    never under one: the pool is shared by every workspace, so one brand's many connectors must not
    close the SES or SMTP client another brand's campaign is sending through. A call that still holds
    it afterwards (a stream outliving its place in the pool) gets a client built anew for its next
    send, closed in turn once idle."""

    def __init__(self, build: Callable[[], Connector], owner: tuple[str, str] = ("", "")) -> None:
        self._build = build
        self.owner = owner  # (workspace, connector ID): what a deletion forgets
        self._client: Connector | None = build()
        self.provider = self._client.provider
        self.max_batch = self._client.max_batch
        self._sending = 0
        self._evicted = False

    async def send(self, messages: list[OutboundMessage]) -> list[SendOutcome]:
        client = self._client
        if client is None:
            client = self._client = self._build()
        self._sending += 1
        try:
            return await client.send(messages)
        finally:
            self._sending -= 1
            if self._evicted and not self._sending:
                await self.close()

    async def evict(self) -> None:
        self._evicted = True
        if not self._sending:
            await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class ConnectorPool:
    def __init__(
        self,
        store: ConnectorStore,
        http: aiohttp.ClientSession,
        settings: DispatcherSettings,
        message_http: MessageClient | None = None,
    ) -> None:
        self._store = store
        self._http = http
        self._message_http = message_http
        self._settings = settings
        self._retry = RetryPolicy(
            max_retries=settings.provider_max_retries,
            base_seconds=settings.provider_retry_base_ms / 1000,
            cap_seconds=settings.provider_retry_max_ms / 1000,
            max_retry_after_seconds=settings.provider_max_retry_after_seconds,
            connect_timeout_seconds=settings.provider_connect_timeout_seconds,
            read_timeout_seconds=settings.provider_read_timeout_seconds,
        )
        # Keyed by the saved bytes, so an edited connector gets a fresh client.
        self._clients: OrderedDict[str, PooledClient] = OrderedDict()

    async def get(self, workspace_id: str, connector_id: str) -> tuple[pb.Connector, PooledClient]:
        try:
            config, fingerprint = await self._store.load_for_call(workspace_id, connector_id)
        except NotFound:
            # Deleted, perhaps by another process: the client this one kept for it goes too.
            await self.forget(workspace_id, connector_id)
            raise
        client = self._clients.get(fingerprint)
        if client is None:
            client = PooledClient(
                lambda: build_connector(
                    config,
                    http=self._http,
                    message_http=self._message_http,
                    public_webhook_url=self._settings.public_webhook_url,
                    retry=self._retry,
                    allow_private=self._settings.allow_private_networks,
                ),
                (workspace_id, connector_id),
            )
            self._clients[fingerprint] = client
            while len(self._clients) > MAX_CLIENTS:
                _, evicted = self._clients.popitem(last=False)
                await evicted.evict()
        else:
            self._clients.move_to_end(fingerprint)
        return config, client

    async def forget(self, workspace_id: str, connector_id: str) -> None:
        """Drops the clients of a deleted connector, each closed once no send of it is under way."""
        owner = (workspace_id, connector_id)
        for fingerprint in [f for f, client in self._clients.items() if client.owner == owner]:
            await self._clients.pop(fingerprint).evict()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
